"""`harmonization evaluate MODEL`: score a model's human alignment on ClickMe, beside the paper's numbers.

The protocol is the published one (serre-lab/Harmonization `evaluate_clickme`, arXiv 2211.04533), run by
`harmonization.data.load_clickme(..., training=False)` and `harmonization.evaluate_alignment`; `protocol()`
spells it out into `results.json`, so that a number can be traced to how it was measured.
Only the standard library is imported at module level: `harmonization --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from harmonization.cli_common import input_size, to_numpy

DEFAULT_OUT_ROOT = "harmonization_evaluate"
DEFAULT_DATASET = "clickme"
DEFAULT_SPLIT = "validation"
DEFAULT_BATCH_SIZE = 64  # published
GRID_IMAGES = 6
#: What needs TensorFlow here, for harmonization._backend.require_tensorflow: the model may run on any backend.
EVALUATE_NEEDS_TENSORFLOW = "harmonization evaluate (it reads ClickMe through TensorFlow Datasets)"

#: The built-in saliency methods (`harmonization.saliency_methods`), by name, for `--method` and its `--help`
#: without importing TensorFlow; tests/test_saliency_methods.py keeps it equal to the registry.
SALIENCY_METHODS = ("gradient_mean", "gradient_max_abs", "smoothgrad", "integrated_gradients")
#: The published evaluation map (xplique Saliency in the published `evaluate_clickme`).
DEFAULT_SALIENCY_METHOD = "gradient_max_abs"
METHOD_HELP = (
    f"saliency method: {', '.join(SALIENCY_METHODS)} (default: {DEFAULT_SALIENCY_METHOD}, the published "
    "evaluation map; see harmonization.saliency_methods)"
)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 that TensorFlow can count to (int64), or an error naming the value."""
    from harmonization._numbers import INT64_MAX  # here: this module imports only the standard library at load

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r:.60}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    if value > INT64_MAX:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer no larger than {INT64_MAX} (TensorFlow counts in int64), got {value}"
        )
    return value


def check_out_dir(out: Path) -> None:
    """Refuse an output folder that cannot be made (a file in the way, no write access), before any model or
    data work: scoring a dataset takes minutes, and its results would be lost at the end."""
    for folder in (out, *out.parents):
        if not folder.exists():
            continue
        if not folder.is_dir():
            where = "is a file" if folder == out else f"is under {str(folder)!r}, which is a file"
            raise NotADirectoryError(
                f"--out {str(out)!r} {where}; expected a directory for results.json and saliency_grid.png."
            )
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"--out {str(out)!r}: cannot create or write in {str(folder)!r} (no permission).")
        return


def protocol(image_size: int, method: str = DEFAULT_SALIENCY_METHOD) -> dict[str, Any]:
    """How the scores are measured, field by field (written into results.json), with saliency `method`."""
    from harmonization import data, metrics
    from harmonization.saliency_methods import get_saliency_method

    return {
        "reference": "serre-lab/Harmonization harmonization/evaluation/clickme.py `evaluate_clickme` "
        "(arXiv 2211.04533), with xplique Saliency and preprocess_input",
        "image_size": image_size,
        "images": f"the whole image (ClickMe: a 256x256 JPEG), resized (bilinear) to {image_size}x{image_size}, "
        "RGB in [0, 255]; the model applies its own preprocessing",
        "heatmaps": f"the whole map, resized (bilinear) to {data.PUBLISHED_HEATMAP_RESOLUTION}x"
        f"{data.PUBLISHED_HEATMAP_RESOLUTION}, blurred with the published normalised "
        f"{data.PUBLISHED_BLUR_SIZE}x{data.PUBLISHED_BLUR_SIZE} Gaussian (sigma {data.PUBLISHED_BLUR_SIGMA:g}, "
        f"its off-centre even-size grid, zero SAME padding), resized (bilinear) to {image_size}x{image_size}",
        "heatmap_resolution": data.PUBLISHED_HEATMAP_RESOLUTION,
        "blur_size": data.PUBLISHED_BLUR_SIZE,
        "blur_sigma": data.PUBLISHED_BLUR_SIGMA,
        "saliency_method": method,
        "saliency": get_saliency_method(method).description,
        "spearman": "per image, Spearman rank correlation of the flattened saliency and human maps, ties "
        "averaged as scipy.stats.spearmanr (a constant map scores 0 where scipy gives NaN)",
        "dice_iou": "top 10% of each map, m > np.percentile(m, 90); Dice = 2|A&B| / (|A| + |B| + epsilon), "
        "IoU = |A&B| / (|A|B| + epsilon)",
        "percentile": 10,
        "epsilon": metrics.EPSILON,
        "alignment_score": "mean per-image Spearman / human_ceiling",
        "human_ceiling": metrics.HUMAN_CEILING,
        "accuracy": "top-1 of the model's logits on the evaluated images (the paper's imagenet_top1 is on "
        "ImageNet validation)",
        "remainder": "every image is scored (the published loader drops the last incomplete batch)",
    }


