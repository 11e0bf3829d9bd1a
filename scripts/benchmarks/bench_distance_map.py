"""Time the per-cell normalised distance map against the one-transform-per-colour version.

    PYTHONPATH=. python scripts/benchmarks/bench_distance_map.py --cells 300 --size 1024 --repeats 3 \\
        --output reports/benchmarks/distance_map.json

Both run on the same label image of touching Voronoi cells; the script checks they agree to 1e-6
and reports the median times and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.data.distance_map import normalized_distance_map, normalized_distance_map_per_cell
from common.data.synthetic.cells import voronoi_labels
from common.io.instance_outputs import atomic_write


def median_seconds(
    function: Callable[[np.ndarray], np.ndarray], labels: np.ndarray, repeats: int
) -> tuple[float, np.ndarray]:
    """Median wall time of ``function(labels)`` over ``repeats`` calls, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(labels)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


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
    per_cell_s, reference = median_seconds(normalized_distance_map_per_cell, labels, args.repeats)
    fast_s, fast = median_seconds(normalized_distance_map, labels, args.repeats)
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
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(), "numpy": np.__version__},
    }
    print(
        f"{n_cells} cells, {args.size}x{args.size}: per-cell {per_cell_s:.3f} s, grouped {fast_s:.3f} s, "
        f"speed-up {report['speedup']}x, max difference {max_difference:.1e}"
    )
    atomic_write(args.output, lambda f: f.write(json.dumps(report, indent=2).encode()))


if __name__ == "__main__":
    main()
