"""Render the model card (the Hub `README.md`) of a zoo model from the top-level `MODEL_CARD.md` template.

The template is Markdown with `{{ field }}` placeholders, `{# comments #}` and a YAML front matter slot. The fields come from
the zoo entry (`models/NAME.json`); the front matter is built with `huggingface_hub.ModelCardData`, so the
Hub metadata (library_name, license, tags, datasets, model-index with the paper's metrics and their source)
is written in the exact form the Hub validates. Rendering is strict both ways: a placeholder the renderer
does not fill, or a field the template lost, raises, so the card and the registry cannot drift apart.

The paper's numbers are shown beside the baseline's, with their source; a number the paper did not publish
reads "not published" rather than disappearing.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from harmonization import zoo

__all__ = ["TEMPLATE_NAME", "TemplateNotFoundError", "card_data", "render_model_card", "template_path"]

TEMPLATE_NAME = "MODEL_CARD.md"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_COMMENT = re.compile(r"\{#.*?#\}\n?", re.DOTALL)  # template comments, not rendered
# Fields the template must use (a card without them is not a model card).
REQUIRED_FIELDS = frozenset({"card_data", "name", "repo_id", "metrics_table", "output", "mean", "std", "source_url"})
# The paper metrics of a zoo entry's `metrics` (`zoo.PAPER_METRICS`), as the card and the Hub model-index show them.
_METRICS = {
    "imagenet_top1": {
        "label": "ImageNet-1k top-1 accuracy (%)",
        "dataset": ("ImageNet-1k", "imagenet-1k", "validation"),
        "metric_type": "accuracy",
    },
    "clickme_alignment": {
        "label": "ClickMe human feature alignment (% of the human ceiling)",
        "dataset": ("ClickMe", "clickme", "validation"),
        "metric_type": "clickme_alignment",
    },
}
NOT_PUBLISHED = "not published"


class TemplateNotFoundError(FileNotFoundError):
    """`MODEL_CARD.md` is not where the renderer looks (it ships with a source checkout)."""


def template_path() -> Path:
    """The `MODEL_CARD.md` template: packaged with `harmonization` if present, else at the repository root."""
    packaged = resources.files("harmonization").joinpath(TEMPLATE_NAME)
    candidates = [Path(str(packaged)), Path(__file__).resolve().parents[1] / TEMPLATE_NAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise TemplateNotFoundError(
        f"The model-card template {TEMPLATE_NAME} was not found (looked at {[str(c) for c in candidates]}). "
        "It is the top-level MODEL_CARD.md of the harmonization-hub source tree; publish from a checkout."
    )


def _display_name(entry: Mapping[str, Any]) -> str:
    return entry.get("display_name") or entry["architecture"]["class_name"]


def card_data(entry: Mapping[str, Any]):
    """The Hub metadata of a zoo entry as a `huggingface_hub.ModelCardData`.

    The model-index holds the harmonized model's published numbers only (the baseline is another model), each
    with the entry's source; with none published there is no model-index (the Hub requires values).
    """
    from huggingface_hub import EvalResult, ModelCardData

    metrics = entry["metrics"]
    results = []
    for key, spec in _METRICS.items():
        if metrics[key] is None:
            continue
        dataset_name, dataset_type, split = spec["dataset"]
        results.append(
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_split=split,
                metric_type=spec["metric_type"],
                metric_value=float(metrics[key]),
                metric_name=spec["label"],
                verified=False,
                source_name=metrics["source"],
                source_url=metrics["source_url"],
            )
        )
    family = entry["architecture"]["module"].rsplit(".", 1)[-1]
    tags = ["image-classification", "keras", "harmonization", "neural-harmonizer", "human-alignment", "clickme",
            "explainability", family]
    training = entry.get("training") or {}
    return ModelCardData(
        library_name="keras",
        license=entry["license"],
        tags=tags,
        datasets=[training.get("dataset", "imagenet-1k")],
        pipeline_tag="image-classification",
        model_name=entry["name"] if results else None,
        eval_results=results or None,
    )


def _shown(value: float | None) -> str:
    return NOT_PUBLISHED if value is None else f"{float(value):g}"


def _metrics_table(entry: Mapping[str, Any], checks: Mapping[str, Any] | None) -> str:
    # Imported here: harmonization.metrics imports Keras (which picks the backend), which a card needs for nothing else.
    from harmonization.metrics import HUMAN_CEILING

    metrics = entry["metrics"]
    rows = ["| Metric (paper) | Harmonized (this model) | Baseline (same architecture, not harmonized) |",
            "|---|---|---|"]
    for key, spec in _METRICS.items():
        rows.append(f"| {spec['label']} | {_shown(metrics[key])} | {_shown(metrics['baseline'][key])} |")
    lines = [
        "\n".join(rows),
        f"Source: {metrics['source']} <{metrics['source_url']}>",
        "The alignment score is the mean Spearman correlation between the model's saliency maps and the ClickMe "
        f"human maps, divided by the human inter-rater ceiling ({HUMAN_CEILING:g}) and times 100 "
        "(`harmonization.evaluate_alignment`).",
    ]
    if checks:
        measured = ["| Check | Value | How |", "|---|---|---|"]
        measured += [f"| {label} | {value} | {how} |" for label, (value, how) in checks.items()]
        lines.append("\n".join(measured))
    return "\n\n".join(lines)


def _output(entry: Mapping[str, Any], num_classes: str) -> str:
    output = entry["output"]
    native = "logits (no softmax)" if output["native"] == "logits" else "probabilities (softmax)"
    text = f"{num_classes} ImageNet {native}, in class-index order (names: `model.class_names`)"
    if output["original"] == output["native"]:
        return f"{text}, as the original model returned."
    if output["original"] == "probabilities":
        return f"{text}. The original model returned probabilities (softmax); `keras.ops.softmax(logits)` gives them."
    return f"{text}. The original model returned logits."


def render_model_card(
    name_or_entry: str | Mapping[str, Any],
    *,
    repo_id: str | None = None,
    parameter_count: int | None = None,
    checks: Mapping[str, tuple[Any, str]] | None = None,
    template: str | os.PathLike | None = None,
) -> str:
    """Render the model card of a zoo model and return its Markdown text (with the YAML front matter).

    Args:
        name_or_entry: str or mapping. A zoo name, or a zoo entry (e.g. `harmonization.model_info(name)`).
        repo_id: str or None. The Hub repo the card is for. Defaults to the entry's `hub.repo_id`.
        parameter_count: int or None. The parameter count to show. Defaults to the entry's.
        checks: mapping or None. Extra measured rows for the metrics table, `label -> (value, how measured)`,
            e.g. the preset round-trip difference `harmonization publish` measures. Defaults to None.
        template: path or None. The template. Defaults to the top-level `MODEL_CARD.md`.

    Raises:
        TemplateNotFoundError: no template. ValueError: the template and the fields do not match, or the entry
            is not a valid zoo entry (e.g. a metric outside [0, 100]).
    """
    if isinstance(name_or_entry, str):
        entry = zoo.model_info(name_or_entry)
    else:
        entry = zoo.validate_entry(dict(name_or_entry), f"{name_or_entry.get('name')}.json")
    text = Path(template if template is not None else template_path()).read_text(encoding="utf-8")
    text = _COMMENT.sub("", text)
    architecture = entry["architecture"]
    config = architecture.get("config", {})
    preprocessing = entry.get("preprocessing") or {}
    source = entry["source"]
    count = parameter_count if parameter_count is not None else entry.get("parameter_count")
    num_classes = str(config.get("num_classes", 1000))
    fields = {
        "card_data": card_data(entry).to_yaml(),
        "title": f"{_display_name(entry)}, harmonized ({entry['name']})",
        "description": entry.get("description", ""),
        "name": entry["name"],
        "architecture": _display_name(entry),
        "class_name": architecture["class_name"],
        "module": architecture["module"],
        "parameter_count": f"{int(count):,}" if count is not None else "unknown",
        "image_size": str(config.get("image_size", (preprocessing.get("input_shape") or [224])[0])),
        "num_classes": num_classes,
        "output": _output(entry, num_classes),
        "repo_id": repo_id or entry["hub"]["repo_id"],
        "source_url": source["url"],
        "source_file": source["url"].rsplit("/", 1)[-1],
        "source_format": source.get("format", "Keras-2 HDF5"),
        "source_library": source.get("library", "not recorded"),
        "license": entry["license"],
        "paper_url": (entry.get("paper") or {}).get("url", "https://arxiv.org/abs/2211.04533"),
        "mean": str(tuple(preprocessing.get("mean", ()))),
        "std": str(tuple(preprocessing.get("std", ()))),
        "metrics_table": _metrics_table(entry, checks),
    }
    used = set(_PLACEHOLDER.findall(text))
    unknown = sorted(used - set(fields))
    if unknown:
        raise ValueError(f"Model-card template uses fields the renderer does not fill: {unknown}.")
    lost = sorted(REQUIRED_FIELDS - used)
    if lost:
        raise ValueError(f"Model-card template lacks required fields {lost}.")
    return _PLACEHOLDER.sub(lambda match: fields[match.group(1)], text)
