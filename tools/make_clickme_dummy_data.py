"""Writes `tfds_clickme/clickme/dummy_data/`: tiny synthetic shards in the published ClickMe format.

The records are real published-format records (a `tf.train.Example` with JPEG-encoded `image`
and `heatmap` and an int64 `label`) built from synthetic pictures, never real ClickMe images.
The builder test expects the counts written here (see `clickme_dataset_builder_test.py`).

Usage: python tools/make_clickme_dummy_data.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # Run as a script from a checkout, without installing.
    sys.path.insert(0, str(REPO_ROOT))

from tfds_clickme.clickme import published_shards  # noqa: E402

#: shard name -> number of records. Two train shards (numbered as published, so the builder's
#: numeric ordering is exercised) and one validation shard.
DUMMY_SHARDS = {"train-0": 5, "train-1": 4, "val-0": 3}

DEFAULT_OUT = REPO_ROOT / "tfds_clickme" / "clickme" / "dummy_data"


def write_dummy_data(out: Path, quality: int = 75) -> dict[str, int]:
    """Writes the dummy shards into `out`; returns {shard name: records written}."""
    written = {}
    for seed, (name, count) in enumerate(DUMMY_SHARDS.items()):
        records = published_shards.synthetic_records(count, seed=seed, quality=quality)
        written[name] = published_shards.write_shard(out / f"{name}.tfrecords", records)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Output directory.")
    args = parser.parse_args()
    written = write_dummy_data(args.out)
    for name, count in written.items():
        path = args.out / f"{name}.tfrecords"
        print(f"{path}: {count} records, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
