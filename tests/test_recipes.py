"""Recipes, run directories and the checks `harmonization train` makes before it trains (fast: nothing trains).

The recipes and the run directory are the standard library; the command's tests go through `cli.main` in this
process and stop at the first refusal. The end-to-end runs (training, killing, resuming, two workers) are in
test_train.py.
"""

import hashlib
import inspect
import json
import re
from importlib import resources

import pytest

from harmonization import cli, recipes, run_dir, zoo
from harmonization.recipes import RecipeError
from harmonization.run_dir import RunDirectory, RunDirError

HARMONIZER_KEYS = ("lambda_harmonization", "lambda_weights", "label_smoothing", "pyramid_levels", "epsilon",
                   "saliency")
# Every `train` command below that reaches TensorFlow: op determinism, once on, stays on in this process.
NOT_DETERMINISTIC = ["--set", "deterministic=false"]


def _keys(tree, prefix=""):
    """The dotted keys of a recipe's values (`sources` is one value: free text under free keys)."""
    for key, value in tree.items():
        if isinstance(value, dict) and prefix + key != "sources":
            yield from _keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


# ---------------------------------------------------------------------------------------------- shipped recipes
def test_one_recipe_ships_per_zoo_model_plus_the_quickstart():
    assert recipes.list_recipes() == sorted([*zoo.list_models(), "quickstart"])  # one sorted list


@pytest.mark.parametrize("name", recipes.list_recipes())
def test_each_shipped_recipe_loads_spelt_out_and_says_where_its_harmonizer_comes_from(name):
    recipe = recipes.load_recipe(name)
    assert recipe["name"] == name and recipe["recipe_version"] == recipes.RECIPE_VERSION
    # The file spells out every key (what a reader sees is what runs), already in its checked form.
    raw = json.loads((resources.files(recipes) / f"{name}.json").read_text(encoding="utf-8"))
    assert raw == recipe
    assert set(_keys(raw)) == set(recipes.KEYS)
    # Where the values come from: the harmonizer's are the published ones, with the file they are in.
    source = recipe["sources"].get("harmonizer", "")
    assert "Published" in source and "serre-lab/Harmonization" in source and "loss.py" in source
    if name != "quickstart":
        # A zoo recipe trains its own model, at the size the zoo entry takes.
        assert recipe["model"]["source"] == name
        assert recipe["data"]["image_size"] == zoo.model_info(name)["preprocessing"]["input_shape"][0]


def test_shipped_harmonizer_values_are_the_harmonized_models_published_defaults():
    from harmonization.harmonized_model import HarmonizedModel

    parameters = inspect.signature(HarmonizedModel.__init__).parameters
    published = {key: parameters[key].default for key in HARMONIZER_KEYS}
    assert published == {"lambda_harmonization": 1.0, "lambda_weights": 1e-5, "label_smoothing": 0.1,
                         "pyramid_levels": 5, "epsilon": 1e-5, "saliency": "gradient_mean"}
    # The recipe keys are exactly HarmonizedModel's arguments (the trainer passes them as **kwargs).
    assert set(recipes.SCHEMA["harmonizer"]) == set(HARMONIZER_KEYS)
    assert {key: field.default for key, field in recipes.SCHEMA["harmonizer"].items()} == published
    for name in recipes.list_recipes():
        assert recipes.load_recipe(name)["harmonizer"] == published, name


