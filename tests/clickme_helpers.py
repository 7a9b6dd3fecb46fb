"""Small ClickMe data in the published format, for tests (imported by name: pytest puts tests/ on sys.path)."""

import tensorflow_datasets as tfds

import tfds_clickme  # noqa: F401  (registers "clickme")
from tfds_clickme.clickme import published_shards


def write_shards(directory, shards, seed=100, quality=80):
    """Write {shard name: record count} as published-format `NAME.tfrecords` files; returns `directory`."""
    for offset, (name, count) in enumerate(shards.items()):
        records = published_shards.synthetic_records(count, seed=seed + offset, quality=quality)
        published_shards.write_shard(directory / f"{name}.tfrecords", records)
    return directory


def build_clickme(data_dir, manual_dir):
    """Build the `clickme` TFDS dataset in `data_dir` from the shards in `manual_dir`; returns `data_dir`."""
    builder = tfds.builder("clickme", data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return data_dir
