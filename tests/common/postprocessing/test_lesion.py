import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image
from skimage.measure import perimeter

from common.postprocessing.lesion import LesionMaskd, clean_lesion_mask, select_lesions
from common.writers.lesion import write_lesion_mask


def _disc(size: int, centre: tuple[int, int], radius: float) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def _detections(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Three soft masks (K, 1, H, W) as torchvision returns them, with scores 0.3, 0.9, 0.6."""
    masks = torch.zeros(3, 1, size, size)
    masks[0, 0, :8, :8] = 0.8
    masks[1, 0, 10:20, 10:20] = 0.7
    masks[1, 0, 20:22, 10:20] = 0.4  # below the mask threshold
    masks[2, 0, 24:30, 24:30] = 0.9
    return masks, torch.tensor([0.3, 0.9, 0.6])


def test_best_mode_keeps_only_the_highest_scoring_mask():
    masks, scores = _detections()
    expected = np.zeros((32, 32), dtype=bool)
    expected[10:20, 10:20] = True
    np.testing.assert_array_equal(select_lesions(masks, scores, mode="best"), expected)


def test_threshold_mode_keeps_the_union_of_confident_masks():
    masks, scores = _detections()
    expected = np.zeros((32, 32), dtype=bool)
    expected[10:20, 10:20] = expected[24:30, 24:30] = True
    selected = select_lesions(masks, scores, mode="threshold", score_threshold=0.5)
    np.testing.assert_array_equal(selected, expected)
    assert not select_lesions(masks, scores, mode="threshold", score_threshold=0.95).any()


@pytest.mark.parametrize("mode", ["best", "threshold"])
def test_no_detection_gives_an_empty_mask(mode):
    lesion = select_lesions(torch.zeros(0, 1, 24, 40), torch.zeros(0), mode=mode)
    assert lesion.shape == (24, 40) and not lesion.any()
    out = LesionMaskd(mode=mode)({"pred_masks": torch.zeros(0, 1, 24, 40), "pred_scores": torch.zeros(0)})
    assert out["lesion_mask"].shape == (1, 24, 40) and out["lesion_mask"].sum() == 0


def test_selection_is_resized_to_the_requested_size():
    masks = torch.zeros(1, 1, 32, 32)
    masks[0, 0, 8:24, 8:24] = 1
    lesion = select_lesions(masks, torch.tensor([0.9]), output_size=(64, 96))
    assert lesion.shape == (64, 96)
    rows, cols = np.nonzero(lesion)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (16, 47, 24, 71)


def test_unknown_mode_and_mismatched_scores_are_rejected():
    masks, scores = _detections()
    with pytest.raises(ValueError, match="mode must be one of"):
        select_lesions(masks, scores, mode="union")
    with pytest.raises(ValueError, match="3 masks but 2 scores"):
        select_lesions(masks, scores[:2])


def test_holes_are_filled():
    ring = _disc(48, (24, 24), 15) & ~_disc(48, (24, 24), 6)
    cleaned = clean_lesion_mask(ring, fill_holes=True, smoothing_radius=0)
    np.testing.assert_array_equal(cleaned, _disc(48, (24, 24), 15))
    np.testing.assert_array_equal(clean_lesion_mask(ring, fill_holes=False, smoothing_radius=0), ring)


def test_jagged_edge_is_smoothed_and_specks_removed():
    disc = _disc(64, (30, 30), 16)
    jagged = disc.copy()
    jagged[np.arange(20, 41, 2)[:, None], np.arange(40, 50)] = True  # comb of one-pixel spurs
    jagged[3, 60:63] = True  # a speck beside the lesion
    cleaned = clean_lesion_mask(jagged, smoothing_radius=3)
    assert perimeter(cleaned) < 0.8 * perimeter(jagged)
    assert (cleaned ^ disc).sum() < 0.02 * disc.sum()
    assert not cleaned[3, 60:63].any()


def test_a_lesion_smaller_than_the_smoothing_disk_survives():
    tiny = np.zeros((16, 16), dtype=bool)
    tiny[8, 7:10] = True
    np.testing.assert_array_equal(clean_lesion_mask(tiny, smoothing_radius=3), tiny)


def test_lesion_touching_the_border_is_not_eroded_by_it():
    mask = np.zeros((32, 32), dtype=bool)
    mask[:, :12] = True
    np.testing.assert_array_equal(clean_lesion_mask(mask, smoothing_radius=3), mask)


def test_lesion_maskd_writes_a_binary_png_at_the_input_size(tmp_path):
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, 0, 4:28, 6:26] = 0.9
    masks[1, 0, 0:4, 0:4] = 0.9
    original = MetaTensor(torch.zeros(3, 64, 64), meta={"filename_or_obj": "ISIC_0000001.jpg"})
    transform = LesionMaskd(mode="best", smoothing_radius=2, size_key="original")
    out = transform({"pred_masks": masks, "pred_scores": torch.tensor([0.8, 0.95]), "original": original})
    lesion = out["lesion_mask"]
    assert lesion.shape == (1, 64, 64) and lesion.dtype == torch.uint8
    assert set(torch.unique(lesion).tolist()) == {0, 1}
    assert lesion.meta["filename_or_obj"] == "ISIC_0000001.jpg"
    path = write_lesion_mask(lesion, tmp_path / "ISIC_0000001_segmentation.png")
    with Image.open(path) as img:
        assert img.mode == "L" and img.size == (64, 64)
        pixels = np.asarray(img)
    np.testing.assert_array_equal(np.unique(pixels), [0, 255])
    np.testing.assert_array_equal(pixels == 255, lesion[0].numpy() == 1)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
