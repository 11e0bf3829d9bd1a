"""scripts/demo.py runs a demo's steps with the demo's own environment variables."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

DEMO_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"


def _demo_module():
    spec = importlib.util.spec_from_file_location("demo_script", DEMO_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRINT_THREADS = ["{python}", "-c", "import os; print('threads', os.environ.get('OMP_NUM_THREADS'))"]


@pytest.mark.parametrize(("env", "expected"), [({"OMP_NUM_THREADS": "1"}, "threads 1"), ({}, "threads 7")])
def test_steps_run_with_the_demo_environment(tmp_path, monkeypatch, env, expected):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # what the caller's shell had
    spec = {"steps": [{"name": "print threads", "command": PRINT_THREADS}], **({"env": env} if env else {})}
    timings = _demo_module().run_steps("demo", spec, {"python": sys.executable}, tmp_path, time.perf_counter())
    assert timings[0]["returncode"] == 0
    assert expected in (tmp_path / "01_print_threads.log").read_text()
