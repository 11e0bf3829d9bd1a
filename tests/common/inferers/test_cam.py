import pytest
import torch
from torch import nn

from common.inferers.cam import CAMInferer


class CAMOnly(nn.Module):
    """Four CAM channels; records the options of every ``cams`` call and refuses ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("CAMInferer must call cams(), not forward()")

    def cams(self, x: torch.Tensor, **options) -> torch.Tensor:
        self.calls.append(options)
        return torch.zeros(x.shape[0], 4, *x.shape[2:])


def test_cam_inferer_unwraps_parallel_networks_and_needs_cams():
    network = CAMOnly()
    cams = CAMInferer(scales=(1.0,))(torch.zeros(2, 3, 8, 8), nn.DataParallel(network))
    assert cams.shape == (2, 4, 8, 8) and network.calls == [{"scales": (1.0,)}]
    with pytest.raises(TypeError, match=r"needs a network with a cams\(x\) method; Linear has none"):
        CAMInferer()(torch.zeros(1, 3), nn.Linear(3, 2))
