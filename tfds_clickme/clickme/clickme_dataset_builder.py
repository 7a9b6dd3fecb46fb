"""ClickMe: human feature-importance maps for ImageNet images, as a TFDS dataset."""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import BinaryIO, Callable, Iterator

import requests
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from google.protobuf import message as protobuf_message

from harmonization import mirrors, network
from harmonization._io import sha256_file
from harmonization.tfrecord_framing import first_record_problem, masked_crc32c, usable_cached_shard
from tfds_clickme.clickme import published_shards

#: A shard's path under the ClickMe base URL (the bucket's, or HARMONIZATION_CLICKME_URL's); `{folder}` is
#: `train` or `val`, as in serre-lab/Harmonization 0.0.9 `load_clickme_train` / `load_clickme_val`.
SHARD_PATH_TEMPLATE = "{folder}/{folder}-{index}.tfrecords"
# The published loader lists range(318) and range(17), but its own tests fetch `train-318` and
# `val-17` (the smallest shard, 256 records). Our guess: shards 0..318 and 0..17 exist, the loader
# misses one. Unverified, so the download probes both ends (0 and 1, 317 and 318; 0 and 1, 16 and
# 17) and fetches the shards that exist: 0..317, 0..318 and 1..318 all work.
PUBLISHED_TRAIN_SHARDS = tuple(range(319))
PUBLISHED_VALIDATION_SHARDS = tuple(range(18))

#: TFDS split name -> the folder and file prefix of its published shards.
SPLIT_FOLDERS = {"train": "train", "validation": "val"}

#: At most this many skipped records are listed (with their reason) in `info.metadata`.
_MAX_LISTED_SKIPS = 100

#: Before downloading, the edge shards of each split are probed with HTTP HEAD requests (whether
#: the numbering starts at 0 or 1 and ends at 317 or 318, and whether the server answers at all),
#: with the timeout and the attempts of every other request (`harmonization.network`).
#: HTTP statuses that mean "this shard is not on the server" (a bucket without list permission
#: answers 403 for a missing object).
_ABSENT_STATUSES = (403, 404, 410)


class ClickMeRecordError(ValueError):
    """A record that does not parse, decode or validate; the message names its shard and index."""


class ClickMeDownloadError(ConnectionError):
    """The shard server cannot be reached or does not answer; raised before anything is downloaded."""


class _InvalidRecord(Exception):
    """Internal: why one record is invalid (wrapped into a `ClickMeRecordError`)."""


class _BadFrame(Exception):
    """Internal: a record whose TFRecord framing is broken; `next_offset` is None when reading must stop."""

    def __init__(self, reason: str, next_offset: int | None):
        super().__init__(reason)
        self.next_offset = next_offset


@dataclasses.dataclass
class ClickMeConfig(tfds.core.BuilderConfig):
    """Where the shards come from and what to do with bad records.

    Attributes:
        url_template: str or None. URL of one shard, with `{folder}` (`train` or `val`) and `{index}`.
            None (the default): under `HARMONIZATION_CLICKME_URL` when set (a mirror laid out as the
            bucket), else the published bucket, read when the download starts.
        train_shards: tuple of int. Indices of the `train-{index}` shards to download.
        validation_shards: tuple of int. Indices of the `val-{index}` shards to download.
        skip_bad_records: bool. Skip records that do not parse, decode or validate, and count
            them in `info.metadata["skipped_records"]`, instead of failing the build. A record
            whose TFRecord framing is broken (bad data CRC) is skipped alone; a bad length field or
            a truncated file ends the shard there (counted as one bad record).
        edges_may_be_missing: bool. The first and the last index of each split may be absent from
            the server (the published numbering is uncertain at both ends, see
            `PUBLISHED_TRAIN_SHARDS`): they are probed before the download and left out if the
            server does not have them. Their inner neighbours, probed too, and every other shard
            must exist. False: every listed shard must exist.
    """

    url_template: str | None = None
    train_shards: tuple[int, ...] = PUBLISHED_TRAIN_SHARDS
    validation_shards: tuple[int, ...] = PUBLISHED_VALIDATION_SHARDS
    skip_bad_records: bool = False
    edges_may_be_missing: bool = True

    def shard_urls(self) -> dict[str, dict[str, str]]:
        """{split: {shard name: url}} for the automatic download."""
        indices = {"train": self.train_shards, "validation": self.validation_shards}
        template = self.url_template or f"{mirrors.clickme_url()}/{SHARD_PATH_TEMPLATE}"
        return {
            split: {
                f"{folder}-{index}": template.format(folder=folder, index=index)
                for index in indices[split]
            }
            for split, folder in SPLIT_FOLDERS.items()
        }