# ---------------------------------------------------------------------------------------------- bad input
def _write_recipe(tmp_path, data, name="mine.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_an_unknown_key_in_a_recipe_file_is_named_with_a_suggestion(tmp_path):
    path = _write_recipe(tmp_path, {"optimizer": {"lr": 0.01}})
    with pytest.raises(RecipeError) as caught:
        recipes.load_recipe(path)
    message = str(caught.value)
    assert f"recipe file {str(path)!r}" in message
    assert "unknown recipe key `optimizer.lr`. Did you mean `optimizer.learning_rate`?" in message
    assert "Known keys:" in message and "optimizer.learning_rate" in message

    path = _write_recipe(tmp_path, {"epoch": 3})  # a misspelling, not an alias: the closest key
    with pytest.raises(RecipeError, match=r"unknown recipe key `epoch`\. Did you mean `epochs`\?"):
        recipes.load_recipe(path)
    path = _write_recipe(tmp_path, {"optimiser": {"name": "adam"}})  # a section's alias
    with pytest.raises(RecipeError, match=r"unknown recipe key `optimiser`\. Did you mean `optimizer`\?"):
        recipes.load_recipe(path)


def test_a_recipe_file_value_of_the_wrong_type_is_named(tmp_path):
    path = _write_recipe(tmp_path, {"data": {"image_size": "large"}})
    with pytest.raises(RecipeError, match=r"`data\.image_size` must be an integer in \[8, 4096\]; got 'large'"):
        recipes.load_recipe(path)
    path = _write_recipe(tmp_path, {"optimizer": 0.1})  # a value where a section goes
    with pytest.raises(RecipeError, match=r"`optimizer` must be a JSON object; got 0\.1"):
        recipes.load_recipe(path)
    path = _write_recipe(tmp_path, {"epochs": 3}, name="broken.json")
    path.write_text('{"epochs": 3,}', encoding="utf-8")
    with pytest.raises(RecipeError, match="is not valid JSON"):
        recipes.load_recipe(path)


@pytest.mark.parametrize("override, expected", [
    ("epochs=two", "`epochs` must be an integer in [1, 100000]; got 'two'"),
    ("epochs=2.5", "`epochs` must be an integer in [1, 100000]; got 2.5"),
    ("epochs=0", "`epochs` must be an integer in [1, 100000]; got 0"),
    ("data.augment=1", "`data.augment` must be true or false; got 1"),
    ("optimizer.name=rmsprop", "`optimizer.name` must be one of 'sgd', 'adam', 'adamw'; got 'rmsprop'"),
    ("optimizer.learning_rate=-0.1", "`optimizer.learning_rate` must be a number >= 0; got -0.1"),
    ("optimizer.learning_rate=NaN", "`optimizer.learning_rate` must be a number >= 0; got nan"),
    ("data.clickme_fraction=1.5", "`data.clickme_fraction` must be a number in [0, 1]; got 1.5"),
    ("data.crop_scale=[0.5]", "`data.crop_scale` must be a list of 2 numbers; got [0.5]"),
    ("evaluation.limit=none", "`evaluation.limit` must be an integer in [1, 2147483647] or null; got 'none'"),
    # Values TensorFlow cannot take: refused here, not as a TypeError at the first step, an abort or a hang.
    ("epochs=" + "1" + "0" * 20, "`epochs` must be an integer in [1, 100000]; got 1" + "0" * 20),
    ("data.image_size=1000000000", "`data.image_size` must be an integer in [8, 4096]; got 1000000000"),
    ("harmonizer.pyramid_levels=1000000", "`harmonizer.pyramid_levels` must be an integer in [1, 16]; got 1000000"),
    ("batch_size=2147483648", "`batch_size` must be an integer in [1, 2147483647]; got 2147483648"),
    ("evaluation.limit=" + "1" + "0" * 20,
     "`evaluation.limit` must be an integer in [1, 2147483647] or null; got 1" + "0" * 20),
    # Keras ignores clipnorm=0 without a word (no clipping): refused, null says "no clipping".
    ("optimizer.clipnorm=0", "`optimizer.clipnorm` must be a number > 0 or null; got 0.0"),
])
def test_a_set_of_the_wrong_type_names_the_key_the_expectation_and_the_value(override, expected):
    with pytest.raises(RecipeError) as caught:
        recipes.load_recipe("quickstart", [override])
    assert str(caught.value) == f"--set {override!r}: Recipe key {expected}."


def test_a_set_without_equals_or_of_an_unknown_key_is_refused():
    with pytest.raises(RecipeError, match=r"--set 'epochs': expected KEY=VALUE, e\.g\. --set "):
        recipes.load_recipe("quickstart", ["epochs"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        recipes.parse_override("=3")
    with pytest.raises(RecipeError) as caught:
        recipes.load_recipe("quickstart", ["optimizer.lr=0.01"])
    assert str(caught.value) == ("--set 'optimizer.lr=0.01': unknown recipe key `optimizer.lr`. "
                                 "Did you mean `optimizer.learning_rate`?")
    with pytest.raises(RecipeError, match=r"unknown recipe key `bs`\. Did you mean `batch_size`\?"):
        recipes.parse_override("bs=32")
    with pytest.raises(RecipeError, match=r"`optimizer` is a section; set one of its keys \(optimizer\.name, "):
        recipes.parse_override('optimizer={"name": "adam"}')  # a section is not a value


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_another_recipe_version_is_refused(tmp_path, version):
    path = _write_recipe(tmp_path, {"recipe_version": version, "epochs": 2})
    with pytest.raises(RecipeError) as caught:
        recipes.load_recipe(path)
    assert f"`recipe_version` is {version!r}; this version of harmonization reads recipe_version 1" in str(
        caught.value)


def test_values_that_disagree_with_each_other_are_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"`data\.crop_scale` must be \[low, high\] with 0 < low <= high <= 1; "
                                          r"got \[0\.9, 0\.1\]"):
        recipes.load_recipe("quickstart", ["data.crop_scale=[0.9, 0.1]"])
    with pytest.raises(RecipeError, match=r"`data\.crop_scale` .* got \[0\.0, 1\.0\]"):  # low must be > 0
        recipes.from_dict({"data": {"crop_scale": [0, 1]}})
    # warmup_epochs must end before training does: in a file, by --set, and by --epochs (with_settings).
    path = _write_recipe(tmp_path, {"epochs": 3, "schedule": {"warmup_epochs": 3}})
    with pytest.raises(RecipeError, match=r"`schedule\.warmup_epochs` \(3\) must be less than `epochs` \(3\)"):
        recipes.load_recipe(path)
    with pytest.raises(RecipeError, match=r"`schedule\.warmup_epochs` \(9\) must be less than `epochs` \(8\)"):
        recipes.load_recipe("quickstart", ["schedule.warmup_epochs=9"])
    with pytest.raises(RecipeError, match=r"`schedule\.warmup_epochs` \(5\) must be less than `epochs` \(5\)"):
        recipes.with_settings(recipes.load_recipe("resnet50v2_harmonized"), epochs=5)
    # The same values, in order, are fine.
    recipe = recipes.load_recipe("quickstart", ["data.crop_scale=[0.5, 0.5]", "schedule.warmup_epochs=7.5"])
    assert recipe["data"]["crop_scale"] == [0.5, 0.5] and recipe["schedule"]["warmup_epochs"] == 7.5


def test_an_unknown_recipe_name_suggests_a_shipped_one_and_a_missing_file_is_named(tmp_path):
    with pytest.raises(RecipeError) as caught:
        recipes.load_recipe("resnet50_harmonized")
    message = str(caught.value)
    assert "Unknown recipe 'resnet50_harmonized'" in message and "Did you mean 'resnet50v2_harmonized'?" in message
    assert "quickstart" in message  # the shipped names are listed
    missing = tmp_path / "nowhere" / "mine.json"
    with pytest.raises(RecipeError) as caught:
        recipes.load_recipe(missing)
    assert f"Recipe file {str(missing)!r} does not exist" in str(caught.value)
    assert "Shipped recipes: " in str(caught.value)


# ---------------------------------------------------------------------------------------------- overrides
def test_parse_override_reads_json_values_and_keeps_other_text():
    assert recipes.parse_override("epochs=3") == ("epochs", 3)
    assert recipes.parse_override("optimizer.learning_rate=1e-3") == ("optimizer.learning_rate", 0.001)
    assert recipes.parse_override("data.augment=false") == ("data.augment", False)
    assert recipes.parse_override("evaluation.limit=null") == ("evaluation.limit", None)
    assert recipes.parse_override("data.crop_scale=[0.5, 1]") == ("data.crop_scale", [0.5, 1])
    assert recipes.parse_override(" epochs = 4") == ("epochs", 4)  # spaces around the key and value
    # Text that is not JSON stays text, '=' after the first included.
    assert recipes.parse_override("data.clickme=clickme_synthetic/quick") == ("data.clickme",
                                                                               "clickme_synthetic/quick")
    assert recipes.parse_override("description=a=b") == ("description", "a=b")
    # Applied: checked, numbers as floats where the key is a number, and the input recipe left as it was.
    base = recipes.load_recipe("quickstart")
    recipe = recipes.apply_overrides(base, ["optimizer.learning_rate=1", "data.augment=true",
                                            "evaluation.limit=null", "data.clickme=clickme_synthetic/quick"])
    assert recipe["optimizer"]["learning_rate"] == 1.0 and isinstance(recipe["optimizer"]["learning_rate"], float)
    assert recipe["data"]["augment"] is True and recipe["evaluation"]["limit"] is None
    assert recipe["data"]["clickme"] == "clickme_synthetic/quick"
    assert base == recipes.load_recipe("quickstart")


def test_with_settings_overrides_epochs_and_batch_size_with_checks():
    base = recipes.load_recipe("quickstart")
    recipe = recipes.with_settings(base, epochs=2, batch_size=16)
    assert (recipe["epochs"], recipe["batch_size"]) == (2, 16)
    assert (base["epochs"], base["batch_size"]) == (8, 64)  # not changed in place
    assert recipes.with_settings(base, epochs=None, batch_size=None) == base  # None: the recipe's
    with pytest.raises(RecipeError, match=r"`batch_size` must be an integer in \[1, 2147483647\]; got 0"):
        recipes.with_settings(base, batch_size=0)
    with pytest.raises(RecipeError, match=r"`epochs` must be an integer in \[1, 100000\]; got '3'"):
        recipes.with_settings(base, epochs="3")


# ---------------------------------------------------------------------------------------------- identity
def test_only_resumable_changes_keep_the_identity():
    base = recipes.load_recipe("quickstart")
    same = recipes.apply_overrides(base, ["epochs=20", "evaluation.limit=10", "evaluation.final=false",
                                          "checkpoint.every_steps=7", "checkpoint.keep=5", "description=more"])
    assert recipes.identity_hash(same) == recipes.identity_hash(base)
    assert recipes.identity(same) == recipes.identity(base)
    for override in ("optimizer.learning_rate=0.01", "model.source=vgg16_harmonized", "seed=1",
                     "data.clickme=clickme_synthetic/quick", "harmonizer.lambda_harmonization=2"):
        other = recipes.apply_overrides(base, [override])
        assert recipes.identity_hash(other) != recipes.identity_hash(base), override
    assert len(recipes.identity_hash(base)) == 16


def test_differences_lists_each_changed_key_with_its_old_and_new_value():
    base = recipes.load_recipe("quickstart")
    other = recipes.apply_overrides(base, ["optimizer.learning_rate=0.5", "model.source=vgg16_harmonized"])
    assert recipes.differences(base, other) == [
        "model.source: 'quickstart_cnn' -> 'vgg16_harmonized'",
        "optimizer.learning_rate: 0.002 -> 0.5",
    ]
    assert recipes.differences(base, base) == []


# ---------------------------------------------------------------------------------------------- run directory
def test_claim_records_a_new_run_and_recognises_it_again(tmp_path):
    recipe = recipes.load_recipe("quickstart")
    out = tmp_path / "runs" / "one"  # parents are made
    assert RunDirectory(out, recipe).claim() is False
    record = json.loads((out / run_dir.RUN_FILE).read_text())
    assert record["recipe"] == recipe and record["identity"] == recipes.identity(recipe)
    assert record["identity_hash"] == recipes.identity_hash(recipe)
    assert RunDirectory(out, recipe).claim() is True
    # More epochs (and another evaluation) resume the same run; the record keeps its creation time.
    longer = recipes.apply_overrides(recipe, ["epochs=20", "evaluation.limit=10"])
    assert RunDirectory(out, longer).claim() is True
    second = json.loads((out / run_dir.RUN_FILE).read_text())
    assert second["recipe"]["epochs"] == 20 and second["created"] == record["created"]
    assert not [p.name for p in out.iterdir() if p.name != run_dir.RUN_FILE]  # no temporary file left


@pytest.mark.parametrize("override, change", [
    ("optimizer.learning_rate=0.5", "optimizer.learning_rate: 0.002 -> 0.5"),
    ("model.source=vgg16_harmonized", "model.source: 'quickstart_cnn' -> 'vgg16_harmonized'"),
])
def test_claim_refuses_another_runs_directory_naming_what_differs(tmp_path, override, change):
    recipe = recipes.load_recipe("quickstart")
    RunDirectory(tmp_path, recipe).claim()
    before = (tmp_path / run_dir.RUN_FILE).read_text()
    with pytest.raises(RunDirError) as caught:
        RunDirectory(tmp_path, recipes.apply_overrides(recipe, [override])).claim()
    assert change in str(caught.value) and "choose another --out" in str(caught.value)
    assert (tmp_path / run_dir.RUN_FILE).read_text() == before


def test_claim_refuses_a_folder_that_is_not_a_run_and_leaves_it_alone(tmp_path):
    recipe = recipes.load_recipe("quickstart")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"is not empty and is not a run directory \(it has no run\.json\)"):
        RunDirectory(tmp_path, recipe).claim()
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"

    a_file = tmp_path / "notes.txt"
    with pytest.raises(RunDirError, match=r"--out '.*notes\.txt' is a file"):
        RunDirectory(a_file, recipe).claim()
    assert a_file.read_text() == "mine"

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / run_dir.RUN_FILE).write_text("{not json")
    with pytest.raises(RunDirError, match="is not a run record"):
        RunDirectory(broken, recipe).claim()


