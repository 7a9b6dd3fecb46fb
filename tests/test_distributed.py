"""HarmonizedModel.fit under tf.distribute, in fresh processes (see distributed_script.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from network_helpers import free_ports

SCRIPT = Path(__file__).with_name("distributed_script.py")
ROOT = SCRIPT.parent.parent


def run_script(args, env=None, timeout=240):
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process, timeout=240):
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"distributed worker timed out after {timeout}s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.mark.slow
def test_mirrored_step_equals_single_device_step(tmp_path):
    out = tmp_path / "mirrored.npz"
    finish(run_script(["mirrored", str(out)]))
    data = np.load(out)
    count = len([k for k in data if k.startswith("initial_")])
    for i in range(count):
        initial, single, mirrored = data[f"initial_{i}"], data[f"single_{i}"], data[f"mirrored_{i}"]
        np.testing.assert_allclose(mirrored, single, rtol=1e-5, atol=1e-7)
        update = np.abs(single - initial).max()
        if update > 0:  # the step moved this weight: both runs moved it the same way
            assert np.abs(mirrored - single).max() <= 1e-3 * update
    for key in ("loss", "cross_entropy", "harmonization"):
        np.testing.assert_allclose(data[f"mirrored_log_{key}"], data[f"single_log_{key}"], rtol=1e-5)


@pytest.mark.slow
def test_two_multi_worker_processes_end_with_identical_weights(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(
            run_script(["worker", str(tmp_path / f"worker{index}.npz")], env={"TF_CONFIG": json.dumps(tf_config)})
        )
    for process in processes:
        finish(process, timeout=300)
    first, second = np.load(tmp_path / "worker0.npz"), np.load(tmp_path / "worker1.npz")
    assert first["loss"].shape == (2,) and np.isfinite(first["loss"]).all()  # one scalar per epoch
    weight_keys = [k for k in first if k.startswith("w")]
    assert weight_keys
    for key in weight_keys:
        np.testing.assert_array_equal(first[key], second[key])
