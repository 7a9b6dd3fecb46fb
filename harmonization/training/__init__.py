"""The published 0.0.9 training API (serre-lab/Harmonization `harmonization/training`), on the native loss.

`harmonizer_loss` returns the gradients of one harmonized step, as published; `pyramidal_mse_with_tokens`,
`standardize_cut` and `pyramid.pyramidal_representation` are the published pieces. The work is done by
`harmonization.losses`, `harmonization.saliency` and `harmonization.harmonized_model`; for new code,
`harmonization.HarmonizedModel` runs the same step inside Keras `fit` (one device or `tf.distribute`).
"""

from harmonization import _backend

# Before the submodules import TensorFlow: without it, one sentence naming what needs it and the install command.
_backend.require_tensorflow("The published 0.0.9 training API harmonization.training (TensorFlow code)")

from harmonization.training.loss import harmonizer_loss, pyramidal_mse_with_tokens, standardize_cut

__all__ = ["harmonizer_loss", "pyramidal_mse_with_tokens", "standardize_cut"]
