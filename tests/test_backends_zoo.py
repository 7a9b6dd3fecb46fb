"""Every zoo architecture gives TensorFlow's logits on JAX and PyTorch, and a preset saved on one backend loads on all.

A model is the same on every backend when, from the same weights, its logits agree to float32 noise: here
`max |logits - TensorFlow's| / max |TensorFlow's| <= 1e-5`. The weights come from a seed, one variable at a time
and keyed by the variable's path (`seeded_weights`), so every backend builds the same model without a file.

Keras picks its backend once per process, so the other backends run in child processes (`run_on_backend`), one
per backend for all the architectures at once (a child costs seconds to start). In an environment without
TensorFlow (CI's JAX and PyTorch runs), TensorFlow's logits are the committed fixture
tests/fixtures/backends/zoo_logits.json, written by tools/make_backend_fixtures.py; under TensorFlow the tests
check that the fixture is still what TensorFlow computes. The tiny configs include odd image sizes, where
strided "same" convolutions and pools pad asymmetrically (TensorFlow's rule), which each backend must follow.
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest

from backend_helpers import current_backend, other_backends, require_backend, run_on_backend

pytestmark = pytest.mark.backends

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "backends"
TINY_FIXTURE = FIXTURES / "zoo_logits.json"
FULL_FIXTURE = FIXTURES / "full_size_logits.json"
TENSORFLOW_PRESET = FIXTURES / "tensorflow_preset"
#: max |difference| / max |TensorFlow's logits|: float32 noise, far below what a wrong layer gives.
TOLERANCE = 1e-5


# --- what every backend runs (here, or in a child that imports this module) ---------------------------------


def seeded_weights(model, seed: int):
    """Give every variable of `model` values drawn from `seed` and its path: the same model on every backend.

    Scaled so that a deep network's logits stay of order one: kernels N(0, 1/fan_in), normalisation scales
    N(1, 0.2), shifts, biases and moving means N(0, 0.2), moving variances U(0.5, 1.5). Keyed by path, not by
    position, so that the order in which a backend lists variables cannot change the model.
    """
    for variable in model.weights:
        rng = np.random.default_rng([seed, zlib.crc32(variable.path.encode())])
        shape = tuple(variable.shape)
        if "variance" in variable.path:
            value = rng.uniform(0.5, 1.5, shape)
        elif variable.path.endswith("gamma"):
            value = rng.normal(1.0, 0.2, shape)
        elif len(shape) <= 1:
            value = rng.normal(0.0, 0.2, shape)
        else:
            value = rng.normal(0.0, 1.0 / np.sqrt(max(int(np.prod(shape[:-1])), 1)), shape)
        variable.assign(value.astype(variable.dtype))
    return model


def images(size: int, seed: int, count: int = 2) -> np.ndarray:
    """RGB images in [0, 255], what zoo models take."""
    return np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)).astype("float32")


def relative_difference(values: Any, reference: Any) -> float:
    """max |values - reference| / max |reference|."""
    values, reference = np.asarray(values, "float64"), np.asarray(reference, "float64")
    return float(np.abs(values - reference).max() / np.abs(reference).max())


def build_case(case: Mapping[str, Any]):
    """The tiny model of a fixture case: its architecture and config, with `seeded_weights(weights_seed)`."""
    import harmonization.architectures as architectures  # in the child too: importing picks the backend

    cls = getattr(architectures, case["architecture"])
    return seeded_weights(cls(**case["config"]), case["weights_seed"])


def logits_of(model, case: Mapping[str, Any]) -> list:
    """The model's logits on the case's images, as nested lists (JSON travels back from a child).

    On JAX through `predict` (one XLA program): eager JAX compiles every operation on its own, which costs a
    tiny model seconds on this CPU; elsewhere the eager call, the way the fixture was computed.
    """
    import keras

    x = images(case["config"]["image_size"], case["images_seed"])
    if keras.backend.backend() == "jax":
        return model.predict(x, batch_size=len(x), verbose=0).tolist()
    return keras.ops.convert_to_numpy(model(x, training=False)).tolist()


def fingerprint(model) -> str:
    """sha256 of what makes a model compute what it does: its class and config, and every weight by path, bit for
    bit. Two models with one fingerprint give the same logits on one backend."""
    import keras

    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    digest.update(json.dumps(model.get_config(), sort_keys=True, default=str).encode())
    for variable in sorted(model.weights, key=lambda v: v.path):
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        digest.update(f"{variable.path}:{value.dtype}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def run_cases(cases: Mapping[str, Mapping[str, Any]], *, save_dir: str | None,
              load_dirs: Mapping[str, str]) -> dict[str, Any]:
    """On the current backend: load the presets in `load_dirs` (saving backend -> folder of one preset per case),
    then, when `save_dir` is given, build each case, save it there as a preset and load it back.

    Returns {"backend", "built": {case: {"logits", "fingerprint"}}, "loaded": {saving backend: {case:
    fingerprint}}, "tensorflow_imported_by_loading": whether loading the others' presets imported TensorFlow (None
    when none were loaded)}. A loaded preset is compared by fingerprint with the model built here from the same
    weights: equal fingerprints mean equal logits, and on JAX a forward pass of every loaded preset would cost a
    compilation each. Loading runs first: saving imports TensorFlow where it is installed (Keras's serialiser
    checks for `tf.TensorShape`), which would hide an import by the loading path.
    """
    import keras

    import harmonization

    result: dict[str, Any] = {"backend": keras.backend.backend(), "built": {}, "loaded": {},
                              "tensorflow_imported_by_loading": None}
    for source, folder in load_dirs.items():
        result["loaded"][source] = {name: fingerprint(harmonization.load_model(Path(folder) / name))
                                    for name in cases}
    if load_dirs:
        result["tensorflow_imported_by_loading"] = "tensorflow" in sys.modules
    if save_dir is not None:
        mine = result["loaded"].setdefault(result["backend"], {})
        for name, case in cases.items():
            model = build_case(case)
            result["built"][name] = {"logits": logits_of(model, case), "fingerprint": fingerprint(model)}
            harmonization.save_preset(model, Path(save_dir) / name)
            mine[name] = fingerprint(harmonization.load_model(Path(save_dir) / name))
    return result


def full_size_logits(names: list[str], seed: int, images_seed: int, count: int) -> dict[str, list]:
    """{zoo name: logits} of each full-size zoo architecture with `seeded_weights(seed)`, one model at a time."""
    import keras

    from harmonization import zoo

    out = {}
    for name in names:
        entry = zoo.model_info(name)
        model = seeded_weights(zoo.build(entry), seed)
        x = images(entry["architecture"]["config"]["image_size"], images_seed, count)
        out[name] = keras.ops.convert_to_numpy(model(x, training=False)).tolist()
        del model
        gc.collect()
    return out


# --- the tests -----------------------------------------------------------------------------------------------


def _fixture(path: Path) -> dict[str, Any]:
    """A committed fixture; empty while tools/make_backend_fixtures.py (which imports this module) first writes it,
    and then `test_the_fixture_covers_every_zoo_architecture_and_is_small` fails."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"cases": {}, "models": {}}


