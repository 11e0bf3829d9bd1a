"""Whole-smear detection on synthetic slides whose cells are known: a marker pixel block per cell that a
fake detector turns into a Gaussian heatmap peak, inside a disc whose blue value a fake classifier reads
as the cell's class."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.data.cell_crops import extract_crops
from common.data.cytology import BETHESDA_CLASSES
from common.errors import InputDataError
from common.inferers.slide_tiles import SlideTileStream
from common.inferers.wsi_detection import MICRON_COLUMNS, WholeSmearDetector, owned_bounds
from common.postprocessing.cell_classification import ClassifyCellsd
from common.postprocessing.centernet import DecodeCentresd
from common.writers.detection_overlays import class_colours
from common.writers.detections import DETECTION_COLUMNS, read_detections_csv
from tests.common.data.test_tile_reader import corrupt_tile
from tests.common.data.test_wsi import write_slide

pytestmark = pytest.mark.usefixtures("one_thread")

TISSUE = (200, 120, 160)  # pink enough for the tissue filter
GLASS = (255, 255, 255)
DISC = 8  # radius in level-0 pixels of the disc around each marker, coloured by class
N_CLASSES = len(BETHESDA_CLASSES)


def class_code(label: int) -> int:
    """The blue value of a cell of class ``label``."""
    return 40 + 20 * label


class MarkerDetector(torch.nn.Module):
    """CenterNet maps at stride 4: a Gaussian heatmap peak (probability 1) at each cell holding marker
    pixels (red below half of ``input_max / 5``), offsets placing the centre at the markers' mean pixel
    centre. Each output cell depends on its own 4 x 4 pixels and, through the blur, on its neighbours':
    tiles and whole images agree away from their edges."""

    def __init__(self, input_max: float = 255.0) -> None:
        super().__init__()
        self.input_max = input_max
        ramp = torch.arange(-2, 3, dtype=torch.float32)
        self.register_buffer("kernel", torch.exp(-(ramp[:, None] ** 2 + ramp[None] ** 2) / 2)[None, None])

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        marker = (batch[:, 0] < 0.2 * self.input_max / 2).float()
        b, h, w = marker.shape
        cells = marker.reshape(b, h // 4, 4, w // 4, 4)
        count = cells.sum((2, 4))
        centres = torch.arange(4, dtype=torch.float32) + 0.5
        offset_x = (cells * centres).sum((2, 4)) / count.clamp(min=1) / 4
        offset_y = (cells * centres[:, None, None]).sum((2, 4)) / count.clamp(min=1) / 4
        heat = F.conv2d((count > 0).float()[:, None], self.kernel, padding=2)[:, 0].clamp(max=1)
        return torch.stack([torch.logit(heat, eps=1e-6), offset_x, offset_y], dim=1)


class BlueClassifier(torch.nn.Module):
    """Logits from the mean blue of the crop's central 3 x 3 pixels: highest for the class whose code
    (:func:`class_code`) it is nearest, so a crop cut at the wrong place gets a wrong class."""

    def __init__(self, input_max: float = 255.0) -> None:
        super().__init__()
        self.input_max = input_max
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # gives it a device

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        middle = crops.shape[-1] // 2
        blue = (
            crops[:, 2, middle - 1 : middle + 2, middle - 1 : middle + 2].mean((1, 2)) * 255 / self.input_max
        )
        codes = torch.tensor([class_code(k) for k in range(N_CLASSES)], dtype=torch.float32)
        return -((blue[:, None] - codes) ** 2) / 100


def smear(height: int, width: int, cells: list[tuple[int, int, int]], background=TISSUE) -> np.ndarray:
    """Level-0 pixels with a 2 x 2 marker at each ``(x, y, class)`` (x, y even: the cell's centre is
    ``(x + 1, y + 1)`` at level 0 and at level 1) inside a disc of its class's blue."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = background
    yy, xx = np.mgrid[:height, :width]
    for x, y, label in cells:
        disc = (xx - x - 1) ** 2 + (yy - y - 1) ** 2 <= DISC**2
        pixels[disc] = (220, 120, class_code(label))
        pixels[y : y + 2, x : x + 2] = (0, 120, class_code(label))
    return pixels


# 256 px tiles with 64 px overlap start at 0, 192, 384...: the owned parts meet at 224, 416, 608...
KNOWN = [
    (0, 0, 0),  # the slide's corner
    (1278, 600, 1),  # the right border (a 1280 px wide slide)
    (700, 1534, 2),  # the bottom border (1536 px high)
    (222, 100, 3),  # centre 223: in the overlap of columns 0 and 1, owned by column 0
    (224, 140, 4),  # centre 225: owned by column 1
    (410, 410, 5),  # near four tiles' corner
    (600, 800, 6),
    (200, 214, 7),  # in the overlap of two rows and two columns
    (1000, 1200, 0),
    (50, 1300, 1),
]


def known_centres() -> np.ndarray:
    return np.array([(x + 1, y + 1) for x, y, _ in KNOWN], dtype=np.float64)


