"""Make the Keras-2 conversion fixtures: tiny `.h5` files in the published layouts, with the originals' logits.

The published harmonized weights were written by four third-party libraries on TensorFlow 2 / Keras 2.
This script builds reduced-size versions of the same networks *with those libraries*, gives every
weight a non-trivial value, and saves

- `tests/fixtures/keras2/<name>.h5` — the file, in the layout the published file has (weights-only
  `save_weights`, or full-model `model.save` with its `model_weights/` root);
- `tests/fixtures/keras2/<name>.npz` — `images` (RGB in [0, 255], uint8) and `logits`, the original
  model's output on `preprocess_input(images)` (/255, ImageNet mean/std, as serre-lab/Harmonization does),
  computed in float32 by the original library;
- `tests/fixtures/keras2/manifest.json` — per fixture: the library call that built it, library versions,
  the file's sha256, the original's parameter count, and `native_config`: the class of
  `harmonization.architectures` and the tiny config that is the same network (tests/test_convert.py and
  `harmonization.conversion_check`, which reports the check on published model cards, both read it here);
- `tests/fixtures/reference/*.tsv` — the full-size weight layouts of the published architectures that are
  built from a library's function (vit_keras ViT-B/16; kecam ConvNeXt-Tiny, MaxViT-Tiny, LeViT-128), one
  weight a line in the library's order; see tests/fixtures/reference/README.md.

It needs a side environment with the original libraries, kept outside the repository:

    python3 -m venv /tmp/keras2env
    /tmp/keras2env/bin/pip install tensorflow-cpu==2.15.1 vit-keras==0.1.2 efficientnet==1.1.1 \
        tensorflow-addons==0.23.0 "opencv-python-headless<4.11" tqdm ftfy regex
    /tmp/keras2env/bin/pip install --no-deps keras-cv-attention-models==1.3.9  # its deps pull a 2nd TF
    /tmp/keras2env/bin/python tools/make_conversion_fixtures.py
    /tmp/keras2env/bin/python tools/make_conversion_fixtures.py --reference-only  # only the .tsv layouts

`--reference-out DIR` writes the layouts elsewhere (e.g. to compare them with the committed ones).

Reductions (each fixture < 1 MB):
- vit_keras: `vit.build_model` with tiny sizes (the function `vit_b16` calls);
- kecam ConvNeXt, MaxViT, LeViT: the family constructors with tiny `num_blocks` / channels / heads;
- efficientnet: `EfficientNet(width_coefficient, depth_coefficient, ...)`, the function `EfficientNetB0` calls;
- ResNet50V2: `keras.applications.resnet.ResNet` with the library's own `stack2` blocks, fewer and narrower;
- VGG16: `keras.applications.VGG16`'s own graph (config) with every width divided (VGG has no block function).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "keras2"
REFERENCE_OUT = ROOT / "tests" / "fixtures" / "reference"
MEAN = np.array([0.485, 0.456, 0.406], dtype="float32")
STD = np.array([0.229, 0.224, 0.225], dtype="float32")
MAX_BYTES = 1_000_000


def preprocess_input(images):
    """serre-lab/Harmonization `preprocess_input`: RGB in [0, 255] -> /255 -> ImageNet mean/std."""
    return (images / 255.0 - MEAN) / STD


def perturb(model, seed):
    """Give every weight a non-trivial value (zeros and unit BN statistics would hide layout bugs)."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        shape = tuple(weight.shape)
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        value = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), shape)
        name = weight.name
        if "moving_variance" in name:
            value = rng.uniform(0.5, 1.5, shape)
        elif "gamma" in name or "moving_mean" in name or "beta" in name:
            value = rng.normal(0.0 if "gamma" not in name else 1.0, 0.2, shape)
        weight.assign(value.astype("float32"))
    return model


def images_for(size, seed):
    """Two RGB images with integer values in [0, 255] (stored as uint8, used as float32)."""
    return np.random.default_rng(seed).integers(0, 256, (2, size, size, 3)).astype("uint8")


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def native(class_name, **config):
    """The native architecture (a class of `harmonization.architectures`) and config the original `call` matches."""
    return {"class_name": class_name, "config": config}


