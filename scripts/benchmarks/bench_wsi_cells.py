"""Whole-slide cell segmentation: the pipeline's own throughput and peak resident memory per slide shape.

    PYTHONPATH=. python scripts/benchmarks/bench_wsi_cells.py --shapes 2048x2048 8192x2048 2048x8192

Writes slides of packed disk-shaped cells whose pixels encode their normalised distance map in 24 bits
(R, G, B), and runs :class:`common.inferers.wsi_cells.WholeSlideCellSegmenter` on each in a fresh
subprocess with a stand-in network that decodes the map from the pixels: the figures are those of
reading, blending, the band watershed, the instance TIFF, the cell table and the overlay, not of a
network (DINOCell's ViT-S/8 costs are in the bundle's Speed and memory table). The peak is the process's
own ``VmHWM`` (``ru_maxrss`` would carry over the parent's peak across ``exec``). A slide four times
taller should hold the same; four times wider, about 4x the band watershed's ``peak_bytes`` more.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from benchmark_utils import save_report

SCALE = 2**24


def decoding_network(batch: torch.Tensor) -> torch.Tensor:
    """The distance map the tile's pixels encode (see :func:`write_cell_slide`)."""
    return ((batch[:, 0:1] * 65536 + batch[:, 1:2] * 256 + batch[:, 2:3]) / SCALE).float()


def write_cell_slide(path: Path, height: int, width: int) -> Path:
    """A pyramidal TIFF of disks (radius 4..9 px, one per 400 pixels) whose pixels encode their map."""
    from skimage.draw import disk

    from common.data.distance_map import normalized_distance_map
    from common.data.wsi import write_pyramid_tiff

    rng = np.random.default_rng(0)
    labels = np.zeros((height, width), np.int32)
    for index in range(1, height * width // 400 + 1):
        centre = (rng.integers(0, height), rng.integers(0, width))
        labels[disk(centre, rng.integers(4, 10), shape=labels.shape)] = index
    value = np.round(normalized_distance_map(labels).astype(np.float64) * (SCALE - 1)).astype(np.int64)
    del labels
    pixels = np.stack([value >> 16, (value >> 8) & 255, value & 255], axis=-1).astype(np.uint8)
    levels = [pixels]
    while max(levels[-1].shape[:2]) > 512:
        levels.append(levels[-1][::2, ::2])
    return write_pyramid_tiff(path, levels, mpp=0.5, tile_size=256)


def segment(args: argparse.Namespace) -> dict:
    """In the child process: segment ``args.child`` and report the summary with the peak memory."""
    from common.inferers.wsi_cells import WholeSlideCellSegmenter

    torch.set_num_threads(1)
    segmenter = WholeSlideCellSegmenter(
        decoding_network,
        args.child.parent / "out",
        patch_size=args.patch_size,
        overlap=0.25,
        workers=args.workers,
        thumbnail_size=args.thumbnail_size,
    )
    summary = segmenter(args.child)
    with open("/proc/self/status") as f:
        summary["peak_rss_mib"] = int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes", nargs="+", default=["2048x2048", "8192x2048", "2048x8192"], help="ROWSxCOLUMNS"
    )
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--thumbnail-size", type=int, default=512)
    parser.add_argument(
        "--workdir", type=Path, help="slides are kept and reused here (default: a temporary folder)"
    )
    parser.add_argument("--output", type=Path, default=Path("reports/benchmarks/wsi_cells.json"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(segment(args)))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_wsi_cells_"))
    workdir.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    results = []
    for shape in args.shapes:
        height, width = (int(v) for v in shape.split("x"))
        slide = workdir / f"cells_{height}x{width}.tif"
        if not slide.exists():
            write_cell_slide(slide, height, width)
        child = [sys.executable, __file__, *sys.argv[1:], "--child", str(slide)]
        output = subprocess.run(child, check=True, capture_output=True, text=True, env=environment).stdout
        summary = json.loads(output.strip().splitlines()[-1])
        tiles, seconds = summary["tiles"]["processed"], summary["seconds"]["total"]
        result = {
            "shape": [height, width],
            "cells": summary["cells"],
            "tiles": tiles,
            "seconds": round(seconds, 2),
            "tiles_per_s": round(tiles / seconds, 1),
            "peak_rss_mib": round(summary["peak_rss_mib"]),
            "peak_bytes": summary["peak_bytes"],
            "cells_reaching_the_margin": summary["cells_reaching_the_margin"],
        }
        results.append(result)
        print(
            f"{height}x{width}: {result['cells']} cells, {tiles} tiles in {result['seconds']} s = "
            f"{result['tiles_per_s']} tiles/s, peak RSS {result['peak_rss_mib']} MiB, "
            f"band watershed {summary['peak_bytes']['band_watershed'] / 2**20:.1f} MiB, "
            f"merger {summary['peak_bytes']['merger'] / 2**20:.1f} MiB",
            flush=True,
        )
    settings = {"patch_size": args.patch_size, "workers": args.workers, "thumbnail_size": args.thumbnail_size}
    print(f"saved {save_report({'settings': settings, 'results': results}, args.output)}")


if __name__ == "__main__":
    main()
