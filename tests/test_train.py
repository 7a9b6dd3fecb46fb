"""`harmonization train` run as users run it: the command in a fresh process, killed and resumed, on 2 workers.

Training runs in subprocesses: a recipe's `deterministic` turns on TensorFlow's op determinism for the whole
process, and a kill must be a real SIGKILL. The data is the quickstart's generated dataset (`quick` config),
built once per session into a shared TFDS folder (tests/conftest.py).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from harmonization import run_dir
from network_helpers import free_ports

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--set", "data.clickme=clickme_synthetic/quick", "--batch-size", "16", "--set", "checkpoint.every_steps=5",
         "--set", "evaluation.limit=40", "--verbose", "2"]
STEPS_PER_EPOCH = 200 // 16  # the quick config's 200 training images


def _env(extra=None):
    return {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", **(extra or {})}


def command(*args, env=None, timeout=400):
    """`harmonization train ...` in a fresh process; (returncode, output)."""
    process = subprocess.run(
        [sys.executable, "-m", "harmonization", "train", *args], env=_env(env), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )
    return process.returncode, process.stdout


@pytest.fixture
def data_dir(quick_data):
    """The session's clickme_synthetic/quick folder (tests/conftest.py); runs only read it."""
    return quick_data


def preset_weights(preset: Path) -> dict:
    with h5py.File(preset / "model.weights.h5", "r") as file:
        arrays = {}
        file.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset)
                        else None)
    return arrays


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = preset_weights(a), preset_weights(b)
    assert first.keys() == second.keys() and first
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