def test_claim_without_write_checks_but_writes_nothing(tmp_path):
    recipe = recipes.load_recipe("quickstart")
    out = tmp_path / "new"
    assert RunDirectory(out, recipe).claim(write=False) is False
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert RunDirectory(empty, recipe).claim(write=False) is False
    assert list(empty.iterdir()) == []
    # An existing run: recognised, its record untouched (even with more epochs).
    RunDirectory(out, recipe).claim()
    before = (out / run_dir.RUN_FILE).read_text()
    assert RunDirectory(out, recipes.with_settings(recipe, epochs=30)).claim(write=False) is True
    assert (out / run_dir.RUN_FILE).read_text() == before


# ---------------------------------------------------------------------------------------------- checkpoints
def _files(text):
    def write(folder):
        (folder / run_dir.WEIGHTS_FILE).write_text(text)
        (folder / run_dir.RANDOM_STATE_FILE).write_text("random")
        (folder / run_dir.METRICS_FILE).write_text("metrics")
    return write


def _state(step, steps_per_epoch=10, history=()):
    """The state `harmonization train` records for global step `step`."""
    return {"epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
            "steps_per_epoch": steps_per_epoch, "history": list(history)}


def test_checkpoints_are_written_whole_and_pruned_to_keep(tmp_path):
    run = RunDirectory(tmp_path, recipes.load_recipe("quickstart"))
    assert run.latest_checkpoint() is None and run.list_checkpoints() == []
    for step in (5, 10, 15):
        checkpoint = run.write_checkpoint(step, _state(step), _files(f"w{step}"), keep=2)
        assert checkpoint.path == tmp_path / run_dir.CHECKPOINTS / f"step-{step:06d}" and checkpoint.step == step
    assert sorted(p.name for p in (tmp_path / run_dir.CHECKPOINTS).iterdir()) == ["step-000010", "step-000015"]
    latest = run.latest_checkpoint()
    # Each file's size and sha256 are recorded, as a preset's metadata records them.
    files = {name: {"size": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}
             for name, text in ((run_dir.WEIGHTS_FILE, "w15"), (run_dir.RANDOM_STATE_FILE, "random"),
                                (run_dir.METRICS_FILE, "metrics"))}
    assert latest.step == 15 and latest.state == {**_state(15), "step": 15, "files": files}
    assert latest.problem is None and run.check(latest).problem is None
    assert (latest.path / run_dir.WEIGHTS_FILE).read_text() == "w15"
    assert [c.step for c in run.list_checkpoints()] == [10, 15]
    # The same step again (a resumed run re-reaching it) replaces it.
    run.write_checkpoint(15, _state(15), _files("again"), keep=2)
    assert (run.latest_checkpoint().path / run_dir.WEIGHTS_FILE).read_text() == "again"
    assert [c.step for c in run.list_checkpoints()] == [10, 15]


