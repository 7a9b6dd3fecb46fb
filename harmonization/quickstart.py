"""`harmonization quickstart`: see what harmonization does, offline, in a few minutes on a CPU.

It runs the same code paths as real ClickMe training, on a generated ClickMe-format dataset
(`tfds_clickme/clickme_synthetic`) whose classes are defined by an object that the "human" maps mark,
and whose training images also carry an easier *shortcut* (a black-and-white texture in a corner that names
the class in ~90% of the training images; random in the test split):

1. build (once, cached by TFDS) and load the dataset with `tfds` + `harmonization.data.load_clickme`;
2. train a baseline (cross-entropy only) and a `HarmonizedModel`: same architecture, seed and steps;
3. score both on the shortcut-free test split: accuracy, Spearman, alignment score, Dice, IoU;
4. save the harmonized model as a preset (with its class names) and reload it with `harmonization.load_model`:
   it takes raw [0, 255] images, so `harmonization predict` and `explain` work on it;
5. draw figures: test images | human map | baseline saliency | harmonized saliency, and the
   accuracy-vs-alignment plane.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = "harmonization_quickstart"
DATASET = "clickme_synthetic"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="harmonization quickstart",
        description="Train a baseline and a harmonized model on generated ClickMe-format data and compare them.",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: 400; 150 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model initialisation and the data order (default: 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per step (default: 64)")
    parser.add_argument(
        "--data-dir", default=None, help="TFDS data directory where the dataset is built once (default: TFDS's, ~/tensorflow_datasets)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and test images (for tests and smoke runs)")
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Keras progress bars: 0 none, 1 bars, 2 one line per epoch")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 150 if args.quick else 400
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(args, name)}")
    if not 0 <= args.seed < 2**31:
        parser.error(f"--seed must be an integer in [0, 2**31); got {args.seed}")
    return args


def _check_writable(out: Path) -> None:
    """Fail before any work when the output folder cannot be created or written (e.g. read-only)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
        pass


def quickstart_model(num_classes: int, image_size: int, seed: int):
    """A small CNN (three strided convolutions), the same for both runs, initialised from `seed`.

    It takes raw RGB in [0, 255] and scales it to [-1, 1] with its first layer, a `Rescaling`. The
    harmonizer differentiates at that layer's output (the preprocessed input, as published;
    `HarmonizedModel.saliency_input` says so): w.r.t. raw pixels the gradients would be 127.5x
    smaller, the loss's std epsilon would dominate them and the harmonization term would all but vanish.
    """
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3), name="images")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocessing")(inputs)
    for i, filters in enumerate((16, 32, 64)):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu", name=f"conv{i + 1}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name="quickstart_cnn")


def build_dataset(config: str, data_dir):
    """Build (once) the generated dataset through TFDS; TFDS writes it atomically."""
    import tensorflow_datasets as tfds

    import tfds_clickme  # noqa: F401  (registers the builders)

    builder = tfds.builder(f"{DATASET}/{config}", data_dir=data_dir)
    builder.download_and_prepare()
    return builder


def train(model, dataset, steps: int, harmonized: bool, verbose: int):
    """Fit `steps` steps; returns the history dict."""
    import keras
    import tensorflow as tf

    import harmonization

    epochs = min(steps, 6)
    per_epoch = steps // epochs
    optimizer = keras.optimizers.Adam(2e-3)
    if harmonized:
        trainer = harmonization.HarmonizedModel(model)
        trainer.compile(optimizer=optimizer)
        print(f"      saliency taken at {trainer.saliency_input.description}", flush=True)
        data = dataset
    else:
        trainer = model
        num_classes = model.output_shape[-1]
        trainer.compile(
            optimizer=optimizer,
            loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        )
        data = dataset.map(lambda b: (b["image"], tf.one_hot(b["label"], num_classes)))
    # shuffle=False: the dataset is shuffled already (Keras would warn that it ignores shuffle=True).
    history = trainer.fit(data.repeat(), epochs=epochs, steps_per_epoch=per_epoch, verbose=verbose, shuffle=False)
    return history.history