def imagenet_label_names_file() -> epath.Path:
    """The ImageNet-1k class names (WordNet ids, in class-index order) shipped with TFDS."""
    return tfds.core.tfds_path("datasets/imagenet2012/labels.txt")


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for ClickMe (Linsley et al., ICLR 2019)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: the published train/val shards, original JPEG bytes, stable ids.",
    }
    BUILDER_CONFIGS = [
        ClickMeConfig(
            name="strict",
            description="Any record that does not parse, decode or validate fails the build.",
        ),
        ClickMeConfig(
            name="skip_bad_records",
            skip_bad_records=True,
            description="Bad records are skipped and counted in info.metadata['skipped_records'].",
        ),
    ]
    #: Split names, known before anything is downloaded (harmonization.data checks against them).
    SPLIT_NAMES = tuple(SPLIT_FOLDERS)

    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Optional: without a manual directory, ClickMe downloads the published shards by itself.
    To build from shards you already hold (a mirror, an offline machine), put the published
    TFRecord shards in `manual_dir` (by default ~/tensorflow_datasets/downloads/manual/):

        <manual_dir>/train-0.tfrecords ... train-318.tfrecords   or  <manual_dir>/train/train-*.tfrecords
        <manual_dir>/val-0.tfrecords ... val-17.tfrecords         or  <manual_dir>/val/val-*.tfrecords

    Every `train-*.tfrecords` file found becomes the `train` split and every `val-*.tfrecords`
    file the `validation` split, whatever their number. To download from a mirror laid out as the
    bucket instead, set HARMONIZATION_CLICKME_URL. The shards are public, e.g.:

        BASE=https://storage.googleapis.com/serrelab/prj_harmonization/dataset/click-me
        for i in $(seq 0 318); do curl -fO $BASE/train/train-$i.tfrecords; done
        for i in $(seq 0 17); do curl -fO $BASE/val/val-$i.tfrecords; done

    (The published numbering is uncertain at its ends: a 404 for train-0 or train-318, val-0 or
    val-17 is expected.)

    Then: tfds.load("clickme", download_and_prepare_kwargs={"download_config":
    tfds.download.DownloadConfig(manual_dir="<manual_dir>")}).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=published_shards.IMAGE_SHAPE, encoding_format="jpeg"
                    ),
                    "heatmap": tfds.features.Image(
                        shape=published_shards.HEATMAP_SHAPE, encoding_format="jpeg"
                    ),
                    "label": tfds.features.ClassLabel(names_file=imagenet_label_names_file()),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://serre-lab.github.io/Harmonization/",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Returns a generator per split, from the manual directory if it holds shards."""
        shards = self._manual_shards(dl_manager)
        if shards is None:
            shards = self._downloaded_shards(dl_manager)
        self.info.metadata["skipped_records"] = {}
        # No digests of the published shards are registered yet (checksums.tsv is empty): record
        # what was built from, so that two builds can be compared and digests registered later.
        self.info.metadata["shard_sha256"] = {}
        return {split: self._generate_examples(split, split_shards) for split, split_shards in shards.items()}

    def _manual_shards(self, dl_manager) -> dict[str, list[tuple[str, epath.Path]]] | None:
        """{split: [(shard name, path)]} found in the manual directory, or None to download.

        A manual directory the user named must hold shards: an empty or missing one is an error,
        not a silent download of the 337 published shards. TFDS's default one may be empty.
        """
        given = _given_manual_dir(dl_manager)
        expected = " and ".join(f"{folder}-*.tfrecords" for folder in SPLIT_FOLDERS.values())
        try:
            manual_dir = epath.Path(dl_manager.manual_dir)
        except AssertionError:  # No manual directory, or a missing or empty one.
            if given is None:
                return None
            state = "is empty" if given.is_dir() else "does not exist"
            raise FileNotFoundError(
                f"The ClickMe manual directory {given} (`manual_dir`) {state}: it should hold the "
                f"published shards, files matching {expected} (e.g. train-0.tfrecords, val-0.tfrecords; "
                "or the same names under train/ and val/). To download the published shards instead, "
                f"do not pass `manual_dir`.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            ) from None
        found = {split: _find_shards(manual_dir, folder) for split, folder in SPLIT_FOLDERS.items()}
        if not any(found.values()):
            if given is not None:  # The user pointed us there: say what is missing.
                present = sorted(p.name for p in manual_dir.iterdir())[:10]
                patterns = [f"{manual_dir / f'{folder}-*.tfrecords'}" for folder in SPLIT_FOLDERS.values()]
                raise FileNotFoundError(
                    f"No ClickMe shards in the manual directory {manual_dir}: expected files matching "
                    f"{patterns} (or the same names under train/ and val/); found {present}.\n"
                    f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
                )
            logging.info("No ClickMe shards in %s; downloading the published shards.", manual_dir)
            return None
        for split, split_shards in found.items():
            if not split_shards:
                logging.warning(
                    "No %s-*.tfrecords shards in %s: the %r split will be missing from the dataset.",
                    SPLIT_FOLDERS[split], manual_dir, split,
                )
        return {split: split_shards for split, split_shards in found.items() if split_shards}

    def _downloaded_shards(self, dl_manager) -> dict[str, list[tuple[str, epath.Path]]]:
        """Downloads the shards that the server has; {split: [(shard name, path)]}.

        The edges of each split are probed first (`_probe_edges`): an unreachable server fails here,
        within about a minute and with the manual-directory instructions, before anything is
        downloaded. The shards are then fetched with bounded waits (`_download_shards`).
        """
        config = self.builder_config
        urls = _probe_edges(config.shard_urls(), config.edges_may_be_missing, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        flat = {name: url for split_urls in urls.values() for name, url in split_urls.items()}
        registered = self.url_infos or {}
        unverified = [name for name, url in flat.items() if url not in registered]
        if unverified:
            logging.warning(
                "No known digests are registered for %d of the %d ClickMe shards (e.g. %s): they are "
                "downloaded without verifying their checksums. Their sha256 are recorded in "
                "info.metadata['shard_sha256'].",
                len(unverified), len(flat), unverified[0],
            )
        paths = _download_shards(flat, epath.Path(dl_manager.download_dir) / _DOWNLOAD_FOLDER,
                                 self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        return {
            split: [(name, paths[name]) for name in split_urls]
            for split, split_urls in urls.items()
            if split_urls
        }

    def _generate_examples(self, split: str, shards: list[tuple[str, epath.Path]]):
        """Yields examples."""
        skip_bad = self.builder_config.skip_bad_records
        skipped: list[dict] = []
        count = 0
        for shard_name, path in shards:
            self.info.metadata["shard_sha256"][shard_name] = sha256_file(path)
            for index, record, read_error in _read_records(path):
                try:
                    if read_error is not None:
                        raise _InvalidRecord(read_error)
                    example = _decode_record(record)
                except _InvalidRecord as reason:
                    where = f"{shard_name}.tfrecords, record {index}"
                    if not skip_bad:
                        raise ClickMeRecordError(
                            f"Bad ClickMe record in split {split!r}: {where}: {reason}. Nothing was "
                            "written as a complete dataset. To skip bad records and count them, build "
                            "the 'clickme/skip_bad_records' config."
                        ) from None
                    skipped.append({"shard": shard_name, "record": index, "reason": str(reason)})
                    logging.warning("Skipping bad ClickMe record %s: %s", where, reason)
                    continue
                key = f"{shard_name}_{index:05d}"
                example["id"] = key
                count += 1
                yield key, example
        self.info.metadata["skipped_records"][split] = {
            "count": len(skipped),
            "first": skipped[:_MAX_LISTED_SKIPS],
        }
        if skipped:
            logging.warning(
                "ClickMe %r: skipped %d bad records, kept %d (see info.metadata['skipped_records']).",
                split, len(skipped), count,
            )


#: Sub-folder of TFDS's download directory where the shards are kept (a file there is complete:
#: downloads are written to `<name>.incomplete` and renamed when whole).
_DOWNLOAD_FOLDER = "clickme_shards"
#: Shards downloaded at once.
DOWNLOAD_THREADS = 8


def _download_shards(urls: dict[str, str], directory: epath.Path, instructions: str) -> dict[str, epath.Path]:
    """{shard name: local path} of `urls`, downloaded into `directory` (complete files are reused).

    Not through TFDS's download manager: its HTTP client has no timeout, so a server that stalls
    mid-file would hang the build forever. `harmonization.hub.download_file` waits at most
    `harmonization.network.timeout()` per read, cuts off a body slower than `network.min_rate()`,
    tries `network.attempts()` times, and keeps a file only when complete and framed as a TFRecord
    file (`first_record_problem`: a mirror answering web pages must not leave them as shards). A kept
    shard that fails that check is downloaded again. The first failure stops the download and names
    the shard.
    """
    import concurrent.futures

    from huggingface_hub.utils import tqdm

    from harmonization.hub import download_file

    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / f"{name}.tfrecords" for name in urls}
    todo = [name for name in urls if not usable_cached_shard(paths[name])]

    def fetch(name: str) -> None:
        url = urls[name]
        if url.startswith(("http://", "https://", "file://")):
            download_file(url, paths[name], progress=False, check=first_record_problem)
        else:  # gs://, or a path TensorFlow's file systems read: copied, checked, then renamed when complete.
            partial = paths[name].parent / f"{name}.tfrecords.incomplete"
            tf.io.gfile.copy(url, str(partial), overwrite=True)
            problem = first_record_problem(partial)
            if problem is not None:
                partial.unlink()
                raise OSError(f"{url} is not a ClickMe TFRecord shard ({problem}) and was not kept")
            partial.rename(paths[name])

    with tqdm(total=len(urls), initial=len(urls) - len(todo), unit="shard", desc="Downloading ClickMe") as bar, \
            concurrent.futures.ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS) as pool:
        futures = {pool.submit(fetch, name): name for name in todo}
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
                bar.update(1)
        except (OSError, tf.errors.OpError) as error:
            pool.shutdown(wait=True, cancel_futures=True)
            name = futures[future]
            raise tfds.download.DownloadError(
                f"ClickMe shard {name} could not be downloaded from {urls[name]}: {error}\nNothing incomplete "
                "was kept; run again to resume with the shards still missing. If the published shard list "
                f"changed, download the shards you can reach and build from them instead:\n{instructions}"
            ) from error
    return paths


def _given_manual_dir(dl_manager) -> epath.Path | None:
    """The manual directory the user named, or None when it is TFDS's default (`<download_dir>/manual`)."""
    # TFDS keeps the configured directory only privately: its `manual_dir` property raises for a
    # missing or empty one. Without the attribute (another TFDS), fall back to downloading.
    manual_dir = getattr(dl_manager, "_manual_dir", None)
    if manual_dir is None:
        return None
    manual_dir = epath.Path(manual_dir)
    return None if manual_dir == epath.Path(dl_manager.download_dir) / "manual" else manual_dir


def _find_shards(manual_dir: epath.Path, folder: str) -> list[tuple[str, epath.Path]]:
    """[(shard name, path)] of `{folder}-*.tfrecords` in `manual_dir` or `manual_dir/folder`."""
    found: dict[str, epath.Path] = {}
    for directory in (manual_dir, manual_dir / folder):
        if not directory.is_dir():
            continue
        for path in directory.glob(f"{folder}-*.tfrecords"):
            name = path.name[: -len(".tfrecords")]
            if name in found:
                raise ValueError(f"Shard {path.name} is in the manual directory twice: {found[name]} and {path}.")
            found[name] = path
    return sorted(found.items(), key=lambda item: published_shards.shard_sort_key(item[1].name))


def _probe_edges(
    urls: dict[str, dict[str, str]], edges_may_be_missing: bool, instructions: str
) -> dict[str, dict[str, str]]:
    """`urls` ({split: {shard name: url}}) less the edge shards that the server does not have.

    Per split, the first and last shard are probed and, when they may be missing, their inner
    neighbours too (which must exist): either published numbering (0..317 or 0..318, 1..318) is
    then downloaded exactly. A shard missing elsewhere fails the download itself, naming it.
    Raises `ClickMeDownloadError` if the server cannot be reached, `tfds.download.DownloadError`
    if a shard that must exist is not there.
    """
    kept: dict[str, dict[str, str]] = {}
    for split, split_urls in urls.items():
        names = sorted(split_urls, key=lambda name: published_shards.shard_sort_key(f"{name}.tfrecords"))
        if not names:
            kept[split] = {}
            continue
        outer = {names[0], names[-1]}
        probed = [names[0], names[-1]]
        if edges_may_be_missing:
            probed = [names[0], *names[1:2], *names[-2:-1], names[-1]]
        dropped: dict[str, int] = {}
        for name in dict.fromkeys(probed):
            url = split_urls[name]
            status = _probe(url, instructions)
            if 200 <= status < 300:
                continue
            if status in _ABSENT_STATUSES and edges_may_be_missing and name in outer:
                dropped[name] = status
                logging.warning(
                    "ClickMe shard %s is not on the server (%s answered HTTP %d): the published numbering "
                    "does not include it; the %r split is downloaded without it.",
                    name, url, status, split,
                )
                continue
            raise tfds.download.DownloadError(
                f"ClickMe shard {name} is not on the server: {url} answered HTTP {status}. The shard list "
                "changed, or the mirror is incomplete. Download the shards you can reach and build from "
                f"them instead:\n{instructions}"
            )
        if len(dropped) == len(names):
            raise tfds.download.DownloadError(
                f"No ClickMe {split!r} shard is on the server: "
                + ", ".join(f"{split_urls[name]} answered HTTP {status}" for name, status in dropped.items())
                + f". Check the URL, or build from shards you hold:\n{instructions}"
            )
        kept[split] = {name: split_urls[name] for name in names if name not in dropped}
    return kept


class _ServerError(Exception):
    """Internal: the server answered, but with a status that says "try again later" (429, 5xx)."""


def _probe(url: str, instructions: str) -> int:
    """The HTTP status of `url` (HEAD), with `harmonization.network`'s timeout and attempts.

    Non-HTTP URLs (gs://, file://, read by TFDS through tf.io.gfile) answer 200 or 404 by existence.
    Raises `ClickMeDownloadError` naming the URL, the manual directory and the mirror variable
    when the server cannot be reached or keeps failing.
    """
    if not url.startswith(("http://", "https://")):
        try:
            return 200 if tf.io.gfile.exists(url) else 404
        except tf.errors.OpError:  # A file system TensorFlow cannot ask: let the download try.
            return 200
    timeout = network.timeout()

    def status_of_url() -> int:
        with requests.head(url, allow_redirects=True, timeout=timeout) as response:
            status = response.status_code
        if status in (405, 501):  # No HEAD: read the headers of a GET, not its body.
            with requests.get(url, stream=True, timeout=timeout) as response:
                status = response.status_code
        if status == 429 or status >= 500:
            raise _ServerError(f"HTTP {status}")
        return status

    failures = (requests.RequestException, _ServerError)  # Refused, no DNS, TLS, timeouts; busy server.
    try:
        return network.retry(status_of_url, transient=lambda error: isinstance(error, failures))
    except failures as error:
        failure = str(error) if isinstance(error, _ServerError) else f"{type(error).__name__}: {error}"
    raise ClickMeDownloadError(
        f"Cannot reach the ClickMe shard server: HEAD {url} failed {network.attempts()} time(s), with a "
        f"{timeout:g} s timeout ({failure}). Nothing was downloaded.\n"
        "To build ClickMe without this server: fetch the shards where you can (train-*.tfrecords and "
        "val-*.tfrecords, see below), put them in one directory and pass it as `manual_dir` "
        "(tfds.download.DownloadConfig(manual_dir=...)); or set "
        f"{mirrors.CLICKME_URL_VARIABLE} to a mirror laid out as the bucket "
        "(<url>/train/train-<i>.tfrecords, <url>/val/val-<i>.tfrecords).\n"
        f"{instructions}"
    )


# --- TFRecord framing ---------------------------------------------------------------------------
# A TFRecord file is a sequence of: uint64 length (little-endian), uint32 masked crc32c of those 8
# bytes, the data, uint32 masked crc32c of the data (`harmonization.tfrecord_framing`). tf.data stops at
# the first bad CRC; to skip exactly the bad records, the shard is walked record by record here.

def _read_frame(file: BinaryIO, offset: int, size: int) -> tuple[bytes, int]:
    """(data, next offset) of the record at `offset`, checked in Python; `_BadFrame` says why not."""
    left = size - offset
    if left < 12:
        raise _BadFrame(
            f"the shard is corrupted or truncated here: it ends {left} bytes into a record header "
            f"(at byte {offset})",
            None,
        )
    file.seek(offset)
    header = file.read(12)
    (length,) = struct.unpack("<Q", header[:8])
    (length_crc,) = struct.unpack("<I", header[8:])
    if masked_crc32c(header[:8]) != length_crc:
        raise _BadFrame(
            f"the shard is corrupted or truncated here: the length field of the record at byte {offset} "
            "fails its CRC, so the records after it cannot be located; reading this shard stops here",
            None,
        )
    end = offset + 12 + length + 4
    if end > size:
        raise _BadFrame(
            f"the shard is corrupted or truncated here: the record at byte {offset} needs {length + 16} "
            f"bytes, the file has {left} left",
            None,
        )
    data = file.read(length)
    (data_crc,) = struct.unpack("<I", file.read(4))
    if masked_crc32c(data) != data_crc:
        raise _BadFrame(f"the shard is corrupted here: the data of the record at byte {offset} fails its CRC", end)
    return data, end


def _record_reader(path: epath.Path, file: BinaryIO, size: int) -> Callable[[int], tuple[bytes, int]]:
    """read(offset) -> (data, next offset): TensorFlow's C++ reader (it checks both CRCs) if present.

    `tf_record_random_reader` is not exported under `tf.`; without it every record is checked in
    Python (correct, but slow for 100 MB shards).
    """
    try:
        from tensorflow.python.lib.io import tf_record
    except ImportError:
        tf_record = None
    if tf_record is None or not hasattr(tf_record, "tf_record_random_reader"):
        logging.warning("TensorFlow's TFRecord reader is unavailable: checking %s in pure Python.", path)
        return lambda offset: _read_frame(file, offset, size)
    return tf_record.tf_record_random_reader(os.fspath(path)).read


def _read_records(path: epath.Path) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(index, record, None) per good record, (index, None, reason) per bad one.

    A record whose data fails its CRC is reported and skipped alone. A bad length field (the next
    record cannot be found) or a truncated end is reported once, and the shard ends there.
    """
    path = epath.Path(path)
    size = path.stat().length
    with path.open("rb") as file:
        read = _record_reader(path, file, size)
        offset, index = 0, 0
        while offset < size:
            try:
                record, next_offset = read(offset)
            except (tf.errors.OpError, IndexError, _BadFrame) as error:  # DataLossError, short header.
                try:  # Find out what is wrong, and whether the next record can be found.
                    _read_frame(file, offset, size)
                    bad = _BadFrame(f"the shard is corrupted here ({_first_line(error)})", None)
                except _BadFrame as frame_error:
                    bad = frame_error
                yield index, None, str(bad)
                if bad.next_offset is None:
                    return
                next_offset = bad.next_offset
            else:
                yield index, record, None
            offset, index = next_offset, index + 1


def _first_line(error: Exception) -> str:
    message = getattr(error, "message", None) or str(error)
    return message.splitlines()[0] if message else type(error).__name__


def _decode_record(record: bytes) -> dict:
    """The example dict of one published-format record; raises `_InvalidRecord` saying why not."""
    try:
        example = tf.train.Example.FromString(record)
    except protobuf_message.DecodeError as error:
        raise _InvalidRecord(f"not a serialized tf.train.Example ({error})") from None
    feature = example.features.feature
    values = {}
    for key, kind in (
        (published_shards.IMAGE_KEY, "bytes_list"),
        (published_shards.HEATMAP_KEY, "bytes_list"),
        (published_shards.LABEL_KEY, "int64_list"),
    ):
        if key not in feature:
            raise _InvalidRecord(f"missing feature {key!r} (has {sorted(feature)})")
        actual_kind = feature[key].WhichOneof("kind")
        found = getattr(feature[key], kind).value
        if actual_kind != kind or len(found) != 1:
            raise _InvalidRecord(
                f"feature {key!r} must hold exactly one {kind} value; got {actual_kind} with "
                f"{len(getattr(feature[key], actual_kind).value) if actual_kind else 0} values"
            )
        values[key] = found[0]
    _check_jpeg(values[published_shards.IMAGE_KEY], published_shards.IMAGE_KEY, published_shards.IMAGE_SHAPE)
    _check_jpeg(values[published_shards.HEATMAP_KEY], published_shards.HEATMAP_KEY, published_shards.HEATMAP_SHAPE)
    label = int(values[published_shards.LABEL_KEY])
    if not 0 <= label < published_shards.NUM_CLASSES:
        raise _InvalidRecord(f"label {label} is outside 0..{published_shards.NUM_CLASSES - 1}")
    # The original JPEG bytes are stored as they are: no re-encoding, no quality loss.
    return {
        "image": values[published_shards.IMAGE_KEY],
        "heatmap": values[published_shards.HEATMAP_KEY],
        "label": label,
    }


def _check_jpeg(data: bytes, key: str, expected_shape: tuple[int, int, int]) -> None:
    """Raise `_InvalidRecord` unless `data` is a JPEG that TensorFlow decodes to `expected_shape`."""
    if not bool(tf.io.is_jpeg(data)):
        raise _InvalidRecord(f"{key!r} is not JPEG data (starts with {bytes(data[:4])!r})")
    try:
        shape = tuple(tf.io.decode_jpeg(data).shape)  # The decoder training uses, native channels.
    except tf.errors.OpError as error:
        raise _InvalidRecord(f"{key!r} does not decode as JPEG ({_first_line(error)})") from None
    if shape != tuple(expected_shape):
        raise _InvalidRecord(f"{key!r} has shape {shape}; expected {tuple(expected_shape)}")
