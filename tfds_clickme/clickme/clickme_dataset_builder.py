"""ClickMe: human feature-importance maps for ImageNet images, as a TFDS dataset."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from google.protobuf import message as protobuf_message

from harmonization import mirrors
from tfds_clickme.clickme import published_shards

#: A shard's path under the ClickMe base URL (the bucket's, or HARMONIZATION_CLICKME_URL's); `{folder}` is
#: `train` or `val`, as in serre-lab/Harmonization 0.0.9 `load_clickme_train` / `load_clickme_val`.
SHARD_PATH_TEMPLATE = "{folder}/{folder}-{index}.tfrecords"
#: Where the harmonization authors publish the shards.
PUBLISHED_URL_TEMPLATE = f"{mirrors.PUBLISHED_CLICKME_URL}/{SHARD_PATH_TEMPLATE}"
# The published loader lists range(318) and range(17), but its own tests fetch `train-318` and
# `val-17` (the smallest shard, 256 records): shards 0..318 and 0..17 exist, the loader misses one.
PUBLISHED_TRAIN_SHARDS = tuple(range(319))
PUBLISHED_VALIDATION_SHARDS = tuple(range(18))

#: TFDS split name -> the folder and file prefix of its published shards.
SPLIT_FOLDERS = {"train": "train", "validation": "val"}

#: At most this many skipped records are listed (with their reason) in `info.metadata`.
_MAX_LISTED_SKIPS = 100


class ClickMeRecordError(ValueError):
    """A record that does not parse, decode or validate; the message names its shard and index."""


class _InvalidRecord(Exception):
    """Internal: why one record is invalid (wrapped into a `ClickMeRecordError`)."""


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
            them in `info.metadata["skipped_records"]`, instead of failing the build.
    """

    url_template: str | None = None
    train_shards: tuple[int, ...] = PUBLISHED_TRAIN_SHARDS
    validation_shards: tuple[int, ...] = PUBLISHED_VALIDATION_SHARDS
    skip_bad_records: bool = False

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
        for i in $(seq 0 318); do curl -O $BASE/train/train-$i.tfrecords; done
        for i in $(seq 0 17); do curl -O $BASE/val/val-$i.tfrecords; done

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
        return {split: self._generate_examples(split, split_shards) for split, split_shards in shards.items()}

    def _manual_shards(self, dl_manager) -> dict[str, list[tuple[str, epath.Path]]] | None:
        """{split: [(shard name, path)]} found in the manual directory, or None to download."""
        try:
            manual_dir = epath.Path(dl_manager.manual_dir)
        except AssertionError:  # No manual directory, or an empty one.
            return None
        found = {split: _find_shards(manual_dir, folder) for split, folder in SPLIT_FOLDERS.items()}
        if not any(found.values()):
            expected = [f"{manual_dir / f'{folder}-*.tfrecords'}" for folder in SPLIT_FOLDERS.values()]
            default_manual_dir = epath.Path(dl_manager.download_dir) / "manual"
            if manual_dir != default_manual_dir:  # The user pointed us there: say what is missing.
                present = sorted(p.name for p in manual_dir.iterdir())[:10]
                raise FileNotFoundError(
                    f"No ClickMe shards in the manual directory {manual_dir}: expected files matching "
                    f"{expected} (or the same names under train/ and val/); found {present}.\n"
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
        """Downloads the shards listed by the config; {split: [(shard name, path)]}."""
        urls = self.builder_config.shard_urls()
        flat = {name: url for split_urls in urls.values() for name, url in split_urls.items()}
        try:
            paths = dl_manager.download(flat)
        except tfds.download.DownloadError as error:
            raise tfds.download.DownloadError(
                f"{error}\nCould not download a ClickMe shard. If the published shard list changed, "
                "download the shards you can reach and build from them instead:\n"
                f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            ) from error
        return {
            split: [(name, epath.Path(paths[name])) for name in split_urls]
            for split, split_urls in urls.items()
            if split_urls
        }

    def _generate_examples(self, split: str, shards: list[tuple[str, epath.Path]]):
        """Yields examples."""
        skip_bad = self.builder_config.skip_bad_records
        skipped: list[dict] = []
        count = 0
        for shard_name, path in shards:
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


def _read_records(path: epath.Path) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(index, record, None) per record; (index, None, reason) and stop if the shard is corrupt."""
    iterator = iter(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
    index = 0
    while True:
        try:
            record = next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as error:  # DataLossError: bad length/CRC, truncated file.
            reason = error.message.splitlines()[0] if error.message else type(error).__name__
            yield index, None, f"the shard is corrupted or truncated here, later records are unreadable ({reason})"
            return
        yield index, record, None
        index += 1


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
        reason = error.message.splitlines()[0] if error.message else type(error).__name__
        raise _InvalidRecord(f"{key!r} does not decode as JPEG ({reason})") from None
    if shape != tuple(expected_shape):
        raise _InvalidRecord(f"{key!r} has shape {shape}; expected {tuple(expected_shape)}")
