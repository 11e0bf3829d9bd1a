"""Process-group set-up shared by every bundle's ``multi_gpu_train.json``.

``torchrun`` sets ``LOCAL_RANK``/``RANK``/``WORLD_SIZE``; this joins the group with NCCL on CUDA and
Gloo on CPU, so the same config runs on a GPU node and on a laptop (and in CI).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["setup_distributed", "is_main_process"]


def setup_distributed() -> torch.device:
    """Initialise the default process group once and return this rank's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device(f"cuda:{local_rank}")
    return torch.device("cpu")


def is_main_process() -> bool:
    """True on rank 0 or when not distributed: the one process that writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0
