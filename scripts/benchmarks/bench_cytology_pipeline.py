"""Throughput of the cytology bundle's two stages together at 1024x1024, and where the time goes.

    PYTHONPATH=. python scripts/benchmarks/bench_cytology_pipeline.py --images 4 --size 1024

Runs what inference.json runs on synthetic smears (CenterNet over the whole image, peak decoding,
batched crops through the classifier) and reports images per second and the share of time spent
outside the two networks (loading, normalisation, decoding, cropping). Random weights: throughput
does not depend on them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import timm
import torch
from benchmark_utils import save_report

from common.data.cell_crops import extract_crops
from common.data.cytology import BETHESDA_CLASSES
from common.data.synthetic.smears import synthesize_smear
from common.networks.centernet import CenterNet
from common.postprocessing.centernet import decode_centres
from common.transforms.intensity import NormalizeImageNet


class Stopwatch:
    """Accumulates wall time per named part, synchronising CUDA so GPU work is attributed correctly."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def time(self, name: str, function, *args):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--detector-backbone", default="resnet50")
    parser.add_argument("--classifier-backbone", default="efficientnet_b2")
    parser.add_argument("--classifier-input-size", type=int, default=224)
    parser.add_argument("--classifier-batch-size", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.0, help="detection threshold (0: classify top-k)")
    parser.add_argument("--top-k", type=int, default=100, help="cells classified per image")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path("reports/benchmarks/cytology_pipeline.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    detector = CenterNet(args.detector_backbone).to(device).eval()
    classifier = timm.create_model(args.classifier_backbone, num_classes=8).to(device).eval()
    rng = np.random.default_rng(0)
    smears = [synthesize_smear(rng, list(rng.choice(BETHESDA_CLASSES, 60)), args.size)[0] for _ in range(args.images + 1)]
    watch = Stopwatch(device)

    def prepare(pixels: np.ndarray) -> torch.Tensor:
        return NormalizeImageNet(input_max=255)(torch.from_numpy(pixels).permute(2, 0, 1)).to(device)

    def classify(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        logits = []
        for start in range(0, len(points), args.classifier_batch_size):
            crops = extract_crops(image, points[start : start + args.classifier_batch_size], 100, args.classifier_input_size, "reflect")
            logits.append(watch.time("classifier", classifier, crops))
        return torch.cat(logits)

    with torch.inference_mode():
        for index, pixels in enumerate(smears):
            if index == 1:  # the first image warms up kernels and allocators
                watch.seconds.clear()
                start = time.perf_counter()
            image = watch.time("load and normalise", prepare, pixels)
            heatmaps = watch.time("detector", detector, image[None])
            points, _ = watch.time("decode", decode_centres, heatmaps, 4, args.top_k, args.threshold)[0]
            watch.time("crop and classify", classify, image, torch.as_tensor(points, device=device))
        total = time.perf_counter() - start
    crop_and_classify = watch.seconds.pop("crop and classify")
    watch.seconds["cropping"] = crop_and_classify - watch.seconds["classifier"]
    networks = watch.seconds["detector"] + watch.seconds["classifier"]
    report = {
        "benchmark": "cytology two-stage pipeline",
        "image_size": [args.size, args.size],
        "images": args.images,
        "cells_classified_per_image": args.top_k,
        "device": str(device),
        "detector": args.detector_backbone,
        "classifier": args.classifier_backbone,
        "images_per_second": round(args.images / total, 3),
        "seconds_per_image": {k: round(v / args.images, 4) for k, v in watch.seconds.items()},
        "share_outside_networks": round(1 - networks / total, 3),
    }
    save_report(report, args.output)
    print(
        f"{args.images} images of {args.size}x{args.size} on {device}: {report['images_per_second']} images/s; "
        f"{100 * report['share_outside_networks']:.1f}% of the time outside the two networks; per image "
        + ", ".join(f"{k} {v:.3f} s" for k, v in report["seconds_per_image"].items())
    )


if __name__ == "__main__":
    main()