def detector(tmp_path: Path, network: torch.nn.Module | None = None, **settings) -> WholeSmearDetector:
    defaults = {
        "class_names": BETHESDA_CLASSES,
        "patch_size": 256,
        "overlap": 64,
        "batch_size": 3,
        "min_tissue_fraction": 0.0,
        "crop_size": 16,
        "classifier_input_size": 16,
        "classifier_batch_size": 4,
        "min_distance": 4,
        "box_size": 24,
        "thumbnail_size": 256,
    }
    return WholeSmearDetector(
        network or MarkerDetector(), BlueClassifier(), tmp_path / "out", **{**defaults, **settings}
    )


def read_rows(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def sorted_by_position(points: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    order = np.lexsort((points[:, 0], points[:, 1]))
    return [points[order], *(other[order] for other in others)]


@pytest.fixture(scope="module")
def known_slide(tmp_path_factory) -> Path:
    return write_slide(tmp_path_factory.mktemp("smear") / "smear.tif", smear(1536, 1280, KNOWN), levels=3)


@pytest.mark.parametrize("level", [0, 1])
def test_every_known_cell_is_reported_once_in_level_0_pixels_with_its_class(known_slide, tmp_path, level):
    """At level 0 and level 1 alike: cells in overlaps, at tile corners and at the slide's border are each
    reported once, by one tile (``min_distance=0`` keeps any duplicate), at their level-0 centre, with
    the class read from the crop around them."""
    size = {"patch_size": 256 // 2**level, "overlap": 64 // 2**level}
    summary = detector(tmp_path, level=level, min_distance=0, **size)(known_slide)
    assert summary["level"] == level and summary["cells"] == len(KNOWN)
    found = read_detections_csv(summary["outputs"]["detections"])["smear.tif"]
    points, labels = sorted_by_position(found["points"].astype(np.float64), found["labels"])
    expected, expected_labels = sorted_by_position(known_centres(), np.array([c for _, _, c in KNOWN]))
    np.testing.assert_array_equal(points, expected)
    np.testing.assert_array_equal(labels, expected_labels)
    rows = read_rows(summary["outputs"]["detections"])
    assert tuple(rows[0]) == (*DETECTION_COLUMNS, *MICRON_COLUMNS)
    assert {row["width"] for row in rows} == {f"{24 * 2**level:g}"}  # level-0 pixels
    for row in rows:  # 0.5 mpp at level 0
        assert float(row["x_um"]) == pytest.approx(float(row["x"]) / 2, abs=0.01)
        assert float(row["y_um"]) == pytest.approx(float(row["y"]) / 2, abs=0.01)
    assert summary["classes"] == {
        name: sum(c == k for _, _, c in KNOWN) for k, name in enumerate(BETHESDA_CLASSES)
    }


def test_ownership_splits_each_overlap_at_its_middle():
    bounds = owned_bounds([0, 192, 384], 256, 600)
    np.testing.assert_array_equal(bounds, [0, 224, 416, 600])
    np.testing.assert_array_equal(owned_bounds([0, 256], 256, 400), [0, 256, 400])  # no overlap: the seam


def test_a_cell_seen_twice_across_a_seam_is_kept_once(tmp_path):
    """When the two tiles over a seam put one cell's peak on either side of it (here: a detector that moves
    the centres in a tile's left half 3 px right, those in its right half 3 px left), each tile keeps its
    own point; the slide-wide ``min_distance`` suppression keeps one."""

    class Shifted(MarkerDetector):
        def forward(self, batch):
            maps = super().forward(batch)
            half = maps.shape[-1] // 2
            maps[:, 1, :, :half] += 0.75  # +3 px in the tile's left half
            maps[:, 1, :, half:] -= 0.75  # -3 px in its right half
            return maps

    # one cell on the seam between columns 0 and 1 (owned parts meet at x = 224)
    slide = write_slide(tmp_path / "seam.tif", smear(256, 512, [(222, 100, 2)]), levels=1)
    assert (
        detector(tmp_path, Shifted(), min_distance=0)(slide)["cells"] == 2
    )  # 220 from tile 0 (its right half), 226 from tile 1 (its left half)
    summary = detector(tmp_path, Shifted(), min_distance=8)(slide)
    assert summary["cells"] == 1 and summary["classes"]["INFL"] == 1


def test_crops_are_cut_around_each_centre_of_the_processed_level(known_slide, tmp_path, monkeypatch):
    """Every crop the classifier gets, cut from a tile in the tile's coordinates, equals the crop cut from
    the whole processed level (level 1) around one known centre, and every known cell gets one."""
    level_image = torch.from_numpy(smear(1536, 1280, KNOWN)[::2, ::2].astype(np.float32)).permute(2, 0, 1)
    centres = known_centres() / 2  # in pixels of level 1
    expected = extract_crops(level_image, torch.from_numpy(centres).float(), 16, 16, "reflect")
    matched = []
    original = ClassifyCellsd.classify

    def classify(self, image, points):
        for crop in extract_crops(image, points, 16, 16, "reflect"):
            errors = (expected - crop).abs().flatten(1).amax(1)
            assert errors.min() < 0.5, "a crop matches no crop of the whole level"
            matched.append(int(errors.argmin()))
        return original(self, image, points)

    monkeypatch.setattr(ClassifyCellsd, "classify", classify)
    summary = detector(tmp_path, level=1, patch_size=128, overlap=32)(known_slide)
    assert summary["cells"] == len(KNOWN) and sorted(matched) == list(range(len(KNOWN)))


def test_same_detections_as_the_image_pipeline_on_a_small_slide(tmp_path):
    """A slide small enough to hold in memory: the whole-slide run (256 px tiles) and the image pipeline's
    postprocessing (decode, suppress, classify on the whole preprocessed image) give the same cells,
    scores and classes; both preprocess (here: scale to 0..1) before the detector and the crops."""
    rng = np.random.default_rng(0)
    cells, taken = [], []
    while len(cells) < 40:  # random cells, some near the seams
        x, y = (int(v) * 2 for v in rng.integers(0, 255, 2))
        if all(np.hypot(x - a, y - b) >= 3 * DISC for a, b in taken):  # discs apart
            taken.append((x, y))
            cells.append((x, y, int(rng.integers(N_CLASSES))))
    pixels = smear(512, 512, cells)
    slide = write_slide(tmp_path / "small.tif", pixels, levels=1)

    def scale(batch: torch.Tensor) -> torch.Tensor:
        return batch / 255

    run = WholeSmearDetector(
        MarkerDetector(input_max=1),
        BlueClassifier(input_max=1),
        tmp_path / "out",
        patch_size=256,
        overlap=64,
        min_tissue_fraction=0.0,
        preprocess=scale,
        crop_size=16,
        classifier_input_size=16,
        min_distance=6,
        thumbnail_size=128,
    )
    found = read_detections_csv(run(slide)["outputs"]["detections"])["small.tif"]

    image = scale(torch.from_numpy(pixels).permute(2, 0, 1).float())
    data = {"image": image, "pred": MarkerDetector(input_max=1)(image[None])[0]}
    data = DecodeCentresd("pred", stride=4, top_k=500, threshold=0.3, min_distance=6)(data)
    data = ClassifyCellsd("image", BlueClassifier(input_max=1), crop_size=16, input_size=16)(data)

    assert len(found["points"]) == len(cells)
    mine = sorted_by_position(found["points"].astype(np.float64), found["labels"], found["scores"])
    theirs = sorted_by_position(
        data["points"].double().numpy(), data["classes"].numpy(), data["conf"].double().numpy()
    )
    np.testing.assert_array_equal(mine[0], theirs[0])
    np.testing.assert_array_equal(mine[1], theirs[1])
    np.testing.assert_allclose(mine[2], theirs[2], atol=5e-5)


def test_glass_tiles_are_skipped_and_outputs_written_summary_last(tmp_path):
    """A smear on the right half only: the tiles of bare glass are skipped (found on a low level), the
    overlay dots each cell in its class's colour, and the summary (written last) counts the tiles."""
    cells = [(600, 100, 3), (700, 400, 5)]
    pixels = smear(512, 1024, cells)
    pixels[:, :512] = GLASS
    slide = write_slide(tmp_path / "half.tif", pixels, levels=4)
    run = detector(tmp_path, min_tissue_fraction=0.05, thumbnail_size=512)
    summary = run(slide)
    # tiles start at 0, 192, 384 along y and 0, 192, ..., 768 along x; those within x < 512 are glass
    assert summary["tiles"] == {"processed": 3 * 3, "skipped": 3 * 2}
    assert summary["cells"] == 2 and run.is_done(slide)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "half_detections.csv",
        "half_overlay.png",
        "half_summary.json",
    ]
    assert json.loads(Path(summary["outputs"]["summary"]).read_text())["cells"] == 2
    overlay = np.asarray(Image.open(summary["outputs"]["overlay"]))
    assert overlay.shape == (256, 512, 3)
    colours = class_colours(N_CLASSES)
    for x, y, label in cells:
        assert tuple(overlay[(y + 1) // 2, (x + 1) // 2]) == colours[label]


def test_a_corrupt_tile_names_the_slide_and_location_and_writes_nothing(tmp_path):
    slide = write_slide(tmp_path / "slide.tif", smear(512, 768, KNOWN[:1]), levels=1)
    corrupt_tile(
        slide, page=0, index=2 * 6 + 4
    )  # TIFF tile (2, 4) of 128 px: rows 256..383, columns 512..639
    with pytest.raises(InputDataError, match=r"slide\.tif: tile at \(y, x\) = \(192, 384\) of level 0"):
        detector(tmp_path)(slide)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_settings_are_checked_up_front(tmp_path):
    with pytest.raises(ValueError, match="overlap must be at least 102 px"):
        detector(tmp_path, crop_size=100, overlap=0.25)  # 64 px of a 256 px tile
    with pytest.raises(ValueError, match="multiple of the stride 4"):
        detector(tmp_path, patch_size=250)
    with pytest.raises(ValueError, match="either level or mpp"):
        detector(tmp_path, level=0, mpp=0.5)
    assert isinstance(detector(tmp_path).stream, SlideTileStream)
