from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from common.data.dermoscopy import read_binary_mask, read_isic_folder, read_unlabelled_images
from common.data.synthetic.dermoscopy import _ruler, generate_dermoscopy_dataset, synthesize_dermoscopy_image
from common.errors import InputDataError

SIZE = 96


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dermoscopy_dataset(tmp_path_factory.mktemp("synthetic") / "derm", 8, 2, SIZE, seed=0)


def test_layout_is_read_by_the_isic_reader(dataset):
    entries = read_isic_folder(dataset / "labelled")
    assert [e["name"] for e in entries] == [f"ISIC_{i:07d}" for i in range(8)]
    unlabelled = read_unlabelled_images(dataset / "unlabelled")
    assert [Path(e["image"]).name for e in unlabelled] == ["ISIC_0000008.jpg", "ISIC_0000009.jpg"]
    assert Image.open(unlabelled[0]["image"]).size == (SIZE, SIZE)


def test_masks_are_binary_non_empty_and_count_the_lesions(dataset):
    counts = json.loads((dataset / "dataset.json").read_text())["lesions_per_labelled_image"]
    found = []
    for entry in read_isic_folder(dataset / "labelled"):
        mask = read_binary_mask(entry["mask"])
        assert 0 < mask.mean() < 0.6
        found.append(ndimage.label(mask, structure=np.ones((3, 3)))[1])
    assert found == counts
    assert 2 in found and 1 in found


def test_lesions_are_darker_than_the_skin_around_them():
    image, mask = synthesize_dermoscopy_image(np.random.default_rng(1), SIZE, 1)
    ring = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(mask, iterations=2)
    grey = image.mean(axis=2)
    assert grey[mask].mean() < grey[ring].mean() - 10


def test_some_images_have_a_ruler_with_evenly_spaced_ticks():
    layers = [_ruler(np.random.default_rng(seed), 128) for seed in range(20)]
    drawn = [layer for layer in layers if layer.any()]
    assert 0 < len(drawn) < len(layers)
    layer = drawn[0]
    # the ruler lies along one edge: turned to the top, its ticks hang below the line
    top = max((np.rot90(layer, k) for k in range(4)), key=lambda turned: turned[:16].sum())[:16]
    line = int(np.argmax(top.sum(axis=1)))
    ticks = np.flatnonzero(top[line + 2] > 0.3)
    assert len(ticks) >= 10 and len(set(np.diff(ticks))) == 1


def test_white_balance_varies_the_colour_of_the_same_skin_between_images():
    means = [synthesize_dermoscopy_image(np.random.default_rng([5, i]), SIZE, 1)[0].mean((0, 1)) for i in range(6)]
    ratios = np.array([mean / mean.sum() for mean in means])
    assert ratios.std(axis=0).max() > 0.01


def test_generation_is_deterministic_and_reruns_replace_only_their_own_output(dataset, tmp_path):
    again = generate_dermoscopy_dataset(tmp_path / "again", 8, 0, SIZE, seed=0)
    for name in ("ISIC_0000003.jpg", "ISIC_0000003_segmentation.png"):
        assert (again / "labelled" / name).read_bytes() == (dataset / "labelled" / name).read_bytes()
    other = generate_dermoscopy_dataset(tmp_path / "again", 1, 0, SIZE, seed=1)
    first = Path("labelled", "ISIC_0000000.jpg")
    assert (other / first).read_bytes() != (dataset / first).read_bytes()
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("keep me")
    with pytest.raises(InputDataError, match="refusing to replace"):
        generate_dermoscopy_dataset(tmp_path / "user", 1, 0, SIZE)
    assert (tmp_path / "user" / "notes.txt").read_text() == "keep me"
