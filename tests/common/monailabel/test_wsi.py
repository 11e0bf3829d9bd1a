"""QuPath's tiled whole-slide answer: tiles of a region and each tile's class outlines as polygons."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import InputDataError
from common.monailabel.regions import tile_boxes
from common.monailabel.wsi import class_map_annotation

CLASSES = ["tumour epithelium", "necrosis", "lymphocyte", "tumour-associated stroma"]
BACKGROUND = len(CLASSES)


def test_tiles_cover_the_region_row_by_row_and_are_cut_at_its_edge():
    assert tile_boxes([10, 20], [300, 100], [128, 128]) == [
        (10, 20, 128, 100),
        (138, 20, 128, 100),
        (266, 20, 44, 100),
    ]
    assert len(tile_boxes([0, 0], [640, 512], [256, 256])) == 6
    with pytest.raises(InputDataError, match="tile_size must be positive"):
        tile_boxes([0, 0], [10, 10], [0, 16])


def _bounds(element: dict) -> tuple[int, int, int, int]:
    points = np.array([point for contour in element["contours"] for point in contour])
    return points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max()


def test_every_tissue_class_becomes_polygons_in_level_0_pixels_and_background_none():
    classes = np.full((64, 80), BACKGROUND, np.uint8)
    classes[10:30, 20:50] = 1  # necrosis
    classes[40:60, 5:25] = 0  # tumour epithelium: value 0 is a tissue class, not background
    annotation = class_map_annotation(classes, CLASSES, location=(100, 200), min_poly_area=10)["annotation"]
    elements = {element["label"]: element for element in annotation["elements"]}
    assert set(elements) == {"necrosis", "tumour epithelium"}
    x0, y0, x1, y1 = _bounds(elements["necrosis"])  # x first, offset by the tile's location
    assert abs(x0 - 120) <= 1 and abs(y0 - 210) <= 1 and abs(x1 - 149) <= 1 and abs(y1 - 229) <= 1
    x0, y0, x1, y1 = _bounds(elements["tumour epithelium"])
    assert abs(x0 - 105) <= 1 and abs(y0 - 240) <= 1 and abs(x1 - 124) <= 1 and abs(y1 - 259) <= 1
    assert set(annotation["labels"]) == {"necrosis", "tumour epithelium"}
    assert class_map_annotation(np.full((8, 8), BACKGROUND, np.uint8), CLASSES, (0, 0)) == {}
    small = np.full((32, 32), BACKGROUND, np.uint8)
    small[:3, :3] = 2
    assert class_map_annotation(small, CLASSES, (0, 0), min_poly_area=80) == {}