def save(name, model, *, layout, image_size, seed, call, native_config, extra_outputs=None, hdf5_libver=None):
    """Save `model` as `<name>.h5` in `layout` ("weights" or "full-model") with its logits on fixed images.

    `hdf5_libver="v110"` lets Keras write into an h5py file with HDF5 1.10 object headers: the same groups,
    attributes and datasets (the layout a converter reads), about 15% fewer bytes.
    """
    path = OUT / f"{name}.h5"
    if path.exists():
        path.unlink()
    if layout == "weights":
        model.save_weights(str(path))
    elif layout == "full-model" and hdf5_libver:
        import h5py

        with h5py.File(path, "w", libver=hdf5_libver) as handle:
            model.save(handle, include_optimizer=False, save_format="h5")
    elif layout == "full-model":
        model.save(str(path), include_optimizer=False, save_format="h5")
    else:
        raise ValueError(layout)
    images = images_for(image_size, seed)
    inputs = preprocess_input(images.astype("float32"))
    outputs = {"images": images, "logits": np.asarray(model(inputs, training=False))}
    outputs.update(extra_outputs(model, inputs) if extra_outputs else {})
    np.savez_compressed(OUT / f"{name}.npz", **outputs)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise RuntimeError(f"{path} is {size} bytes; fixtures must stay under {MAX_BYTES}.")
    print(f"{name:28s} {layout:10s} {size:8d} bytes  {model.count_params():8d} params  logits {outputs['logits'].shape}")
    return {
        "file": path.name,
        "sha256": sha256(path),
        "size": size,
        "layout": layout,
        "hdf5_libver": hdf5_libver or "earliest (h5py default)",
        "call": call,
        "parameter_count": int(model.count_params()),
        "image_size": image_size,
        "outputs": sorted(outputs),
        "native_config": native_config,
    }


def make_vit(manifest):
    from vit_keras import vit

    kwargs = dict(image_size=32, patch_size=8, num_layers=2, hidden_size=12, num_heads=3, name="vit-tiny",
                  mlp_dim=24, classes=5, dropout=0.1, activation="linear", include_top=True,
                  representation_size=None)
    model = perturb(vit.build_model(**kwargs), seed=1)
    call = f"vit_keras.vit.build_model(**{kwargs})"
    config = native("ViT", image_size=32, patch_size=8, hidden_size=12, num_layers=2, num_heads=3, mlp_dim=24,
                    num_classes=5)
    manifest["vit_keras_weights"] = save("vit_keras_weights", model, layout="weights", image_size=32, seed=10,
                                         call=call, native_config=config)
    manifest["vit_keras_full_model"] = save("vit_keras_full_model", model, layout="full-model", image_size=32, seed=10,
                                            call=call, native_config=config)


def make_convnext(manifest):
    from keras_cv_attention_models import convnext

    kwargs = dict(num_blocks=[1, 1, 2, 1], out_channels=[8, 8, 16, 16], input_shape=(32, 32, 3), num_classes=5,
                  classifier_activation=None, pretrained=None, model_name="convnext_tiny_fixture")
    model = perturb(convnext.ConvNeXt(**kwargs), seed=2)
    manifest["kecam_convnext_weights"] = save("kecam_convnext_weights", model, layout="weights", image_size=32,
                                              seed=11, call=f"keras_cv_attention_models.convnext.ConvNeXt(**{kwargs})",
                                              native_config=native("ConvNeXt", image_size=32, depths=[1, 1, 2, 1],
                                                                   widths=[8, 8, 16, 16], num_classes=5))


def make_maxvit(manifest):
    from keras_cv_attention_models import maxvit

    # Three stages (four would pass 1 MB): image 64 with window_ratio 12 gives 6x6 windows on 16 (padded to 18)
    # and 8 (padded to 12) pixel feature maps, and a window clipped to the 4x4 map of the last stage.
    kwargs = dict(num_blocks=[1, 1, 1], out_channels=[8, 8, 16], stem_width=8, head_dimension=4,
                  window_ratio=12, input_shape=(64, 64, 3), num_classes=5, classifier_activation=None,
                  pretrained=None, model_name="maxvit_tiny_fixture")
    model = perturb(maxvit.MaxViT(**kwargs), seed=3)
    manifest["kecam_maxvit_weights"] = save("kecam_maxvit_weights", model, layout="weights", image_size=64, seed=12,
                                            call=f"keras_cv_attention_models.maxvit.MaxViT(**{kwargs})",
                                            native_config=native("MaxViT", image_size=64, depths=[1, 1, 1],
                                                                 widths=[8, 8, 16], stem_width=8, head_dim=4,
                                                                 window_size=6, num_classes=5))


