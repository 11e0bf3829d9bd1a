"""Tune the two watershed thresholds on validation data.

How high the seeds must be (``cells_max``) and where a cell ends (``cell_fill``) depend on how sharp the
trained network's distance maps are and on how crowded the cells are. Instead of guessing, a small grid
is scored with the dataset-level Cell Tracking Challenge OP_CSB on the validation predictions, and the
winner is saved beside the weights for inference to pick up with
:func:`common.postprocessing.watershed.load_watershed_thresholds`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.io.atomic import atomic_write
from common.metrics.ctc import aggregate_ctc, ctc_scores
from common.postprocessing.watershed import check_thresholds, distance_map_watershed

__all__ = ["search_watershed_thresholds", "save_watershed_thresholds"]


def search_watershed_thresholds(
    dist_maps: Sequence[np.ndarray | torch.Tensor],
    references: Sequence[np.ndarray | torch.Tensor],
    cells_max_grid: Sequence[float],
    cell_fill_grid: Sequence[float],
    min_size: int = 0,
) -> dict[str, Any]:
    """Grid search for the watershed thresholds with the best dataset-level OP_CSB.

    Every pair with ``cell_fill < cells_max`` is tried; ties go to the pair met first (grids in the
    order given, ``cells_max`` outermost).

    Args:
        dist_maps: predicted distance maps, (H, W) or (1, H, W) each.
        references: ground-truth instance labels, one per map.
        cells_max_grid: candidate seed thresholds in (0, 1].
        cell_fill_grid: candidate foreground thresholds in [0, 1).
        min_size: smallest object kept, passed to the watershed.

    Returns:
        ``{"cells_max", "cell_fill", "min_size", "SEG", "DET", "OP_CSB", "grid"}`` where ``grid`` lists
        ``{"cells_max", "cell_fill", "SEG", "DET", "OP_CSB"}`` for every pair tried.

    Raises:
        ValueError: no maps, maps and references differ in number, a threshold lies outside [0, 1], no
            pair satisfies ``cell_fill < cells_max``, or the references hold no object at all.
    """
    if not dist_maps or len(dist_maps) != len(references):
        raise ValueError(
            f"need one reference per distance map and at least one map, got {len(dist_maps)} maps "
            f"and {len(references)} references"
        )
    pairs = [(hi, lo) for hi in cells_max_grid for lo in cell_fill_grid if lo < hi]
    if not pairs:
        raise ValueError(
            f"no threshold pair with cell_fill < cells_max in cells_max_grid={list(cells_max_grid)} "
            f"and cell_fill_grid={list(cell_fill_grid)}"
        )
    for cells_max, cell_fill in pairs:
        check_thresholds(cells_max, cell_fill)

    grid: list[dict[str, float]] = []
    best: dict[str, float] | None = None
    for cells_max, cell_fill in pairs:
        overall = aggregate_ctc(
            [
                ctc_scores(reference, distance_map_watershed(dist_map, cells_max, cell_fill, min_size))
                for dist_map, reference in zip(dist_maps, references)
            ]
        )
        if math.isnan(overall.op_csb):
            raise ValueError("the references contain no objects, so the thresholds cannot be scored")
        row = {
            "cells_max": float(cells_max),
            "cell_fill": float(cell_fill),
            "SEG": overall.seg,
            "DET": overall.det,
            "OP_CSB": overall.op_csb,
        }
        grid.append(row)
        if best is None or row["OP_CSB"] > best["OP_CSB"]:
            best = row
    return {
        "cells_max": best["cells_max"],
        "cell_fill": best["cell_fill"],
        "min_size": int(min_size),
        "SEG": best["SEG"],
        "DET": best["DET"],
        "OP_CSB": best["OP_CSB"],
        "grid": grid,
    }


def save_watershed_thresholds(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the search result as JSON, atomically, where ``load_watershed_thresholds`` will read it."""
    text = json.dumps(result, indent=2) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
