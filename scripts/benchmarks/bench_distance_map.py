"""Time the per-cell normalised distance map against the one-transform-per-colour version.

    PYTHONPATH=. python scripts/benchmarks/bench_distance_map.py --cells 300 --size 1024 --repeats 3 \\
        --output reports/benchmarks/distance_map.json

Both run on the same label image of touching Voronoi cells; the script checks they agree to 1e-6
and reports the median times and the speed-up.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from benchmark_utils import median_seconds, save_report

from common.data.distance_map import normalized_distance_map, normalized_distance_map_per_cell
from common.data.synthetic.cells import voronoi_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=300, help="Voronoi seeds (cells before masking)")
    parser.add_argument("--size", type=int, default=1024, help="image height and width")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("reports/benchmarks/distance_map.json"))
    args = parser.parse_args()

    labels = voronoi_labels((args.size, args.size), args.cells, seed=args.seed, foreground=0.8)
    n_cells = len(np.unique(labels)) - 1
    per_cell_s, reference = median_seconds(lambda: normalized_distance_map_per_cell(labels), args.repeats, warmup=False)
    fast_s, fast = median_seconds(lambda: normalized_distance_map(labels), args.repeats)
    max_difference = float(np.abs(fast - reference).max())
    if max_difference > 1e-6:
        raise SystemExit(f"results differ by {max_difference}: the fast distance map is wrong")

    report = {
        "image_size": [args.size, args.size],
        "cells": n_cells,
        "repeats": args.repeats,
        "per_cell_median_s": round(per_cell_s, 4),
        "grouped_median_s": round(fast_s, 4),
        "speedup": round(per_cell_s / fast_s, 1),
        "max_abs_difference": max_difference,
    }
    print(
        f"{n_cells} cells, {args.size}x{args.size}: per-cell {per_cell_s:.3f} s, grouped {fast_s:.3f} s, "
        f"speed-up {report['speedup']}x, max difference {max_difference:.1e}"
    )
    save_report(report, args.output)


if __name__ == "__main__":
    main()