TINY = _fixture(TINY_FIXTURE)
CASES = sorted(TINY["cases"])
BACKENDS_HERE = [current_backend(), *other_backends()]


def on_backend(backend: str, function: str, *, module: str = __name__, env: Mapping[str, str] | None = None,
               **kwargs: Any) -> Any:
    """`function(**kwargs)` of test module `module` on `backend`: here for the current one, else in a child process
    (which imports the module from this folder, calls the function and prints its JSON result)."""
    if backend == current_backend():
        return getattr(sys.modules[module], function)(**kwargs)
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import {module} as module; "
            f"print(json.dumps(module.{function}(**json.loads({json.dumps(kwargs)!r}))))")
    return run_on_backend(backend, code, env=dict(env or {}))


def child_environment(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What the children get: a persistent JAX compilation cache, in pytest's cache folder when there is one.

    Eager JAX compiles each new operation shape (0.25 s apiece here: a tiny model's initialisers take seconds);
    with the cache, the second JAX child of a run, and every later run, reads them instead.
    """
    cache = getattr(config, "cache", None)
    folder = cache.mkdir("jax-compilation-cache") if cache is not None else tmp_path_factory.mktemp("jax-cache")
    return {"JAX_COMPILATION_CACHE_DIR": str(folder), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pytestconfig) -> dict[str, dict[str, Any]]:
    """Each backend here builds every tiny case, saves it as a preset and loads the presets every other one saved.

    In order (this process's backend first, JAX, the slowest to start, last): each loads what the earlier ones
    saved, then saves its own; then each but the last loads what was saved after it. Three backends cost three
    child processes, one of them JAX.
    """
    root = tmp_path_factory.mktemp("presets_by_backend")
    cases = TINY["cases"]
    env = child_environment(pytestconfig, tmp_path_factory)
    order = [BACKENDS_HERE[0], *sorted(BACKENDS_HERE[1:], key=lambda backend: backend == "jax")]
    results = {}
    for index, backend in enumerate(order):
        earlier = {b: str(root / b) for b in order[:index]}
        results[backend] = on_backend(backend, "run_cases", env=env, cases=cases, save_dir=str(root / backend),
                                      load_dirs=earlier)
    for index, backend in enumerate(order[:-1]):
        later = {b: str(root / b) for b in order[index + 1:]}
        results[backend]["loaded"].update(on_backend(backend, "run_cases", env=env, cases=cases, save_dir=None,
                                                     load_dirs=later)["loaded"])
    return results


def _tensorflow_logits(runs: Mapping[str, Any], case: str) -> tuple[Any, str]:
    """TensorFlow's logits of `case`: computed now when TensorFlow is here, else the committed fixture's."""
    if "tensorflow" in runs:
        return runs["tensorflow"]["built"][case]["logits"], "TensorFlow's (computed now)"
    return TINY["cases"][case]["logits"], f"TensorFlow's ({TINY_FIXTURE.name}, TensorFlow {TINY['tensorflow']})"


def test_the_fixture_covers_every_zoo_architecture_and_is_small():
    import harmonization.architectures as architectures
    from harmonization import zoo

    in_zoo = {zoo.model_info(name)["architecture"]["class_name"] for name in zoo.list_models()}
    assert in_zoo <= {case["architecture"] for case in TINY["cases"].values()} <= set(architectures.__all__)
    assert TINY_FIXTURE.stat().st_size < 20_000 and FULL_FIXTURE.stat().st_size < 20_000


def test_the_fixture_is_what_tensorflow_computes(runs):
    require_backend("tensorflow")  # skipped (with the reason) where the environment was built without it
    if "tensorflow" not in runs:
        pytest.fail("TensorFlow is installed but did not run (backend_helpers.other_backends)")
    stale = {case: relative_difference(runs["tensorflow"]["built"][case]["logits"], TINY["cases"][case]["logits"])
             for case in CASES}
    assert max(stale.values()) <= TOLERANCE, (
        f"{TINY_FIXTURE} is not what TensorFlow computes now (relative differences {stale}); if an architecture "
        "changed on purpose, run `python tools/make_backend_fixtures.py`.")


@pytest.mark.parametrize("case", CASES)
def test_logits_on_every_backend_equal_tensorflows(runs, case):
    reference, origin = _tensorflow_logits(runs, case)
    assert np.abs(np.asarray(reference)).max() > 0.05, "reference logits this small would prove nothing"
    differences = {backend: relative_difference(run["built"][case]["logits"], reference)
                   for backend, run in runs.items()}
    assert max(differences.values()) <= TOLERANCE, (
        f"{case}: logits differ from {origin} by {differences} (max |diff| / max |TensorFlow's|; allowed "
        f"{TOLERANCE:g})")


@pytest.mark.parametrize("case", CASES)
def test_a_preset_saved_on_any_backend_loads_on_the_others(runs, case):
    """Loaded on backend B, a preset saved on backend A is the model B builds from the same weights: same class,
    same config, every weight bit for bit (one fingerprint), hence B's logits, which equal TensorFlow's above."""
    for loader, run in runs.items():
        assert sorted(run["loaded"]) == sorted(runs), f"{loader} loaded presets of {sorted(run['loaded'])} only"
        expected = run["built"][case]["fingerprint"]
        wrong = sorted(saver for saver, loaded in run["loaded"].items() if loaded[case] != expected)
        assert not wrong, (f"{case}: the presets saved on {wrong} and loaded on {loader} are not the model {loader} "
                           "builds from the same weights (class, config or weights differ)")
    assert len({run["built"][case]["fingerprint"] for run in runs.values()}) == 1, "backends built different models"


def test_loading_a_preset_never_imports_tensorflow(runs):
    """On JAX and PyTorch, loading presets (saved on TensorFlow among others) must not need TensorFlow: here it is
    installed, so an import would go unnoticed but for this check."""
    checked = {backend: run["tensorflow_imported_by_loading"] for backend, run in runs.items()
               if backend != "tensorflow" and run["tensorflow_imported_by_loading"] is not None}
    if not checked:
        pytest.skip("no other backend's presets were loaded on JAX or PyTorch here (one backend in this environment)")
    assert not any(checked.values()), f"loading a preset imported TensorFlow on {checked}"


def test_a_preset_written_by_tensorflow_loads_here():
    """A preset saved by TensorFlow (committed, tools/make_backend_fixtures.py) on this backend: in the environments
    built without TensorFlow, the direct proof that a published preset needs none."""
    import harmonization

    record = json.loads((TENSORFLOW_PRESET / "metadata.json").read_text(encoding="utf-8"))
    assert record["keras_backend"] == "tensorflow"
    case = TINY["cases"][record["case"]]
    model = harmonization.load_model(TENSORFLOW_PRESET)
    assert relative_difference(logits_of(model, case), case["logits"]) <= TOLERANCE


FULL = _fixture(FULL_FIXTURE)


@pytest.mark.slow
def test_full_size_architectures_agree_across_backends(pytestconfig, tmp_path_factory):
    """Every zoo architecture at full size (224 px, 1000 classes), from the same seeded weights, on each backend here:
    its logits on two images equal TensorFlow's to 1e-5 relative. Without TensorFlow, the reference is the first
    logits of each image and the largest |logit| that TensorFlow gave (tests/fixtures/backends/full_size_logits.json).
    """
    names = sorted(FULL["models"])
    options = {"seed": FULL["seed"], "images_seed": FULL["images_seed"], "count": FULL["count"]}
    env = child_environment(pytestconfig, tmp_path_factory)
    results = {backend: on_backend(backend, "full_size_logits", env=env, names=names, **options)
               for backend in BACKENDS_HERE}
    head = FULL["head"]
    failures = []
    for name in names:
        recorded = FULL["models"][name]
        if "tensorflow" in results:
            reference = np.asarray(results["tensorflow"][name])
            stale = relative_difference(reference[:, :head], recorded["logits_head"])
            assert stale <= TOLERANCE, f"{name}: {FULL_FIXTURE.name} is stale ({stale:g}); rerun the tool"
            scale = np.abs(reference).max()
        else:
            reference, scale = np.asarray(recorded["logits_head"]), recorded["max_abs"]
        for backend, by_name in results.items():
            difference = np.abs(np.asarray(by_name[name])[:, :reference.shape[1]] - reference).max() / scale
            if not difference <= TOLERANCE:
                failures.append(f"{name} on {backend}: {difference:g}")
    assert not failures, f"full-size logits differ from TensorFlow's beyond {TOLERANCE:g}: {failures}"
