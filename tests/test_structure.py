"""The package's layers, read from its own imports: each module imports only what is below it, and nothing cycles.

docs/architecture.md draws the same layers; this test is what keeps the drawing true.
"""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harmonization", "tfds_clickme")

# Bottom to top. A module may import (at the top of the file or inside a function) only modules of an earlier
# layer of its chain; modules outside both chains are free, as long as the whole graph has no cycle.
DISTRIBUTION = (
    "harmonization._io",
    "harmonization.presets",  # the on-disk format only
    "harmonization.hub",  # remote access: Hub snapshots and verified downloads, no zoo
    "harmonization.hub_upload",  # a preset folder into a Hub repo once: compare, refuse, upload, check
    "harmonization.originals",  # the published originals: trust store, verified download
    "harmonization.convert",  # a Keras-2 .h5 into a model it is given
    "harmonization.zoo",  # the entries, family defaults, build(entry)
    "harmonization.conversion_check",  # the converter against the original libraries' reduced-size fixtures
    "harmonization.model_card",  # cards, from an entry
    "harmonization.publish",  # build_preset(entry, source) and the upload
    "harmonization.loader",  # names, hf:// URIs and paths -> presets; the cache of converted originals
    "harmonization.release",  # the whole zoo to the Hub: build, upload once, pin
)
TRAINING = (
    "harmonization._host_checks",  # NumPy checks of concrete values, every backend
    "harmonization._validation",  # the same checks inside a TensorFlow graph
    "harmonization.batch",
    "harmonization.losses",
    "harmonization.saliency_input",
    "harmonization.autodiff",  # each backend's input gradient
    "harmonization.saliency",
    "harmonization.saliency_methods",
    "harmonization.harmonized_step_tensorflow",  # one train/test step per backend
    "harmonization.harmonized_step_jax",
    "harmonization.harmonized_step_torch",
    "harmonization.harmonized_model",
)
RUNS = (
    "harmonization.recipes",  # the schema and the shipped recipes, standard library only
    "harmonization.run_dir",  # the run directory: identity, atomic checkpoints, history
    "harmonization.trainer",  # a run, from a recipe
)
# `__getattr__` of a module resolves a 0.1 name that moved up a layer, on use (see the modules): not a dependency.
COMPATIBILITY_HOOKS = ("__getattr__",)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    _module_name(path): path
    for package in PACKAGES
    for path in sorted((ROOT / package).rglob("*.py"))
    if not path.name.endswith("_test.py")
}


def _imports(module: str) -> list[tuple[str, str | None]]:
    """(imported module, enclosing function or None) for each import of our own modules in `module`."""
    found = []

    def target(name: str) -> str | None:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                # `from harmonization import zoo` imports the module harmonization.zoo.
                names = [f"{child.module}.{alias.name}" for alias in child.names]
            for name in names:
                resolved = target(name)
                if resolved is not None and resolved != module:
                    found.append((resolved, function))
            visit(child, inner)

    visit(ast.parse(MODULES[module].read_text(encoding="utf-8")), None)
    return found


def test_the_chains_name_real_modules():
    assert set(DISTRIBUTION) | set(TRAINING) | set(RUNS) <= set(MODULES)


@pytest.mark.parametrize("chain", [DISTRIBUTION, TRAINING, RUNS], ids=["distribution", "training", "runs"])
def test_each_module_imports_only_what_is_below_it(chain):
    rank = {module: index for index, module in enumerate(chain)}
    upward = [
        f"{module} imports {imported}" + (f" (in {function})" if function else "")
        for module in chain
        for imported, function in _imports(module)
        if imported in rank and rank[imported] > rank[module] and function not in COMPATIBILITY_HOOKS
    ]
    assert not upward, "layer violations:\n" + "\n".join(upward)


def test_no_import_cycles():
    """No cycle among all imports, those inside functions included (the package's lazy `__init__`s excepted)."""
    graph = {
        module: {imported for imported, function in _imports(module)
                 if function not in COMPATIBILITY_HOOKS and imported not in PACKAGES}
        for module in MODULES
    }
    state: dict[str, str] = {}
    cycles = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycles.append(" -> ".join(path[path.index(imported):] + [imported]))
            elif imported not in state:
                walk(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_inside_functions_say_why():
    """An import inside a function (of our own modules) has a comment on its line or just above it."""
    silent = []
    for module, path in MODULES.items():
        if module.startswith("tfds_clickme") or module.endswith(("cli", "evaluate_command", "quickstart")):
            continue  # commands import what each command needs, so that `--help` starts without TensorFlow
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            if line.startswith((" ", "\t")) and stripped.startswith(("import harmonization", "from harmonization")):
                window = lines[max(0, number - 3):number + 1]
                if not any("#" in text for text in window):
                    silent.append(f"{module}:{number + 1}: {stripped}")
    assert not silent, "imports inside functions without a reason:\n" + "\n".join(silent)


@pytest.mark.parametrize("old, new", [
    ("harmonization.presets.load_model", "harmonization.loader.load_model"),
    ("harmonization.hub.resolve_preset", "harmonization.loader.resolve_preset"),
    ("harmonization.hub.convert_original", "harmonization.loader.convert_original"),
    ("harmonization.hub.cache_dir", "harmonization.originals.cache_dir"),
    ("harmonization.convert.convert", "harmonization.publish.convert"),
    ("harmonization.convert.convert_to_preset", "harmonization.publish.convert_to_preset"),
    ("harmonization.convert.conversion_metadata", "harmonization.publish.conversion_metadata"),
    ("harmonization.convert.build_native", "harmonization.zoo.build_native"),
    ("harmonization.load_model", "harmonization.loader.load_model"),
])
def test_names_that_moved_still_answer(old, new):
    def resolve(dotted):
        module, _, name = dotted.rpartition(".")
        return getattr(importlib.import_module(module), name)

    assert resolve(old) is resolve(new)