def make_levit(manifest):
    from keras_cv_attention_models import levit

    # Image 96: stem /16 -> 6x6, strided attention -> 3x3 -> 2x2 (ceil), as LeViT-128's 14 -> 7 -> 4.
    kwargs = dict(patch_channel=16, out_channels=[24, 32, 32], num_heads=[2, 4, 4], depthes=[2, 1, 1],
                  key_dims=[4, 4, 4], attn_ratios=[2, 2, 2], mlp_ratios=[2, 2, 2], strides=[2, 2, 0],
                  input_shape=(96, 96, 3), num_classes=5, classifier_activation=None, use_distillation=False,
                  pretrained=None, model_name="levit128_fixture")
    model = perturb(levit.LeViT(**kwargs), seed=4)
    manifest["kecam_levit_weights"] = save("kecam_levit_weights", model, layout="weights", image_size=96, seed=13,
                                           call=f"keras_cv_attention_models.levit.LeViT(**{kwargs})",
                                           native_config=native("LeViT", image_size=96, patch_channel=16,
                                                                out_channels=[24, 32, 32], num_heads=[2, 4, 4],
                                                                depths=[2, 1, 1], key_dims=[4, 4, 4], num_classes=5))


def make_efficientnet(manifest):
    import efficientnet.keras  # noqa: F401  (registers swish / FixedDropout, as serre-lab's loader does)
    from efficientnet import inject_keras_modules, model as effnet_model

    # depth 0.3: one block per stage but two in stage 6, so one block has the residual (drop-path) branch.
    kwargs = dict(width_coefficient=0.25, depth_coefficient=0.3, default_resolution=32, dropout_rate=0.2,
                  model_name="efficientnet-b0-fixture", weights=None, input_shape=(32, 32, 3), classes=5)
    model = perturb(inject_keras_modules(effnet_model.EfficientNet)(**kwargs), seed=5)

    def logits(model, x):
        # The package's head is Dense('probs', activation='softmax'): keep the logits before the softmax too.
        head = model.get_layer("probs")
        features = tf.keras.Model(model.input, head.input)(x, training=False)
        kernel, bias = head.get_weights()
        return {"pre_softmax_logits": np.asarray(features) @ kernel + bias}

    manifest["efficientnet_b0_full_model"] = save(
        "efficientnet_b0_full_model", model, layout="full-model", image_size=32, seed=14, extra_outputs=logits,
        hdf5_libver="v110",  # 1.03 MB with the default object headers
        call=f"efficientnet.model.EfficientNet(**{kwargs}) (efficientnet.keras modules)",
        native_config=native("EfficientNet", image_size=32, width_coefficient=0.25, depth_coefficient=0.3,
                             num_classes=5))


def make_resnet50v2(manifest):
    from keras.src.applications import resnet

    def stack_fn(x):
        # stack2 needs >= 2 blocks (its first and last block are named apart).
        x = resnet.stack2(x, 4, 2, name="conv2")
        x = resnet.stack2(x, 4, 2, name="conv3")
        x = resnet.stack2(x, 8, 2, name="conv4")
        return resnet.stack2(x, 8, 2, stride1=1, name="conv5")

    model = resnet.ResNet(stack_fn, True, True, "resnet50v2", include_top=True, weights=None,
                          input_shape=(32, 32, 3), classes=5, classifier_activation=None)
    perturb(model, seed=6)
    call = ("keras.applications.resnet.ResNet(stack_fn, preact=True, use_bias=True, 'resnet50v2', weights=None, "
            "input_shape=(32, 32, 3), classes=5, classifier_activation=None) with stack2 blocks "
            "[(4, 2), (4, 2), (8, 2), (8, 2, stride1=1)] as ResNet50V2's [(64, 3), (128, 4), (256, 6), (512, 3)]")
    manifest["resnet50v2_full_model"] = save("resnet50v2_full_model", model, layout="full-model", image_size=32,
                                             seed=15, call=call,
                                             native_config=native("ResNetV2", image_size=32, stack_blocks=[2, 2, 2, 2],
                                                                  stack_filters=[4, 4, 8, 8], stem_filters=64,
                                                                  num_classes=5))


