"""What the wheel installs: no generic top-level names, the zoo inside our package, and a loud refusal to share
an environment with the published `Harmonization` distribution (both install `harmonization/`)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["setup.py", "pyproject.toml", "README.md", "harmonization", "tfds_clickme", "models"]


def _python(code, cwd, pythonpath):
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip install .` would install, built from a copy of the sources (the checkout stays clean)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(work / "dist"), str(source)], check=True, timeout=600)
    return next((work / "dist").glob("harmonization_hub-*.whl"))


def test_the_wheel_installs_no_generic_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"harmonization", "tfds_clickme"}
    entries = sorted(n for n in names if n.startswith("harmonization/models/entries/") and n.endswith(".json"))
    assert [Path(n).stem for n in entries] == sorted(p.stem for p in (ROOT / "models").glob("*.json"))
    assert "harmonization/imagenet_classes.txt" in names and "harmonization/MODEL_CARD.md" in names
    # The shipped recipes (`harmonization train --recipe NAME`) are package data too.
    recipes = sorted(n for n in names if n.startswith("harmonization/recipes/") and n.endswith(".json"))
    assert [Path(n).name for n in recipes] == sorted(p.name for p in (ROOT / "harmonization/recipes").glob("*.json"))


def test_a_working_directory_with_its_own_models_and_tests_packages_changes_nothing(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, timeout=600)
    project = tmp_path / "project"
    for package in ("models", "tests"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text(f"MINE = {package!r}\n")
    code = (
        "import harmonization, models, tests\n"
        "from harmonization.models import load_ViT_B16, preprocess_input\n"
        "print(harmonization.__file__)\n"
        "print(len(harmonization.list_models()), models.MINE, tests.MINE)\n"
        "print(harmonization.model_info('tiny_convnext_harmonized')['name'])\n"
    )
    result = _python(code, project, site)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    assert lines[0].startswith(str(site))  # the installed wheel, not a checkout
    assert lines[1:3] == ["7 models tests", "convnext_tiny_harmonized"]


def test_import_refuses_to_run_beside_the_published_distribution(tmp_path):
    # What pip leaves for `pip install Harmonization==0.0.9` (its wheel's dist-info, as published).
    info = tmp_path / "Harmonization-0.0.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: Harmonization\nVersion: 0.0.9\n"
                                   "Summary: Aligning Human & Machine vision\n")
    (info / "top_level.txt").write_text("harmonization\ntests\n")
    (info / "RECORD").write_text("harmonization/__init__.py,,\n")
    result = _python("import harmonization", tmp_path, os.pathsep.join([str(tmp_path), str(ROOT)]))
    assert result.returncode == 1
    message = next(line for line in result.stderr.splitlines() if "ConflictingPackageError:" in line)
    assert message.startswith("harmonization._conflicts.ConflictingPackageError: The published research package "
                              "Harmonization 0.0.9")
    assert "python -m pip uninstall -y Harmonization" in result.stderr
    assert "python -m pip install --force-reinstall --no-deps harmonization-hub" in result.stderr
    # Without it, the same import works.
    shutil.rmtree(info)
    assert _python("import harmonization", tmp_path, ROOT).returncode == 0
