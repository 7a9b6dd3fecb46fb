"""Run the published harmonization 0.0.9 test suite, unchanged, against the installed harmonization-hub.

    python tools/run_published_tests.py [--published WHEEL_OR_FOLDER] [--keep DIR]

The published package (PyPI `Harmonization` 0.0.9, serre-lab/Harmonization ffe1c49) ships its `tests/`
folder inside its wheel. This script takes that folder (from a wheel or folder you give, else from the wheel
`pip download` fetches from PyPI), never installs the published package (it would overwrite ours), and runs
it with pytest against whatever `import harmonization` finds.

Its tests download ClickMe shards from `harmonization.common.clickme_dataset.CLICKME_BASE_URL`; they get them
from a local mirror: a static HTTP server on 127.0.0.1 serving shards in the published format (synthetic
pictures, `tfds_clickme.clickme.published_shards`), named through `HARMONIZATION_CLICKME_URL`. `KERAS_HOME`
points at a fresh folder, so nothing is read from or left in the user's Keras cache. The bucket test
(`tests/models/test_bucket.py`) is left out: it loads the bucket's `dummy_model.h5` with plain Keras and
tests nothing of ours. Nothing of the published package is written into this repository.

Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PUBLISHED_REQUIREMENT = "Harmonization==0.0.9"
#: The shards the published tests fetch, and how many records each gets: `val-17` is "the smallest shard,
#: 256 records" in tests/evaluation/test_tf_evaluation.py, which asserts exactly 256 scored images.
MIRRORED_SHARDS = {"val/val-17.tfrecords": 256, "train/train-318.tfrecords": 64}
SKIPPED = ["tests/models/test_bucket.py"]


def fetch_published_wheel(directory: Path) -> Path:
    """Download the published wheel (no dependencies, nothing installed) into `directory`."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--dest", str(directory), PUBLISHED_REQUIREMENT],
        check=True, timeout=300,
    )
    wheels = sorted(directory.glob("Harmonization-0.0.9-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download of {PUBLISHED_REQUIREMENT} gave no wheel in {directory}.")
    return wheels[0]


def extract_tests(published: Path, work: Path) -> Path:
    """Copy the published `tests/` folder (from a wheel or a source folder) to `work/tests`."""
    target = work / "tests"
    if published.is_dir():
        shutil.copytree(published / "tests", target)
    else:
        with zipfile.ZipFile(published) as wheel:
            members = [name for name in wheel.namelist() if name.startswith("tests/")]
            if not members:
                raise SystemExit(f"{published} holds no tests/ folder.")
            wheel.extractall(work, members)
    return target


def make_mirror(root: Path) -> Path:
    """Write the shards the published tests fetch, in the published format, under `root/click-me`."""
    from tfds_clickme.clickme import published_shards

    base = root / "click-me"
    for seed, (relative, count) in enumerate(sorted(MIRRORED_SHARDS.items())):
        published_shards.write_shard(base / relative, published_shards.synthetic_records(count, seed=seed))
    return base


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002  (the base class's signature)
        pass


def serve(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    """Serve `directory` on 127.0.0.1 (any free port) from a daemon thread; return the server and its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def run(published: Path | None, work: Path, pytest_args: list[str]) -> int:
    if published is None:
        published = fetch_published_wheel(work / "wheel")
    tests = extract_tests(published, work)
    mirror = make_mirror(work / "mirror")
    server, url = serve(mirror.parent)
    try:
        env = dict(os.environ)
        env["HARMONIZATION_CLICKME_URL"] = f"{url}/click-me"
        env["KERAS_HOME"] = str(work / "keras_home")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(work),
                   *[f"--ignore={work / path}" for path in SKIPPED], str(tests), *pytest_args]
        print(f"Published tests from {published}; ClickMe mirror at {url}/click-me", flush=True)
        return subprocess.run(command, cwd=work, env=env, timeout=1800).returncode
    finally:
        server.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--published", type=Path, default=None,
                        help="the published wheel, or a checkout holding tests/ (default: pip download it)")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args, pytest_args = parser.parse_known_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return run(args.published, args.keep, pytest_args)
    with tempfile.TemporaryDirectory(prefix="published-tests-") as work:
        return run(args.published, Path(work), pytest_args)


if __name__ == "__main__":
    sys.exit(main())
