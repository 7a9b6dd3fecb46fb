"""`harmonization.train(recipe)` and `harmonization train`: a harmonized training run from a recipe, resumable.

One code path for the command and for Python. The run:

1. reads the recipe (`harmonization.recipes`), checks the data folders, claims the run directory
   (`harmonization.run_dir`: a directory of another recipe or model is refused);
2. creates the distribution strategy (`default`, `mirrored`, or `multiworker` from `TF_CONFIG`) before any
   other TensorFlow work, seeds everything, and makes ops deterministic when the recipe says so;
3. opens the data (ClickMe through TFDS, mixed with ImageNet when `data.clickme_fraction` < 1) and builds the
   model, and checks that they agree (classes, image size) before anything trains;
4. resumes from the newest whole checkpoint in the run directory, if any, then fits epoch by epoch with
   `HarmonizedModel`; a checkpoint (weights, optimizer, random state, step, history) is written every
   `checkpoint.every_steps` steps and at the end of each epoch, with history.json/csv and TensorBoard logs;
5. saves the model as a preset (the recipe in its metadata) and runs `harmonization evaluate` on it.

**Resuming is exact.** Epoch `e`'s data is a pure function of (seed, e): its own seeded shuffle and
augmentation. A run resumed at step `s` of epoch `e` rebuilds epoch `e`'s data and skips its first `s`
batches, restores the weights, the optimizer's state (with its step count, hence the learning rate) and the
layers' random-generator state. With `deterministic` (TensorFlow's op determinism) the resumed run ends with
exactly the weights of an uninterrupted one; without it, not bit for bit, as two runs with non-deterministic
kernels differ. The price of the replay is reading the skipped batches' encoded examples again (they are
skipped before anything is decoded). Raising `epochs` extends a run, but its schedule is then laid over the new
total (a cosine decay restarts from where the longer curve is), so it is no longer the run it would have been.

**Each worker decodes only what it trains on.** Under `multiworker`, every worker builds the epoch's global
batches of encoded examples (cheap: no image decoded), keeps its own rows of each, and decodes and augments those
alone; the rows together are exactly the one-process batch (`_epoch_batches`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from harmonization import _backend

# Before `import tensorflow`: without it, one sentence naming what needs it and the install command.
_backend.require_tensorflow("harmonization.trainer (harmonization.train and `harmonization train`)")

#: What runs on the TensorFlow backend only, for harmonization._backend (`harmonization train` says it too).
TRAIN_NEEDS_TENSORFLOW_BACKEND = "harmonization.train (tf.data pipelines and tf.distribute strategies)"

import keras
import numpy as np
import tensorflow as tf

from harmonization import data as data_lib
from harmonization import loader, recipes, run_dir, zoo
from harmonization.cli_common import input_size
from harmonization.harmonized_model import HarmonizedModel
from harmonization.presets import save_preset

STRATEGIES = ("default", "mirrored", "multiworker")
DEFAULT_OUT_ROOT = "harmonization_runs"
#: Built-in models a recipe can name besides the zoo: the quickstart's small CNN.
BUILTIN_MODELS = ("quickstart_cnn",)


@dataclass
class TrainResult:
    """What a run produced; the same facts are in the run directory."""

    run_dir: Path
    recipe: dict[str, Any]
    steps: int  # global steps trained in all (this call and earlier ones)
    steps_per_epoch: int
    resumed_from_step: int | None
    history: list[dict[str, Any]] = field(default_factory=list)
    preset: Path | None = None
    evaluation: dict[str, Any] | None = None
    is_chief: bool = True
    trained_steps: int = 0  # by this call


# ---------------------------------------------------------------------------------------------- set-up
def _resolve_recipe(recipe, overrides: Iterable[str], model: str | None, epochs: int | None,
                    batch_size: int | None) -> dict[str, Any]:
    if isinstance(recipe, Mapping):
        resolved = recipes.apply_overrides(recipes.from_dict(recipe), overrides)
    else:
        resolved = recipes.load_recipe(recipe, overrides)
    resolved = recipes.with_settings(resolved, epochs=epochs, batch_size=batch_size)
    if model is not None:
        resolved["model"]["source"] = str(model)
    return resolved


def _check_folder(path, option: str, why: str) -> str | None:
    if path is None:
        return None
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{option} {str(path)!r} is not a directory{why}.")
    return str(folder.resolve())


def _make_strategy(name: str) -> tf.distribute.Strategy:
    """The strategy, created first: MultiWorkerMirroredStrategy must come before any other TensorFlow op."""
    if name not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {', '.join(STRATEGIES)}; got {name!r}.")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise ValueError(
                "--strategy multiworker reads the cluster from the TF_CONFIG environment variable, which is not "
                'set; e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": '
                '"worker", "index": 0}}\' on the first worker.'
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _is_chief(strategy: tf.distribute.Strategy) -> bool:
    """The worker that writes the run directory: the `chief` task, or worker 0 of a cluster without one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


@dataclass
class _Data:
    """What the opened datasets say that the checks and the step count need."""

    clickme: str
    num_classes: int
    class_names: list[str] | None
    train_examples: int
    eval_examples: int
    imagenet_examples: int | None


