"""The `harmonization` command: browse the zoo, download, convert, publish, predict, explain, evaluate, train,
quickstart.

Heavy imports (Keras and its backend) happen inside the subcommands, so `harmonization --help` and
`harmonization list` answer at once. Every command but `train`, `evaluate` and `quickstart` runs on any Keras
backend; those three are refused with one line (exit status 2) where TensorFlow is missing, before any work.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from harmonization import _backend
from harmonization.cli_common import import_backend_quietly, input_size, to_numpy
from harmonization.evaluate_command import EVALUATE_NEEDS_TENSORFLOW as _EVALUATE_NEEDS_TENSORFLOW

# Commands that answer from the zoo's JSON entries: Keras is not imported at all.
_WITHOUT_KERAS = frozenset(("list", "info"))
# Commands that check their own arguments first and import Keras themselves.
_KERAS_LATER = frozenset(("train",))
# What each TensorFlow command needs it for, completing "... needs TensorFlow" (harmonization._backend).
_NEEDS_TENSORFLOW = {
    "evaluate": _EVALUATE_NEEDS_TENSORFLOW,
    "quickstart": "harmonization quickstart (it builds its dataset with TensorFlow Datasets)",
}
# Commands that run on the TensorFlow backend only, completing "... runs on the TensorFlow backend only".
_NEEDS_TENSORFLOW_BACKEND = {
    "train": "harmonization train (tf.data pipelines and tf.distribute strategies)",
}


def _cmd_list(args: argparse.Namespace) -> int:
    from harmonization import zoo

    names = zoo.list_models()
    if args.json:
        print(json.dumps(names))
        return 0
    width = max((len(n) for n in names), default=0)
    for name in names:
        info = zoo.model_info(name)
        print(f"{name:<{width}}  {info.get('description', '')}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from harmonization import zoo

    print(json.dumps(zoo.model_info(args.name), indent=2))
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from harmonization import loader

    path = loader.resolve_preset(args.name, revision=args.revision)
    print(path)
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    from harmonization.presets import sign_preset

    record = sign_preset(args.preset)
    for name, facts in sorted(record["files"].items()):
        print(f"{name}: {facts['size']} bytes, sha256 {facts['sha256']}")
    print(f"Signed {args.preset}: a later change to these files is detected before the preset is loaded.")
    return 0


def _arch_of_published_file(source: str) -> str:
    """The zoo model a published file is, from its name (`vit-b16_harmonized.h5`, ...), or a clear error."""
    from harmonization import zoo

    arch = zoo.model_for_file(source)
    if arch is None:
        published = sorted(zoo.model_info(n)["source"]["url"].rsplit("/", 1)[-1] for n in zoo.list_models())
        raise ValueError(
            f"Cannot tell which zoo model {source!r} is from its name (the published files are "
            f"{', '.join(published)}); pass --arch NAME (a zoo name or an architecture class)."
        )
    return arch


def _cmd_convert(args: argparse.Namespace) -> int:
    from harmonization.convert import read_keras2_h5
    from harmonization.publish import convert_to_preset

    try:
        config = json.loads(args.config) if args.config else None
    except json.JSONDecodeError as error:
        raise ValueError(f"--config is not valid JSON ({error}): {args.config!r}. Example: "
                         '--config \'{"image_size": 64}\'.') from None
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"--config must be a JSON object of constructor arguments, got {args.config!r}.")
    arch = args.arch or _arch_of_published_file(args.source)
    source = read_keras2_h5(args.source)
    path = convert_to_preset(source, arch, args.out, config=config, source_url=args.source_url)  # read once
    print(f"Converted {args.source} ({source.layout} layout, {source.weight_count} weights, "
          f"{source.parameter_count:,} parameters) into {arch}.")
    print(path)
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harmonization import zoo
    from harmonization.publish import publish

    if args.all == bool(args.names):
        raise ValueError("publish: name the zoo models to publish, or pass --all for every one (not both).")
    single = args.repo_id is not None or args.dry_run or args.source is not None or args.out is not None
    if not single:
        return _release(args)
    if args.all or len(args.names) != 1 or args.pin:
        raise ValueError("publish: --repo-id, --source, --out and --dry-run publish one model without pinning it; "
                         "drop them to publish several models (--namespace ORG, --pin).")
    name = args.names[0]
    repo_id = args.repo_id or f"{args.namespace or zoo.default_namespace()}/{name}"
    folder = args.out
    if args.dry_run and folder is None:
        folder = str(Path("publish") / name)
    result = publish(name, repo_id, source=args.source, dry_run=args.dry_run, folder=folder,
                     private=args.private or None, commit_message=args.message, overwrite_card=args.overwrite_card,
                     force=args.force)
    print(f"Round trip: max |logit difference| after reloading the preset = {result.round_trip_max_abs_diff:.1e}")
    if result.dry_run:
        print(f"Dry run: preset and model card written to {result.folder}; nothing uploaded.")
        print(result.folder)
        return 0
    if result.kept_hub_card:
        print("The repo already has a README.md; it was kept (pass --overwrite-card to replace it).")
    if result.commit_url is None:
        print(f"hf://{result.repo_id} already holds this preset at commit {result.commit_oid}; nothing uploaded.")
    else:
        print(f"Uploaded to hf://{result.repo_id} in commit {result.commit_oid} ({result.commit_url}).")
    print(f'Pin it: set "hub": {{"repo_id": "{result.repo_id}", "revision": "{result.commit_oid}"}} in '
          f"models/{result.name}.json.")
    return 0


def _release(args: argparse.Namespace) -> int:
    from harmonization.release import release

    released = release(None if args.all else args.names, namespace=args.namespace, work_dir=args.work_dir,
                       models_dir=args.models_dir, pin=args.pin, force=args.force,
                       overwrite_card=args.overwrite_card, private=args.private or None)
    width = max(len(item.repo_id) for item in released)
    print(f"{'repo':<{width + 5}}  commit                                    uploaded")
    for item in released:
        uploaded = ", ".join(item.uploaded) if item.uploaded else "nothing (already there)"
        print(f"hf://{item.repo_id:<{width}}  {item.commit_oid}  {uploaded}")
    if args.pin:
        print(f"Pinned {len(released)} model(s): their repo and commit are in models/NAME.json.")
    else:
        print("Pass --pin to write these commits into models/NAME.json (the zoo then loads exactly them).")
    return 0


def _load_images(paths: Sequence[str], size: int):
    import numpy as np
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype="float32"))
    return np.stack(images)


def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from harmonization.loader import load_model
    from harmonization.presets import class_names

    model = load_model(args.model, revision=args.revision)
    images = _load_images(args.images, input_size(model))
    logits = np.asarray(model.predict(images, verbose=0))
    labels = _imagenet_labels(logits.shape[-1], class_names(model))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = shifted / shifted.sum(axis=-1, keepdims=True)
    for path, row in zip(args.images, probs):
        print(path)
        for index in np.argsort(-row)[: args.top]:
            print(f"  {row[index]:7.2%}  {index:4d}  {labels[index]}")
    return 0


def _imagenet_labels(num_classes: int, names: Sequence[str] | None = None) -> list[str]:
    """The preset's class names if it has them; else the shipped ImageNet names for a 1000-class head; else indices."""
    if names is not None and len(names) == num_classes:
        return list(names)
    from harmonization.zoo import imagenet_class_names

    imagenet = imagenet_class_names()
    if num_classes == len(imagenet):
        return imagenet
    return [f"class_{i}" for i in range(num_classes)]