def evaluate(model, test, verbose: int) -> dict:
    import numpy as np

    import harmonization

    scores = harmonization.evaluate_alignment(model, test, verbose=verbose)
    return {
        "accuracy": float(scores["accuracy"]),
        "spearman": float(scores["spearman_mean"]),
        "alignment_score": float(scores["alignment_score"]),
        "dice": float(scores["dice_mean"]),
        "iou": float(scores["iou_mean"]),
        "num_images": int(scores["num_images"]),
        "spearman_per_image": np.asarray(scores["spearman"]).tolist(),
    }


def format_table(results: dict) -> str:
    columns = [("accuracy", "accuracy"), ("spearman", "Spearman"), ("alignment_score", "alignment"), ("dice", "Dice"), ("iou", "IoU")]
    header = f"{'model':<12}" + "".join(f"{title:>11}" for _, title in columns)
    lines = [header, "-" * len(header)]
    for name, scores in results.items():
        lines.append(f"{name:<12}" + "".join(f"{scores[key]:>11.3f}" for key, _ in columns))
    return "\n".join(lines)


def check_preset_round_trip(model, directory: Path, metadata: dict, images) -> float:
    """Save as a preset, reload with load_model, return the max |difference| of the logits."""
    import numpy as np

    import harmonization

    harmonization.save_preset(model, directory, metadata=metadata)
    reloaded = harmonization.load_model(directory)
    want = model.predict(images, verbose=0)
    got = reloaded.predict(images, verbose=0)
    return float(np.max(np.abs(want - got)))


