"""Render the model card (the Hub `README.md`) of a zoo model from the top-level `MODEL_CARD.md` template.

The template is Markdown with `{{ field }}` placeholders, `{# comments #}` and a YAML front matter slot. The fields come from
the zoo entry (`models/NAME.json`); the front matter is built with `huggingface_hub.ModelCardData`, so the
Hub metadata (library_name, license, tags, datasets, model-index with the paper's metrics and their source)
is written in the exact form the Hub validates. Rendering is strict both ways: a placeholder the renderer
does not fill, or a field the template lost, raises, so the card and the registry cannot drift apart.

The paper's numbers are shown beside the baseline's, with their source; a number the paper did not publish
reads "not published" rather than disappearing. A card rendered for publishing (`publish.build_preset` with
`check_round_trip=True`) also states the conversion check that was run, with its numbers
(`harmonization.conversion_check`), and shows the saliency figure stored beside it (`harmonization.card_figure`).
"""

from __future__ import annotations

import ast
import functools
import os
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from harmonization import zoo
from harmonization._io import is_repo_id

if TYPE_CHECKING:  # for the annotations only: the check converts models, which rendering a card never does
    from harmonization.conversion_check import ConversionCheck

__all__ = ["TEMPLATE_NAME", "TemplateNotFoundError", "card_data", "published_loader", "render_model_card",
           "template_path"]

TEMPLATE_NAME = "MODEL_CARD.md"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_COMMENT = re.compile(r"\{#.*?#\}\n?", re.DOTALL)  # template comments, not rendered
# Fields the template must use (a card without them is not a model card).
REQUIRED_FIELDS = frozenset({"card_data", "name", "repo_id", "metrics_table", "output", "mean", "std", "source_url",
                             "published_api", "conversion_check", "saliency_figure"})
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
# The Hub tags of every card (the entry's architecture family is added).
TAGS = ("image-classification", "keras", "harmonization", "neural-harmonizer", "human-alignment", "clickme",
        "explainability")
# `base_model` (the Hub model a model was fine-tuned from) is written only where a zoo entry names one in
# `hub.base_model`, and no published entry does. Checked sources: serre-lab/Harmonization's docs/models.md ("we
# re-trained a set of models with the harmonization loss"), its README and package (no training script, no
# starting checkpoint named), and arXiv 2211.04533's abstract and figure caption ("versions of those models trained
# only for classification" as baselines). None names the weights the published models started from, none of the
# originals lives on the Hub (they are .h5 files on Google Cloud Storage), and our recipes record "the
# initialisation of the published models is not published" (harmonization/recipes/*.json). A Hub id would be invented.


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
    labelled as published and carrying the entry's source; with none published there is no model-index (the Hub
    requires values). `base_model` is the entry's `hub.base_model` (a Hub id or a list of them) when it has one.

    Raises:
        ValueError: `hub.base_model` is not a Hub model id ("org/name") or a list of them.
    """
    # Imported here: huggingface_hub is needed only to render a card, not to read the zoo.
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
                metric_name=f"{spec['label']}, as published (not re-measured here)",
                verified=False,
                source_name=metrics["source"],
                source_url=metrics["source_url"],
            )
        )
    family = entry["architecture"]["module"].rsplit(".", 1)[-1]
    training = entry.get("training") or {}
    return ModelCardData(
        base_model=_base_model(entry),
        library_name="keras",
        license=entry["license"],
        tags=[*TAGS, family],
        datasets=[training.get("dataset", "imagenet-1k")],
        pipeline_tag="image-classification",
        model_name=entry["name"] if results else None,
        eval_results=results or None,
    )


def _base_model(entry: Mapping[str, Any]) -> str | list[str] | None:
    value = (entry.get("hub") or {}).get("base_model")
    ids = [value] if isinstance(value, str) else value
    if value is None:
        return None
    if not isinstance(ids, list) or not ids or not all(is_repo_id(i) for i in ids):
        raise ValueError(f"Zoo entry {entry.get('name')!r}: 'hub.base_model' must be a Hub model id 'org/name' or a "
                         f"list of them (the model these weights were fine-tuned from), got {value!r}.")
    return value


@functools.lru_cache(maxsize=1)
def _published_loaders() -> dict[str, str]:
    """zoo name -> the 0.0.9 function of `harmonization.models` that loads it, read from `models/loaders.py`.

    Read, not imported: `harmonization.models` sits above the loader, which sits above this module. Each loader is
    a function `load_X()` whose body calls `load_published("<zoo name>")`.
    """
    source = resources.files("harmonization").joinpath("models", "loaders.py").read_text(encoding="utf-8")
    found = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.FunctionDef) or node.name == "load_published":
            continue
        for call in ast.walk(node):
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "load_published"
                    and call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
                found[call.args[0].value] = node.name
    return found


def published_loader(name: str) -> str | None:
    """The published 0.0.9 API's loader of zoo model `name` (e.g. "load_ViT_B16"), or None when 0.0.9 had none."""
    return _published_loaders().get(name)


def _published_api(entry: Mapping[str, Any], image_size: str) -> str:
    function = published_loader(entry["name"])
    if function is None:
        return ("The published research package (serre-lab/Harmonization 0.0.9) had no loader for this model; "
                "use one of the two ways above.")
    returned = ("softmax probabilities, as 0.0.9 returned them" if entry["output"]["original"] == "probabilities"
                else "logits")
    return "\n".join([
        "Code written for the research package (`pip install harmonization`, serre-lab/Harmonization 0.0.9) runs "
        "unchanged on Harmonization Hub, which installs the same `harmonization` module on Keras 3:",
        "",
        "```python",
        f"from harmonization.models import {function}, preprocess_input",
        "",
        f"model = {function}()  # the bare network: no preprocessing inside, as 0.0.9 returned it",
        f"outputs = model(preprocess_input(images))  # images: RGB in [0, 255], {image_size}x{image_size}; {returned}",
        "```",
    ])