def _cmd_explain(args: argparse.Namespace) -> int:
    import numpy as np

    from harmonization.loader import load_model
    from harmonization.presets import class_names
    from harmonization.evaluate_command import DEFAULT_SALIENCY_METHOD
    from harmonization.saliency_methods import get_saliency_method
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = _figure_path(args.out, args.image)
    model = load_model(args.model, revision=args.revision)
    image = _load_images([args.image], input_size(model))
    logits = np.asarray(model.predict(image, verbose=0))[0]
    label = int(np.argmax(logits))
    name = _imagenet_labels(logits.shape[-1], class_names(model))[label]
    # W.r.t. the preprocessed input, as published (harmonization.saliency_input), by the chosen method.
    saliency = to_numpy(get_saliency_method(args.method)(model, image, [label]))[0]
    figure, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].imshow(image[0].astype("uint8"))
    axes[0].set_title("image")
    axes[1].imshow(saliency, cmap="jet")
    shown = "saliency" if args.method == DEFAULT_SALIENCY_METHOD else args.method
    axes[1].set_title(f"{shown} of {name} (class {label})")
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    print(out)
    return 0


_FIGURE_FORMATS = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def _figure_path(out: str, image: str):
    """Where `explain` writes: `out` itself; `out/<image>_saliency.png` for a folder; `out.png` without a suffix.

    Decided (and checked) before the model is loaded, so that a bad `--out` costs nothing.
    """
    from pathlib import Path

    path = Path(out)
    if path.is_dir() or out.endswith(("/", "\\")):
        path = path / f"{Path(image).stem}_saliency.png"
    elif path.suffix == "":
        path = path.with_name(path.name + ".png")
    elif path.suffix.lower() not in _FIGURE_FORMATS:
        raise ValueError(f"--out {out!r}: unsupported figure format {path.suffix!r}; use one of "
                         f"{', '.join(_FIGURE_FORMATS)} (or a folder).")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from harmonization import evaluate_command

    evaluate_command.run(args)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from harmonization import recipes

    # A bad recipe or --set is reported at once, before TensorFlow's few seconds of start-up.
    recipes.with_settings(recipes.load_recipe(args.recipe, args.set or ()), epochs=args.epochs,
                          batch_size=args.batch_size)
    import_backend_quietly()
    from harmonization import trainer

    return trainer.main(args)


