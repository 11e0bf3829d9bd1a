"""Tune the watershed thresholds and the smoothing of the map on validation data.

How high the seeds must be (``cells_max``) and where a cell ends (``cell_fill``) depend on how sharp the
trained network's distance maps are and on how crowded the cells are. Instead of guessing, a small grid
is scored with the dataset-level Cell Tracking Challenge OP_CSB on the validation predictions, and the
winner is saved beside the weights for inference to pick up with
:func:`common.postprocessing.watershed.load_watershed_thresholds`.

When the best value of a threshold sits on the edge of its grid the optimum may lie beyond it, so the
grid grows by one step past that edge and the search goes on, a few times at most. The Gaussian
smoothing of the map (``smooth_sigma``) shapes outlines more than it decides which cells are found,
so among the best threshold pairs for each width, the width with the best SEG wins.
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
from scipy.ndimage import gaussian_filter

from common.io.atomic import atomic_write
from common.metrics.ctc import aggregate_ctc, ctc_scores
from common.postprocessing.watershed import check_smooth_sigma, check_thresholds, distance_map_watershed
from common.utils import as_plane

__all__ = ["save_watershed_thresholds", "search_watershed_thresholds", "widen_grid"]

# the values a widened grid may reach: seeds above 0 (a seed threshold of 0 would seed the background),
# foreground below 1
_CELLS_MAX_RANGE = (0.01, 1.0)
_CELL_FILL_RANGE = (0.0, 0.99)


def widen_grid(grid: list[float], best: float, low: float, high: float) -> bool:
    """Add one value to ``grid`` past the edge that ``best`` sits on, one grid step further out.

    The step is the spacing of the two outermost values at that edge, and the new value is clipped to
    [``low``, ``high``]. Returns whether a value was added (not when ``best`` is inside the grid or the
    grid already reaches the limit); ``grid`` is left sorted.
    """
    values = sorted(grid)
    if len(values) < 2 or best not in (values[0], values[-1]):
        return False
    if best == values[-1]:
        candidate = best + values[-1] - values[-2]
    else:
        candidate = best - (values[1] - values[0])
    candidate = round(min(max(candidate, low), high), 6)
    if candidate in values:
        return False
    grid[:] = sorted([*values, candidate])
    return True


def _score(
    maps: Sequence[np.ndarray], references: Sequence[np.ndarray], cells_max: float, cell_fill: float, min_size: int
) -> dict[str, float]:
    overall = aggregate_ctc(
        [
            ctc_scores(reference, distance_map_watershed(dist_map, cells_max, cell_fill, min_size))
            for dist_map, reference in zip(maps, references)
        ]
    )
    if math.isnan(overall.op_csb):
        raise ValueError("the references contain no objects, so the thresholds cannot be scored")
    return {"SEG": overall.seg, "DET": overall.det, "OP_CSB": overall.op_csb}


def _select(rows: Sequence[dict[str, float]], sigmas: Sequence[float]) -> dict[str, float]:
    """Best OP_CSB per smoothing width, then the width with the best SEG; ties go to the row met first."""
    finalists = []
    for sigma in sigmas:
        candidates = [row for row in rows if row["smooth_sigma"] == sigma]
        finalists.append(max(candidates, key=lambda row: row["OP_CSB"]))
    return max(finalists, key=lambda row: row["SEG"])


def search_watershed_thresholds(
    dist_maps: Sequence[np.ndarray | torch.Tensor],
    references: Sequence[np.ndarray | torch.Tensor],
    cells_max_grid: Sequence[float],
    cell_fill_grid: Sequence[float],
    min_size: int = 0,
    smooth_sigma_grid: Sequence[float] = (0.0,),
    max_widenings: int = 4,
) -> dict[str, Any]:
    """Grid search for the watershed thresholds with the best dataset-level OP_CSB, and the smoothing
    width with the best SEG.

    Every pair with ``cell_fill < cells_max`` is tried for every smoothing width; ties go to the pair
    met first (grids in the order given, ``cells_max`` outermost, widened values last). While the
    winning ``cells_max`` or ``cell_fill`` sits on the edge of its grid, that grid is widened by
    :func:`widen_grid`, at most ``max_widenings`` times.

    Args:
        dist_maps: predicted distance maps, (H, W) or (1, H, W) each.
        references: ground-truth instance labels, one per map.
        cells_max_grid: candidate seed thresholds in (0, 1].
        cell_fill_grid: candidate foreground thresholds in [0, 1).
        min_size: smallest object kept, passed to the watershed.
        smooth_sigma_grid: candidate Gaussian smoothing widths of the map, in pixels (0: none).
        max_widenings: how many times the grids may grow past an edge (0: never).

    Returns:
        ``{"cells_max", "cell_fill", "min_size", "smooth_sigma", "SEG", "DET", "OP_CSB", "cells_max_grid",
        "cell_fill_grid", "grid"}``, the two grids as finally searched, and ``grid`` listing
        ``{"smooth_sigma", "cells_max", "cell_fill", "SEG", "DET", "OP_CSB"}`` for every triple tried.

    Raises:
        ValueError: no maps, maps and references differ in number, a threshold lies outside [0, 1], a
            negative smoothing width, no pair satisfies ``cell_fill < cells_max``, or the references
            hold no object at all.
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
    sigmas = [float(sigma) for sigma in smooth_sigma_grid]
    if not sigmas:
        raise ValueError("smooth_sigma_grid needs at least one width (0.0 for no smoothing)")
    for sigma in sigmas:
        check_smooth_sigma(sigma)
    if max_widenings < 0:
        raise ValueError(f"max_widenings must be >= 0, got {max_widenings}")

    planes = [as_plane(dist_map, "distance map", dtype=np.float32) for dist_map in dist_maps]
    labels = [as_plane(reference, "reference", dtype=np.int32) for reference in references]
    smoothed = {s: [gaussian_filter(p, s, mode="nearest") if s > 0 else p for p in planes] for s in sigmas}
    cells_max_values = [float(v) for v in cells_max_grid]
    cell_fill_values = [float(v) for v in cell_fill_grid]
    scored: dict[tuple[float, float, float], dict[str, float]] = {}
    for _ in range(max_widenings + 1):
        for sigma in sigmas:
            for cells_max in cells_max_values:
                for cell_fill in cell_fill_values:
                    if cell_fill < cells_max and (sigma, cells_max, cell_fill) not in scored:
                        scores = _score(smoothed[sigma], labels, cells_max, cell_fill, min_size)
                        row = {"smooth_sigma": sigma, "cells_max": cells_max, "cell_fill": cell_fill, **scores}
                        scored[(sigma, cells_max, cell_fill)] = row
        best = _select(list(scored.values()), sigmas)
        widened_max = widen_grid(cells_max_values, best["cells_max"], *_CELLS_MAX_RANGE)
        widened_fill = widen_grid(cell_fill_values, best["cell_fill"], *_CELL_FILL_RANGE)
        if not (widened_max or widened_fill):
            break
    return {
        "cells_max": best["cells_max"],
        "cell_fill": best["cell_fill"],
        "min_size": int(min_size),
        "smooth_sigma": best["smooth_sigma"],
        "SEG": best["SEG"],
        "DET": best["DET"],
        "OP_CSB": best["OP_CSB"],
        "cells_max_grid": sorted(cells_max_values),
        "cell_fill_grid": sorted(cell_fill_values),
        "grid": list(scored.values()),
    }


def save_watershed_thresholds(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the search result as JSON, atomically, where ``load_watershed_thresholds`` will read it."""
    text = json.dumps(result, indent=2) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
