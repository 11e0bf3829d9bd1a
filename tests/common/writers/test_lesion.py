import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from common.transforms.intensity import IMAGENET_MEAN, IMAGENET_STD
from common.writers.lesion import SaveLesionOutputsd, write_lesion_overlay


def test_overlay_outlines_the_mask_on_a_normalised_image(tmp_path):
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    ramp = torch.linspace(0, 1, 48).expand(3, 40, 48)
    image = (ramp - mean) / std
    mask = np.zeros((40, 48), dtype=bool)
    mask[10:30, 12:36] = True
    path = write_lesion_overlay(image, mask, tmp_path / "overlay.png", colour=(255, 0, 255), thickness=2)
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    assert rgb.shape == (40, 48, 3)
    magenta = (rgb == (255, 0, 255)).all(axis=-1)
    outline = mask.copy()
    outline[12:28, 14:34] = False
    np.testing.assert_array_equal(magenta, outline)
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255  # each channel stretched to the full range
    with pytest.raises(ValueError, match="mask is 20x48 but the image is 40x48"):
        write_lesion_overlay(image, mask[:20], tmp_path / "bad.png")


def _lesion_sample(name: str) -> dict:
    image = MetaTensor(torch.full((3, 24, 32), 128.0), meta={"filename_or_obj": f"/data/{name}.jpg"})
    mask = torch.zeros(1, 24, 32, dtype=torch.uint8)
    mask[0, 6:18, 8:24] = 1
    return {"image": image, "lesion_mask": mask}


def test_save_lesion_outputs_names_files_after_the_image(tmp_path):
    out = SaveLesionOutputsd(output_dir=tmp_path)(_lesion_sample("ISIC_0000007"))
    assert out["lesion_mask_path"] == str(tmp_path / "ISIC_0000007_mask.png")
    assert out["lesion_mask_overlay_path"] == str(tmp_path / "ISIC_0000007_overlay.png")
    with Image.open(out["lesion_mask_path"]) as img:
        np.testing.assert_array_equal(np.asarray(img) == 255, out["lesion_mask"][0].numpy() == 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ISIC_0000007_mask.png", "ISIC_0000007_overlay.png"]


def test_save_lesion_outputs_writes_a_single_image_to_the_given_file(tmp_path):
    target = tmp_path / "reports" / "mask.png"
    writer = SaveLesionOutputsd(output_file=target, overlay=True)
    writer(_lesion_sample("scan"))
    assert sorted(p.name for p in target.parent.iterdir()) == ["mask.png", "mask_overlay.png"]
    with pytest.raises(ValueError, match="takes one image"):
        writer(_lesion_sample("another_scan"))


def test_save_lesion_outputs_needs_a_named_image(tmp_path):
    sample = _lesion_sample("x")
    sample["image"] = torch.zeros(3, 24, 32)
    with pytest.raises(ValueError, match="filename_or_obj"):
        SaveLesionOutputsd(output_dir=tmp_path)(sample)