def _open_data(recipe, data_dir, imagenet_dir, download: bool) -> _Data:
    spec = recipe["data"]
    clickme = data_lib.prepared_builder(spec["clickme"], (spec["train_split"], spec["eval_split"]), data_dir,
                                        download=download)
    label = clickme.info.features["label"]
    imagenet_examples = None
    if spec["clickme_fraction"] < 1:
        imagenet = data_lib.prepared_builder("imagenet2012", "train", data_dir, download=download,
                                             manual_dir=imagenet_dir)
        imagenet_examples = imagenet.info.splits["train"].num_examples
        if imagenet.info.features["label"].num_classes != label.num_classes:
            raise ValueError(
                f"ClickMe dataset {spec['clickme']!r} has {label.num_classes} classes and imagenet2012 "
                f"{imagenet.info.features['label'].num_classes}: the mix needs one label space."
            )
    names = list(getattr(label, "names", None) or []) or None
    splits = clickme.info.splits
    return _Data(spec["clickme"], int(label.num_classes), names, int(splits[spec["train_split"]].num_examples),
                 int(splits[spec["eval_split"]].num_examples), imagenet_examples)


def _steps_per_epoch(recipe, data: _Data) -> int:
    """The recipe's, or one pass over the training data: ClickMe's split alone, or ImageNet's in a mix.

    A run whose passes cannot make one full batch is refused here, whatever `steps_per_epoch` says: each pass
    drops its last partial batch, so it would yield nothing, and Keras would end every epoch after zero steps
    with a warning (an untrained model saved as if trained).
    """
    fraction, batch = recipe["data"]["clickme_fraction"], recipe["batch_size"]
    for examples, what in ((data.train_examples, f"the {data.train_examples} training examples of {data.clickme!r} "
                                                 f"{recipe['data']['train_split']!r}"),
                           (data.imagenet_examples, f"the {data.imagenet_examples} ImageNet training examples")):
        if examples is not None and batch > examples:
            raise ValueError(f"`batch_size` {batch} is larger than {what}: an epoch would have no full batch. Use "
                             f"--batch-size {examples} or less.")
    if recipe["steps_per_epoch"] is not None:
        return int(recipe["steps_per_epoch"])
    if fraction < 1:
        examples = data.imagenet_examples / (1.0 - fraction)  # ImageNet examples are (1 - f) of each batch
    else:
        examples = data.train_examples
    return max(1, int(examples // batch))


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**31 - 1)


def _passes(make_pass, examples_needed: float, examples: int) -> tf.data.Dataset:
    """Enough passes over a split for one epoch, pass `i` made by `make_pass(i)` with its own seed (a new order
    and new augmentations each), then repeated should a mix draw more than expected."""
    count = int(math.ceil(examples_needed / max(1, examples))) + 1
    dataset = make_pass(0)
    for index in range(1, count):
        dataset = dataset.concatenate(make_pass(index))
    return dataset.repeat()


@dataclass(frozen=True)
class _Rows:
    """The rows `[start, start + size)` of every global batch that one worker trains on, decoded in batches of
    `batch` (its per-replica batch; on one worker the whole global batch is its slice)."""

    start: int
    size: int
    batch: int


def _encoded_epoch(recipe, data: _Data, data_dir, imagenet_dir, epoch: int, skip: int,
                   steps_per_epoch: int) -> tuple[tf.data.Dataset, data_lib._TaggedDecoder]:
    """Epoch `epoch`'s global batches of encoded examples (`data._EncodedSource.tagged`: nothing decoded), a pure
    function of (seed, epoch), without the first `skip`; and the decoder that turns them into `fit` batches.

    Every random choice (order, the seed of each example's crop and flip, the ClickMe/ImageNet draw) is seeded
    from (seed, epoch, pass), and iterating the dataset again repeats it: Keras iterates it twice under
    tf.distribute, and a resumed run rebuilds it to skip what was trained (reading, not decoding, the skipped
    batches). Decoded, the batches are exactly those of the public loaders composed as this trainer composed
    them before it split its input between workers: `load_clickme` per pass (augmented: shuffled, each pass's
    last partial batch dropped; not augmented: read in order and shuffled by the pass's seed), mixed with
    `load_imagenet`'s passes by `mix_datasets` (tests/test_input_split.py compares the two).
    """
    spec = recipe["data"]
    batch, fraction, augment = recipe["batch_size"], spec["clickme_fraction"], spec["augment"]
    seed = _epoch_seed(recipe["seed"], epoch)
    # Each source's preprocessing, the same for every pass: kept from pass 0, which `_passes` makes at once.
    preprocessors: dict[str, data_lib._Preprocessor] = {}

    def clickme_pass(index: int) -> tf.data.Dataset:
        """One pass: the epoch's global batches when ClickMe is alone, single examples for the mix to batch."""
        pass_seed = _epoch_seed(seed, index + 1)
        source = data_lib._clickme_source(
            spec["train_split"], spec["image_size"], augment, data_dir, name=spec["clickme"], seed=pass_seed,
            shuffle_buffer=spec["shuffle_buffer"], download=False, crop_scale=spec["crop_scale"],
            reshuffle_each_iteration=False, per_batch_resize=False,
        )
        preprocessors.setdefault("clickme", source.preprocessor)
        examples = source.tagged()
        if not augment:  # read in order (the loader shuffles only when training), shuffled here
            examples = examples.shuffle(spec["shuffle_buffer"], seed=pass_seed, reshuffle_each_iteration=False)
        if fraction == 1:
            return examples.batch(batch, drop_remainder=True)
        # Augmented, a pass goes into the mix in whole batches (its last partial one dropped), as it always has;
        # not augmented, whole.
        return examples.batch(batch, drop_remainder=True).unbatch() if augment else examples

    needed = steps_per_epoch * batch
    clickme = _passes(clickme_pass, needed * fraction, data.train_examples)
    if fraction == 1:
        # endless: `fit` takes the epoch's remaining steps from it
        return clickme.skip(skip), data_lib._TaggedDecoder(preprocessors["clickme"])

    def imagenet_pass(index: int) -> tf.data.Dataset:
        source = data_lib._imagenet_source(
            "train", spec["image_size"], augment, data_dir, manual_dir=imagenet_dir, seed=_epoch_seed(seed, index + 1),
            shuffle_buffer=spec["shuffle_buffer"], download=False, crop_scale=spec["crop_scale"],
            reshuffle_each_iteration=False,
        )
        preprocessors.setdefault("imagenet", source.preprocessor)
        return source.tagged().batch(batch, drop_remainder=True).unbatch()  # whole batches per pass, as read

    imagenet = _passes(imagenet_pass, needed * (1 - fraction), data.imagenet_examples)
    mixed = data_lib._mix_encoded(clickme, imagenet, fraction, seed=seed, reshuffle_each_iteration=False)
    decoder = data_lib._TaggedDecoder(preprocessors["clickme"], preprocessors["imagenet"])
    return mixed.batch(batch, drop_remainder=True).skip(skip), decoder


def _epoch_batches(recipe, data: _Data, data_dir, imagenet_dir, epoch: int, skip: int, steps_per_epoch: int,
                   rows: _Rows | None = None) -> tf.data.Dataset:
    """Epoch `epoch`'s batches, a pure function of (seed, epoch), without the first `skip`: the global batches
    (`rows` None), or one worker's rows of each, decoded in its per-replica batches.

    The rows are cut from each global batch of encoded examples (`_encoded_epoch`) before anything is decoded,
    so a worker decodes and augments only the images it trains on; one process takes the same path with the
    whole batch as its rows. Decoding is a pure function of each (encoded example, seed) and finishing a batch
    works row by row, so the workers' rows together are exactly the one-process batch.
    """
    encoded, decoder = _encoded_epoch(recipe, data, data_dir, imagenet_dir, epoch, skip, steps_per_epoch)
    batch = recipe["batch_size"]
    rows = rows or _Rows(0, batch, batch)
    if not (0 <= rows.start and rows.start + rows.size <= batch and rows.size % rows.batch == 0):
        raise ValueError(f"{rows} is not a slice of a global batch of {batch} in whole per-replica batches.")
    mine = encoded.map(lambda examples: {key: value[rows.start:rows.start + rows.size]
                                         for key, value in examples.items()})
    return decoder(mine.unbatch(), rows.batch)


def _distributed(make_batches, distribution: tf.distribute.Strategy, batch_size: int, multiworker: bool):
    """The batches of `make_batches(rows)`, each global batch split across all replicas of all workers in order.

    On one worker Keras splits each global batch across the local replicas itself. Across workers, TensorFlow's
    automatic sharding hands out whole elements (or files), so a worker's replicas would not see the slice of
    the global batch they see on one machine; here every worker reads the same global batches of encoded
    examples and decodes only its own contiguous rows of each (`_worker_batches`), so that the step is the
    one-device step (the global batch, in order) and each image is decoded by one worker only.
    """
    if not multiworker:
        return make_batches(None)
    return distribution.distribute_datasets_from_function(
        lambda context: _worker_batches(make_batches, batch_size, context))


def _worker_batches(make_batches, batch_size: int, context: tf.distribute.InputContext) -> tf.data.Dataset:
    """One worker's per-replica batches: rows `[i * local, (i + 1) * local)` of each global batch for worker
    (input pipeline) `i` of a cluster whose workers hold `local` examples each, decoded by that worker alone."""
    per_replica = context.get_per_replica_batch_size(batch_size)
    local = per_replica * (context.num_replicas_in_sync // context.num_input_pipelines)
    batches = make_batches(_Rows(context.input_pipeline_id * local, local, per_replica))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return batches.with_options(options).prefetch(tf.data.AUTOTUNE)


def _shard_by_data(batches: tf.data.Dataset, multiworker: bool) -> tf.data.Dataset:
    """Across workers, split each global batch by element (every worker reads the same order). TensorFlow's
    default shards by file, which fails for datasets with fewer files than workers and would change the order."""
    if not multiworker:
        return batches
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return batches.with_options(options)


def _validation_batches(recipe, data: _Data, data_dir, replicas: int, multiworker: bool):
    """The validation batches, with their number stated (`assert_cardinality`, checked by tf.data as it reads).

    Keras warns "Your input ran out of data" at the end of a dataset of unknown length; with the length known,
    the warning is left to the case it is meant for (training data that truly ran out), not every epoch's
    validation.
    """
    spec, evaluation = recipe["data"], recipe["evaluation"]
    size, limit = evaluation["batch_size"], evaluation["limit"]
    images = data.eval_examples if limit is None else min(limit, data.eval_examples)
    batches = data_lib.load_clickme(spec["eval_split"], size, image_size=spec["image_size"], training=False,
                                    data_dir=data_dir, name=spec["clickme"], download=False)
    if replicas > 1:
        # Split across replicas, a short last batch could leave one an empty slice (a NaN mean): batches are
        # whole multiples of the replica count, and the remainder is not scored.
        size = min(size, images) // replicas * replicas
        if size == 0:
            raise ValueError(f"`evaluation.limit` {limit} is less than the {replicas} replicas: each needs an image.")
        batches = batches.unbatch().take(images).batch(size, drop_remainder=True)
        return _shard_by_data(batches.apply(tf.data.experimental.assert_cardinality(images // size)), multiworker)
    if limit is not None:
        batches = batches.unbatch().take(limit).batch(size)
    return batches.apply(tf.data.experimental.assert_cardinality(-(-images // size)))


def _build_model(recipe, num_classes: int) -> keras.Model:
    """The recipe's model, with `num_classes` outputs; clear errors when it cannot be that."""
    source, weights = recipe["model"]["source"], recipe["model"]["weights"]
    image_size = recipe["data"]["image_size"]
    if source in BUILTIN_MODELS:
        if weights != "random":
            raise ValueError(f"model.source {source!r} has no pretrained weights; use model.weights=random.")
        # Imported here: the quickstart is a command module above this one's layer only in name (no cycle).
        from harmonization.quickstart import quickstart_model

        return quickstart_model(num_classes, image_size, recipe["seed"])
    zoo_name = zoo.canonical_name(source)
    if weights == "random":
        if zoo_name is None:
            raise ValueError(
                f"model.weights=random builds a zoo architecture or {', '.join(BUILTIN_MODELS)}; {source!r} is "
                f"neither (zoo: {', '.join(zoo.list_models())}). For a preset or hf:// model use "
                "model.weights=pretrained."
            )
        return zoo.build(zoo.model_info(zoo_name), image_size=image_size, num_classes=num_classes)
    model = loader.load_model(source)
    _check_model_fits_data(model, recipe, num_classes)  # random weights are built to fit; a preset may not
    if keras.mixed_precision.global_policy().name != "float32":
        if zoo_name is None:
            raise ValueError(
                f"precision {recipe['precision']!r} with pretrained weights needs a zoo model (rebuilt under the "
                f"policy, then given the weights); {source!r} is not one. Use precision=float32."
            )
        rebuilt = zoo.build(zoo.model_info(zoo_name), image_size=input_size(model), num_classes=num_classes)
        rebuilt.set_weights(model.get_weights())
        model = rebuilt
    return model


def _check_model_fits_data(model: keras.Model, recipe, num_classes: int) -> None:
    source = recipe["model"]["source"]
    shape = model.output_shape
    if not (isinstance(shape, tuple) and all(d is None or isinstance(d, int) for d in shape)):  # several outputs
        count = len(shape) if isinstance(shape, (list, tuple, dict)) else "several"
        raise ValueError(
            f"Model {source!r} has {count} outputs; `harmonization train` trains a classifier with one "
            "logits output. Save a preset of the model that returns only the logits, or train it in Python with "
            "HarmonizedModel(model, output=...)."
        )
    outputs = shape[-1]
    if outputs != num_classes:
        raise ValueError(
            f"Model {source!r} has {outputs} classes and the data {recipe['data']['clickme']!r} has {num_classes}: "
            "the labels would index the wrong logits. Train a model with that many classes, or a dataset whose "
            "labels are the model's."
        )
    size = input_size(model)
    if size != recipe["data"]["image_size"]:
        raise ValueError(
            f"Model {source!r} takes {size}x{size} images and data.image_size is {recipe['data']['image_size']}; "
            f"set --set data.image_size={size}."
        )


def _learning_rate(recipe, steps_per_epoch: int):
    """The learning rate, a schedule of the optimizer's step count (restored with it on resume)."""
    peak = recipe["optimizer"]["learning_rate"]
    schedule = recipe["schedule"]
    total = recipe["epochs"] * steps_per_epoch
    warmup = int(round(schedule["warmup_epochs"] * steps_per_epoch))
    if schedule["name"] == "constant" and not warmup:
        return peak
    if schedule["name"] == "step":
        every = schedule["step_epochs"] * steps_per_epoch
        # Keras keeps a value up to and including its boundary: the decayed rate starts at step `every` itself.
        boundaries = [step - 1 for step in range(every, total, every)]
        values = [peak * schedule["step_gamma"] ** i for i in range(len(boundaries) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values) if boundaries else peak
    if schedule["name"] == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else peak, decay_steps=max(1, total - warmup), alpha=schedule["final_fraction"],
            warmup_target=peak if warmup else None, warmup_steps=warmup,
        )
    # constant after a linear warm-up
    return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=1, alpha=1.0, warmup_target=peak,
                                                  warmup_steps=warmup)


def _optimizer(recipe, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    spec = recipe["optimizer"]
    rate = _learning_rate(recipe, steps_per_epoch)
    clip = {"clipnorm": spec["clipnorm"]} if spec["clipnorm"] is not None else {}
    if spec["name"] == "sgd":
        return keras.optimizers.SGD(rate, momentum=spec["momentum"], nesterov=spec["nesterov"], **clip)
    if spec["name"] == "adamw":
        return keras.optimizers.AdamW(rate, weight_decay=spec["weight_decay"], **clip)
    return keras.optimizers.Adam(rate, **clip)


def _random_state_variables(model: keras.Model) -> list:
    """Variables that are not weights but change what training does: the layers' random-generator states."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


# ---------------------------------------------------------------------------------------------- checkpoints
def _metric_values(trainer: HarmonizedModel) -> list[np.ndarray]:
    """The running totals of the epoch's metrics (loss, accuracy, ... so far). Under tf.distribute they are
    summed across replicas when read, a collective: every worker reads them, the chief alone writes them."""
    return [np.asarray(v.numpy()) for v in trainer.metrics_variables]


class TrainingFailedError(ValueError):
    """Training cannot go on to a meaningful result (it diverged, or its data ran out); nothing of it was saved."""


def _non_finite(variables) -> str | None:
    """The path of the first variable holding a NaN or an infinity, or None when all are finite."""
    for variable in variables:
        value = np.asarray(variable.numpy())
        if value.dtype.kind not in "biu" and not np.isfinite(value).all():  # counters are integers: always finite
            return variable.path
    return None


def _state_variables(trainer: HarmonizedModel) -> list:
    """What a checkpoint holds that must be finite: the model's weights and the optimizer's state."""
    return [*trainer.model.weights, *trainer.optimizer.variables]


class _Checkpointer(keras.callbacks.Callback):
    """Writes a checkpoint every `every` steps and at each epoch's end (the chief only), and the history; stops
    the run at the first non-finite loss, and when the epoch's data runs out early.

    A mid-epoch checkpoint also holds the epoch's running metric totals (sums: totals and counts), which a run
    resumed there adds back after its first step (Keras builds some metrics during that step), so that the
    epoch's logged loss and accuracy are those of the whole epoch, as in an uninterrupted run.

    Nothing non-finite is ever written: the loss is checked after every step (as `keras.callbacks.TerminateOnNaN`
    does, but raising, so that the run fails instead of saving a preset) and every weight and optimizer variable
    before each checkpoint, so a diverged run keeps its last good checkpoints instead of rotating them away.
    """

    def __init__(self, run: run_dir.RunDirectory, trainer: HarmonizedModel, *, first_step: int,
                 steps_per_epoch: int, recipe, history: list, write: bool, metrics: dict | None = None):
        super().__init__()
        self.run, self.trainer, self.recipe = run, trainer, recipe
        self.first_step, self.steps_per_epoch = first_step, steps_per_epoch
        self.every, self.keep = recipe["checkpoint"]["every_steps"], recipe["checkpoint"]["keep"]
        self.history, self.write, self.metrics = history, write, metrics
        self.steps_done = 0

    def _where(self, step: int) -> str:
        epoch, within = divmod(step, self.steps_per_epoch)
        if within == 0:
            epoch, within = epoch - 1, self.steps_per_epoch
        return f"step {step} (epoch {epoch + 1}, step {within} of {self.steps_per_epoch})"

    def _diverged(self, step: int, what: str) -> TrainingFailedError:
        kept = self.run.latest_checkpoint()
        optimizer = self.recipe["optimizer"]
        return TrainingFailedError(
            f"Training diverged at {self._where(step)}: {what}. Nothing from this state was saved"
            + (f"; {self.run.path} keeps its checkpoints up to {kept.path.name}" if kept is not None else "")
            + f". Train with a lower optimizer.learning_rate (now {optimizer['learning_rate']:g})"
            + (", " if optimizer["clipnorm"] else " or optimizer.clipnorm set, ")
            + "into a new --out (a run directory keeps its recipe)."
        )

    def _save(self, step: int, with_metrics: bool) -> None:
        bad = _non_finite(_state_variables(self.trainer))
        if bad is not None:
            raise self._diverged(step, f"variable {bad!r} holds NaN or infinite values")
        metrics = _metric_values(self.trainer) if with_metrics else []
        if not self.write:
            return

        def files(folder: Path) -> None:
            self.trainer.save_weights(str(folder / run_dir.WEIGHTS_FILE))
            states = _random_state_variables(self.trainer.model)
            np.savez(folder / run_dir.RANDOM_STATE_FILE,
                     **{f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(states)})
            np.savez(folder / run_dir.METRICS_FILE, **{f"m{i}": value for i, value in enumerate(metrics)})

        state = {"epoch": step // self.steps_per_epoch, "step_in_epoch": step % self.steps_per_epoch,
                 "steps_per_epoch": self.steps_per_epoch, "history": self.history}
        self.run.write_checkpoint(step, state, files, self.keep)

    def on_train_batch_end(self, batch, logs=None):
        self.steps_done = batch + 1
        loss = float(np.asarray((logs or {}).get("loss", 0.0)))
        if not math.isfinite(loss):
            raise self._diverged(self.first_step + batch + 1, f"the loss is {loss}")
        if batch == 0 and self.metrics is not None:  # resumed mid-epoch: the steps trained before the kill
            now = _metric_values(self.trainer)
            if len(now) == len(self.metrics):
                for variable, value, saved in zip(self.trainer.metrics_variables, now, self.metrics.values()):
                    variable.assign(value + saved)
        step = self.first_step + batch + 1
        if step % self.every == 0 and step % self.steps_per_epoch:  # the epoch's end is saved with its logs
            self._save(step, with_metrics=True)

    def on_epoch_end(self, epoch, logs=None):
        expected = (epoch + 1) * self.steps_per_epoch - self.first_step
        if self.steps_done < expected:  # Keras ends an epoch whose data runs out with a warning only
            raise TrainingFailedError(
                f"The training data of epoch {epoch + 1} ran out after {self.steps_done} of its {expected} steps "
                f"(batch_size {self.recipe['batch_size']}, steps_per_epoch {self.steps_per_epoch}); nothing of this "
                "epoch was saved. Check that the training split holds at least one full batch."
            )
        row = {"epoch": epoch + 1, **{k: float(np.mean(v)) for k, v in (logs or {}).items()}}
        self.history.append(row)
        self._save((epoch + 1) * self.steps_per_epoch, with_metrics=False)
        if self.write:
            self.run.write_history(self.history)


class _Progress(keras.callbacks.ProgbarLogger):
    """Keras's progress bar, headed "Epoch e/N" with the run's N (each epoch is its own `fit` call)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.run_epochs = epochs

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.run_epochs


def _agree_on_start(distribution: tf.distribute.Strategy, start: int, run: run_dir.RunDirectory) -> None:
    """Across workers, the same step to resume from, or an error on every worker (not a hang in a collective).

    Each worker reads the newest checkpoint in the run directory itself: on a folder that is not shared, the
    chief would resume while the others start over.
    """
    # The sum over all replicas equals start x replicas on every worker exactly when all starts are equal.
    values = distribution.run(lambda: tf.constant(float(start), tf.float64))
    total = float(distribution.reduce(tf.distribute.ReduceOp.SUM, values, axis=None))
    if total != start * distribution.num_replicas_in_sync:
        mean = total / distribution.num_replicas_in_sync
        raise run_dir.RunDirError(
            f"The workers found different checkpoints in {run.path} (this one resumes from step {start}, the "
            f"workers' mean is {mean:g}): the run directory must be one folder that every worker reads (a shared "
            "filesystem)."
        )


def _restore(trainer: HarmonizedModel, checkpoint: run_dir.Checkpoint) -> dict | None:
    """Weights, optimizer state and random state from `checkpoint`; returns its metric totals (mid-epoch; added
    back by `_Checkpointer` after the first step, when every metric exists)."""
    trainer.optimizer.build(trainer.trainable_variables)
    trainer.load_weights(str(checkpoint.path / run_dir.WEIGHTS_FILE))
    states = _random_state_variables(trainer.model)
    with np.load(checkpoint.path / run_dir.RANDOM_STATE_FILE) as saved:
        if len(saved.files) != len(states):
            raise run_dir.RunDirError(
                f"Checkpoint {checkpoint.path} holds {len(saved.files)} random-generator states and the model has "
                f"{len(states)}: it is not this model's."
            )
        for i, variable in enumerate(states):
            variable.assign(saved[f"v{i}"])
    if not checkpoint.state.get("step_in_epoch"):
        return None
    with np.load(checkpoint.path / run_dir.METRICS_FILE) as saved:
        return {name: saved[name] for name in sorted(saved.files, key=lambda n: int(n[1:]))}


#: What loading a damaged checkpoint raises from h5py, NumPy's npz reader (zipfile) and Keras.
_LOAD_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)


def _resume(trainer: HarmonizedModel, run: run_dir.RunDirectory, chief: bool
            ) -> tuple[run_dir.Checkpoint | None, dict | None]:
    """Restore the newest whole checkpoint; return it and its metric totals, or (None, None) to start afresh.

    Newest first, each checkpoint must have a state of the right shape, files of the recorded sizes and digests,
    load, and hold only finite values. One that fails is reported by path and moved to RUN_DIR/damaged (by the
    chief), and the next older one is tried. If checkpoints were there and none is whole, the run stops: the
    model may hold part of a damaged one, and starting over should be a choice, not a surprise.
    """
    tried = []
    for checkpoint in reversed(run.list_checkpoints()):
        checkpoint = run.check(checkpoint)
        problem, metrics = checkpoint.problem, None
        if problem is None:
            try:
                metrics = _restore(trainer, checkpoint)
            except run_dir.RunDirError:
                raise  # a whole checkpoint of another model: not damage
            except _LOAD_ERRORS as error:
                problem = f"it cannot be loaded ({type(error).__name__}: {error})"
            else:
                bad = _non_finite(_state_variables(trainer))
                problem = None if bad is None else f"variable {bad!r} holds NaN or infinite values"
        if problem is None:
            return checkpoint, metrics
        where = run.set_aside(checkpoint, problem) if chief else checkpoint.path
        tried.append(checkpoint.path.name)
        _say(chief, f"Checkpoint {checkpoint.path} is damaged: {problem}. Moved to {where}; trying an older one.")
    if tried:
        raise run_dir.RunDirError(
            f"No whole checkpoint is left in {run.checkpoints}: {', '.join(tried)} were damaged and were moved to "
            f"{run.path / run_dir.DAMAGED}. Run the same command again to start this run over from step 0."
        )
    return None, None


# ---------------------------------------------------------------------------------------------- the run
def train(
    recipe: str | os.PathLike | Mapping[str, Any] = "quickstart",
    *,
    model: str | None = None,
    data_dir: str | os.PathLike | None = None,
    imagenet_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    overrides: Sequence[str] = (),
    strategy: str = "default",
    download: bool = True,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 1,
) -> TrainResult:
    """Train (or resume) a harmonized model from a recipe; save it as a preset and score it.

    Args:
        recipe: a shipped recipe's name (`harmonization.recipes.list_recipes()`), a recipe file, or a dict.
        model: overrides the recipe's `model.source` (zoo name, hf:// URI, preset directory, quickstart_cnn).
        data_dir: TFDS data directory holding ClickMe (and ImageNet). Defaults to TFDS's.
        imagenet_dir: the folder with ImageNet's archives (TFDS manual_dir), needed when the recipe mixes in
            ImageNet (`data.clickme_fraction` < 1) and imagenet2012 is not prepared yet.
        out: the run directory. Defaults to ./harmonization_runs/RECIPE_NAME. Running again with the same
            settings resumes it (also after a kill); a directory of another recipe or model is refused.
        epochs, batch_size: override the recipe's. `epochs` may grow between runs of one directory.
        overrides: "key=value" recipe overrides (`--set`), e.g. "optimizer.learning_rate=0.01".
        strategy: "default" (one device), "mirrored" (the local GPUs) or "multiworker" (workers from TF_CONFIG).
        download: build the datasets when `data_dir` lacks them (ClickMe downloads; the generated dataset is
            made locally). Under "multiworker" datasets must be prepared first.
        callbacks: more Keras callbacks for each epoch's `fit`.
        verbose: Keras progress: 0 none, 1 bars, 2 one line per epoch.

    Returns:
        A `TrainResult`: the run directory, the recipe, steps, history, preset and evaluation.

    Process-wide effects, as for any TensorFlow training script: the recipe's seed is set for Python, NumPy and
    TensorFlow (`keras.utils.set_random_seed`), and with `deterministic` TensorFlow's op determinism stays on
    for the rest of the process (TensorFlow has no public way to turn it off). The precision policy is restored.

    Raises:
        MissingBackendError: Keras runs on JAX or PyTorch; the run's strategies, checkpoints and step are TensorFlow's.
    """
    _backend.require_tensorflow_backend(TRAIN_NEEDS_TENSORFLOW_BACKEND)
    resolved = _resolve_recipe(recipe, overrides, model, epochs, batch_size)
    fraction = resolved["data"]["clickme_fraction"]
    data_dir = _check_folder(data_dir, "--data-dir", " (the TFDS data directory; omit it for TFDS's default)")
    imagenet_dir = _check_folder(imagenet_dir, "--imagenet-dir", " (the folder with ImageNet's archives)")
    if fraction < 1 and imagenet_dir is None and data_dir is None:
        raise FileNotFoundError(
            f"Recipe {resolved['name']!r} mixes ImageNet into training (data.clickme_fraction {fraction:g}): pass "
            "--imagenet-dir with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (or --data-dir where "
            "imagenet2012 is prepared), or --set data.clickme_fraction=1 to train on ClickMe alone."
        )
    out = Path(out) if out is not None else Path(DEFAULT_OUT_ROOT) / resolved["name"]
    run = run_dir.RunDirectory(out, resolved)
    run.claim(write=False)  # a bad --out fails before TensorFlow starts anything

    distribution = _make_strategy(strategy)
    multiworker = isinstance(distribution, tf.distribute.MultiWorkerMirroredStrategy)
    chief = _is_chief(distribution)
    replicas = distribution.num_replicas_in_sync
    if resolved["batch_size"] % replicas:
        raise ValueError(f"`batch_size` {resolved['batch_size']} must be a multiple of the {replicas} replicas "
                         "(the global batch is split evenly).")
    keras.utils.set_random_seed(resolved["seed"])
    if resolved["deterministic"]:
        tf.config.experimental.enable_op_determinism()
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(resolved["precision"])
    try:
        with contextlib.ExitStack() as held:  # the run directory's lock, once taken
            return _run(resolved, run, distribution, chief, multiworker, data_dir, imagenet_dir,
                        download and not multiworker, callbacks, verbose, held)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _say(chief: bool, text: str) -> None:
    if chief:
        print(text, flush=True)


def _run(recipe, run, distribution, chief, multiworker, data_dir, imagenet_dir, download, callbacks,
         verbose, held: contextlib.ExitStack) -> TrainResult:
    data = _open_data(recipe, data_dir, imagenet_dir, download)
    steps_per_epoch = _steps_per_epoch(recipe, data)
    total_steps = recipe["epochs"] * steps_per_epoch
    with distribution.scope():
        network = _build_model(recipe, data.num_classes)
        trainer = HarmonizedModel(network, **recipe["harmonizer"])  # refuses a saliency method that cannot train
        trainer.compile(optimizer=_optimizer(recipe, steps_per_epoch))
        # Only now is the run recorded: a run refused by a check above leaves --out as it was, free for the fix.
        if chief:
            held.enter_context(run.lock())  # one run at a time on this directory, until this one ends
            run.claim(write=True)
            run.remove_partial()
        checkpoint = run.latest_checkpoint()
        history: list[dict[str, Any]] = []
        start, metrics = 0, None
        if checkpoint is not None:
            if checkpoint.state["steps_per_epoch"] != steps_per_epoch:
                raise run_dir.RunDirError(
                    f"{checkpoint.path} was written with {checkpoint.state.get('steps_per_epoch')} steps per epoch "
                    f"and this run has {steps_per_epoch}: the data position would not match."
                )
            if checkpoint.step > total_steps:
                raise run_dir.RunDirError(
                    f"{run.path} has trained {checkpoint.step} steps, more than the {recipe['epochs']} epochs of "
                    f"{steps_per_epoch} steps asked for now; run it with --epochs {checkpoint.step // steps_per_epoch}"
                    " or more, or choose another --out."
                )
        checkpoint, metrics = _resume(trainer, run, chief)  # the newest whole one (damaged ones set aside)
        if checkpoint is not None:
            start, history = checkpoint.step, list(checkpoint.state.get("history", []))
    if multiworker:
        _agree_on_start(distribution, start, run)
    if chief and history:
        run.write_history(history)  # the files may lag the checkpoint after a kill between the two writes
    _say(chief, f"Run {run.path}: recipe {recipe['name']!r}, model {recipe['model']['source']!r} "
                f"({recipe['model']['weights']} weights), {data.num_classes} classes, {recipe['epochs']} epochs x "
                f"{steps_per_epoch} steps of {recipe['batch_size']} images, {distribution.num_replicas_in_sync} "
                f"replica(s); saliency at {trainer.saliency_input.description}")
    finished = start >= total_steps
    if finished and checkpoint is not None:
        _say(chief, f"The run has trained its {recipe['epochs']} epochs ({start} steps): nothing to train "
                    "(raise --epochs to train on).")
    elif checkpoint is not None:
        _say(chief, f"Resuming from {checkpoint.path.name}: epoch {start // steps_per_epoch + 1}, step "
                    f"{start % steps_per_epoch} of {steps_per_epoch} done")
    validation = (_validation_batches(recipe, data, data_dir, distribution.num_replicas_in_sync, multiworker)
                  if recipe["evaluation"]["each_epoch"] else None)
    board = (keras.callbacks.TensorBoard(str(run.path / run_dir.TENSORBOARD), write_graph=False) if chief
             else None)
    progress = _Progress(recipe["epochs"])
    for epoch in range(start // steps_per_epoch, recipe["epochs"]):
        skip = start - epoch * steps_per_epoch if epoch == start // steps_per_epoch else 0
        batches = _distributed(
            functools.partial(_epoch_batches, recipe, data, data_dir, imagenet_dir, epoch, skip, steps_per_epoch),
            distribution, recipe["batch_size"], multiworker,
        )
        checkpointer = _Checkpointer(run, trainer, first_step=epoch * steps_per_epoch + skip,
                                     steps_per_epoch=steps_per_epoch, recipe=recipe, history=history, write=chief,
                                     metrics=metrics if skip else None)
        # Each epoch is its own `fit` (its own data): user callbacks see on_train_begin/end once per epoch.
        trainer.fit(batches, epochs=epoch + 1, initial_epoch=epoch, steps_per_epoch=steps_per_epoch - skip,
                    validation_data=validation,
                    callbacks=[checkpointer, progress, *([board] if board else []), *callbacks],
                    verbose=verbose if chief else 0, shuffle=False)  # shuffled by its seed, above
        if trainer.stop_training:  # a callback (e.g. EarlyStopping) asked to stop: the run ends here
            _say(chief, f"Stopped after epoch {epoch + 1} by a callback.")
            total_steps = (epoch + 1) * steps_per_epoch
            break
    result = TrainResult(run.path, recipe, max(start, total_steps), steps_per_epoch,
                         checkpoint.step if checkpoint is not None else None, history, is_chief=chief,
                         trained_steps=max(0, total_steps - start))
    if not chief:
        return result
    preset, scores = run.path / run_dir.PRESET, run.path / run_dir.EVALUATION / "results.json"
    reused = finished and _preset_steps(preset) == result.steps  # a finished run, run again: its outputs stand
    if reused:
        result.preset = preset
        print(f"Preset: {preset}", flush=True)
    else:
        shutil.rmtree(run.path / run_dir.EVALUATION, ignore_errors=True)  # scores of an older preset
        result.preset = _save_final_preset(run, network, recipe, data, result)
    if recipe["evaluation"]["final"]:
        result.evaluation = _reusable_scores(scores, recipe) if reused else None
        if result.evaluation is not None:
            print(f"Evaluation: {scores}", flush=True)
        else:
            result.evaluation = _evaluate(run, recipe, data_dir)
    return result


def _reusable_scores(path: Path, recipe) -> dict[str, Any] | None:
    """The final scores already written for this preset with these settings, or None (then it is scored again)."""
    try:
        scores = json.loads(path.read_text(encoding="utf-8"))
        asked = {"dataset": recipe["data"]["clickme"], "split": recipe["data"]["eval_split"],
                 "limit": recipe["evaluation"]["limit"], "batch_size": recipe["evaluation"]["batch_size"]}
        return scores if all(scores["data"][key] == value for key, value in asked.items()) else None
    except (OSError, ValueError, KeyError, TypeError):  # none, half-written by a kill, or not ours
        return None


def _preset_steps(preset: Path) -> int | None:
    """The training steps a run's preset was saved after, or None without a readable one."""
    try:
        return int(json.loads((preset / "metadata.json").read_text(encoding="utf-8"))["training"]["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_final_preset(run, network, recipe, data: _Data, result: TrainResult) -> Path:
    """The trained network as a preset (`save_preset` stages it beside and swaps it in: a kill leaves the old
    preset or the new one). Weights that are not all finite are never saved as a model."""
    bad = _non_finite(network.weights)
    if bad is not None:
        raise TrainingFailedError(f"The trained model's variable {bad!r} holds NaN or infinite values; no preset was "
                                  f"saved to {run.path / run_dir.PRESET}.")
    final = run.path / run_dir.PRESET
    metadata = {
        "name": f"{recipe['name']}_run",
        "description": f"Trained by `harmonization train` with recipe {recipe['name']!r}.",
        "recipe": recipe,
        "training": {"steps": result.steps, "steps_per_epoch": result.steps_per_epoch,
                     "history": result.history, "dataset": recipe["data"]["clickme"]},
    }
    if data.class_names is not None and len(data.class_names) == network.output_shape[-1]:
        metadata["class_names"] = data.class_names
    save_preset(network, final, metadata=metadata)
    print(f"Preset: {final}", flush=True)
    return final


def _evaluate(run, recipe, data_dir) -> dict[str, Any]:
    """`harmonization evaluate` on the final preset, into RUN_DIR/evaluation."""
    # Imported here: the evaluate command is a module of the command layer, used by the run's last step only.
    from harmonization import evaluate_command

    args = argparse.Namespace(
        model=str(run.path / run_dir.PRESET), data_dir=data_dir, dataset=recipe["data"]["clickme"],
        split=recipe["data"]["eval_split"], batch_size=recipe["evaluation"]["batch_size"],
        limit=recipe["evaluation"]["limit"], out=str(run.path / run_dir.EVALUATION), download=False,
        method=evaluate_command.DEFAULT_SALIENCY_METHOD,
    )
    return evaluate_command.run(args)


def main(args: argparse.Namespace) -> int:
    """`harmonization train` (cli.py parses the arguments)."""
    result = train(
        args.recipe, model=args.model, data_dir=args.data_dir, imagenet_dir=args.imagenet_dir, out=args.out,
        epochs=args.epochs, batch_size=args.batch_size, overrides=args.set or (), strategy=args.strategy,
        verbose=args.verbose,
    )
    if result.is_chief:
        resumed = result.resumed_from_step is not None and result.trained_steps
        print(f"Run directory: {result.run_dir} ({result.steps} steps"
              + (f", {result.trained_steps} of them now, resumed from step {result.resumed_from_step}" if resumed
                 else "") + ")")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("Use `harmonization train` (harmonization.cli).")
