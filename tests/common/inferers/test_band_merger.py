from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data.utils import iter_patch_position
from scipy import ndimage

from common.inferers.band_merger import BandMerger, StrideUpsampler, argmax_first, tile_positions

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


@pytest.mark.parametrize("stride", [1, 8])
def test_memory_is_bounded_by_the_band_formula_and_independent_of_height(stride):
    patch, step, width = (64, 64), (48, 48), 400
    low_width = -(-width // stride)
    bound = 4 * C * ((patch[0] - step[0]) // stride * low_width + patch[0] * patch[1] // stride**2)  # docstring's
    peaks = []
    for height in (200, 800):
        rows, cols = (tile_positions(n, p, s) for n, p, s in zip((height, width), patch, step))
        merger = BandMerger((height, width), patch, rows, cols, C, BACKGROUND, lambda top, labels: None, stride=stride)
        tile = np.full((C, patch[0] // stride, patch[1] // stride), 1 / C, np.float32)
        for i, j in itertools.product(range(len(rows)), range(len(cols))):
            merger.add(i, j, tile)
        merger.finish()
        peaks.append(merger.peak_bytes)
    assert peaks[0] == peaks[1] <= bound
    assert peaks[0] >= 4 * C * (patch[0] - step[0]) // stride * (width - patch[1]) // stride  # the band is what it holds


def test_tiles_must_come_in_raster_order_and_match_the_tile_size():
    merger = BandMerger((100, 100), (64, 64), [0, 36], [0, 36], C, BACKGROUND, lambda top, labels: None)
    merger.add(1, 0, np.zeros((C, 64, 64), np.float32))
    with pytest.raises(ValueError, match="raster order"):
        merger.add(0, 1, np.zeros((C, 64, 64), np.float32))  # would touch rows already final
    with pytest.raises(ValueError, match="shape"):
        merger.add(1, 1, np.zeros((C, 32, 64), np.float32))
    with pytest.raises(ValueError, match="multiples of the stride"):  # starts at 36 are not on the 8 px grid
        BandMerger((100, 100), (64, 64), [0, 36], [0, 36], C, BACKGROUND, lambda top, labels: None, stride=8)


def upsample(low: np.ndarray, stride: int, shape: tuple[int, int]) -> np.ndarray:
    """PyTorch's bilinear upsampling (align_corners=False, clamped edges), cropped to ``shape``."""
    tensor = torch.from_numpy(low)[None]
    return F.interpolate(tensor, scale_factor=stride, mode="bilinear", align_corners=False)[0, :, : shape[0], : shape[1]]


@pytest.mark.parametrize(("shape", "stride", "blocks"), [((203, 150), 8, [3, 1, 20, 2]), ((61, 47), 3, [5, 16])])
def test_stride_upsampler_equals_bilinear_interpolation_then_argmax(shape, stride, blocks):
    low_shape = (-(-shape[0] // stride), -(-shape[1] // stride))
    low = np.random.default_rng(1).dirichlet(np.ones(C), size=low_shape).astype(np.float32).transpose(2, 0, 1)
    low = np.ascontiguousarray(np.repeat(np.repeat(low[:, ::2, ::2], 2, 1), 2, 2)[:, : low_shape[0], : low_shape[1]])
    covered = np.ones(low_shape, bool)
    covered[:4, :3] = False  # no tile there: background, weighing nothing for its neighbours
    low[:, ~covered] = 0
    written, probabilities = [], np.full((1, C, *shape), np.nan, np.float32)
    upsampler = StrideUpsampler(shape, stride, BACKGROUND, lambda top, labels: written.append((top, labels)), probabilities)
    for top, bottom in itertools.pairwise(np.cumsum([0, *blocks])):
        upsampler.push(low[:, top:bottom], covered[top:bottom])
    assert [top for top, _ in written] == list(np.cumsum([0] + [len(labels) for _, labels in written])[:-1])
    labels = np.concatenate([labels for _, labels in written])
    weights = upsample(covered[None].astype(np.float32), stride, shape)[0].numpy()
    with np.errstate(invalid="ignore"):  # 0 / 0 where no blended neighbour is covered
        expected_probabilities = upsample(low, stride, shape).numpy() / weights
    own_covered = np.repeat(np.repeat(covered, stride, 0), stride, 1)[: shape[0], : shape[1]]
    expected = np.where(own_covered, expected_probabilities.argmax(0), BACKGROUND)
    top2 = np.sort(expected_probabilities, axis=0)[-2:]
    differ = labels != expected
    assert np.allclose(top2[0][differ], top2[1][differ], atol=1e-6)  # only ties
    np.testing.assert_allclose(probabilities[0][:, own_covered], expected_probabilities[:, own_covered], atol=1e-5)
    assert np.isnan(probabilities[0][:, ~own_covered]).all()
    assert (labels == BACKGROUND).any() and len(np.unique(labels)) >= 3


def test_output_stride_blending_agrees_with_full_resolution_blending_except_along_boundaries():
    """Tiles of a network at output stride 8 (smooth class scores that differ from tile to tile) blended
    at full resolution (each tile upsampled and softmaxed, as before) and at the output stride."""
    shape, patch, step, stride = (700, 520), (128, 128), (96, 96), 8
    rows, cols = (tile_positions(n, p, s) for n, p, s in zip(shape, patch, step))
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0 : shape[0] + patch[0] : stride, 0 : shape[1] + patch[1] : stride] / 100.0
    field = np.stack([np.sin(yy + k) * np.cos(xx * (k + 1) / 3) for k in range(C)]).astype(np.float32) * 3
    outputs: dict[int, list[np.ndarray]] = {1: [], stride: []}
    mergers = {
        s: BandMerger(shape, patch, rows, cols, C, BACKGROUND, lambda top, labels, s=s: outputs[s].append(labels), stride=s)
        for s in outputs
    }
    for i, y in enumerate(rows):
        for j, x in enumerate(cols):
            if (i, j) == (1, 1):
                continue  # skipped: its pixels are covered by neighbours
            window = (slice(y // stride, (y + patch[0]) // stride), slice(x // stride, (x + patch[1]) // stride))
            logits = torch.from_numpy(field[:, window[0], window[1]] + rng.normal(0, 0.3, (C, 1, 1)).astype(np.float32))
            full = F.interpolate(logits[None], size=patch, mode="bilinear", align_corners=False)[0]
            mergers[1].add(i, j, torch.softmax(full, 0).numpy())
            mergers[stride].add(i, j, torch.softmax(logits, 0).numpy())
    for merger in mergers.values():
        merger.finish()
    full, strided = (np.concatenate(outputs[s]) for s in (1, stride))
    agree = (full == strided).mean()
    area_change = np.abs(mergers[stride].class_pixels - mergers[1].class_pixels) / full.size
    assert agree >= 0.995, agree
    assert area_change.max() <= 0.002, area_change  # per class, as a share of the slide
    assert agree < 1  # the two blends do differ somewhere
    differ = full != strided
    edges = np.zeros_like(differ)  # pixels where the full-resolution class changes to the next one
    edges[:-1] |= full[:-1] != full[1:]
    edges[:, :-1] |= full[:, :-1] != full[:, 1:]
    assert ndimage.binary_dilation(edges, iterations=stride)[differ].all()  # within a stride of one
    assert mergers[stride].peak_bytes * 32 < mergers[1].peak_bytes
