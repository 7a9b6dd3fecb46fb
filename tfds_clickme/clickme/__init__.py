"""The `clickme` TFDS builder (ClickMe human feature-importance maps, Linsley et al., ICLR 2019)."""

from tfds_clickme.clickme.clickme_dataset_builder import (  # noqa: F401  (registers "clickme")
    Builder,
    ClickMeConfig,
    ClickMeRecordError,
)
