"""wrap_ddp under torchrun with 2 CPU processes (Gloo) on a model with complex rotary buffers.

The file is both the test and the worker torchrun starts: each rank trains two steps of a tiny
attention layer whose rotary table is a complex buffer (as in SAM3's trunk), with a bfloat16
parameter (kept float32 on Gloo) and a parameter that gets no gradient, then checks that the
ranks agree and writes what it saw.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.helpers import TORCHRUN_2, run_command

TOKENS, DIM = 16, 8


class TinyRopeAttention(nn.Module):
    """One-head attention with a complex rotary table, an unused branch, and a bfloat16 projection."""

    def __init__(self) -> None:
        super().__init__()
        angles = torch.outer(torch.arange(TOKENS, dtype=torch.float32), torch.linspace(0.1, 1.0, DIM // 2))
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles))
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM).to(torch.bfloat16)
        self.unused = nn.Linear(DIM, DIM)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], DIM // 2, 2))
        return torch.view_as_real(pairs * self.freqs_cis).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attended = torch.softmax(self.rotate(q) @ self.rotate(k).transpose(-1, -2) / DIM**0.5, -1) @ v
        return self.proj(attended.to(self.proj.weight.dtype)).float()


def _worker(out_dir: Path) -> None:
    from common.engines.distributed import setup_distributed, teardown_distributed, wrap_ddp

    device = setup_distributed()
    rank = dist.get_rank()
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's parameters
    model = wrap_ddp(TinyRopeAttention(), device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        x = torch.randn(2, TOKENS, DIM, generator=torch.Generator().manual_seed(rank + 10))
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    report = {
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "broadcast_buffers": model.broadcast_buffers,
        "ranks_agree": all(torch.equal(gathered[0], g) for g in gathered),
        "freqs_cis_complex": model.module.freqs_cis.is_complex(),
        "unused_untouched": model.module.unused.weight.grad is None,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    teardown_distributed()


@pytest.mark.slow
def test_wrap_ddp_with_complex_buffers_under_torchrun(tmp_path: Path):
    run_command(
        [
            *TORCHRUN_2,
            __file__,
            str(tmp_path),
        ],
        timeout=180,
        OMP_NUM_THREADS="1",
    )
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report == {
            "dtypes": ["torch.float32"],
            "broadcast_buffers": False,
            "ranks_agree": True,
            "freqs_cis_complex": True,
            "unused_untouched": True,
        }, f"rank {rank}: {report}"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker(Path(sys.argv[1]))
