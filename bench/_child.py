"""Run a benchmark script again in a fresh Python process and read the JSON figures it prints last.

Memory and speed are measured in fresh processes so that nothing one measurement leaves allocated, traced or
cached counts against the next. Scripts run as `python bench/NAME.py`, so this folder is on `sys.path`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_child(script: str, *args, what: str, env: dict | None = None) -> dict:
    """`python SCRIPT ARGS...` from the bench folder with the checkout importable; its last stdout line as JSON."""
    here = os.path.dirname(os.path.abspath(script))
    done = subprocess.run(
        [sys.executable, os.path.abspath(script), *map(str, args)], cwd=here, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": os.path.dirname(here), **(env or {})},
    )
    if done.returncode:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
