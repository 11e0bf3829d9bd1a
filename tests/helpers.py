"""Helpers shared by the tests: run bundle workflows the way users do, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.transforms.centernet import centernet_target

REPO_ROOT = Path(__file__).resolve().parents[1]

#: ``torchrun`` with 2 processes on this machine, as the DDP tests start it (Gloo on CPU).
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run_command(args: list[str], timeout: float = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run ``args`` from the repository root with this interpreter's environment; with ``check``,
    fail the test with the command's output if it exits non-zero."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "2", **env}
    result = subprocess.run(args, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=environment)
    if check and result.returncode != 0:
        pytest.fail(f"command failed ({result.returncode}): {' '.join(args)}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def bundle_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", *args]


def centernet_oracle_output(centres: np.ndarray, image_size: int = 128, box_size: float = 100.0) -> torch.Tensor:
    """What a perfect CenterNet would output for cells centred at ``centres`` (x, y): the training
    target, with the heatmap as logits."""
    boxes = np.concatenate([centres - box_size / 2, centres + box_size / 2], axis=1)
    target = torch.from_numpy(centernet_target(boxes, (image_size, image_size)))
    return torch.cat([torch.logit(target[:1], eps=1e-6), target[1:3]])


def check_folder_inference_resumes(
    infer: list[str], config: Path, folder: Path, output_dir: Path, outputs: list[str], bad: str, good: str
) -> None:
    """Run the folder inference ``infer`` twice over ``folder``, which holds the corrupt image ``bad``
    between good ones: the first run writes exactly ``outputs`` and fails naming ``bad``; the rerun skips
    the finished images (``good`` among them) and reports ``bad`` again; with ``overwrite`` the ``datalist``
    of ``config`` lists every image again."""
    from monai.bundle import ConfigParser

    first = run_command(infer, check=False)
    log = first.stdout + first.stderr
    assert first.returncode != 0 and f"InputDataError: {folder / bad}: " in log
    assert "2 processed, 0 skipped (outputs complete), 1 failed" in log
    assert sorted(p.name for p in output_dir.iterdir()) == sorted(outputs)
    again = run_command(infer, check=False)
    log = again.stdout + again.stderr
    assert again.returncode != 0 and f"{folder / good}: outputs complete, skipped" in log
    assert "0 processed, 2 skipped (outputs complete), 1 failed" in log and str(folder / bad) in log
    parser = ConfigParser()
    parser.read_config(str(config))
    parser.update({"input_dir": str(folder), "output_dir": str(output_dir), "overwrite": True})
    assert [entry["image"] for entry in parser.get_parsed_content("datalist")] == sorted(map(str, folder.iterdir()))
