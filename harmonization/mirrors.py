"""Where the published files are fetched from: the authors' public bucket, or a mirror you name.

The harmonization authors publish ClickMe shards and the harmonized `.h5` files on one public bucket
(serre-lab/Harmonization 0.0.9: `CLICKME_BASE_URL` in `common/clickme_dataset.py`, the `HARMONIZED_*_WEIGHTS`
constants in `models/*.py`). Two environment variables replace those base URLs everywhere we use them
(the TFDS ClickMe builder, the published API in `harmonization.common` and `harmonization.models`, the zoo's
fallback to original files), for institutions that mirror the data, air-gapped sites and the day the bucket
goes away:

* `HARMONIZATION_CLICKME_URL` replaces `.../dataset/click-me` (a mirror holds `train/train-{i}.tfrecords` and
  `val/val-{i}.tfrecords` under it, as the bucket does);
* `HARMONIZATION_MODELS_URL` replaces `.../models` (a mirror holds the `.h5` files under their published names).

They are read at each use, not at import, so a process can point at a mirror at any time. This module only
reads the environment: it imports nothing heavy.
"""

from __future__ import annotations

import os

__all__ = [
    "CLICKME_URL_VARIABLE",
    "MODELS_URL_VARIABLE",
    "PUBLISHED_CLICKME_URL",
    "PUBLISHED_MODELS_URL",
    "clickme_url",
    "model_file_url",
    "models_url",
]

#: serre-lab/Harmonization 0.0.9, harmonization/common/clickme_dataset.py `CLICKME_BASE_URL`.
PUBLISHED_CLICKME_URL = "https://storage.googleapis.com/serrelab/prj_harmonization/dataset/click-me"
#: serre-lab/Harmonization 0.0.9, harmonization/models/*.py: every `HARMONIZED_*_WEIGHTS` lies under it.
PUBLISHED_MODELS_URL = "https://storage.googleapis.com/serrelab/prj_harmonization/models"

CLICKME_URL_VARIABLE = "HARMONIZATION_CLICKME_URL"
MODELS_URL_VARIABLE = "HARMONIZATION_MODELS_URL"


def _base(variable: str, default: str) -> str:
    value = os.environ.get(variable, "").strip()
    if not value:
        return default
    if "://" not in value:
        raise ValueError(
            f"{variable} must be a URL such as https://mirror.example.org/click-me (file:// works for a local "
            f"folder); got {value!r}."
        )
    return value.rstrip("/")


def clickme_url() -> str:
    """The ClickMe base URL: `HARMONIZATION_CLICKME_URL` if set, else the published bucket's."""
    return _base(CLICKME_URL_VARIABLE, PUBLISHED_CLICKME_URL)


def models_url() -> str:
    """The base URL of the published `.h5` files: `HARMONIZATION_MODELS_URL` if set, else the bucket's."""
    return _base(MODELS_URL_VARIABLE, PUBLISHED_MODELS_URL)


def model_file_url(published_url: str) -> str:
    """`published_url` (a file under the bucket's `models/`) as fetched now: moved under the mirror, if any.

    A URL outside the published models folder is returned unchanged.
    """
    prefix = PUBLISHED_MODELS_URL + "/"
    if not published_url.startswith(prefix):
        return published_url
    return f"{models_url()}/{published_url[len(prefix):]}"
