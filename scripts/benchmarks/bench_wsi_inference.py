"""Whole-slide segmentation throughput and memory: tiles/s, the same against the bare decode of the slide
(the floor), the share of the time spent outside the network, and the peak resident memory per slide size.

    PYTHONPATH=. python scripts/benchmarks/bench_wsi_inference.py --sizes 10000 20000 40000

Writes synthetic H&E-like pyramidal slides (tissue islands on glass, 512 px JPEG tiles) of each size, tile
by tile from a lazily computed image, so no slide-sized array exists, and runs
:func:`common.inferers.wsi.segment_slide` on them the way a bundle would (512 px tiles, 25% overlap,
ImageNet normalisation), each in a fresh subprocess so that its peak resident memory (sampled every
20 ms) is its own. ``--backbone const`` (default) is a network returning constant scores at output
stride 8, so the figure is the pipeline's own throughput (reading, tissue detection, upsampling, softmax,
blending, class map, pyramid TIFF, overlay), blended at the output stride unless ``--blend full``;
``conv`` is a two-layer strided conv net; a timm name (e.g.
``resnet101``, with ``--amp`` on a GPU) builds a DeepLab-v2 on it. The floor is decoding every JPEG tile
of level 0 once with tifffile on one thread. The measured process runs with ``MALLOC_ARENA_MAX=2``
(``--malloc-arena-max``): glibc's default of 8 arenas per core lets the decoding threads' arenas
fragment, which measured as ~200 MiB more peak RSS on a 20k² slide than on a 10k² one, and none with 2.
It also runs torch on one intra-op thread (``--torch-threads``): with the constant network torch only
preprocesses, and on a loaded machine each of its parallel regions waited for a descheduled thread (a
softmax of 8 tiles at stride 8 took 16 ms instead of 0.4 ms), which is why "network" seconds were 1.9 s
for 371 tiles of a network that does nothing.

Generating the slides takes longer than segmenting them (a 40k² slide: over 10 minutes on a loaded core):
``--workdir DIR --keep-slides`` keeps them in ``DIR`` and reuses them on the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import numpy as np
import tifffile
import torch
from benchmark_utils import save_report

from common.data.wsi import write_pyramid_tiff
from common.inferers.wsi import BLENDS, segment_slide
from common.transforms.intensity import NormalizeImageNet

NUM_CLASSES = 5  # four tissue classes and background
_PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


class SyntheticSlide:
    """One pyramid level of a synthetic slide, computed for the region asked: smooth tissue islands
    (eosin pink and haematoxylin purple areas with pixel noise) on slightly noisy glass."""

    def __init__(self, size: int, downsample: int = 1) -> None:
        self.downsample = downsample
        side = -(-size // downsample)
        self.shape = (side, side, 3)

    def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
        rows, cols = index
        y = np.arange(rows.start, min(rows.stop, self.shape[0]), dtype=np.int64)[:, None] * self.downsample
        x = np.arange(cols.start, min(cols.stop, self.shape[1]), dtype=np.int64)[None, :] * self.downsample
        tissue = np.sin(y / 700.0) + np.sin(x / 550.0) + 0.5 * np.sin((x + y) / 400.0) > 0.4
        purple = np.sin(x / 260.0) * np.sin(y / 310.0) > 0.2
        noise = ((y * 73856093) ^ (x * 19349663)) % 41 - 20  # fixed per level-0 pixel
        colour = np.where(purple[..., None], (120, 60, 160), (225, 140, 185)) + noise[..., None]
        glass = np.broadcast_to(240 + noise[..., None] // 4, colour.shape)
        return np.clip(np.where(tissue[..., None], colour, glass), 0, 255).astype(np.uint8)


def write_synthetic_slide(path: Path, size: int, min_side: int = 1024) -> Path:
    levels = [SyntheticSlide(size)]
    while levels[-1].shape[0] > min_side:
        levels.append(SyntheticSlide(size, levels[-1].downsample * 2))
    return write_pyramid_tiff(path, levels, mpp=0.5, tile_size=512, compression="jpeg")


class ConstantNetwork(torch.nn.Module):
    """Constant class scores at output stride 8: the pipeline's cost with a network that costs nothing."""

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        height, width = batch.shape[-2] // 8, batch.shape[-1] // 8
        scores = torch.arange(NUM_CLASSES, dtype=batch.dtype, device=batch.device)
        return scores[None, :, None, None].expand(batch.shape[0], -1, height, width).contiguous()


