"""Acceptance: the published harmonization 0.0.9 test suite passes, unchanged, against this package.

tools/run_published_tests.py takes the `tests/` folder out of the published wheel (PyPI `Harmonization==0.0.9`,
fetched with `pip download` from the package registry, never installed) and runs it with pytest, its ClickMe
downloads answered by a local mirror through HARMONIZATION_CLICKME_URL. Only its bucket test is left out (it
loads the bucket's dummy_model.h5 with plain Keras and tests nothing of ours).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED_TESTS = 9  # tests/ of 0.0.9: 2 data, 3 metrics, 1 evaluation, 3 loss (+ 1 bucket test, left out)


@pytest.mark.slow
def test_the_published_test_suite_passes_unchanged(tmp_path):
    # The installed package answers `import harmonization` there, as for any user of 0.0.9's code.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "run_published_tests.py"), "--keep", str(tmp_path), "-p", "no:warnings"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    assert f"{PUBLISHED_TESTS} passed" in report, report[-3000:]
    # Its tests really were the published ones, and its shards came from the local mirror.
    assert (tmp_path / "tests" / "training" / "test_loss.py").read_text().count("def test_") == 3
    assert sorted(p.name for p in (tmp_path / "keras_home" / "datasets" / "click-me").iterdir()) == [
        "clickme_train_318", "clickme_val_17"]
