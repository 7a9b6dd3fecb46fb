"""Render the model card (the Hub `README.md`) of a zoo model from the top-level `MODEL_CARD.md` template.

The template is Markdown with `{{ field }}` placeholders, `{# comments #}` and a YAML front matter slot. The fields come from
the zoo entry (`models/NAME.json`); the front matter is built with `huggingface_hub.ModelCardData`, so the
Hub metadata (library_name, license, tags, datasets, model-index with the paper's metrics and their source)
is written in the exact form the Hub validates. Rendering is strict both ways: a placeholder the renderer
does not fill, or a field the template lost, raises, so the card and the registry cannot drift apart.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

__all__ = ["TEMPLATE_NAME", "TemplateNotFoundError", "card_data", "render_model_card", "template_path"]

TEMPLATE_NAME = "MODEL_CARD.md"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_COMMENT = re.compile(r"\{#.*?#\}\n?", re.DOTALL)  # template comments, not rendered
# Fields the template must use (a card without them is not a model card).
REQUIRED_FIELDS = frozenset({"card_data", "name", "repo_id", "metrics_table", "mean", "std", "source_url"})
# Names of the paper metrics in a zoo entry's `metrics`, with how the card and the Hub model-index show them.
_METRICS = {
    "imagenet_top1": {
        "label": "ImageNet top-1 accuracy (%)",
        "dataset": ("ImageNet-1k", "imagenet-1k", "validation"),
        "metric_type": "accuracy",
    },
    "clickme_alignment_spearman": {
        "label": "Human feature alignment, ClickMe (Spearman, % of human inter-rater)",
        "dataset": ("ClickMe", "clickme", "validation"),
        "metric_type": "spearmanr",
    },
}


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


def _paper_metrics(entry: Mapping[str, Any]) -> list[tuple[str, float]]:
    metrics = entry.get("metrics") or {}
    return [(key, float(metrics[key])) for key in _METRICS if metrics.get(key) is not None]


def card_data(entry: Mapping[str, Any]):
    """The Hub metadata of a zoo entry as a `huggingface_hub.ModelCardData`."""
    from huggingface_hub import EvalResult, ModelCardData

    metrics = entry.get("metrics") or {}
    source = metrics.get("source")
    source_url = metrics.get("source_url") or (entry.get("paper") or {}).get("url")
    results = []
    for key, value in _paper_metrics(entry):
        spec = _METRICS[key]
        dataset_name, dataset_type, split = spec["dataset"]
        results.append(
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_split=split,
                metric_type=spec["metric_type"],
                metric_value=value,
                metric_name=spec["label"],
                verified=False,
                source_name=source,
                source_url=source_url,
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


def _metrics_table(entry: Mapping[str, Any], checks: Mapping[str, Any] | None) -> str:
    metrics = entry.get("metrics") or {}
    source = metrics.get("source") or "not recorded"
    source_url = metrics.get("source_url")
    cited = f"[{source}]({source_url})" if source_url else source
    rows = ["| Metric | Value | Source |", "|---|---|---|"]
    for key, spec in _METRICS.items():
        value = metrics.get(key)
        shown = f"{float(value):g}" if value is not None else "not transcribed yet"
        rows.append(f"| {spec['label']} | {shown} | {cited} |")
    for label, (value, how) in (checks or {}).items():
        rows.append(f"| {label} | {value} | {how} |")
    return "\n".join(rows)


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
        TemplateNotFoundError: no template. ValueError: the template and the fields do not match.
    """
    from harmonization import zoo

    entry = zoo.model_info(name_or_entry) if isinstance(name_or_entry, str) else dict(name_or_entry)
    text = Path(template if template is not None else template_path()).read_text(encoding="utf-8")
    text = _COMMENT.sub("", text)
    architecture = entry["architecture"]
    config = architecture.get("config", {})
    preprocessing = entry.get("preprocessing") or {}
    source = entry["source"]
    count = parameter_count if parameter_count is not None else entry.get("parameter_count")
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
        "num_classes": str(config.get("num_classes", 1000)),
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
