"""TFDS builders for human feature-importance maps; importing this package registers them.

`import tfds_clickme` makes `tfds.load("clickme")` (the published ClickMe maps) and, when present,
`tfds.load("clickme_synthetic")` (a small synthetic dataset with the same features) work.
"""

import importlib.util as _importlib_util

from tfds_clickme import clickme  # noqa: F401  (registers "clickme")

# The synthetic builder is optional (it may not be installed yet); errors inside it still raise.
if _importlib_util.find_spec("tfds_clickme.clickme_synthetic") is not None:
    from tfds_clickme import clickme_synthetic  # noqa: F401  (registers "clickme_synthetic")