def _table_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _conversion_check(checks: Mapping[str, tuple[Any, str]] | None, conversion: ConversionCheck | None) -> str:
    if not checks and conversion is None:
        return ("No check was run for this rendering. A published card states here the checks its build ran, "
                "with their numbers (`harmonization publish`: `publish.build_preset(..., check_round_trip=True)`).")
    lines = ["The checks this repository's build ran (`harmonization.publish.build_preset`), with what they measured."]
    if checks:
        rows = ["| Check | Value | How |", "|---|---|---|"]
        rows += [f"| {_table_cell(label)} | {_table_cell(value)} | {_table_cell(how)} |"
                 for label, (value, how) in checks.items()]
        lines.append("\n".join(rows))
    if conversion is not None and not conversion.checks:
        lines.append(f"**Against the original library**: not run for this build, because {conversion.not_run}.")
    elif conversion is not None:
        # Imported here: the tolerance lives with the check, whose module converts models (rendering never does).
        from harmonization.conversion_check import TOLERANCE

        versions = ", ".join(f"{package} {version}" for package, version in sorted(conversion.versions.items()))
        lines.append(
            "**Against the original library.** The libraries that wrote the published file (see *Original "
            "library* above) need TensorFlow 2.15 with Keras 2 and cannot run beside this package, so the published "
            "file itself is not run through them here. Instead, reduced-size networks of the same family were "
            "built by the original library, given non-trivial weights, saved in the published layout with their "
            "logits on fixed images (`tools/make_conversion_fixtures.py`, with "
            f"{versions}), then converted here by the same code as this model's file and compared "
            f"(tolerance {TOLERANCE:g}):"
        )
        rows = ["| Fixture, made by the original library | Library call | Layout | Images | "
                "Max abs logit difference |", "|---|---|---|---|---|"]
        for check in conversion.checks:
            compared = " (pre-softmax logits: the original ends in a softmax)" if check.reference != "logits" else ""
            size = f"{check.image_size}x{check.image_size}"
            rows.append(f"| `{check.fixture}` | `{_table_cell(check.call)}` | {check.layout} | "
                        f"{check.images} ({size}) | {check.max_abs_diff:.1e}{compared} |")
        lines.append("\n".join(rows))
    return "\n\n".join(lines)


def _saliency_figure(name: str, figure: str | None) -> str:
    if figure is None:
        return ""
    return "\n\n".join([
        "## Saliency",
        f"![Saliency maps of {name} on generated images]({figure})",
        "The model's saliency map of its top class (`harmonization.saliency_map`: the largest absolute gradient of "
        "that class's logit over the colour channels, taken after the preprocessing inside the model) on images made "
        "by `harmonization.synthetic` (shapes on clutter, seed 0, not ImageNet photos: the top class says nothing "
        "about accuracy). Drawn by `harmonization.card_figure.draw_saliency_figure` when this repository was built.",
    ]) + "\n"


def _shown(value: float | None) -> str:
    return NOT_PUBLISHED if value is None else f"{float(value):g}"


def _metrics_table(entry: Mapping[str, Any]) -> str:
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
    conversion: ConversionCheck | None = None,
    figure: str | None = None,
) -> str:
    """Render the model card of a zoo model and return its Markdown text (with the YAML front matter).

    Args:
        name_or_entry: str or mapping. A zoo name, or a zoo entry (e.g. `harmonization.model_info(name)`).
        repo_id: str or None. The Hub repo the card is for. Defaults to the entry's `hub.repo_id`.
        parameter_count: int or None. The parameter count to show. Defaults to the entry's.
        checks: mapping or None. Measured rows for the conversion-check section, `label -> (value, how measured)`,
            e.g. the preset round-trip difference `harmonization publish` measures. Defaults to None.
        template: path or None. The template. Defaults to the top-level `MODEL_CARD.md`.
        conversion: the check against the original library (`harmonization.conversion_check.check_entry`), shown
            with its numbers, or why it was not run. Defaults to None (not part of this rendering).
        figure: str or None. The saliency figure's file name beside the card (`card_figure.FIGURE_FILE`), shown
            in a "Saliency" section. Defaults to None (no figure, no section).

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
    image_size = str(config.get("image_size", (preprocessing.get("input_shape") or [224])[0]))
    fields = {
        "card_data": card_data(entry).to_yaml(),
        "title": f"{_display_name(entry)}, harmonized ({entry['name']})",
        "description": entry.get("description", ""),
        "name": entry["name"],
        "architecture": _display_name(entry),
        "class_name": architecture["class_name"],
        "module": architecture["module"],
        "parameter_count": f"{int(count):,}" if count is not None else "unknown",
        "image_size": image_size,
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
        "metrics_table": _metrics_table(entry),
        "published_api": _published_api(entry, image_size),
        "conversion_check": _conversion_check(checks, conversion),
        "saliency_figure": _saliency_figure(entry["name"], figure),
    }
    used = set(_PLACEHOLDER.findall(text))
    unknown = sorted(used - set(fields))
    if unknown:
        raise ValueError(f"Model-card template uses fields the renderer does not fill: {unknown}.")
    lost = sorted(REQUIRED_FIELDS - used)
    if lost:
        raise ValueError(f"Model-card template lacks required fields {lost}.")
    return _PLACEHOLDER.sub(lambda match: fields[match.group(1)], text)
