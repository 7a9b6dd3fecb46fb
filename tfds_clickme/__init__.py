"""TFDS builders for human feature-importance maps; importing this package registers them.

`import tfds_clickme` makes `tfds.load("clickme")` (the published ClickMe maps) and, when present,
`tfds.load("clickme_synthetic")` (a small synthetic dataset with the same features) work.
"""

import importlib.util as _importlib_util

from harmonization import _backend

# Before the builders import TensorFlow (Datasets): without it, one sentence naming what needs it and the install
# command. Every tfds_clickme module is under this package, so this runs first for all of them.
_backend.require_tensorflow("tfds_clickme (the ClickMe TFDS builders)")

from tfds_clickme import clickme  # noqa: F401  (registers "clickme")

# The synthetic builder is optional (it may not be installed yet); errors inside it still raise.
if _importlib_util.find_spec("tfds_clickme.clickme_synthetic") is not None:
    from tfds_clickme import clickme_synthetic  # noqa: F401  (registers "clickme_synthetic")
