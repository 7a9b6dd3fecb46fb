"""Benchmark: the harmonized training step against a plain cross-entropy step, in the same run.

    python bench/train_step.py                      # tiny CNN, ResNet50V2, ViT-B/16 at 224x224, batch 8
    python bench/train_step.py --models convnext_tiny --jit
    python bench/train_step.py --models tiny --steps 10
    python bench/train_step.py --jit                # also time both steps under XLA
    python bench/train_step.py --backend jax        # the same on JAX (or torch), TensorFlow not needed
    python bench/train_step.py --json steps.json    # also write the figures, backend and device as JSON
    python bench/train_step.py --models resnet50v2 --image-size 160 --steps 9   # another input size

The harmonized step needs a forward pass, an input-gradient backward pass, and a backward pass through
both, so its FLOP floor is about 2x the plain step (forward + backward). We report the ratio of median
step times measured in one process, one model at a time; absolute times on shared machines are noise.
Run it on a quiet machine: the two steps alternate so that other load hits both alike, but load still widens
the spread, and a ratio is only as good as its medians.

The plain step is the same model compiled with cross-entropy only (Keras's own fit step); the harmonized step
is `HarmonizedModel` on that model; both see the same batch, on the same backend and device. On TensorFlow both
run as `HarmonizedModel` trains by default (no XLA; `--jit` adds XLA rows). On JAX and PyTorch both use Keras's
default, which is also `HarmonizedModel`'s there: XLA on JAX, eager on PyTorch; `--jit` is TensorFlow's switch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# keras and the backend packages are imported only after `--backend` has set KERAS_BACKEND (Keras picks its
# backend once, at import), so nothing here imports them at module level. On JAX or PyTorch this script never
# imports TensorFlow, so it runs where TensorFlow is not installed (where it is, Keras itself still loads it to
# recognise its types and seed it).

NUM_CLASSES = 1000
BACKENDS = ("tensorflow", "jax", "torch")
NOTE = ("ratio of median step times after warm-up, steps alternated; "
        "absolute times are only meaningful on a quiet machine")


def tiny_cnn(size):
    import keras  # after select_backend (see the module comment)

    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.LayerNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(x), name="tiny_cnn")


def resnet50v2(size):
    import harmonization  # after select_backend: importing it imports keras

    return harmonization.architectures.ResNetV2(image_size=size)


def vit_b16(size):
    import harmonization  # after select_backend: importing it imports keras

    return harmonization.architectures.ViT(image_size=size)


def convnext_tiny(size):
    import harmonization  # after select_backend: importing it imports keras

    return harmonization.architectures.ConvNeXt(image_size=size)


MODELS = {
    "tiny": (tiny_cnn, 64),
    "resnet50v2": (resnet50v2, 224),
    "vit_b16": (vit_b16, 224),
    "convnext_tiny": (convnext_tiny, 224),
}
DEFAULT_MODELS = ["tiny", "resnet50v2", "vit_b16"]


def select_backend(backend):
    """Make the coming `import keras` load `backend`, overriding KERAS_BACKEND and ~/.keras/keras.json.

    Keras reads its backend once, when first imported, so this must run before anything imports keras; if
    something already has (this module imported into a running program), measuring would silently use that
    backend, so it is refused instead.
    """
    if "keras" in sys.modules:
        current = sys.modules["keras"].backend.backend()
        if current != backend:
            raise RuntimeError(
                f"keras is already imported with the {current!r} backend, so this process cannot measure "
                f"{backend!r}; run `python bench/train_step.py --backend {backend}` as its own process."
            )
    os.environ["KERAS_BACKEND"] = backend


def describe_backend(backend):
    """(header line, backend version, device) for the backend Keras is running on.

    The device is what the steps run on: Keras places variables on the first GPU when the backend sees one.
    On TensorFlow's CPU the header is the line this script always printed, so older outputs compare line for line.
    """
    import keras  # after select_backend (see the module comment)

    cores = f"Keras {keras.__version__}, {os.cpu_count()} CPU cores"
    if backend == "tensorflow":
        import tensorflow as tf  # only on this backend: JAX and PyTorch runs must work without TensorFlow

        gpus = tf.config.list_physical_devices("GPU")
        device = "CPU"
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            device = f"GPU:0 ({details.get('device_name', 'unknown')})"
        header = f"TensorFlow {tf.__version__}, {cores}" + ("" if device == "CPU" else f", on {device}")
        return header, tf.__version__, device
    if backend == "jax":
        import jax  # only on this backend

        first = jax.devices()[0]
        device = f"{first.platform}:{first.id} ({first.device_kind})"
        return f"JAX {jax.__version__}, {cores}, on {device}", jax.__version__, device
    import torch  # only on this backend

    device = str(keras.ops.zeros(()).device)  # where Keras puts tensors on PyTorch: cuda:0 when it sees a GPU
    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"PyTorch {torch.__version__}, {cores}, on {device}", torch.__version__, device


def make_batch(size, batch_size):
    rng = np.random.default_rng(0)
    return {
        "image": rng.uniform(0, 255, (batch_size, size, size, 3)).astype("float32"),
        "heatmap": rng.uniform(0, 1, (batch_size, size, size, 1)).astype("float32"),
        "label": rng.integers(0, NUM_CLASSES, batch_size).astype("int32"),
    }


def device_sync(backend):
    """A call that waits for the device's queued work, so a step's time includes its kernels.

    `train_on_batch` returns its logs as NumPy, which waits on TensorFlow and JAX (the step is one program whose
    outputs include the logs). On a PyTorch GPU the weight updates are queued kernels that the logs do not
    depend on, so the clock must wait for the stream.
    """
    if backend == "torch":
        import torch  # only on this backend

        if torch.cuda.is_available():
            return torch.cuda.synchronize
    return lambda: None


def timed(step, sync=lambda: None):
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def bench(name, batch_size, steps, warmup, jit, backend="tensorflow", image_size=None):
    """Time both steps of one model; print its table row and return the figures as a dict.

    `jit` is passed to both `compile` calls; None leaves Keras's default (what HarmonizedModel trains with on JAX
    and PyTorch). `image_size` None is the model's default size.
    """
    import keras  # after select_backend (see the module comment)

    import harmonization  # after select_backend: importing it imports keras

    build, size = MODELS[name]
    size = size if image_size is None else image_size
    batch = make_batch(size, batch_size)
    keras.utils.set_random_seed(0)
    model = build(size)
    compile_kwargs = {} if jit is None else {"jit_compile": jit}
    plain = keras.models.clone_model(model)
    plain.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
        **compile_kwargs,
    )
    hmodel = harmonization.HarmonizedModel(model)
    hmodel.compile(optimizer=keras.optimizers.SGD(1e-3), **compile_kwargs)
    onehot = np.eye(NUM_CLASSES, dtype="float32")[batch["label"]]
    plain_step = lambda: plain.train_on_batch(batch["image"], onehot)  # noqa: E731
    harmonized_step = lambda: hmodel.train_on_batch(batch)  # noqa: E731
    sync = device_sync(backend)
    # Alternate the two steps so that load from other processes hits both alike.
    times = {"plain": [], "harmonized": []}
    for round_ in range(warmup + steps):
        for key, step in (("plain", plain_step), ("harmonized", harmonized_step)):
            elapsed = timed(step, sync)
            if round_ >= warmup:
                times[key].append(elapsed)
    t_plain, t_harm = (statistics.median(times[k]) for k in ("plain", "harmonized"))
    # On JAX Keras compiles with XLA by default: the row says so, as TensorFlow's --jit rows do.
    xla = jit or (jit is None and backend == "jax")
    label = f"{name}{' (XLA)' if xla else ''}"
    print(
        f"{label:<22} {size:>4}px  batch {batch_size:<3} params {model.count_params():>11,}  "
        f"plain {t_plain * 1e3:9.1f} ms  harmonized {t_harm * 1e3:9.1f} ms  ratio {t_harm / t_plain:5.2f}",
        flush=True,
    )
    return {
        "model": name, "image_size": size, "batch_size": batch_size, "params": model.count_params(), "xla": bool(xla),
        "plain_s": t_plain, "harmonized_s": t_harm, "ratio": t_harm / t_plain,
        "plain_times_s": times["plain"], "harmonized_times_s": times["harmonized"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=BACKENDS, default="tensorflow",
                        help="Keras backend to measure on (default tensorflow, whatever KERAS_BACKEND says)")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=None,
                        help="input side in pixels for every model (default: each model's own, 224; tiny 64)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model and mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (tracing, allocation)")
    parser.add_argument("--jit", action="store_true", help="TensorFlow: also time both steps with jit_compile=True")
    parser.add_argument("--json", metavar="PATH", help="also write the figures, backend and device to PATH")
    args = parser.parse_args(argv)
    if args.jit and args.backend != "tensorflow":
        parser.error("--jit is TensorFlow's XLA switch: on JAX both steps always compile with XLA, and on PyTorch "
                     "both run as HarmonizedModel trains there (Keras's default, eager)")
    select_backend(args.backend)
    header, version, device = describe_backend(args.backend)
    print(header)
    if args.backend == "tensorflow":
        modes = (False, True) if args.jit else (False,)
    else:
        modes = (None,)
    rows = [bench(name, args.batch_size, args.steps, args.warmup, jit, args.backend, args.image_size)
            for name in args.models for jit in modes]
    if args.json:
        import keras  # already imported by the steps; here for its version

        report = {
            "backend": args.backend, "backend_version": version, "keras_version": keras.__version__,
            "device": device, "cpu_cores": os.cpu_count(), "steps": args.steps, "warmup": args.warmup,
            "note": NOTE, "results": rows,
        }
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()