def draw_figures(baseline, harmonized, examples: dict, results: dict, class_names, out: Path) -> list[Path]:
    """The saliency grid and the accuracy-vs-alignment scatter, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import harmonization

    images, heatmaps, labels = examples["image"], examples["heatmap"][..., 0], examples["label"]
    maps = {
        "baseline": harmonization.saliency_map(baseline, images, labels).numpy(),
        "harmonized": harmonization.saliency_map(harmonized, images, labels).numpy(),
    }
    rows = len(images)
    fig, axes = plt.subplots(rows, 4, figsize=(8, 2.1 * rows), squeeze=False)
    titles = ["test image", "human map", "baseline saliency", "harmonized saliency"]
    for r in range(rows):
        panels = [images[r] / 255.0, heatmaps[r], maps["baseline"][r], maps["harmonized"][r]]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(np.clip(panel, 0, 1) if c == 0 else panel, cmap=None if c == 0 else "magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
        axes[r, 0].set_ylabel(class_names[int(labels[r])], fontsize=8)
    fig.suptitle("Where the models look (shortcut-free test images)", fontsize=11)
    fig.tight_layout()
    grid = out / "saliency_grid.png"
    fig.savefig(grid, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    colours = {"baseline": "tab:gray", "harmonized": "tab:orange"}
    for name, scores in results.items():
        ax.scatter(scores["accuracy"], scores["alignment_score"], s=90, color=colours[name], label=name, zorder=3)
        ax.annotate(name, (scores["accuracy"], scores["alignment_score"]), textcoords="offset points", xytext=(8, -4))
    ax.set_xlabel("accuracy on the shortcut-free test split")
    ax.set_ylabel("human alignment score")
    ax.set_title("Accuracy vs. alignment")
    ax.grid(alpha=0.3)
    lo_x = min(s["accuracy"] for s in results.values())
    hi_x = max(s["accuracy"] for s in results.values())
    lo_y = min(s["alignment_score"] for s in results.values())
    hi_y = max(s["alignment_score"] for s in results.values())
    ax.set_xlim(max(0.0, lo_x - 0.1), min(1.0, hi_x + 0.1))
    ax.set_ylim(lo_y - 0.1, hi_y + 0.1)
    fig.tight_layout()
    scatter = out / "accuracy_vs_alignment.png"
    fig.savefig(scatter, dpi=110)
    plt.close(fig)
    return [grid, scatter]


def run(args: argparse.Namespace) -> dict:
    """The whole quickstart; returns the results that it also writes to `results.json`."""
    from harmonization.cli_common import import_backend_quietly

    import_backend_quietly()
    import harmonization

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config = "default"

    print(f"[1/5] Dataset {DATASET}/{config} (built once, then read from the TFDS cache)", flush=True)
    builder = build_dataset(config, args.data_dir)
    info = builder.info
    image_size = info.features["image"].shape[0]
    class_names = info.features["label"].names
    print(f"      {info.splits['train'].num_examples} train / {info.splits['test'].num_examples} test images, "
          f"{image_size}x{image_size}, {len(class_names)} classes, in {builder.data_dir}", flush=True)
    load = dict(name=f"{DATASET}/{config}", data_dir=args.data_dir, image_size=image_size, download=False)
    test_split = "test[:300]" if args.quick else "test"
    # No crop/flip augmentation here: crops cut the corner mark and flips change its texture, which
    # would weaken the planted shortcut that this demonstration is about. Shuffled every epoch.
    train_ds = (
        harmonization.data.load_clickme("train", 256, training=False, **load)
        .unbatch()
        .shuffle(4096, seed=args.seed)
        .batch(args.batch_size, drop_remainder=True)
    )
    test_ds = harmonization.data.load_clickme(test_split, 100, training=False, **load)

    models = {}
    histories = {}
    for index, name in enumerate(("baseline", "harmonized")):
        kind = "cross-entropy only" if name == "baseline" else "HarmonizedModel: cross-entropy + harmonization"
        print(f"[2/5] Training the {name} model ({kind}), {args.steps} steps", flush=True)
        models[name] = quickstart_model(len(class_names), image_size, args.seed)
        histories[name] = train(models[name], train_ds, args.steps, name == "harmonized", args.verbose)

    print("[3/5] Evaluating on the shortcut-free test split", flush=True)
    results = {name: evaluate(model, test_ds, args.verbose) for name, model in models.items()}
    table = format_table(results)
    print(table, flush=True)

    print("[4/5] Saving the harmonized model as a preset and reloading it with harmonization.load_model", flush=True)
    examples = next(iter(test_ds.take(1)))
    examples = {key: value.numpy()[:6] for key, value in examples.items()}
    preset_dir = out / "harmonized_preset"
    max_diff = check_preset_round_trip(
        models["harmonized"], preset_dir,
        {
            "name": "quickstart_harmonized",
            "description": "HarmonizedModel trained by `harmonization quickstart`",
            "class_names": list(class_names),
        },
        examples["image"],
    )
    if max_diff > 1e-5:
        raise RuntimeError(f"The reloaded preset predicts differently (max |difference| {max_diff:.2e}).")
    print(f"      {preset_dir}: reloaded predictions identical (max |difference| {max_diff:.1e})", flush=True)

    print("[5/5] Drawing figures", flush=True)
    figures = draw_figures(models["baseline"], models["harmonized"], examples, results, class_names, out)
    elapsed = time.perf_counter() - started
    summary = {
        "dataset": f"{DATASET}/{config}",
        "steps": args.steps,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "results": {name: {k: v for k, v in r.items() if k != "spearman_per_image"} for name, r in results.items()},
        "histories": {name: {k: [float(x) for x in v] for k, v in h.items()} for name, h in histories.items()},
        "preset": str(preset_dir),
        "preset_max_abs_difference": max_diff,
        "figures": [str(f) for f in figures],
        "seconds": round(elapsed, 1),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    base, harm = results["baseline"], results["harmonized"]
    print(
        f"\nHarmonization moved the model's attention onto the object people look at: alignment score "
        f"{base['alignment_score']:.2f} -> {harm['alignment_score']:.2f}, and shortcut-free accuracy "
        f"{base['accuracy']:.1%} -> {harm['accuracy']:.1%}."
    )
    for figure in figures:
        print(f"Figure: {figure}")
    print(f"Results: {out / 'results.json'}   ({elapsed:.0f} s)")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        _check_writable(Path(args.out))
    except OSError as error:
        print(f"harmonization quickstart: error: --out {args.out!r} cannot be written: "
              f"{error.strerror or error}. Choose a writable folder.", file=sys.stderr)
        return 1
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