def build_network(backbone: str) -> tuple[torch.nn.Module, str]:
    if backbone == "const":
        return ConstantNetwork(), "constant scores at output stride 8 (the pipeline alone)"
    if backbone == "conv":
        network = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, NUM_CLASSES, 1),
        )
        return network, "tiny conv net: two strided 3x3 convolutions (16, 32 channels), output stride 4"
    from common.networks.deeplab_v2 import DeepLabV2

    network = DeepLabV2(NUM_CLASSES, backbone=backbone, pretrained=False)
    return network, f"DeepLabV2 on {backbone}, output stride 8"


def decode_seconds(slide: Path) -> tuple[float, float, int]:
    """Seconds and CPU seconds to decode every tile of level 0 once on one thread (the floor), and the
    tile count."""
    with tifffile.TiffFile(slide) as tif:
        page = tif.series[0].levels[0].keyframe
        start, cpu = time.perf_counter(), time.process_time()
        count = sum(1 for _ in page.segments(maxworkers=1))
        return time.perf_counter() - start, time.process_time() - cpu, count


class PeakRSS:
    """Highest resident set size (Linux /proc) seen while the block runs, sampled in a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak_mib = interval, 0.0
        self._stop = threading.Event()

    @staticmethod
    def current_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_MIB

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.current_mib())
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.current_mib())


def segment(args: argparse.Namespace) -> dict[str, Any]:
    """One slide in this process: the segmenter's summary and the peak resident memory."""
    device = torch.device(args.device)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    network, _ = build_network(args.backbone)
    network = network.to(device).eval()
    baseline = PeakRSS.current_mib()
    cpu = time.process_time()
    with PeakRSS() as rss:
        summary = segment_slide(
            args.child,
            network,
            args.child.parent / "out",
            NUM_CLASSES,
            patch_size=args.patch_size,
            overlap=args.overlap,
            batch_size=args.batch_size,
            device=device,
            amp=args.amp,
            channels_last=args.amp,
            workers=args.workers,
            preprocess=NormalizeImageNet(input_max=255),
            blend=args.blend,
        )
    cpu = time.process_time() - cpu  # all threads: what the pipeline costs whatever the load
    return {"summary": summary, "rss_before_mib": baseline, "peak_rss_mib": rss.peak_mib, "cpu_seconds": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000, 40000], help="slide sides")
    parser.add_argument("--backbone", default="const", help="'const', 'conv' or a timm name for DeepLab-v2")
    parser.add_argument("--patch-size", type=int, default=512)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="threads decoding tiles ahead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="autocast the forward pass, channels-last")
    parser.add_argument("--blend", choices=BLENDS, default="output_stride", help="where tiles are averaged")
    parser.add_argument(
        "--malloc-arena-max",
        type=int,
        default=2,
        help="glibc MALLOC_ARENA_MAX of the measured process (0: glibc's default, 8 per core); with the "
        "default, arenas of the decoding threads fragment and the peak RSS grows with the slide",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch's intra-op threads in the measured process (0: torch's default, one per core). With the "
        "constant network only the preprocessing runs in torch, and the decoding threads already take the "
        "cores: on a loaded machine each of torch's parallel regions then waits for a descheduled thread",
    )
    parser.add_argument("--workdir", type=Path, help="for slides and outputs (default: a temporary folder)")
    parser.add_argument(
        "--keep-slides",
        action="store_true",
        help="keep the generated slides in --workdir and reuse those already there (a 40k² slide takes minutes "
        "to write)",
    )
    parser.add_argument("--output", type=Path, default=Path("reports/benchmarks/wsi_inference.json"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # segment this slide, print JSON
    args = parser.parse_args()
    if args.keep_slides and args.workdir is None:
        parser.error("--keep-slides needs --workdir")
    if args.child is not None:
        print(json.dumps(segment(args)))
        return

    _, network_description = build_network(args.backbone)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_wsi_"))
    child = [sys.executable, __file__, *sys.argv[1:]]
    environment = dict(os.environ)
    if args.malloc_arena_max:
        environment["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
    results: list[dict[str, Any]] = []
    try:
        for size in args.sizes:
            start = time.perf_counter()
            slide = workdir / f"synthetic_{size}.tif"
            if not (args.keep_slides and slide.is_file()):
                write_synthetic_slide(slide, size)
            write_seconds = time.perf_counter() - start
            load = os.getloadavg()[0]
            floor, floor_cpu, tiff_tiles = decode_seconds(slide)
            run = subprocess.run(
                [*child, "--child", str(slide)], check=True, capture_output=True, text=True, env=environment
            )
            measured = json.loads(run.stdout.strip().splitlines()[-1])
            summary = measured["summary"]
            seconds, network_seconds = summary["seconds"]["total"], summary["seconds"]["network"]
            tiles = summary["tiles"]
            results.append(
                {
                    "size": [size, size],
                    "slide_file_mib": round(slide.stat().st_size / 2**20, 1),
                    "slide_write_seconds": round(write_seconds, 1),
                    "tiles_processed": tiles["processed"],
                    "tiles_skipped": tiles["skipped"],
                    "seconds": round(seconds, 2),
                    "network_seconds": round(network_seconds, 2),
                    "share_outside_network": round(1.0 - network_seconds / seconds, 3),
                    "tiles_per_s": round(tiles["processed"] / seconds, 2),
                    "megapixels_per_s": round(size * size / 1e6 / seconds, 2),
                    "decode_seconds": round(floor, 2),
                    "decode_tiles_per_s": round(tiff_tiles / floor, 1),
                    "seconds_over_decode": round(seconds / floor, 2),
                    "cpu_seconds": round(measured["cpu_seconds"], 2),
                    "decode_cpu_seconds": round(floor_cpu, 2),
                    "cpu_over_decode_cpu": round(measured["cpu_seconds"] / floor_cpu, 2),
                    "rss_before_mib": round(measured["rss_before_mib"], 1),
                    "peak_rss_mib": round(measured["peak_rss_mib"], 1),
                    "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)],  # before, after
                }
            )
            r = results[-1]
            print(
                f"{size}x{size}: {r['tiles_processed']} tiles (+{r['tiles_skipped']} glass skipped) in "
                f"{r['seconds']} s = {r['tiles_per_s']} tiles/s, {r['megapixels_per_s']} MP/s; network "
                f"{r['network_seconds']} s, {100 * r['share_outside_network']:.0f}% of the time outside it; "
                f"bare decode of all {tiff_tiles} JPEG tiles {r['decode_seconds']} s "
                f"({r['decode_tiles_per_s']} tiles/s), pipeline/decode {r['seconds_over_decode']}x "
                f"(CPU seconds {r['cpu_seconds']} / {r['decode_cpu_seconds']} = {r['cpu_over_decode_cpu']}x); "
                f"peak RSS {r['peak_rss_mib']} MiB; load {r['load_average_1min'][0]} -> {r['load_average_1min'][1]}",
                flush=True,
            )
            if not args.keep_slides:
                slide.unlink()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "benchmark": "whole-slide segmentation (prefetching tile reader + band merger)",
        "network": network_description,
        "patch_size": args.patch_size,
        "overlap": args.overlap,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": args.device,
        "amp": args.amp,
        "blend": args.blend,
        "malloc_arena_max": args.malloc_arena_max or None,
        "torch_threads": args.torch_threads or torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "slides": results,
        "peak_rss_growth_mib": round(results[-1]["peak_rss_mib"] - results[0]["peak_rss_mib"], 1),
    }
    save_report(report, args.output)
    print(
        f"network: {network_description}; peak RSS growth from the smallest to the largest slide "
        f"{report['peak_rss_growth_mib']} MiB; saved {args.output}"
    )


if __name__ == "__main__":
    main()