@pytest.mark.slow
def test_a_run_writes_checkpoints_logs_a_preset_with_its_recipe_and_an_evaluation(data_dir, tmp_path):
    out = tmp_path / "run"
    code, output = command("--recipe", "quickstart", "--data-dir", str(data_dir), "--out", str(out),
                           "--epochs", "2", *QUICK)
    assert code == 0, output[-3000:]
    history = json.loads((out / run_dir.HISTORY_JSON).read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    for row in history:
        assert np.isfinite([row["loss"], row["harmonization"], row["val_spearman"]]).all()
    assert (out / run_dir.HISTORY_CSV).read_text().splitlines()[0].startswith("epoch,")
    assert list((out / run_dir.TENSORBOARD).rglob("events.out.tfevents.*"))
    # The final step's checkpoint is there (and only `keep` of them).
    checkpoints = sorted(p.name for p in (out / run_dir.CHECKPOINTS).iterdir())
    assert checkpoints[-1] == f"step-{2 * STEPS_PER_EPOCH:06d}" and len(checkpoints) == 2
    metadata = json.loads((out / run_dir.PRESET / "metadata.json").read_text())
    assert metadata["recipe"]["name"] == "quickstart" and metadata["recipe"]["batch_size"] == 16
    assert metadata["recipe"]["data"]["clickme"] == "clickme_synthetic/quick"
    assert metadata["training"]["steps"] == 2 * STEPS_PER_EPOCH
    assert len(metadata["class_names"]) == 10
    results = json.loads((out / run_dir.EVALUATION / "results.json").read_text())
    assert results["data"]["num_images"] == 40 and np.isfinite(results["scores"]["spearman"])
    assert "Preset:" in output and "Run directory:" in output
    # Keras's warning is kept for data that truly ran out (refused or failed by name), not every validation.
    assert "ran out of data" not in output

    # Re-running the finished run trains nothing more and keeps its outputs.
    stamp = (out / run_dir.PRESET / "model.weights.h5").stat().st_mtime_ns
    code, again = command("--recipe", "quickstart", "--data-dir", str(data_dir), "--out", str(out), "--epochs", "2",
                          *QUICK)
    assert code == 0, again[-3000:]
    assert "nothing to train" in again and "Epoch" not in again and "Scoring" not in again
    assert (out / run_dir.PRESET / "model.weights.h5").stat().st_mtime_ns == stamp
    # Asked for other final scores (evaluation may change on a finished run), it scores again; never stale ones.
    code, again = command("--recipe", "quickstart", "--data-dir", str(data_dir), "--out", str(out), "--epochs", "2",
                          *QUICK, "--set", "evaluation.limit=20")
    assert code == 0 and "Scoring" in again, again[-3000:]
    assert json.loads((out / run_dir.EVALUATION / "results.json").read_text())["data"]["num_images"] == 20
    # Fewer epochs than it trained is refused (its checkpoints hold more), as is another recipe's settings.
    code, fewer = command("--recipe", "quickstart", "--data-dir", str(data_dir), "--out", str(out), "--epochs", "1",
                          *QUICK)
    assert code == 1 and f"has trained {2 * STEPS_PER_EPOCH} steps, more than the 1 epochs" in fewer, fewer[-2000:]
    code, output = command("--recipe", "quickstart", "--data-dir", str(data_dir), "--out", str(out),
                           "--epochs", "2", *QUICK, "--set", "optimizer.learning_rate=0.5")
    assert code == 1 and "optimizer.learning_rate: 0.002 -> 0.5" in output, output[-2000:]
    assert "Epoch" not in output


KILLED_RUN = """
import os, signal, sys
import keras
import harmonization

class KillAt(keras.callbacks.Callback):
    '''SIGKILL this process (no clean-up of any kind) after global step {kill_at}.'''
    def __init__(self):
        super().__init__()
        self.step = {first}
    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

harmonization.train("quickstart", data_dir=sys.argv[1], out=sys.argv[2], epochs=3, batch_size=16,
                    overrides=["data.clickme=clickme_synthetic/quick", "checkpoint.every_steps=5",
                               "evaluation.limit=40", "data.augment=true"], callbacks=[KillAt()], verbose=2)
"""


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(data_dir, tmp_path):
    # With augmentation (random crops and flips, as the zoo recipes train), to replay them too.
    args = ["--recipe", "quickstart", "--data-dir", str(data_dir), "--epochs", "3", *QUICK, "--set", "data.augment=true"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    code, output = command(*args, "--out", str(whole))
    assert code == 0, output[-3000:]

    # Killed at step 18 of 36: epoch 2's 6th step, 3 steps after the checkpoint of step 15.
    kill_at = STEPS_PER_EPOCH + 6
    script = KILLED_RUN.format(kill_at=kill_at, first=0)
    killed = subprocess.run([sys.executable, "-c", script, str(data_dir), str(resumed)], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    latest = run_dir.RunDirectory(resumed, {}).latest_checkpoint()
    assert latest.step == 15 and 0 < latest.state["step_in_epoch"] < STEPS_PER_EPOCH  # mid-epoch
    assert not (resumed / run_dir.PRESET).exists()

    code, output = command(*args, "--out", str(resumed))  # the same command again
    assert code == 0, output[-3000:]
    assert "Resuming from step-000015: epoch 2, step 3 of 12 done" in output
    assert_same_weights(whole / run_dir.PRESET, resumed / run_dir.PRESET)
    # The same logs too: the killed epoch's row covers its whole epoch (its running totals were checkpointed).
    history = json.loads((resumed / run_dir.HISTORY_JSON).read_text())
    assert history == json.loads((whole / run_dir.HISTORY_JSON).read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]


@pytest.mark.slow
def test_mixed_bfloat16_is_a_recipe_setting(data_dir, tmp_path):
    out = tmp_path / "bf16"
    code, output = command("--recipe", "quickstart", "--data-dir", str(data_dir), "--out", str(out), "--epochs", "1",
                           *QUICK, "--set", "precision=mixed_bfloat16", "--set", "evaluation.final=false")
    assert code == 0, output[-3000:]
    history = json.loads((out / run_dir.HISTORY_JSON).read_text())
    assert np.isfinite([history[0]["loss"], history[0]["harmonization"]]).all()
    assert '"mixed_bfloat16"' in (out / run_dir.PRESET / "config.json").read_text()  # the layers computed in bf16


@pytest.mark.slow
def test_two_local_workers_train_through_the_command(data_dir, tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    out = tmp_path / "multiworker"
    args = ["--recipe", "quickstart", "--data-dir", str(data_dir), "--out", str(out), "--epochs", "1",
            "--strategy", "multiworker", *QUICK]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "harmonization", "train", *args], env=_env({"TF_CONFIG": json.dumps(tf_config)}),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail("a worker did not finish in 400 s")
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    # Worker 0 (the chief) wrote the run; the global batch of 16 was split over the 2 workers' replicas.
    assert "2 replica(s)" in outputs[0] and "Preset:" in outputs[0]
    assert "Preset:" not in outputs[1]
    history = json.loads((out / run_dir.HISTORY_JSON).read_text())
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    # The same training as on one device: the same global batches in the same order, each split between the
    # workers, gradients summed across them (to float noise: Adam's first steps amplify the summation order's).
    single = tmp_path / "single"
    code, output = command(*[a for a in args if a not in ("--strategy", "multiworker")][:-len(QUICK)], *QUICK,
                           "--out", str(single))
    assert code == 0, output[-3000:]
    first, second = preset_weights(out / run_dir.PRESET), preset_weights(single / run_dir.PRESET)
    for name in first:
        np.testing.assert_allclose(first[name], second[name], rtol=0, atol=5e-5, err_msg=name)


# ------------------------------------------------------------------ the data of an epoch (fast, in-process)
SIZE = 8


def _fake_source(offset, count, with_maps):
    """A loader cut before decoding (`data._EncodedSource`) of `count` PNG images whose pixels hold their id
    (offset + i), ordered by `seed`; decoded by the real preprocessing, crops and flips keep the id."""

    def source(split, image_size=SIZE, training=False, data_dir=None, *, seed=None, **_):
        import tensorflow as tf

        from harmonization import data as data_lib

        order = np.random.default_rng(seed if training or seed is not None else 0).permutation(count) + offset
        examples = {"image": tf.stack([tf.io.encode_png(np.full((SIZE, SIZE, 3), i, "uint8")) for i in order]),
                    "label": (order % 10).astype("int64")}
        if with_maps:
            examples["heatmap"] = tf.fill([count], tf.io.encode_png(np.full((SIZE, SIZE, 1), 255, "uint8")))
        pairs = tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(examples),
                                    tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=False))
        preprocessor = data_lib._Preprocessor(image_size, training, with_heatmaps=with_maps, jpeg=False,
                                              eval_crop_fraction=None if with_maps else 0.875)
        return data_lib._EncodedSource(pairs, preprocessor, deterministic=True)

    return source


def _ids(dataset, steps):
    return [batch["image"].numpy()[:, 0, 0, 0].astype(int).tolist() for batch in dataset.take(steps)]


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_an_epochs_batches_are_a_pure_function_of_seed_and_epoch(monkeypatch, fraction):
    from harmonization import recipes, trainer

    monkeypatch.setattr(trainer.data_lib, "_clickme_source", _fake_source(0, 24, with_maps=True))
    monkeypatch.setattr(trainer.data_lib, "_imagenet_source", _fake_source(100, 24, with_maps=False))
    recipe = recipes.load_recipe("quickstart", [f"data.clickme_fraction={fraction}", "data.augment=true",
                                                f"data.image_size={SIZE}", "batch_size=4", "steps_per_epoch=15"])
    data = trainer._Data("fake", 10, None, train_examples=24, eval_examples=8, imagenet_examples=24)
    steps = recipe["steps_per_epoch"]

    def epoch(e, skip=0):
        return trainer._epoch_batches(recipe, data, None, None, e, skip, steps)

    first = epoch(0)
    ids = _ids(first, steps)
    assert _ids(first, steps) == ids  # iterated again (Keras does, under tf.distribute): the same batches
    assert _ids(epoch(0), steps) == ids  # rebuilt (a resumed run does): the same batches
    assert _ids(epoch(0, skip=5), steps - 5) == ids[5:]  # resumed mid-epoch: the rest, in order
    assert _ids(epoch(1), steps) != ids  # the next epoch: another order
    clickme = [i for batch in ids for i in batch if i < 100]
    # 15 steps of 4 need more than one pass over 24 ClickMe examples: the next pass has its own order.
    if fraction == 1:
        assert sorted(clickme[:24]) == list(range(24)) and clickme[24:48] != clickme[:24]
    else:
        imagenet = [i for batch in ids for i in batch if i >= 100]
        assert clickme and imagenet  # both sources, each example's token says which
        for batch in first.take(steps):
            from_clickme = batch["image"].numpy()[:, 0, 0, 0] < 100
            np.testing.assert_array_equal(batch["token"].numpy(), from_clickme.astype("float32"))
            assert (batch["heatmap"].numpy()[~from_clickme] == 0).all()


# ------------------------------------------------------------------ the learning rate and the optimizer
def _rates(recipe, steps_per_epoch, steps):
    from harmonization import trainer

    schedule = trainer._learning_rate(recipe, steps_per_epoch)
    return np.array([float(schedule(step)) if callable(schedule) else schedule for step in steps])


@pytest.mark.parametrize("name, warmup", [("cosine", 2.0), ("cosine", 0.0), ("step", 0.0), ("constant", 1.0),
                                          ("constant", 0.0)])
def test_the_learning_rate_follows_its_formula(name, warmup):
    """Against the schedules written out in float64: linear warm-up from 0, then cosine to final_fraction x peak,
    a step decay every step_epochs, or constant."""
    from harmonization import recipes

    recipe = recipes.load_recipe("quickstart", [f"schedule.name={name}", f"schedule.warmup_epochs={warmup}",
                                                "schedule.final_fraction=0.1", "schedule.step_epochs=3",
                                                "schedule.step_gamma=0.5", "optimizer.learning_rate=0.4",
                                                "epochs=8"])
    per_epoch, peak = 10, 0.4
    steps = np.arange(0, 80)
    w, total = int(warmup * per_epoch), 80
    if name == "cosine":
        t = np.clip((steps - w) / (total - w), 0, 1)
        want = peak * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t)))
    elif name == "step":
        want = peak * 0.5 ** (steps // 30)
    else:
        want = np.full(steps.shape, peak)
    if w:
        want = np.where(steps < w, peak * steps / w, want)
    np.testing.assert_allclose(_rates(recipe, per_epoch, steps), want, rtol=1e-5, atol=1e-7)


def test_the_recipes_optimizer_is_built_as_written():
    import keras

    from harmonization import recipes, trainer

    sgd = trainer._optimizer(recipes.load_recipe("resnet50v2_harmonized"), 100)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.nesterov and sgd.momentum == pytest.approx(0.9)
    adam = trainer._optimizer(recipes.load_recipe("vit_b16_harmonized"), 100)
    assert type(adam) is keras.optimizers.Adam and adam.clipnorm == pytest.approx(1.0)
    adamw = trainer._optimizer(recipes.load_recipe("quickstart", ["optimizer.name=adamw",
                                                                  "optimizer.weight_decay=0.02"]), 100)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == pytest.approx(0.02)


def test_a_real_augmented_epoch_is_the_same_each_time_it_is_read(data_dir):
    """The zoo recipes' path (random resized crops and flips on the real pipeline), not a stand-in."""
    from harmonization import recipes, trainer

    recipe = recipes.load_recipe("quickstart", ["data.clickme=clickme_synthetic/quick", "data.augment=true",
                                                "batch_size=16"])
    data = trainer._open_data(recipe, str(data_dir), None, download=False)
    steps = trainer._steps_per_epoch(recipe, data)

    def images(epoch, skip=0):
        batches = trainer._epoch_batches(recipe, data, str(data_dir), None, epoch, skip, steps)
        return [batch["image"].numpy() for batch in batches.take(steps - skip)]

    first = images(0)
    np.testing.assert_array_equal(np.stack(images(0)), np.stack(first))
    np.testing.assert_array_equal(np.stack(images(0, skip=4)), np.stack(first[4:]))
    assert not np.array_equal(np.stack(images(1)), np.stack(first))


def test_a_restored_checkpoint_continues_with_the_same_dropout_masks(tmp_path):
    """Dropout's random-generator state is not in Keras's weights file; the checkpoint keeps it."""
    import keras

    import harmonization
    from harmonization import recipes, trainer

    def make():
        keras.utils.set_random_seed(3)
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Rescaling(1 / 255.0)(inputs)
        x = keras.layers.Dropout(0.5)(keras.layers.Flatten()(x))
        model = keras.Model(inputs, keras.layers.Dense(4)(x))
        hmodel = harmonization.HarmonizedModel(model)
        hmodel.compile(optimizer=keras.optimizers.SGD(0.1))
        return hmodel

    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(0, 255, (6, 8, 8, 3)).astype("float32"),
             "heatmap": rng.uniform(0, 1, (6, 8, 8, 1)).astype("float32"), "label": rng.integers(0, 4, 6)}
    first = make()
    first.train_on_batch(batch)
    assert trainer._random_state_variables(first.model)  # the Dropout layer's generator state
    recipe = recipes.defaults()
    run = run_dir.RunDirectory(tmp_path, recipe)
    saver = trainer._Checkpointer(run, first, first_step=0, steps_per_epoch=10, recipe=recipe, history=[],
                                  write=True)
    saver._save(1, with_metrics=True)
    first.train_on_batch(batch)

    second = make()
    second.build((None, 8, 8, 3))
    trainer._restore(second, run.latest_checkpoint())
    second.train_on_batch(batch)
    for a, b in zip(first.model.get_weights(), second.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # Without the generator state, the same step draws other masks and ends elsewhere.
    third = make()
    third.build((None, 8, 8, 3))
    third.optimizer.build(third.trainable_variables)
    third.load_weights(str(run.latest_checkpoint().path / run_dir.WEIGHTS_FILE))
    third.train_on_batch(batch)
    assert not np.allclose(first.model.get_weights()[0], third.model.get_weights()[0], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- nothing garbage
def _tiny_trainer(seed=3):
    import keras

    import harmonization

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Dropout(0.5)(keras.layers.Flatten()(x))
    hmodel = harmonization.HarmonizedModel(keras.Model(inputs, keras.layers.Dense(4)(x)))
    hmodel.compile(optimizer=keras.optimizers.Adam(0.01))
    hmodel.build((None, 8, 8, 3))
    hmodel.optimizer.build(hmodel.trainable_variables)
    return hmodel


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.uniform(0, 255, (6, 8, 8, 3)).astype("float32"),
            "heatmap": rng.uniform(0, 1, (6, 8, 8, 1)).astype("float32"), "label": rng.integers(0, 4, 6)}


def _drop_record(folder):
    """Make `folder` a checkpoint as written before files were recorded: its files are then not hashed."""
    state = json.loads((folder / run_dir.STATE_FILE).read_text())
    del state["files"]
    (folder / run_dir.STATE_FILE).write_text(json.dumps(state))


def _poison_weights(folder):
    """Write NaN and 1e30 into a few weights of a checkpoint's weights file (in place, as bad RAM or a bug would)."""
    with h5py.File(folder / run_dir.WEIGHTS_FILE, "r+") as file:
        kernels = []
        file.visititems(lambda name, item: kernels.append(item) if isinstance(item, h5py.Dataset)
                        and item.ndim == 2 else None)
        values = kernels[0][()]
        values.flat[:3] = [np.nan, 1e30, np.nan]
        kernels[0][...] = values


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture
def checkpointed_run(tmp_path):
    """A run directory with whole checkpoints at steps 1..6 of one tiny model (6 steps per epoch), each holding
    other weights; returns (run, weights saved at each step)."""
    from harmonization import recipes, trainer

    hmodel = _tiny_trainer()
    recipe = recipes.with_settings(recipes.defaults(), epochs=2)
    recipe["checkpoint"]["keep"] = 10
    run = run_dir.RunDirectory(tmp_path / "run", recipe)
    saver = trainer._Checkpointer(run, hmodel, first_step=0, steps_per_epoch=6, recipe=recipe, history=[],
                                  write=True)
    saved = {}
    for step in range(1, 7):
        hmodel.train_on_batch(_batch(step))
        saver._save(step, with_metrics=step < 6)
        saved[step] = [w.copy() for w in hmodel.model.get_weights()]
    return run, saved


def test_damaged_checkpoints_are_set_aside_and_the_newest_whole_one_is_restored(checkpointed_run, capsys):
    from harmonization import trainer

    run, saved = checkpointed_run
    folders = {c.step: c.path for c in run.list_checkpoints()}
    # Newest first, each damaged in another way a disk, a kill or a person damages files.
    _poison_weights(folders[6])                    # NaN/1e30 in the weights: no longer the recorded bytes
    _poison_weights(folders[5])                    # ... and in one written before files were recorded:
    _drop_record(folders[5])                       #     found when its values are read back
    (folders[4] / run_dir.WEIGHTS_FILE).write_bytes(b"")          # zero bytes
    _truncate(folders[3] / run_dir.RANDOM_STATE_FILE)              # the random state's npz truncated
    _drop_record(folders[2])
    _truncate(folders[2] / run_dir.WEIGHTS_FILE)                   # truncated, unrecorded: h5py fails to open it
    fresh = _tiny_trainer(seed=9)
    checkpoint, _ = trainer._resume(fresh, run, chief=True)
    assert checkpoint.step == 1
    for restored, expected in zip(fresh.model.get_weights(), saved[1]):
        np.testing.assert_array_equal(restored, expected)
    output = capsys.readouterr().out
    damaged = run.path / run_dir.DAMAGED
    assert sorted(p.name for p in damaged.iterdir()) == [f"step-00000{i}" for i in range(2, 7)]
    for step, reason in ((6, "has changed since it was written"), (5, "holds NaN or infinite values"),
                         (4, "state.weights.h5 has 0 bytes"), (3, "random_state.npz has"), (2, "cannot be loaded")):
        assert reason in (damaged / f"step-00000{step}" / run_dir.REASON_FILE).read_text(), step
        assert f"Checkpoint {folders[step]} is damaged: " in output and f"Moved to {damaged / folders[step].name}" \
            in output
        assert (damaged / f"step-00000{step}" / run_dir.WEIGHTS_FILE).exists()  # evidence kept, not deleted
    assert [c.step for c in run.list_checkpoints()] == [1]

    # When none is whole, the run stops (its model may hold part of a damaged one); run again, it starts over.
    _truncate(folders[1] / run_dir.WEIGHTS_FILE)
    with pytest.raises(run_dir.RunDirError, match=r"No whole checkpoint is left .*step-000001 were damaged .*"
                                                  r"Run the same command again to start this run over"):
        trainer._resume(_tiny_trainer(), run, chief=True)
    assert trainer._resume(_tiny_trainer(), run, chief=True) == (None, None)


def test_a_non_finite_loss_or_weight_stops_the_run_and_writes_nothing(checkpointed_run):
    from harmonization import trainer

    run, _ = checkpointed_run
    before = sorted(p.name for p in run.checkpoints.iterdir())
    hmodel = _tiny_trainer()
    saver = trainer._Checkpointer(run, hmodel, first_step=6, steps_per_epoch=6, recipe=run.recipe, history=[],
                                  write=True)
    with pytest.raises(trainer.TrainingFailedError,
                       match=r"^Training diverged at step 9 \(epoch 2, step 3 of 6\): the loss is nan\. Nothing from "
                             r"this state was saved; .* keeps its checkpoints up to step-000006\."):
        saver.on_train_batch_end(2, {"loss": np.float32(np.nan)})
    hmodel.model.weights[0].assign(np.full(hmodel.model.weights[0].shape, np.inf, "float32"))
    saver.steps_done = 6  # the epoch's steps all ran
    with pytest.raises(trainer.TrainingFailedError, match=r"at step 12 \(epoch 2, step 6 of 6\): variable "
                                                          r"'.*' holds NaN or infinite values"):
        saver.on_epoch_end(1, {"loss": 1.0})  # the epoch's end checkpoint
    assert sorted(p.name for p in run.checkpoints.iterdir()) == before  # the good ones stay, none was added
    with pytest.raises(trainer.TrainingFailedError, match="holds NaN or infinite values; no preset was saved"):
        trainer._save_final_preset(run, hmodel.model, run.recipe, None, None)
    assert not (run.path / run_dir.PRESET).exists()


def test_an_epoch_whose_data_ran_out_fails_naming_why(checkpointed_run):
    from harmonization import trainer

    run, _ = checkpointed_run
    saver = trainer._Checkpointer(run, _tiny_trainer(), first_step=6, steps_per_epoch=6, recipe=run.recipe,
                                  history=[], write=True)
    for batch in range(4):
        saver.on_train_batch_end(batch, {"loss": 1.0})
    with pytest.raises(trainer.TrainingFailedError, match=r"^The training data of epoch 2 ran out after 4 of its 6 "
                                                          r"steps \(batch_size 64, steps_per_epoch 6\)"):
        saver.on_epoch_end(1, {"loss": 1.0})
    assert not (run.checkpoints / "step-000012").exists()


def test_a_model_with_two_outputs_is_refused_in_one_sentence():
    import keras

    from harmonization import recipes, trainer

    inputs = keras.Input((64, 64, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(10)(x), keras.layers.Dense(10)(x)])
    recipe = recipes.load_recipe("quickstart")
    with pytest.raises(ValueError, match=r"^Model 'quickstart_cnn' has 2 outputs; `harmonization train` trains a "
                                         r"classifier with one logits output\."):
        trainer._check_model_fits_data(model, recipe, 10)


@pytest.mark.slow
def test_a_diverging_run_fails_naming_the_step_and_saves_nothing_non_finite(data_dir, tmp_path):
    out = tmp_path / "run"
    code, output = command("--recipe", "quickstart", "--data-dir", str(data_dir), "--out", str(out), "--epochs", "1",
                           *QUICK, "--set", "checkpoint.every_steps=1", "--set", "optimizer.learning_rate=1e30")
    assert code == 1, output[-3000:]
    assert "harmonization train: error: Training diverged at step " in output and "Traceback" not in output
    assert "Preset:" not in output and not (out / run_dir.PRESET).exists()
    for checkpoint in (out / run_dir.CHECKPOINTS).iterdir():  # the steps before it diverged, all finite
        with h5py.File(checkpoint / run_dir.WEIGHTS_FILE, "r") as file:
            values = []
            file.visititems(lambda name, item: values.append(item[()]) if isinstance(item, h5py.Dataset) else None)
        assert values and all(np.isfinite(v).all() for v in values if v.dtype.kind == "f"), checkpoint.name


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_reported_and_the_run_resumes_to_the_uninterrupted_weights(data_dir,
                                                                                                   tmp_path):
    args = ["--recipe", "quickstart", "--data-dir", str(data_dir), *QUICK]
    whole, damaged = tmp_path / "whole", tmp_path / "damaged"
    code, output = command(*args, "--epochs", "2", "--out", str(whole))
    assert code == 0, output[-3000:]
    code, output = command(*args, "--epochs", "1", "--out", str(damaged))  # checkpoints at steps 10 and 12
    assert code == 0, output[-3000:]
    newest = damaged / run_dir.CHECKPOINTS / f"step-{STEPS_PER_EPOCH:06d}"
    weights = newest / run_dir.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as a full disk leaves it

    code, output = command(*args, "--epochs", "2", "--out", str(damaged))  # extended: resumes
    assert code == 0, output[-3000:]
    assert f"Checkpoint {newest} is damaged: {weights} has 1000 bytes" in output
    assert "Resuming from step-000010: epoch 1, step 10 of 12 done" in output
    assert (damaged / run_dir.DAMAGED / newest.name / run_dir.WEIGHTS_FILE).stat().st_size == 1000  # kept
    assert_same_weights(whole / run_dir.PRESET, damaged / run_dir.PRESET)
