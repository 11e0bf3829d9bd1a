"""Per-cell normalised distance maps, the regression target of distance-based cell segmentation.

For every cell ``k`` of an instance label image the target is the Euclidean distance transform of
``labels == k`` (distance from each pixel of ``k`` to the nearest pixel *not* in ``k``, with
:func:`scipy.ndimage.distance_transform_edt` semantics: the image border is not background)
divided by that cell's own maximum, so that every cell peaks at exactly 1 whatever its size.

The obvious computation runs one full-image transform per cell. :func:`instance_distance_transform`
gets the identical result from a handful of transforms, one per colour of the cell adjacency graph:

* For a pixel ``p`` of cell ``k`` let ``q`` be its nearest pixel outside ``k``. The pixel ``q'``
  one king move from ``q`` towards ``p`` is strictly closer to ``p`` (both coordinate differences
  shrink or stay zero, at least one shrinks), so ``q'`` lies in ``k``: ``q`` is 8-adjacent to ``k``.
* Hence, if no two cells of a group are 8-adjacent, ``q`` belongs to no cell of the group, and the
  transform of the union of the group's cells equals, on each of its cells, that cell's own
  transform (the union only adds pixels that are farther than ``q`` or not outside ``k``).

A greedy colouring of the 8-adjacency graph gives such groups; cells separated by background need a
single transform, densely touching cells typically four to seven.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["instance_distance_transform", "normalized_distance_map", "normalized_distance_map_per_cell"]

# Offsets (dy, dx) that visit every unordered pair of 8-neighbours exactly once.
_HALF_NEIGHBOURHOOD = ((0, 1), (1, 0), (1, 1), (1, -1))


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D instance label image, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must have an integer dtype (0 = background, k > 0 = cell k), got {labels.dtype}"
        )
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative (0 = background, k > 0 = cell k)")
    return labels


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel cells to ``1..n`` (background stays 0) so that per-cell tables are plain arrays."""
    if labels.max() <= labels.size:  # ids small enough for a dense lookup table: no sort needed
        present = np.bincount(labels.ravel().astype(np.intp), minlength=1) > 0
        present[0] = False
        lut = np.cumsum(present)
        return lut[labels], int(lut[-1])
    ids, inverse = np.unique(labels, return_inverse=True)
    compact = inverse.reshape(labels.shape)
    if ids[0] != 0:
        return compact + 1, len(ids)
    return compact, len(ids) - 1


def _colour_cells(compact: np.ndarray, n_cells: int) -> np.ndarray:
    """Colour of each cell (index 0 = background, -1) such that 8-adjacent cells differ."""
    height, width = compact.shape
    pairs = []
    for dy, dx in _HALF_NEIGHBOURHOOD:
        x0, x1 = max(0, -dx), width - max(0, dx)
        a = compact[: height - dy, x0:x1]
        b = compact[dy:, x0 + dx : x1 + dx]
        touching = (a != b) & (a > 0) & (b > 0)
        a, b = a[touching].astype(np.int64), b[touching]
        pairs.append(np.minimum(a, b) * (n_cells + 1) + np.maximum(a, b))
    neighbours: list[list[int]] = [[] for _ in range(n_cells + 1)]
    for pair in np.unique(np.concatenate(pairs)).tolist():
        a, b = divmod(pair, n_cells + 1)
        neighbours[a].append(b)
        neighbours[b].append(a)
    colours = [-1] * (n_cells + 1)
    # Welsh-Powell order (most neighbours first) keeps the number of colours, i.e. transforms, low.
    for cell in sorted(range(1, n_cells + 1), key=lambda c: -len(neighbours[c])):
        taken = {colours[n] for n in neighbours[cell]}
        colour = 0
        while colour in taken:
            colour += 1
        colours[cell] = colour
    return np.asarray(colours)


def _distance(compact: np.ndarray, n_cells: int) -> np.ndarray:
    """Each cell's own distance transform, from one transform per colour of non-adjacent cells."""
    distance = np.zeros(compact.shape, dtype=np.float32)
    if n_cells == 0:
        return distance
    if n_cells == 1 and compact.all():
        distance[:] = np.inf
        return distance
    pixel_colour = _colour_cells(compact, n_cells)[compact]  # -1 on background
    for colour in range(int(pixel_colour.max()) + 1):
        group = pixel_colour == colour
        distance[group] = ndimage.distance_transform_edt(group)[group]
    return distance


def instance_distance_transform(labels: np.ndarray) -> np.ndarray:
    """Distance from each cell pixel to the nearest pixel outside its own cell; 0 on background.

    Exactly ``distance_transform_edt(labels == k)`` on every cell ``k``, computed for all cells
    together (see the module docstring). A cell filling the whole image has no outside pixel; its
    distance is ``inf``.

    Args:
        labels: HxW integer instance labels, 0 = background; ids need not be contiguous.

    Returns:
        HxW float32 distances.

    Raises:
        ValueError: ``labels`` is not 2-D, not integer, or negative.
    """
    labels = _check_labels(labels)
    if labels.size == 0:
        return np.zeros(labels.shape, dtype=np.float32)
    return _distance(*_compact(labels))


def normalized_distance_map(labels: np.ndarray) -> np.ndarray:
    """Each cell's distance transform divided by its own maximum: float32 in [0, 1], exactly 1 at
    every cell's centre, 0 on background. A cell filling the whole image is 1 everywhere.

    Args:
        labels: HxW integer instance labels, 0 = background; ids need not be contiguous.

    Raises:
        ValueError: ``labels`` is not 2-D, not integer, or negative.
    """
    labels = _check_labels(labels)
    if labels.size == 0:
        return np.zeros(labels.shape, dtype=np.float32)
    compact, n_cells = _compact(labels)
    if n_cells == 1 and compact.all():  # no boundary inside the image: a flat interior
        return np.ones(labels.shape, dtype=np.float32)
    distance = _distance(compact, n_cells)
    peak = np.zeros(n_cells + 1, dtype=np.float32)
    np.maximum.at(peak, compact.ravel(), distance.ravel())
    peak[0] = 1.0  # background: 0 / 1
    return distance / peak[compact]


def normalized_distance_map_per_cell(labels: np.ndarray) -> np.ndarray:
    """Reference definition of :func:`normalized_distance_map`: one full-image transform per cell.

    Slow (linear in the number of cells); kept for tests and benchmarks to check the fast one against.
    """
    labels = _check_labels(labels)
    out = np.zeros(labels.shape, dtype=np.float32)
    for cell in np.unique(labels):
        if cell == 0:
            continue
        mask = labels == cell
        if mask.all():
            out[:] = 1.0
            continue
        distance = ndimage.distance_transform_edt(mask)
        out[mask] = (distance[mask] / distance.max()).astype(np.float32)
    return out
