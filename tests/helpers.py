"""Helpers shared by the tests: run bundle workflows the way users do, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_command(args: list[str], timeout: float = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run ``args`` from the repository root with this interpreter's environment; with ``check``,
    fail the test with the command's output if it exits non-zero."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "2", **env}
    result = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=environment)
    if check and result.returncode != 0:
        pytest.fail(f"command failed ({result.returncode}): {' '.join(args)}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def bundle_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", *args]
