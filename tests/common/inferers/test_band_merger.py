from __future__ import annotations

import numpy as np
import pytest
from monai.data.utils import iter_patch_position

from common.inferers.band_merger import BandMerger, argmax_first, tile_positions

C, BACKGROUND = 4, 3


def test_tile_positions_match_monai_with_end_padding():
    for size, patch, step in [(1024, 256, 128), (300, 128, 96), (200, 512, 384), (1000, 512, 384), (512, 128, 64)]:
        padded = size + (patch - size) % step  # MONAI's WSISlidingWindowSplitter pads the end to fit the grid
        expected = [p[0] for p in iter_patch_position((padded,), (patch,), overlap=patch - step)]
        assert tile_positions(size, patch, step) == expected
        assert expected[-1] < size <= expected[-1] + patch  # covers the slide, no tile wholly in the padding


def test_argmax_first_equals_numpy_including_ties():
    scores = np.random.default_rng(0).integers(0, 3, (5, 40, 30)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(argmax_first(scores), scores.argmax(axis=0))


def run(shape, patch, step, keep_share=0.7, seed=0, tissue=False, probabilities=None):
    """Random tile probabilities through the merger and through a slide-sized in-memory reference."""
    rng = np.random.default_rng(seed)
    rows, cols = (tile_positions(n, p, s) for n, p, s in zip(shape, patch, step))
    ph, pw = patch
    sums = np.zeros((C, shape[0] + ph, shape[1] + pw), np.float32)
    counts = np.zeros((shape[0] + ph, shape[1] + pw), np.int64)
    is_tissue = np.ones_like(counts, dtype=bool)
    written: list[tuple[int, np.ndarray, int]] = []  # top, labels, tiles added before the rows were written
    tops_added: list[int] = []

    def write_rows(top: int, labels: np.ndarray) -> None:
        written.append((top, labels, len(tops_added)))

    merger = BandMerger(shape, patch, rows, cols, C, BACKGROUND, write_rows, probabilities)
    kept = [(i, j) for i in range(len(rows)) for j in range(len(cols)) if rng.random() < keep_share]
    for i, j in kept:
        tile = rng.dirichlet(np.ones(C), size=patch).astype(np.float32).transpose(2, 0, 1).copy()
        # a few exact ties between the two best classes
        tile[1, :2, :2] = tile[0, :2, :2]
        flags = rng.random(patch) > 0.1 if tissue else None
        y, x = rows[i], cols[j]
        sums[:, y : y + ph, x : x + pw] += tile
        counts[y : y + ph, x : x + pw] += 1
        if flags is not None:
            is_tissue[y : y + ph, x : x + pw] = flags
        merger.add(i, j, tile, flags)
        tops_added.append(y)
    merger.finish()
    with np.errstate(invalid="ignore"):
        average = (sums / counts)[:, : shape[0], : shape[1]]
    reference = np.where(counts[: shape[0], : shape[1]] > 0, average.argmax(axis=0), BACKGROUND).astype(np.uint8)
    if tissue:
        reference[~is_tissue[: shape[0], : shape[1]]] = BACKGROUND
    for top, labels, before in written:  # no tile added after rows were written reaches into them
        assert all(later >= top + labels.shape[0] for later in tops_added[before:])
    assert [top for top, *_ in written] == sorted({top for top, *_ in written})  # top to bottom, once each
    classes = np.concatenate([labels for _, labels, _ in written])
    return merger, classes, reference, average


@pytest.mark.parametrize(
    ("shape", "patch", "step"),
    [((300, 260), (64, 64), (48, 48)), ((250, 333), (64, 48), (32, 40)), ((200, 190), (64, 64), (16, 64))],
)
def test_class_map_matches_an_in_memory_reference_except_exact_ties(shape, patch, step):
    merger, classes, reference, average = run(shape, patch, step, tissue=True)
    assert classes.shape == shape
    differ = classes != reference
    # the merger arg-maxes sums, the reference averages: dividing by the count can round two different
    # sums to one average; those exact ties are the only allowed difference
    top2 = np.sort(average, axis=0)[-2:]
    assert (top2[0][differ] == top2[1][differ]).all()
    assert differ.sum() <= 0.001 * differ.size
    expected_pixels = np.bincount(classes.ravel(), minlength=C)
    np.testing.assert_array_equal(merger.class_pixels, expected_pixels)
    assert (classes == BACKGROUND).any() and (classes != BACKGROUND).any()


def test_probabilities_are_the_average_and_untouched_where_no_tile_was_kept():
    shape = (130, 150)
    probabilities = np.full((1, C, *shape), np.nan, np.float32)
    _, _, _, average = run(shape, (64, 64), (48, 48), keep_share=0.5, seed=3, probabilities=probabilities)
    np.testing.assert_allclose(probabilities[0], average, rtol=1e-6, equal_nan=True)
    assert np.isnan(average).any()  # some pixels had no kept tile


def test_memory_is_bounded_by_the_band_formula_and_independent_of_height():
    patch, step, width = (64, 64), (48, 48), 400
    bound = 4 * C * ((patch[0] - step[0]) * width + patch[0] * patch[1])  # the docstring's formula
    peaks = [run((height, width), patch, step, keep_share=1.0)[0].peak_bytes for height in (200, 800)]
    assert peaks[0] == peaks[1] <= bound
    assert peaks[0] >= 4 * C * (patch[0] - step[0]) * (width - patch[1])  # the band is what it holds


def test_tiles_must_come_in_raster_order_and_match_the_tile_size():
    merger = BandMerger((100, 100), (64, 64), [0, 36], [0, 36], C, BACKGROUND, lambda top, labels: None)
    merger.add(1, 0, np.zeros((C, 64, 64), np.float32))
    with pytest.raises(ValueError, match="raster order"):
        merger.add(0, 1, np.zeros((C, 64, 64), np.float32))  # would touch rows already final
    with pytest.raises(ValueError, match="shape"):
        merger.add(1, 1, np.zeros((C, 32, 64), np.float32))
