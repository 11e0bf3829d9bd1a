"""teardown_distributed under torchrun with 2 CPU processes (Gloo), rank 0 arriving late.

The file is both the test and the worker torchrun starts. Rank 0 reaches the teardown a second
after rank 1, as when it is still writing a checkpoint; rank 1 must wait for it rather than
destroy its side of the group alone (which aborted rank 1 with SIGABRT now and then in CI).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import TORCHRUN_2, run_command

LATE_SECONDS = 1.0


def _worker(out_dir: Path) -> None:
    import torch
    import torch.distributed as dist

    from common.engines.distributed import setup_distributed, teardown_distributed

    setup_distributed()
    rank = dist.get_rank()
    total = torch.ones(1)
    dist.all_reduce(total)
    if rank == 0:
        time.sleep(LATE_SECONDS)
    entered = time.time()
    teardown_distributed()
    record = {
        "entered": entered,
        "left": time.time(),
        "world": total.item(),
        "initialized": dist.is_initialized(),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_ranks_leave_the_group_together(tmp_path: Path):
    command = [
        *TORCHRUN_2,
        __file__,
        str(tmp_path),
    ]
    run_command(command, timeout=120, OMP_NUM_THREADS="1")
    late, early = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert late["world"] == early["world"] == 2.0
    assert not late["initialized"] and not early["initialized"]
    assert early["left"] >= late["entered"], "rank 1 destroyed the group before rank 0 reached the teardown"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker(Path(sys.argv[1]))