def _cmd_quickstart(args: argparse.Namespace, rest: list[str]) -> int:
    from harmonization import quickstart

    result = quickstart.main(rest)
    return int(result or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harmonization",
        description="Harmonized vision models: list the zoo, download, convert, publish, predict, explain, evaluate, "
                    "train.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from harmonization import evaluate_command as ev  # its defaults and argument types (standard library only)

    p = sub.add_parser("list", help="list the models of the zoo")
    p.add_argument("--json", action="store_true", help="print the names as a JSON list")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="show a zoo entry")
    p.add_argument("name")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("download", help="download (and verify) a model into the cache; print its preset directory")
    p.add_argument("name", help="zoo name or hf://org/repo[@revision]")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("sign", help="record the size and sha256 of a trusted local preset's files in its metadata")
    p.add_argument("preset", metavar="PRESET_DIR")
    p.set_defaults(func=_cmd_sign)

    p = sub.add_parser("convert", help="convert a published Keras-2 .h5 file into a native Keras 3 preset")
    p.add_argument("source", metavar="SOURCE.h5", help="weights file or full-model save (Keras 2 HDF5)")
    p.add_argument("--arch", default=None,
                   help="zoo name (e.g. vit_b16_harmonized) or architecture class (ViT); default: the zoo model "
                        "the published file name says (vit-b16_harmonized.h5, levit_small_harmonized.h5, ...)")
    p.add_argument("--out", required=True, metavar="DIR", help="preset directory to write")
    p.add_argument("--config", default=None, metavar="JSON",
                   help='constructor arguments overriding the zoo config, e.g. \'{"image_size": 64}\'')
    p.add_argument("--source-url", default=None, help="where the file was published (recorded in metadata.json)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "publish", help="build, check and upload zoo models' presets and cards to the Hub (--all: the whole zoo)",
        description="Publish zoo models to the Hugging Face Hub: for each, download and verify the published "
                    "original, convert it, check the round trip, write the preset, card and figure, create the "
                    "repo ORG/NAME if needed and upload what is not already there. Idempotent: a second run uploads "
                    "nothing, and a run that stopped continues where it stopped. Needs a token with write access "
                    "(HF_TOKEN or `hf auth login`).")
    p.add_argument("names", nargs="*", metavar="NAME", help="zoo names (or --all)")
    p.add_argument("--all", action="store_true", help="every model of the zoo")
    p.add_argument("--namespace", default=None, metavar="ORG",
                   help="Hub user or organisation (default: the zoo's, hub.repo_id in models/_defaults.json)")
    p.add_argument("--pin", action="store_true",
                   help="write each model's repo and commit into models/NAME.json once its upload is checked")
    p.add_argument("--work-dir", default="release", metavar="DIR",
                   help="where built presets and release.json go; a new run reuses what is complete (default: "
                        "./release)")
    p.add_argument("--models-dir", default=None, metavar="DIR",
                   help="the models/ folder to publish and pin (default: the zoo's; a source checkout's models/)")
    p.add_argument("--force", action="store_true", help="replace a repo that holds another model under that name")
    p.add_argument("--repo-id", default=None, metavar="ORG/NAME", help="publish one model to this repo")
    p.add_argument("--source", default=None, metavar="FILE.h5",
                   help="one model: the published original to convert (default: downloaded and verified)")
    p.add_argument("--dry-run", action="store_true",
                   help="one model: write the folder only (default --out publish/NAME)")
    p.add_argument("--out", default=None, metavar="DIR", help="one model: preset folder (default: a temporary one)")
    p.add_argument("--private", action="store_true", help="create repos private if they do not exist")
    p.add_argument("--overwrite-card", action="store_true", help="replace a README.md a repo already has")
    p.add_argument("--message", default=None, help="one model: commit message")
    p.set_defaults(func=_cmd_publish)

    p = sub.add_parser("predict", help="top-k ImageNet classes of images")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", default="vit_b16_harmonized", help="zoo name, hf:// URI or preset directory")
    p.add_argument("--revision", default=None)
    p.add_argument("--top", type=ev.positive_int, default=5, metavar="K", help="classes shown per image (default: 5)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("explain", help="save an image beside its saliency map")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--out", required=True, metavar="FILE.png")
    p.add_argument("--model", default="vit_b16_harmonized", help="zoo name, hf:// URI or preset directory")
    p.add_argument("--revision", default=None)
    p.add_argument("--method", choices=ev.SALIENCY_METHODS, default=ev.DEFAULT_SALIENCY_METHOD, metavar="NAME",
                   help=ev.METHOD_HELP)
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("evaluate", help="score a model's human alignment on ClickMe, beside the paper's numbers")
    p.add_argument("model", metavar="MODEL", help="zoo name, hf://org/repo[@revision] or preset directory")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="TFDS data directory (default: TFDS's)")
    p.add_argument("--dataset", default=ev.DEFAULT_DATASET, help=f"TFDS dataset (default: {ev.DEFAULT_DATASET})")
    p.add_argument("--split", default=ev.DEFAULT_SPLIT, help=f"split to score (default: {ev.DEFAULT_SPLIT})")
    p.add_argument("--batch-size", type=ev.positive_int, default=ev.DEFAULT_BATCH_SIZE, metavar="N",
                   help=f"images per batch (default: {ev.DEFAULT_BATCH_SIZE})")
    p.add_argument("--limit", type=ev.positive_int, default=None, metavar="N", help="score only the first N images")
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"where results.json and saliency_grid.png go (default: ./{ev.DEFAULT_OUT_ROOT}/MODEL)")
    p.add_argument("--download", action="store_true",
                   help="download and build the dataset if DIR lacks it (ClickMe: every published shard)")
    p.add_argument("--method", choices=ev.SALIENCY_METHODS, default=ev.DEFAULT_SALIENCY_METHOD, metavar="NAME",
                   help=ev.METHOD_HELP)
    p.set_defaults(func=_cmd_evaluate)

    from harmonization import recipes  # the shipped recipes' names (standard library only)

    p = sub.add_parser(
        "train", help="train (or resume) a harmonized model from a recipe; save it as a preset and evaluate it",
        description="Train a harmonized model from a recipe. Re-running the same command resumes the run "
                    "directory (also after a kill); a directory of another recipe or model is refused.",
    )
    p.add_argument("--recipe", required=True, metavar="RECIPE",
                   help=f"a shipped recipe ({', '.join(recipes.list_recipes())}) or a recipe JSON file")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help="zoo name, hf://org/repo[@revision], preset directory or quickstart_cnn "
                        "(default: the recipe's model.source)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="TFDS data directory (default: TFDS's)")
    p.add_argument("--imagenet-dir", default=None, metavar="DIR",
                   help="folder with ILSVRC2012_img_{train,val}.tar, for recipes that mix in ImageNet")
    p.add_argument("--out", default=None, metavar="RUN_DIR",
                   help="run directory (default: ./harmonization_runs/NAME, the recipe's name)")
    p.add_argument("--epochs", type=ev.positive_int, default=None, metavar="N", help="override the recipe's epochs")
    p.add_argument("--batch-size", type=ev.positive_int, default=None, metavar="N",
                   help="override the recipe's global batch size")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set optimizer.learning_rate=0.01 (repeatable)")
    p.add_argument("--strategy", choices=("default", "mirrored", "multiworker"), default="default",
                   help="default: one device; mirrored: this machine's GPUs; multiworker: workers from TF_CONFIG")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                   help="Keras progress: 0 none, 1 bars, 2 one line per epoch (default: 1)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "quickstart", help="run the quickstart (arguments are passed on)", add_help=False, prefix_chars="\0"
    )
    p.set_defaults(func=_cmd_quickstart, passthrough=True)
    return parser


