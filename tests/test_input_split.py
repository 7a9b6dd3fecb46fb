"""`harmonization train`'s input split between workers: each decodes only its rows, the data stays what it was.

The trainer batches and splits encoded examples and decodes each worker's rows alone (`trainer._epoch_batches`).
These tests prove, on the quickstart's generated dataset (tests/conftest.py), that

* one process gets exactly the batches the trainer got before the split: the public loaders composed as the
  trainer composed them (`_old_epoch_batches`, rebuilt here from `load_clickme`, `load_imagenet` and
  `mix_datasets`), for ClickMe alone and mixed with ImageNet, with and without augmentation;
* each of N workers decodes only its own rows of each global batch (1/N of it, each row once: counted by
  recording every example `_Preprocessor.example` decodes), and the workers' rows together are the one-process
  batches element for element.

ImageNet is not available offline: `imagenet2012` is served by the quick ClickMe dataset's builder, read through
the ImageNet loader (no maps, centre crops or the training crop), which is all the mix needs of it.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tensorflow as tf

from harmonization import data as data_lib
from harmonization import recipes, trainer

QUICK = "clickme_synthetic/quick"
BATCH = 16


@pytest.fixture
def imagenet_standin(monkeypatch):
    """`imagenet2012` read from the quick ClickMe dataset (its `train` split: 200 images with labels)."""
    original = data_lib._tfds_builder

    def builder(name, data_dir, download, split, manual_dir=None):
        if name == "imagenet2012":
            name, manual_dir = QUICK, None
        return original(name, data_dir, download, split, manual_dir=manual_dir)

    monkeypatch.setattr(data_lib, "_tfds_builder", builder)


@pytest.fixture
def decoded(monkeypatch):
    """Each example decoded from now on, as (has a human map, its augmentation seed), in the order decoded.

    `_Preprocessor.example` is the one decode function of every pipeline (ClickMe's and ImageNet's, before and
    after the split): wrapped, it records each call the input pipeline makes, prefetched ones included.
    """
    records: list[tuple[bool, int]] = []
    original = data_lib._Preprocessor.example

    def example(self, example, seed):
        out = original(self, example, seed)
        with_maps = self.with_heatmaps
        done = tf.py_function(lambda value: records.append((with_maps, int(value))) or 0, [seed], tf.int32)
        with tf.control_dependencies([done]):
            out[data_lib.LABEL] = tf.identity(out[data_lib.LABEL])
        return out

    monkeypatch.setattr(data_lib._Preprocessor, "example", example)
    return records


def _recipe(fraction: float, augment: bool) -> dict:
    return recipes.load_recipe("quickstart", [f"data.clickme={QUICK}", f"data.clickme_fraction={fraction}",
                                              f"data.augment={str(augment).lower()}", f"batch_size={BATCH}"])


def _old_epoch_batches(recipe, data, data_dir, imagenet_dir, epoch: int, skip: int, steps_per_epoch: int):
    """The trainer's epoch before its input was split between workers (commit 99e1efb), from public functions:
    every worker decoded these global batches whole and kept its slice."""
    spec = recipe["data"]
    batch, fraction = recipe["batch_size"], spec["clickme_fraction"]
    seed = trainer._epoch_seed(recipe["seed"], epoch)
    common = dict(image_size=spec["image_size"], data_dir=data_dir, name=spec["clickme"], download=False)

    def clickme_pass(index):
        pass_seed = trainer._epoch_seed(seed, index + 1)
        if spec["augment"]:
            batches = data_lib.load_clickme(
                spec["train_split"], batch, training=True, seed=pass_seed, shuffle_buffer=spec["shuffle_buffer"],
                crop_scale=spec["crop_scale"], drop_remainder=True, reshuffle_each_iteration=False, **common,
            )
            return batches if fraction == 1 else batches.unbatch()
        examples = (data_lib.load_clickme(spec["train_split"], 256, training=False, **common).unbatch()
                    .shuffle(spec["shuffle_buffer"], seed=pass_seed, reshuffle_each_iteration=False))
        return examples.batch(batch, drop_remainder=True) if fraction == 1 else examples

    needed = steps_per_epoch * batch
    clickme = trainer._passes(clickme_pass, needed * fraction, data.train_examples)
    if fraction == 1:
        return clickme.skip(skip)

    def imagenet_pass(index):
        return data_lib.load_imagenet(
            "train", batch, spec["image_size"], training=spec["augment"], data_dir=data_dir, manual_dir=imagenet_dir,
            seed=trainer._epoch_seed(seed, index + 1), shuffle_buffer=spec["shuffle_buffer"],
            crop_scale=spec["crop_scale"], download=False, drop_remainder=True, reshuffle_each_iteration=False,
        )

    imagenet = trainer._passes(imagenet_pass, needed * (1 - fraction), data.imagenet_examples)
    mixed = data_lib.mix_datasets(clickme, imagenet.unbatch(), fraction, batch_size=batch, seed=seed,
                                  reshuffle_each_iteration=False)
    return mixed.skip(skip)


def _arrays(dataset, count: int) -> list[dict]:
    return [{key: value.numpy() for key, value in batch.items()} for batch in dataset.take(count)]


def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        assert a.keys() == b.keys(), step
        for key in a:
            assert a[key].dtype == b[key].dtype, (step, key)
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"batch {step}, {key!r}")


@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("augment", [True, False])
def test_one_process_gets_exactly_the_batches_of_the_loaders_composed_as_before(quick_data, imagenet_standin,
                                                                                fraction, augment):
    recipe = _recipe(fraction, augment)
    data = trainer._open_data(recipe, str(quick_data), None, download=False)
    steps = trainer._steps_per_epoch(recipe, data)
    count = steps + 3  # past the epoch's end, into its next pass: each pass's boundary too
    for epoch, skip in ((0, 0), (1, 5)):
        new = trainer._epoch_batches(recipe, data, str(quick_data), None, epoch, skip, steps)
        old = _old_epoch_batches(recipe, data, str(quick_data), None, epoch, skip, steps)
        got, want = _arrays(new, count), _arrays(old, count)
        _assert_same_batches(got, want)
    tokens = np.concatenate([batch["token"] for batch in got])
    assert (0 < tokens.mean() < 1) if fraction < 1 else (tokens == 1).all()  # both sources in the mix


def _own_rows(recipe, data, data_dir, steps, workers: int, count: int) -> list[set]:
    """Each worker's rows of the first `count` global batches of encoded examples, as (has a map, seed)."""
    encoded, _ = trainer._encoded_epoch(recipe, data, data_dir, None, 0, 0, steps)
    local = recipe["batch_size"] // workers
    rows = [set() for _ in range(workers)]
    for batch in encoded.take(count):
        keys = list(zip((batch["source"].numpy() == data_lib._WITH_MAPS).tolist(), batch["seed"].numpy().tolist()))
        assert len(set(keys)) == len(keys)  # the keys name the examples
        for worker in range(workers):
            rows[worker].update(keys[worker * local:(worker + 1) * local])
    return rows


