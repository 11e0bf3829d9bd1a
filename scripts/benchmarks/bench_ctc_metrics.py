"""Time the Cell Tracking Challenge scoring on a crowded synthetic image.

Evaluation scores every validation image after every validation epoch, so the metric must keep up with
the network. This builds a reference with about ``--cells`` touching cells, a prediction with the
usual mistakes (shifted borders, missed, merged and spurious cells), and reports the median time of
``common.metrics.ctc.ctc_scores`` over ``--repeats`` runs.

    PYTHONPATH=. python scripts/benchmarks/bench_ctc_metrics.py --cells 1000 --size 2048
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from benchmark_utils import median_seconds, save_report
from scipy import ndimage as ndi

from common.data.synthetic.cells import voronoi_labels
from common.metrics.ctc import ctc_scores


def perturbed_prediction(rng: np.random.Generator, reference: np.ndarray) -> np.ndarray:
    """The reference shifted by 2 px, 5% of cells missed, 5% merged into a neighbour, 2% spurious blobs."""
    prediction = np.roll(reference, shift=(2, -1), axis=(0, 1))
    ids = np.unique(prediction)[1:]
    lookup = np.arange(int(reference.max()) + 1)
    lookup[rng.choice(ids, len(ids) // 20, replace=False)] = 0
    left, right = prediction[:, :-1], prediction[:, 1:]
    touching = (left != right) & (left > 0) & (right > 0)
    neighbours = np.unique(np.stack([left[touching], right[touching]], axis=1), axis=0)
    for a, b in neighbours[rng.choice(len(neighbours), len(ids) // 20, replace=False)]:
        lookup[b] = lookup[a]
    prediction = lookup[prediction]
    blobs = np.zeros_like(prediction)
    centres = rng.integers(0, reference.shape[0], size=(len(ids) // 50, 2))
    blobs[centres[:, 0], centres[:, 1]] = np.arange(1, len(centres) + 1) + int(reference.max())
    blobs = ndi.grey_dilation(blobs, size=(5, 5))
    return np.where(prediction > 0, prediction, blobs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", type=int, default=1000, help="number of reference cells")
    parser.add_argument("--size", type=int, default=2048, help="image height and width in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("reports/benchmarks/ctc_metrics.json"))
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    reference = voronoi_labels((args.size, args.size), args.cells, seed=args.seed, foreground=0.8)
    prediction = perturbed_prediction(rng, reference)
    seconds, scores = median_seconds(lambda: ctc_scores(reference, prediction), args.repeats)
    result = {
        "benchmark": "common.metrics.ctc.ctc_scores",
        "image_size": [args.size, args.size],
        "reference_cells": scores.n_reference,
        "predicted_cells": scores.n_prediction,
        "repeats": args.repeats,
        "median_seconds": seconds,
        "scores": scores.as_dict(),
    }
    save_report(result, args.output)
    print(
        f"ctc_scores on {args.size}x{args.size} with {scores.n_reference} cells: "
        f"median {result['median_seconds'] * 1000:.1f} ms over {args.repeats} runs "
        f"(SEG {scores.seg:.3f}, DET {scores.det:.3f}); saved to {args.output}"
    )


if __name__ == "__main__":
    main()