def _refused_without_tensorflow(command: str) -> str | None:
    """The one-line error for a command that needs TensorFlow (or its backend) where it is missing, else None.

    Checked before any argument is read or model loaded, without importing Keras: only `find_spec` and Keras's
    backend rule (harmonization._backend.chosen).
    """
    try:
        if command in _NEEDS_TENSORFLOW:
            _backend.require_tensorflow(_NEEDS_TENSORFLOW[command])
        if command in _NEEDS_TENSORFLOW_BACKEND:
            _backend.require_tensorflow_backend(_NEEDS_TENSORFLOW_BACKEND[command])
    except _backend.MissingBackendError as error:
        return f"harmonization {command}: error: {error}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `harmonization` command with `argv` (default: `sys.argv[1:]`); return the exit status.

    1 for an error of the run (a missing file, a bad value), 2 for a usage error: argparse's, and a command that
    needs TensorFlow where it is missing (what is missing is the caller's setup, as a wrong option is).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "quickstart":
        refused = _refused_without_tensorflow("quickstart")
        if refused:
            print(refused, file=sys.stderr)
            return 2
        # Everything after `quickstart` belongs to the quickstart, including --help (quiet start-up: its run).
        return _cmd_quickstart(argparse.Namespace(command="quickstart"), argv[1:])
    args = parser.parse_args(argv)
    refused = _refused_without_tensorflow(args.command)
    if refused:
        print(refused, file=sys.stderr)
        return 2
    try:
        if args.command not in _WITHOUT_KERAS | _KERAS_LATER:
            import_backend_quietly()
        return args.func(args)
    except _backend.MissingBackendError as error:
        # Something deeper needs TensorFlow (or another backend) than this command's own check knew: one line.
        print(f"harmonization {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (KeyError, ValueError, OSError) as error:
        print(f"harmonization {args.command}: error: {error}", file=sys.stderr)
        return 1
