"""Fixtures shared by several test modules."""

import pytest


@pytest.fixture(scope="session")
def quick_data(tmp_path_factory):
    """A TFDS data folder holding the quickstart's `quick` dataset (clickme_synthetic/quick: 200 training and 100
    test images, 64x64, 10 classes), built once per session with the quickstart's own builder call."""
    from harmonization import quickstart

    folder = tmp_path_factory.mktemp("tfds")
    quickstart.build_dataset("quick", folder)
    return folder
