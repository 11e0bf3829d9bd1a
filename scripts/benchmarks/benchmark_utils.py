"""Timing and reporting shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.io.atomic import atomic_write


def median_seconds(function: Callable[[], Any], repeats: int, warmup: bool = True) -> tuple[float, Any]:
    """Median wall time of ``function()`` over ``repeats`` calls (after one untimed call when
    ``warmup``: lazy imports, first-touch page faults, cuDNN autotuning), and the last result."""
    if warmup:
        function()
    times, result = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info = {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def save_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the report as JSON (atomically) with the machine it ran on."""
    text = json.dumps({**report, "machine": machine()}, indent=2) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