def make_vgg16(manifest):
    full = tf.keras.applications.VGG16(weights=None, input_shape=(32, 32, 3), classes=5, classifier_activation=None)
    config = full.get_config()
    for layer in config["layers"]:
        if layer["class_name"] == "Conv2D":
            layer["config"]["filters"] //= 16
        elif layer["class_name"] == "Dense" and layer["config"]["name"] in ("fc1", "fc2"):
            layer["config"]["units"] = 16
    model = perturb(tf.keras.Model.from_config(config), seed=7)
    call = ("keras.applications.VGG16(weights=None, input_shape=(32, 32, 3), classes=5, classifier_activation=None) "
            "graph with Conv2D filters / 16 and fc1/fc2 units = 16")
    manifest["vgg16_full_model"] = save("vgg16_full_model", model, layout="full-model", image_size=32, seed=16,
                                        call=call, native_config=native("VGG", image_size=32,
                                                                        block_filters=[4, 8, 16, 32, 32], fc_units=16,
                                                                        num_classes=5))


def _layout_rows(model, with_class=True):
    """One line per weight, in the library's order: layer name, [layer class,] weight name, shape."""
    return [
        "\t".join([layer.name, *([type(layer).__name__] if with_class else []), weight.name, str(tuple(weight.shape))])
        for layer in model.layers
        for weight in layer.weights
    ]


def write_reference_layouts(out=REFERENCE_OUT):
    """The full-size weight layouts of the published architectures that a library function builds.

    vit_keras' file has no layer-class column (tests/test_architectures_vit.py reads three).
    """
    from keras_cv_attention_models import convnext, levit, maxvit
    from vit_keras import vit

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = {
        "vit_keras-0.1.2_vit_b16_weights.tsv": (
            vit.vit_b16(image_size=224, activation="linear", pretrained=False, include_top=True,
                        pretrained_top=False), False),
        "kecam-1.3.9_convnext_tiny_weights.tsv": (
            convnext.ConvNeXtTiny(classifier_activation=None, pretrained=None), True),
        "kecam-1.3.9_maxvit_tiny_weights.tsv": (maxvit.MaxViT_Tiny(classifier_activation=None, pretrained=None), True),
        "kecam-1.3.9_levit128_weights.tsv": (
            levit.LeViT128(classifier_activation=None, use_distillation=False, pretrained=None), True),
    }
    for filename, (model, with_class) in models.items():
        rows = _layout_rows(model, with_class)
        (out / filename).write_text("\n".join(rows) + "\n")
        print(f"{filename}: {len(rows)} weights, {model.count_params():,} parameters")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-reference", action="store_true", help="do not rebuild the full-size layouts")
    parser.add_argument("--reference-only", action="store_true", help="only rebuild the full-size layouts")
    parser.add_argument("--reference-out", default=str(REFERENCE_OUT),
                        help="folder of the layouts (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.reference_only:
        write_reference_layouts(args.reference_out)
        return
    tf.keras.utils.set_random_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    import importlib.metadata as md

    manifest = {
        "_generated_by": "tools/make_conversion_fixtures.py",
        "_versions": {p: md.version(p) for p in ("tensorflow-cpu", "keras", "vit-keras", "keras-cv-attention-models",
                                                  "efficientnet", "h5py", "numpy")},
        "_preprocessing": "logits = original(((images / 255) - mean) / std), mean (0.485, 0.456, 0.406), "
                          "std (0.229, 0.224, 0.225)",
    }
    for make in (make_vit, make_convnext, make_maxvit, make_levit, make_efficientnet, make_resnet50v2, make_vgg16):
        make(manifest)
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if not args.skip_reference:
        write_reference_layouts(args.reference_out)


if __name__ == "__main__":
    main()
