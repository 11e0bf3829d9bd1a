import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from common.inferers.flip import FlipAverageInferer, flip_average
from common.postprocessing.centernet import decode_centres
from tests.helpers import centernet_oracle_output as oracle_output

SIZE = 128


def test_flip_average_is_the_mean_of_the_two_passes():
    torch.manual_seed(0)
    network = torch.nn.Conv2d(3, 3, 5, stride=4, padding=2)
    image = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        averaged = flip_average(network, image)
        plain = network(image)
        mirrored = torch.flip(network(torch.flip(image, dims=(-1,))), dims=(-1,))
    assert averaged.shape == plain.shape == (2, 3, 8, 12)
    expected_heatmap = (torch.sigmoid(plain[:, 0]) + torch.sigmoid(mirrored[:, 0])) / 2
    assert torch.allclose(torch.sigmoid(averaged[:, 0]), expected_heatmap, atol=1e-6)
    assert torch.allclose(averaged[:, 1], (plain[:, 1] + 1 - mirrored[:, 1]) / 2, atol=1e-6)
    assert torch.allclose(averaged[:, 2], (plain[:, 2] + mirrored[:, 2]) / 2, atol=1e-6)


def test_flip_average_of_a_perfect_network_keeps_the_centres():
    """A mirrored image's perfect output, flipped back and with offset x mapped, decodes to the same centres."""
    centres = np.array([[10.3, 20.7], [65.0, 64.0], [100.9, 5.2]])
    mirrored_centres = np.stack([SIZE - centres[:, 0], centres[:, 1]], axis=1)
    image = torch.zeros(1, 1, SIZE, SIZE)
    image[..., 0] = 1.0  # marks the unmirrored image

    def perfect(x: torch.Tensor) -> torch.Tensor:
        return oracle_output(centres if x[0, 0, 0, 0] == 1 else mirrored_centres)[None]

    [(points, scores)] = decode_centres(flip_average(perfect, image))
    order = np.argsort(points[:, 0].numpy())
    np.testing.assert_allclose(points.numpy()[order], centres[np.argsort(centres[:, 0])], atol=1e-4)
    assert scores.min() > 0.99


def test_flip_average_inferer_wraps_plain_and_sliding_window_inference():
    torch.manual_seed(0)
    network = torch.nn.Conv2d(3, 3, 1, stride=4)
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = flip_average(network, image)
        assert torch.allclose(FlipAverageInferer()(image, network), expected, atol=1e-6)
        windowed = FlipAverageInferer(SlidingWindowInferer(roi_size=32, sw_batch_size=4, overlap=0.5))(image, network)
    assert torch.allclose(windowed, expected, atol=1e-5)
