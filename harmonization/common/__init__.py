"""The published 0.0.9 data API (serre-lab/Harmonization `harmonization/common`), on the native pipeline.

`load_clickme(shards_paths, batch_size)`, `load_clickme_train()`, `load_clickme_val()` yield
`(images, heatmaps, one-hot labels)` batches exactly as published; `gaussian_kernel` and `gaussian_blur` are
the published blur. The work is done by `harmonization.data`; the native `harmonization.data.load_clickme`
(TFDS, augmentation, no dropped images) is the better choice for new code.
"""

from harmonization import _backend

# Before the submodules import TensorFlow: without it, one sentence naming what needs it and the install command.
_backend.require_tensorflow("The published 0.0.9 data API harmonization.common (tf.data ClickMe loaders)")

from harmonization.common.blur import gaussian_blur, gaussian_kernel
from harmonization.common.clickme_dataset import (
    CLICKME_BASE_URL,
    NB_TRAIN_SHARDS,
    NB_VAL_SHARDS,
    load_clickme,
    load_clickme_train,
    load_clickme_val,
)

__all__ = [
    "CLICKME_BASE_URL",
    "NB_TRAIN_SHARDS",
    "NB_VAL_SHARDS",
    "gaussian_blur",
    "gaussian_kernel",
    "load_clickme",
    "load_clickme_train",
    "load_clickme_val",
]
