"""Make the cross-backend fixtures: TensorFlow's logits of every zoo architecture, for environments without TensorFlow.

tests/test_backends_zoo.py compares each architecture's logits on JAX and PyTorch with TensorFlow's. Where
TensorFlow is installed it computes them live; CI's JAX and PyTorch environments are built without it, so the
reference is committed here, computed by TensorFlow from weights drawn from a seed (`seeded_weights`, keyed by each
variable's path, so that any backend rebuilds the same model):

- `tests/fixtures/backends/zoo_logits.json` — per tiny case: the architecture, its config (the tiny configs of
  tests/test_architectures_*.py, plus odd image sizes where strided "same" layers pad asymmetrically), the seeds,
  and TensorFlow's logits on two images;
- `tests/fixtures/backends/full_size_logits.json` — per zoo model at full size: the first `HEAD` logits of each
  image and the largest |logit| (enough for the relative comparison, a few KB instead of 14,000 numbers);
- `tests/fixtures/backends/tensorflow_preset/` — one tiny preset saved by TensorFlow (the smallest case), so that
  the environments without TensorFlow load a preset TensorFlow wrote.

Run it under TensorFlow from the repository root (a few minutes on 2 cores, most of it the full-size models):

    KERAS_BACKEND=tensorflow python tools/make_backend_fixtures.py
    KERAS_BACKEND=tensorflow python tools/make_backend_fixtures.py --tiny-only   # skip the full-size models

Rerun it only when an architecture changes TensorFlow's numbers on purpose; the tests say when the fixture is stale.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "backends"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the functions every backend runs live in the test module itself

#: The tiny cases: architecture class and config. The tests/test_architectures_*.py configs, plus odd sizes.
CASES = {
    "convnext": ("ConvNeXt", dict(image_size=32, depths=[1, 1, 2, 1], widths=[4, 4, 8, 8], num_classes=5)),
    "efficientnet": ("EfficientNet", dict(image_size=32, width_coefficient=0.1, depth_coefficient=0.4,
                                          num_classes=5)),
    # 37 -> 19 -> 10 -> 5 -> 3: every strided depthwise "same" convolution pads one side more than the other.
    "efficientnet_odd_size": ("EfficientNet", dict(image_size=37, width_coefficient=0.1, depth_coefficient=0.4,
                                                   num_classes=5)),
    "levit": ("LeViT", dict(image_size=96, patch_channel=16, out_channels=[24, 32, 32], num_heads=[2, 4, 4],
                            depths=[1, 1, 1], key_dims=[4, 4, 4], num_classes=5)),
    "maxvit": ("MaxViT", dict(image_size=64, depths=[1, 1, 1], widths=[8, 8, 16], stem_width=8, head_dim=4,
                              window_size=6, num_classes=5)),
    # 36 -> 18 -> 9 -> 5 -> 3: strided "same" convolutions, the "same" average-pool shortcut and the windows
    # (zero-padded to a multiple of 2) on odd sizes.
    "maxvit_odd_size": ("MaxViT", dict(image_size=36, depths=[1, 1, 1], widths=[8, 8, 16], stem_width=8,
                                       head_dim=4, window_size=2, num_classes=5)),
    "resnet_v2": ("ResNetV2", dict(image_size=32, stack_blocks=[1, 2, 1, 1], stack_filters=[2, 2, 4, 4],
                                   stem_filters=4, num_classes=5)),
    "vgg": ("VGG", dict(image_size=32, block_convs=[1, 1, 2, 1, 1], block_filters=[2, 4, 4, 4, 4], fc_units=8,
                        num_classes=5)),
    "vgg_smallest": ("VGG", dict(image_size=32, block_convs=[1, 1, 1, 1, 1], block_filters=[2, 2, 2, 2, 2],
                                 fc_units=4, num_classes=3)),
    "vit": ("ViT", dict(image_size=16, patch_size=8, hidden_size=8, num_layers=2, num_heads=2, mlp_dim=16,
                        num_classes=5)),
}
#: The case saved as a TensorFlow preset (the smallest weights file).
PRESET_CASE = "vgg_smallest"
WEIGHTS_SEED, IMAGES_SEED = 1, 0
FULL_SEED, FULL_COUNT, HEAD = 0, 2, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny-only", action="store_true", help="write the tiny cases and the preset only")
    args = parser.parse_args()
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    import harmonization
    from harmonization import zoo
    from test_backends_zoo import build_case, full_size_logits, logits_of

    if keras.backend.backend() != "tensorflow":
        raise SystemExit(f"The reference is TensorFlow's: run with KERAS_BACKEND=tensorflow, not "
                         f"{keras.backend.backend()!r}.")
    OUT.mkdir(parents=True, exist_ok=True)
    versions = {"tensorflow": tf.__version__, "keras": keras.__version__}
    cases = {}
    for name, (architecture, config) in CASES.items():
        case = {"architecture": architecture, "config": config, "weights_seed": WEIGHTS_SEED,
                "images_seed": IMAGES_SEED}
        case["logits"] = logits_of(build_case(case), case)
        cases[name] = case
    _write(OUT / "zoo_logits.json", {"_generated_by": "tools/make_backend_fixtures.py", **versions, "cases": cases})

    preset = OUT / "tensorflow_preset"
    shutil.rmtree(preset, ignore_errors=True)
    harmonization.save_preset(build_case(cases[PRESET_CASE]), preset, metadata={"case": PRESET_CASE})
    print(f"{preset}: {sum(p.stat().st_size for p in preset.iterdir())} bytes")

    if not args.tiny_only:
        names = zoo.list_models()
        logits = full_size_logits(names, FULL_SEED, IMAGES_SEED, FULL_COUNT)
        models = {name: {"logits_head": [row[:HEAD] for row in values],
                         "max_abs": max(abs(v) for row in values for v in row)} for name, values in logits.items()}
        _write(OUT / "full_size_logits.json", {"_generated_by": "tools/make_backend_fixtures.py", **versions,
                                               "seed": FULL_SEED, "images_seed": IMAGES_SEED, "count": FULL_COUNT,
                                               "head": HEAD, "models": models})


def _write(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