def library_versions() -> dict[str, str]:
    """The versions that produced a results.json: ours, Keras and the backend it ran on, NumPy, Python, and
    TensorFlow and TensorFlow Datasets (which read the data whatever the backend)."""
    import importlib
    import platform

    import keras
    import numpy as np

    import harmonization

    backend = keras.backend.backend()
    versions = {
        "harmonization": harmonization.__version__,
        "keras": keras.__version__,
        "keras_backend": backend,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    # The data's packages, and the backend's own (JAX or PyTorch): all imported by now, so this costs nothing.
    for module in ("tensorflow", "tensorflow_datasets", *(() if backend == "tensorflow" else (backend,))):
        versions[module] = importlib.import_module(module).__version__
    return versions


def resolve_model(spec: str) -> tuple[Path, str | None, str]:
    """(preset directory, zoo name or None, run name) of a zoo name, hf:// URI or preset path.

    A preset or Hub model counts as a zoo model when its metadata.json `name` is one, so that a
    published preset is compared with the paper too.
    """
    from harmonization import hub, loader, presets, zoo

    directory = loader.resolve_preset(spec)  # load_model's resolution and errors
    names = zoo.list_models()
    name = spec if spec in names else presets.read_metadata(directory).get("name")
    name = name if isinstance(name, str) and name in names else None
    if spec.startswith(hub.HF_SCHEME):
        run_name = hub.parse_hf_uri(spec)[0].split("/")[-1]
    else:
        run_name = name or Path(spec).expanduser().resolve().name
    return directory, name, re.sub(r"[^A-Za-z0-9._-]+", "_", run_name) or "model"


def paper_metrics(name: str | None) -> dict[str, Any] | None:
    """The zoo's `metrics` block for `name` (paper numbers, in %), or None."""
    if name is None:
        return None
    from harmonization import zoo

    return zoo.paper_metrics(name)


def format_table(scores: dict[str, Any], paper: dict[str, Any] | None, extra: tuple[str, ...] = ()) -> str:
    """This run's scores beside the paper's (harmonized and baseline) when there are any.

    `extra`: further metrics of `scores` (means), one row each after the published ones.
    """
    rows = [  # title, value, format, key of the paper's number (in %)
        ("top-1 accuracy (%)", 100 * scores["accuracy"], ".1f", "imagenet_top1"),
        ("Spearman", scores["spearman"], ".3f", None),
        ("alignment score (%)", 100 * scores["alignment_score"], ".1f", "clickme_alignment"),
        ("Dice", scores["dice"], ".3f", None),
        ("IoU", scores["iou"], ".3f", None),
    ] + [(name, scores[name], ".3f", None) for name in extra]
    columns = ["this run"] + (["paper", "paper baseline"] if paper is not None else [])
    baseline = (paper or {}).get("baseline") or {}
    lines = [f"{'':<20}" + "".join(f"{c:>16}" for c in columns)]
    for title, value, spec, key in rows:
        cells = [format(value, spec)]
        if paper is not None:
            for source in (paper, baseline):
                number = source.get(key) if key else None
                cells.append("-" if number is None else format(number, spec))
        lines.append(f"{title:<20}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def draw_grid(model, examples: dict, spearman, path: Path, method: str = DEFAULT_SALIENCY_METHOD) -> Path:
    """image | human map | saliency (of `method`), one row per example."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from harmonization.saliency_methods import get_saliency_method

    images, heatmaps, labels = examples["image"], examples["heatmap"][..., 0], examples["label"]
    saliency = to_numpy(get_saliency_method(method)(model, images, labels))
    rows = len(images)
    shown = "saliency" if method == DEFAULT_SALIENCY_METHOD else method
    figure, axes = plt.subplots(rows, 3, figsize=(6.3, 2.1 * rows), squeeze=False)
    for r in range(rows):
        panels = [np.clip(images[r] / 255.0, 0, 1), heatmaps[r], saliency[r]]
        titles = ["image", "human map", shown] if r == 0 else ["", "", ""]
        titles[2] += f" (Spearman {spearman[r]:.2f})"
        for c, panel in enumerate(panels):
            axis = axes[r, c]
            axis.imshow(panel, cmap=None if c == 0 else "magma")
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(titles[c].strip(), fontsize=8)
        axes[r, 0].set_ylabel(f"label {int(labels[r])}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole command; returns what it writes to results.json."""
    from harmonization import _backend  # here: this module imports only the standard library at load

    _backend.require_tensorflow(EVALUATE_NEEDS_TENSORFLOW)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.out:
        check_out_dir(Path(args.out).expanduser())
    if args.data_dir is not None and not args.download and not Path(args.data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"--data-dir {args.data_dir!r} is not a directory (pass --download to build it there).")
    data_dir = None if args.data_dir is None else str(Path(args.data_dir).expanduser().resolve())

    import numpy as np

    import harmonization

    from harmonization import loader

    directory, zoo_name, run_name = resolve_model(args.model)
    out = Path(args.out).expanduser() if args.out else Path(DEFAULT_OUT_ROOT) / run_name
    if not args.out:  # a given --out was checked first thing; the default one is known only now
        check_out_dir(out)
    model = loader.load_resolved(directory)  # resolve_model verified it
    image_size = input_size(model)
    print(f"Model {args.model} ({zoo_name or 'not a zoo model'}), {image_size}x{image_size} inputs", flush=True)

    try:
        dataset = harmonization.data.load_clickme(
            args.split, args.batch_size, image_size=image_size, training=False, data_dir=data_dir,
            name=args.dataset, download=args.download,
        )
    except FileNotFoundError as error:
        if args.download:
            raise
        raise FileNotFoundError(f"{error} From the command line: pass --download, or --data-dir DIR.") from None
    max_batches = None
    if args.limit is not None:
        dataset = dataset.unbatch().take(args.limit).batch(args.batch_size)
        max_batches = math.ceil(args.limit / args.batch_size)  # the progress bar's length
    print(f"Scoring {args.dataset} {args.split!r}" + (f", at most {args.limit} images" if args.limit else ""),
          flush=True)
    method = getattr(args, "method", DEFAULT_SALIENCY_METHOD)
    if method != DEFAULT_SALIENCY_METHOD:
        print(f"Saliency method: {method}", flush=True)
    scores = harmonization.evaluate_alignment(model, dataset, max_batches=max_batches, verbose=1, saliency=method)
    # The published three first, in the published order; then any metric added to DEFAULT_METRICS.
    extra = tuple(name for name in harmonization.metrics.DEFAULT_METRICS if name not in ("spearman", "dice", "iou"))

    summary = {
        "accuracy": float(scores["accuracy"]),
        "spearman": scores["spearman_mean"],
        "alignment_score": scores["alignment_score"],
        "alignment_score_percent": 100 * scores["alignment_score"],
        "dice": scores["dice_mean"],
        "iou": scores["iou_mean"],
        "num_images": int(scores["num_images"]),
        **{name: scores[f"{name}_mean"] for name in extra},
    }
    paper = paper_metrics(zoo_name)
    print(format_table(summary, paper, extra))
    print(f"{summary['num_images']} images of {args.dataset} {args.split!r}.")
    if paper is not None:
        print(f"paper: {paper.get('source', '')} {paper.get('source_url', '')}".rstrip())
        print("(The paper's top-1 is ImageNet validation accuracy; this run's is on the images scored here.)")

    out.mkdir(parents=True, exist_ok=True)
    examples = next(iter(dataset.unbatch().take(GRID_IMAGES).batch(GRID_IMAGES)))
    examples = {key: value.numpy() for key, value in examples.items()}
    grid = draw_grid(model, examples, scores["spearman"], out / "saliency_grid.png", method)

    results = {
        "model": {"spec": args.model, "zoo_name": zoo_name, "preset_dir": str(directory), "input_size": image_size},
        "data": {
            "dataset": args.dataset, "split": args.split, "data_dir": data_dir,
            "limit": args.limit, "batch_size": args.batch_size, "num_images": summary["num_images"],
        },
        "scores": summary,
        "per_image": {
            key: np.asarray(scores[key], np.float64).tolist() for key in harmonization.metrics.DEFAULT_METRICS
        },
        "paper": paper,
        "protocol": protocol(image_size, method),
        "versions": library_versions(),
        "files": {"saliency_grid": grid.name},
    }
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"Wrote {path} and {grid}")
    return results