@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("workers, replicas", [(1, 1), (2, 2), (2, 4)])
def test_each_worker_decodes_only_its_rows_and_together_they_are_the_one_process_batch(
        quick_data, imagenet_standin, decoded, fraction, workers, replicas):
    recipe = _recipe(fraction, augment=True)
    data = trainer._open_data(recipe, str(quick_data), None, download=False)
    steps = trainer._steps_per_epoch(recipe, data)
    taken = 4  # global batches trained on; the pipeline may decode (prefetch) some beyond them
    local, per_replica = BATCH // workers, BATCH // replicas
    horizon = _own_rows(recipe, data, str(quick_data), steps, workers, count=steps)
    first = _own_rows(recipe, data, str(quick_data), steps, workers, count=taken)
    assert not decoded  # building and reading the encoded batches decodes nothing

    make_batches = functools.partial(trainer._epoch_batches, recipe, data, str(quick_data), None, 0, 0, steps)
    outputs = []
    for worker in range(workers):
        decoded.clear()
        context = tf.distribute.InputContext(num_input_pipelines=workers, input_pipeline_id=worker,
                                             num_replicas_in_sync=replicas)
        batches = trainer._worker_batches(make_batches, BATCH, context)
        outputs.append(_arrays(batches, taken * local // per_replica))
        assert len(decoded) == len(set(decoded))  # no example decoded twice
        mine = set(decoded)
        assert first[worker] <= mine, "an image trained on was not decoded by its worker"
        # Only its own rows, 1/N of each global batch: what it decoded beyond them is its rows of batches ahead.
        assert mine <= horizon[worker], "a worker decoded another worker's rows"
        assert len(first[worker]) == local * taken

    # The workers' rows, in order, are the one-process global batches, element for element.
    whole = _arrays(trainer._epoch_batches(recipe, data, str(quick_data), None, 0, 0, steps), taken)
    per_global = local // per_replica
    joined = [{key: np.concatenate([outputs[w][step * per_global + r][key] for w in range(workers)
                                    for r in range(per_global)]) for key in whole[0]} for step in range(taken)]
    _assert_same_batches(joined, whole)
