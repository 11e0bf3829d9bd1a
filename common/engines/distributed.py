"""Process-group set-up and teardown shared by every bundle's ``multi_gpu_train.json``.

``torchrun`` sets ``LOCAL_RANK``/``RANK``/``WORLD_SIZE``; this joins the group with NCCL on CUDA and
Gloo on CPU, so the same config runs on a GPU node and on a laptop (and in CI).
:func:`wrap_ddp` wraps a network with the settings that models with rotary embeddings need.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["has_complex_buffers", "is_main_process", "setup_distributed", "teardown_distributed", "wrap_ddp"]

# Kept as float32 parameters on Gloo, so that CPU runs reduce gradients in full precision (see wrap_ddp).
GLOO_FLOAT32 = (torch.bfloat16, torch.float16)


def setup_distributed() -> torch.device:
    """Initialise the default process group once and return this rank's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device(f"cuda:{local_rank}")
    return torch.device("cpu")


def teardown_distributed() -> None:
    """Leave the process group together, so no rank tears down Gloo's connections under another.

    Rank 0 usually finishes later (it writes checkpoints); a rank that destroys its group while a peer
    still holds open pairs can abort that peer at exit (``terminate called without an active
    exception``, SIGABRT under torchrun). A barrier first makes every rank destroy at the same point.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0 or when not distributed: the one process that writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def has_complex_buffers(model: nn.Module) -> bool:
    """True when a buffer is complex, e.g. SAM3's rotary tables (``freqs_cis``)."""
    return any(buffer.is_complex() for buffer in model.buffers())


def wrap_ddp(
    model: nn.Module, device: torch.device, find_unused_parameters: bool = True
) -> DistributedDataParallel:
    """``model`` on ``device`` in DistributedDataParallel, with what RoPE ViTs and detectors need.

    * On Gloo (the CPU backend), bfloat16/float16 parameters go to float32, so that gradients are
      summed across ranks in full precision rather than in 8- or 11-bit mantissas; on CPU, mixed
      precision belongs in autocast, not in the weights.
    * Buffers are not broadcast from rank 0 at every forward when any is complex. Such buffers are
      rotary tables (SAM3's ``freqs_cis``), computed from the configuration and identical on every
      rank, so broadcasting them is wasted communication.
    * ``find_unused_parameters`` (default on): Mask R-CNN leaves the mask head without gradient in
      an iteration without positive proposals, and a pruned or frozen trunk may leave parameters out.

    Regenerate rotary tables (:func:`common.networks.rope.regenerate_rope`) and load weights before.
    """
    if dist.get_backend() == "gloo":
        for param in model.parameters():
            if param.dtype in GLOO_FLOAT32:
                param.data = param.data.float()
    model = model.to(device)
    return DistributedDataParallel(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        broadcast_buffers=not has_complex_buffers(model),
        find_unused_parameters=find_unused_parameters,
    )
