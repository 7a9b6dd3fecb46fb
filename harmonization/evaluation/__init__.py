"""Scoring a model's human alignment.

Native: `evaluate_alignment` (any Keras model or explainer, any batch format, progress bar, accuracy).
The published 0.0.9 API, unchanged (serre-lab/Harmonization `harmonization/evaluation`): `evaluate_clickme`,
`spearman_correlation`, `dice`, `intersection_over_union`, `HUMAN_SPEARMAN_CEILING`, `load_clickme_val`,
computed by the native code in `harmonization.metrics` and `harmonization.saliency`.
"""

from harmonization.evaluation.alignment import evaluate_alignment
from harmonization.evaluation.clickme import HUMAN_SPEARMAN_CEILING, evaluate_clickme, load_clickme_val
from harmonization.evaluation.metrics import dice, intersection_over_union, spearman_correlation

__all__ = [
    "HUMAN_SPEARMAN_CEILING",
    "dice",
    "evaluate_alignment",
    "evaluate_clickme",
    "intersection_over_union",
    "load_clickme_val",
    "spearman_correlation",
]
