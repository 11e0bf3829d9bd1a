from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from skimage.draw import disk

from common.data.distance_map import normalized_distance_map
from common.inferers.edge_padding import EdgePaddedInferer
from common.postprocessing.watershed import distance_map_watershed

SIZE = 64


class BorderResponse(torch.nn.Module):
    """Passes its input through plus a strong response where its zero padding reaches, as a network
    does at the edge of its field of view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coverage = F.avg_pool2d(torch.ones_like(x), 5, stride=1, padding=2, count_include_pad=True)
        return (x + 3 * (1 - coverage)).clamp(0, 1)


def sliding_window() -> SlidingWindowInferer:
    return SlidingWindowInferer(roi_size=(32, 32), sw_batch_size=4, overlap=0.25, mode="gaussian")


def instances(inferer, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        pred = inferer(torch.as_tensor(image, dtype=torch.float32)[None, None], BorderResponse())
    assert pred.shape == (1, 1, *image.shape)
    return distance_map_watershed(pred[0], cells_max=0.5, cell_fill=0.1)


def test_pure_background_gives_no_instance():
    background = np.zeros((SIZE, SIZE))
    assert instances(sliding_window(), background).max() > 0  # the artefact: instances along the edge
    assert instances(EdgePaddedInferer(sliding_window(), margin=8), background).max() == 0


def test_cell_cut_by_the_border_is_found_once():
    canvas = np.zeros((SIZE, SIZE + 20), dtype=np.int32)  # the cell goes on past the image's left edge
    canvas[disk((20, 20), 12, shape=canvas.shape)] = 1
    canvas[disk((40, 55), 9, shape=canvas.shape)] = 2
    reference = canvas[:, 20:]
    dist = normalized_distance_map(canvas)[:, 20:]
    found = instances(EdgePaddedInferer(sliding_window(), margin=8), dist)
    assert found.max() == 2
    match = np.bincount(found[reference == 1]).argmax()
    assert match > 0 and (found[reference == 1] == match).mean() > 0.85  # the cell's rim is below cell_fill
    assert not np.any((found == match) & (reference != 1))  # nothing added along the edge
    unpadded = instances(sliding_window(), dist)
    assert (unpadded[reference == 0] > 0).sum() > SIZE  # without the padding, cells run along the edge


def test_margin_is_limited_by_small_images_and_output_keeps_input_shape():
    image = torch.rand(2, 3, 5, 7)
    output = EdgePaddedInferer(None, margin=16)(image, lambda x: x * 2)
    torch.testing.assert_close(output, image * 2)
    replicated = EdgePaddedInferer(None, margin=16, mode="replicate")(
        image, lambda x: x.mean(1, keepdim=True)
    )
    assert replicated.shape == (2, 1, 5, 7)


@pytest.mark.parametrize(("kwargs", "message"), [({"margin": -1}, "margin"), ({"mode": "constant"}, "mode")])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EdgePaddedInferer(sliding_window(), **kwargs)
