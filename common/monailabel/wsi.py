"""QuPath's tiled whole-slide inference, ``POST /infer/wsi/<model>`` (and ``/infer/wsi_v2/<model>``).

MONAI Label's own ``MONAILabelApp.infer_wsi`` tiles the requested region with OpenSlide, which the
collection does not need (its slides are read by :mod:`common.data.wsi`), and expects the inference task
to draw polygons itself. Here the region (``location`` and ``size`` in level-0 pixels, the whole slide
when ``size`` is 0 x 0) is cut into ``tile_size`` tiles, :meth:`SlideInferTask.predict_tiles` gives each
tile's class map with one network, and the outline of every tissue class becomes polygons in level-0
pixels through MONAI Label's ``FindContoursd``. The answer is what MONAI Label's ``infer_wsi`` returns,
so its endpoint sends it unchanged: ASAP XML for ``output=asap`` (what QuPath reads), DSA JSON for
``output=dsa``, the JSON itself otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monailabel.transform.post import FindContoursd
from monailabel.utils.others.pathology import create_asap_annotations_xml, create_dsa_annotations_json

from common.data.histopathology import mask_palette
from common.monailabel.infer import SlideInferTask

__all__ = ["class_map_annotation", "infer_wsi"]

_WRITERS = {"asap": create_asap_annotations_xml, "dsa": create_dsa_annotations_json}


def class_map_annotation(
    classes: np.ndarray, class_names: Sequence[str], location: Sequence[int], min_poly_area: float = 80
) -> dict[str, Any]:
    """MONAI Label's annotation of one tile: for every tissue class in the (height, width) class map
    (values ``0..C-1`` tissue, ``C`` background, as the bundle's masks), its outlines as polygons of
    level-0 ``[x, y]`` points offset by the tile's ``location``, polygons under ``min_poly_area`` pixels
    left out; ``{}`` when the tile holds no tissue polygon."""
    background = len(class_names)
    # FindContoursd outlines values above 0 and reads (width, height) arrays
    shifted = np.where(classes == background, 0, classes.astype(np.int32) + 1)
    colours = mask_palette(background)
    find = FindContoursd(
        "classes",
        min_positive=1,
        min_poly_area=min_poly_area,
        labels={name: index + 1 for index, name in enumerate(class_names)},
        colormap={name: colours[index].tolist() for index, name in enumerate(class_names)},
    )
    size = [int(classes.shape[1]), int(classes.shape[0])]
    found = find({"classes": shifted.T, "location": [int(v) for v in location], "size": size})
    return found.get("result", {})


def infer_wsi(task: SlideInferTask, image: str, request: Mapping[str, Any]) -> dict[str, Any]:
    """``{"file": annotation file or None, "params": JSON}`` for a ``/infer/wsi`` request on ``image``.

    The request's ``location``, ``size``, ``tile_size``, ``min_poly_area`` and ``output`` are those of
    MONAI Label's ``WSIInput``; ``level`` is not used: tiles are read at the bundle's resolution.
    """
    start = time.time()
    location, size = list(request.get("location") or [0, 0]), list(request.get("size") or [0, 0])
    if not any(size):
        location, size = [0, 0], list(task.slide_size(image))
    class_names = task.parser().get_parsed_content("class_names")
    annotations = [
        class_map_annotation(classes, class_names, box[:2], float(request.get("min_poly_area", 80)))
        for box, classes in task.predict_tiles(
            image, location, size, request.get("tile_size") or [1024, 1024]
        )
    ]
    result = {
        "name": f"MONAILabel Annotations - {task.entry.name} for {[*location, *size]}",
        "description": task.description,
        "model": task.entry.name,
        "location": location,
        "size": size,
        "annotations": annotations,
        "latencies": {"total": round(time.time() - start, 2)},
    }
    writer = _WRITERS.get(str(request.get("output")))
    file = writer(result, request.get("logging", "WARNING"))[0] if writer else None
    return {"file": file, "params": result}