def test_a_checkpoint_that_failed_midway_is_not_one_and_is_removed(tmp_path):
    run = RunDirectory(tmp_path, recipes.load_recipe("quickstart"))
    run.write_checkpoint(5, _state(5), _files("whole"), keep=2)

    def crash(folder):
        (folder / run_dir.WEIGHTS_FILE).write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run.write_checkpoint(10, _state(10), crash, keep=2)
    leftovers = [p.name for p in (tmp_path / run_dir.CHECKPOINTS).iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and "step-000010" in leftovers[0]
    assert run.latest_checkpoint().step == 5 and [c.step for c in run.list_checkpoints()] == [5]
    # A step folder without state.json (or with an unreadable one) is not a whole checkpoint either: it is listed
    # with its problem (the resume reports it and sets it aside), and never taken as the latest.
    (tmp_path / run_dir.CHECKPOINTS / "step-000020").mkdir()
    (tmp_path / run_dir.CHECKPOINTS / "step-000030").mkdir()
    (tmp_path / run_dir.CHECKPOINTS / "step-000030" / run_dir.STATE_FILE).write_text('{"step": 3')
    assert run.latest_checkpoint().step == 5
    problems = {c.step: c.problem for c in run.list_checkpoints()}
    assert problems[5] is None and "has no state.json" in problems[20] and "cannot be read" in problems[30]
    # A file left half-written in the run directory goes too; whole files and checkpoints stay.
    (tmp_path / ".tmp-history.json.123").write_text("[")
    (tmp_path / "keep.txt").write_text("x")
    run.remove_partial()
    assert not [p for p in (tmp_path / run_dir.CHECKPOINTS).iterdir() if p.name.startswith(".tmp-")]
    assert not (tmp_path / ".tmp-history.json.123").exists() and (tmp_path / "keep.txt").exists()
    assert (run.latest_checkpoint().path / run_dir.WEIGHTS_FILE).read_text() == "whole"


def test_history_is_written_as_json_and_csv_with_every_column(tmp_path):
    run = RunDirectory(tmp_path, recipes.load_recipe("quickstart"))
    rows = [{"epoch": 1, "loss": 2.5}, {"epoch": 2, "loss": 1.5, "val_spearman": 0.25}]
    run.write_history(rows)
    assert json.loads((tmp_path / run_dir.HISTORY_JSON).read_text()) == rows
    assert (tmp_path / run_dir.HISTORY_CSV).read_text().splitlines() == [
        "epoch,loss,val_spearman", "1,2.5,", "2,1.5,0.25"]
    run.write_history(rows[:1])  # replaced, not appended
    assert (tmp_path / run_dir.HISTORY_CSV).read_text().splitlines() == ["epoch,loss", "1,2.5"]
    run_dir.write_atomic(tmp_path / "note.txt", "one")
    run_dir.write_atomic(tmp_path / "note.txt", "two")
    assert (tmp_path / "note.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv", "history.json", "note.txt"]


# ---------------------------------------------------------------------------------------------- the command
def _train(capsys, *args):
    """`harmonization train ARGS` in this process: (exit code, stderr)."""
    code = cli.main(["train", *args])
    return code, capsys.readouterr().err


def test_the_command_refuses_a_bad_set_before_anything(capsys, tmp_path):
    out = tmp_path / "run"
    code, err = _train(capsys, "--recipe", "quickstart", "--set", "epochs=two", "--out", str(out))
    assert code == 1
    assert "harmonization train: error: --set 'epochs=two': Recipe key `epochs` must be an integer in [1, 100000]; " \
           "got 'two'." in err
    assert not out.exists()


def test_the_command_refuses_a_data_dir_that_does_not_exist(capsys, tmp_path):
    out, missing = tmp_path / "run", tmp_path / "no_such_dir"
    code, err = _train(capsys, "--recipe", "quickstart", "--data-dir", str(missing), "--out", str(out),
                       *NOT_DETERMINISTIC)
    assert code == 1
    assert f"harmonization train: error: --data-dir {str(missing)!r} is not a directory" in err
    assert not out.exists() and not missing.exists()


def test_a_zoo_recipe_without_imagenet_is_refused_before_anything(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out, ./harmonization_runs/NAME, must not appear
    code, err = _train(capsys, "--recipe", "resnet50v2_harmonized", *NOT_DETERMINISTIC)
    assert code == 1
    assert "Recipe 'resnet50v2_harmonized' mixes ImageNet into training (data.clickme_fraction 0.2)" in err
    assert "--imagenet-dir" in err and "--set data.clickme_fraction=1" in err
    assert list(tmp_path.iterdir()) == []


def test_the_command_refuses_an_out_that_is_not_a_run_directory(capsys, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"\xff\xd8")
    code, err = _train(capsys, "--recipe", "quickstart", "--data-dir", str(tmp_path), "--out", str(out),
                       *NOT_DETERMINISTIC)
    assert code == 1
    assert f"--out {str(out)!r} is not empty and is not a run directory (it has no run.json)" in err
    assert [p.name for p in out.iterdir()] == ["cat.jpg"] and (out / "cat.jpg").read_bytes() == b"\xff\xd8"


def test_multiworker_without_tf_config_is_refused_before_reading_data(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    data, out = tmp_path / "tfds", tmp_path / "run"
    data.mkdir()  # exists, and holds no dataset: reading it would fail with another message
    code, err = _train(capsys, "--recipe", "quickstart", "--data-dir", str(data), "--out", str(out),
                       "--strategy", "multiworker", *NOT_DETERMINISTIC)
    assert code == 1
    assert "--strategy multiworker reads the cluster from the TF_CONFIG environment variable, which is not set" \
        in err
    assert not out.exists() and list(data.iterdir()) == []


# ---------------------------------------------------------------------------------------------- model vs data
@pytest.fixture(scope="module")
def three_class_preset(tmp_path_factory):
    import harmonization
    from harmonization.quickstart import quickstart_model

    folder = tmp_path_factory.mktemp("preset") / "three"
    harmonization.save_preset(quickstart_model(3, 64, 0), folder)
    return folder


def _quick_run(preset, quick_data, out, weights):
    return ["--recipe", "quickstart", "--model", str(preset), "--set", f"model.weights={weights}",
            "--set", "data.clickme=clickme_synthetic/quick", "--data-dir", str(quick_data), "--out", str(out),
            *NOT_DETERMINISTIC]


def test_a_model_whose_classes_are_not_the_datas_is_refused_before_training(capsys, tmp_path, quick_data,
                                                                            three_class_preset):
    out = tmp_path / "run"
    code, err = _train(capsys, *_quick_run(three_class_preset, quick_data, out, "pretrained"))
    assert code == 1
    assert (f"Model {str(three_class_preset)!r} has 3 classes and the data 'clickme_synthetic/quick' has 10: "
            "the labels would index the wrong logits") in err
    assert not (out / run_dir.CHECKPOINTS).exists() and not (out / run_dir.PRESET).exists()
    assert not (out / run_dir.HISTORY_JSON).exists()
    # Nothing recorded either: the same --out takes the corrected run (it is not "another run's directory").
    assert not (out / run_dir.RUN_FILE).exists()


def test_a_preset_with_random_weights_is_refused(capsys, tmp_path, quick_data, three_class_preset):
    out = tmp_path / "run"
    code, err = _train(capsys, *_quick_run(three_class_preset, quick_data, out, "random"))
    assert code == 1
    assert ("model.weights=random builds a zoo architecture or quickstart_cnn; "
            f"{str(three_class_preset)!r} is neither") in err
    assert "use model.weights=pretrained" in err
    assert not (out / run_dir.CHECKPOINTS).exists() and not (out / run_dir.PRESET).exists()


@pytest.mark.parametrize("text, message", [
    # A JSON integer beyond float's range is a bad value, not a crash.
    ("optimizer.learning_rate=1" + "0" * 400, "Recipe key `optimizer.learning_rate` must be a number >= 0"),
    ("sources={}", "`sources` is free text about the values; edit it in a recipe file"),
])
def test_set_values_that_cannot_be_taken_are_refused_by_name(text, message):
    with pytest.raises(recipes.RecipeError, match=re.escape(message)):
        recipes.load_recipe("quickstart", [text])


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "../up", ".hidden", "a/b", "", "x" * 101, "with space"])
def test_a_recipe_name_is_one_plain_folder_name(name):
    """The name names the default run directory (./harmonization_runs/NAME): an absolute path or `..` would put
    the run somewhere else."""
    with pytest.raises(RecipeError, match=re.escape("`name` must be a string of at most 100 letters, digits")):
        recipes.load_recipe("quickstart", [f"name={name}"])
    assert recipes.load_recipe("quickstart", ["name=my-run_2.1"])["name"] == "my-run_2.1"


def test_the_pyramid_limit_is_the_losses_limit():
    from harmonization import losses

    assert recipes.SCHEMA["harmonizer"]["pyramid_levels"].maximum == losses.MAX_PYRAMID_LEVELS


def test_a_deeply_nested_recipe_is_refused_in_one_sentence(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('{"sources": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001, encoding="utf-8")
    with pytest.raises(RecipeError, match="nests objects or lists thousands of levels deep"):
        recipes.load_recipe(deep)
    nested = {"sources": {}}
    node = nested["sources"]
    for _ in range(40):  # readable by json, but run.json and the checks would recurse on it
        node["a"] = {}
        node = node["a"]
    with pytest.raises(RecipeError, match=f"nests objects or lists more than {recipes.MAX_DEPTH} deep"):
        recipes.from_dict(nested)


def test_overrides_given_as_one_string_are_refused_not_read_letter_by_letter(tmp_path):
    with pytest.raises(RecipeError, match=re.escape("`overrides` must be a list of 'key=value' strings, e.g. "
                                                    "['epochs=2']; got the string 'epochs=2'")):
        recipes.apply_overrides(recipes.defaults(), "epochs=2")
    import harmonization

    with pytest.raises(RecipeError, match="got the string 'epochs=2', which would be read letter by letter"):
        harmonization.train("quickstart", overrides="epochs=2", out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_text_key_takes_the_text_as_typed():
    recipe = recipes.load_recipe("quickstart", ["name=1", "data.clickme=true"])
    assert recipe["name"] == "1" and recipe["data"]["clickme"] == "true"


def test_a_recipe_that_is_not_an_object_or_is_a_folder_is_named(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[]")
    with pytest.raises(recipes.RecipeError, match="must be a JSON object of recipe keys; got list"):
        recipes.load_recipe(path)
    with pytest.raises(recipes.RecipeError, match="is a directory"):
        recipes.load_recipe(tmp_path)
    with pytest.raises(recipes.RecipeError, match="Unknown top-level recipe key `batchsize`"):
        recipes.with_settings(recipes.defaults(), batchsize=3)


@pytest.mark.parametrize("state, problem", [
    ([], "holds list, not an object"),
    ({"epoch": 0}, "has step=None, not an integer >= 0"),
    ({**_state(7), "step": "7"}, "has step='7', not an integer >= 0"),
    ({**_state(7), "step": 7, "epoch": 3}, "which does not match itself or the folder's name"),
    ({**_state(8), "step": 8}, "which does not match itself or the folder's name"),  # in folder step-000007
    ({**_state(7), "step": 7, "history": 3}, "has a `history` that is not a list of objects"),
    ({**_state(7), "step": 7, "files": {"state.weights.h5": 12}}, "has a `files` record that is not"),
    ({**_state(7), "step": 7, "steps_per_epoch": True}, "has steps_per_epoch=True, not an integer >= 1"),
])
def test_a_step_folder_whose_state_has_the_wrong_shape_is_named_not_used(tmp_path, state, problem):
    run = run_dir.RunDirectory(tmp_path, recipes.defaults())
    folder = tmp_path / run_dir.CHECKPOINTS / "step-000007"
    folder.mkdir(parents=True)
    (folder / run_dir.STATE_FILE).write_text(json.dumps(state))
    assert run.latest_checkpoint() is None
    [listed] = run.list_checkpoints()
    assert listed.path == folder and problem in listed.problem


@pytest.mark.parametrize("damage, problem", [
    (lambda folder: (folder / run_dir.WEIGHTS_FILE).write_text("w1"), "has 2 bytes; 3 were written"),
    (lambda folder: (folder / run_dir.WEIGHTS_FILE).write_text(""), "has 0 bytes; 3 were written"),
    (lambda folder: (folder / run_dir.WEIGHTS_FILE).unlink(), "state.weights.h5 is missing"),
    (lambda folder: (folder / run_dir.RANDOM_STATE_FILE).write_text("randoX"), "has changed since it was written"),
    (lambda folder: (folder / run_dir.METRICS_FILE).write_text("metrics and more"), "has 16 bytes; 7 were written"),
])
def test_a_checkpoint_whose_files_changed_is_found_before_it_is_loaded(tmp_path, damage, problem):
    run = RunDirectory(tmp_path, recipes.defaults())
    checkpoint = run.write_checkpoint(3, _state(3), _files("w13"), keep=2)
    assert run.check(checkpoint).problem is None
    damage(checkpoint.path)
    found = run.check(run.latest_checkpoint())
    assert problem in found.problem and str(checkpoint.path) in found.problem


def test_a_damaged_checkpoint_is_set_aside_with_its_reason_never_deleted(tmp_path):
    run = RunDirectory(tmp_path, recipes.defaults())
    for step in (3, 6):
        run.write_checkpoint(step, _state(step), _files(f"w{step}"), keep=2)
    newest = run.latest_checkpoint()
    (newest.path / run_dir.WEIGHTS_FILE).write_text("")
    moved = run.set_aside(newest, "its weights are empty")
    assert moved == tmp_path / run_dir.DAMAGED / "step-000006"
    assert (moved / run_dir.WEIGHTS_FILE).exists() and "its weights are empty" in (moved / run_dir.REASON_FILE
                                                                                    ).read_text()
    assert run.latest_checkpoint().step == 3
    # The same step damaged again later is kept beside the first, and rotation never counts damaged folders.
    run.write_checkpoint(6, _state(6), _files("w6"), keep=2)
    assert run.set_aside(run.latest_checkpoint(), "again") == tmp_path / run_dir.DAMAGED / "step-000006.2"
    (tmp_path / run_dir.CHECKPOINTS / "step-000004").mkdir()  # damaged in place (no state.json)
    run.write_checkpoint(9, _state(9), _files("w9"), keep=1)
    assert [c.step for c in run.list_checkpoints()] == [4, 9]  # the whole step 3 rotated; damage kept


@pytest.mark.parametrize("record", ["[]", '{"identity": []}', '{"identity": 3}', "{}", "[" * 100_000])
def test_a_run_record_of_the_wrong_shape_is_refused_in_one_sentence(tmp_path, record):
    (tmp_path / run_dir.RUN_FILE).write_text(record)
    with pytest.raises(RunDirError, match=r"run\.json is not a run record .*; use another --out"):
        RunDirectory(tmp_path, recipes.defaults()).claim(write=False)


def test_one_run_at_a_time_holds_a_run_directory(tmp_path):
    """A second run on the same directory (a job requeued while the first still runs) is refused, not mixed in."""
    first = RunDirectory(tmp_path / "run", recipes.defaults())
    with first.lock():
        with pytest.raises(RunDirError, match=r"is in use by another running `harmonization train`"):
            with RunDirectory(tmp_path / "run", recipes.defaults()).lock():
                pass
    with RunDirectory(tmp_path / "run", recipes.defaults()).lock():  # released when the first ended
        pass
    assert RunDirectory(tmp_path / "run", recipes.defaults()).claim() is False  # the lock file is no one's data


def test_a_batch_larger_than_the_training_split_is_refused_whatever_steps_per_epoch_says(capsys, tmp_path,
                                                                                        quick_data):
    """Keras would end each epoch after zero steps with a warning, and the run would save an untrained preset."""
    out = tmp_path / "run"
    code, err = _train(capsys, "--recipe", "quickstart", "--set", "data.clickme=clickme_synthetic/quick",
                       "--data-dir", str(quick_data), "--out", str(out), "--batch-size", "5000",
                       "--set", "steps_per_epoch=2", *NOT_DETERMINISTIC)
    assert code == 1
    assert ("`batch_size` 5000 is larger than the 200 training examples of 'clickme_synthetic/quick' 'train': an "
            "epoch would have no full batch. Use --batch-size 200 or less.") in err
    assert not out.exists()
