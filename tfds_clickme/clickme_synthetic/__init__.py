"""Registers the "clickme_synthetic" TFDS builder (importing this package is enough)."""

from tfds_clickme.clickme_synthetic.clickme_synthetic_dataset_builder import Builder, BuilderConfig

__all__ = ["Builder", "BuilderConfig"]
