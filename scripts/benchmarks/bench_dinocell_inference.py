"""Inference throughput of the DINOCell bundle: sliding-window network pass and watershed, in megapixels/s.

    PYTHONPATH=. python scripts/benchmarks/bench_dinocell_inference.py --size 1024 --repeats 2

Runs the same pieces inference.json wires together (ViTUNet, MONAI SlidingWindowInferer with 256 px
windows, 25% overlap and Gaussian blending, then the distance-map watershed) on a synthetic image, and
reports the network, watershed and end-to-end rates and the peak memory. Random weights unless
``--model-file`` is given: throughput does not depend on the weights.
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

import numpy as np
import torch
from benchmark_utils import median_seconds, save_report
from monai.inferers import SlidingWindowInferer

from common.data.synthetic.cells import synthesize_cell_image
from common.io.checkpoint import extract_state_dict, load_checkpoint
from common.networks.vit_unet import ViTUNet
from common.postprocessing.watershed import distance_map_watershed
from common.transforms.intensity import NormalizeImageNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image height and width")
    parser.add_argument("--backbone", default="vit_small_patch8_224")
    parser.add_argument("--model-file", type=Path, help="trained weights (default: random)")
    parser.add_argument("--roi", type=int, default=256, help="sliding-window size")
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="autocast to float16 on CUDA")
    parser.add_argument("--output", type=Path, default=Path("reports/benchmarks/dinocell_inference.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    network = ViTUNet(backbone=args.backbone).to(device).eval()
    if args.model_file:
        network.load_state_dict(extract_state_dict(load_checkpoint(args.model_file)))
    pixels, _ = synthesize_cell_image(np.random.default_rng(0), (args.size, args.size), "phase")
    image = torch.from_numpy(pixels)[None, None].float().expand(1, 3, -1, -1)  # grey repeated to RGB
    image = NormalizeImageNet(input_max=255)(image).to(device)
    inferer = SlidingWindowInferer(
        roi_size=(args.roi, args.roi), sw_batch_size=args.sw_batch_size, overlap=0.25, mode="gaussian", padding_mode="reflect"
    )

    def predict() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, enabled=args.amp and device.type == "cuda"):
            return inferer(image, network)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    network_s, dist_map = median_seconds(predict, args.repeats)
    dist_map = dist_map[0, 0].float().cpu().numpy()
    watershed_s, labels = median_seconds(lambda: distance_map_watershed(dist_map), args.repeats)
    megapixels = args.size * args.size / 1e6
    report = {
        "benchmark": "DINOCell sliding-window inference + watershed",
        "backbone": args.backbone,
        "image_size": [args.size, args.size],
        "roi": args.roi,
        "sw_batch_size": args.sw_batch_size,
        "device": str(device),
        "amp": args.amp,
        "network_seconds": round(network_s, 3),
        "watershed_seconds": round(watershed_s, 3),
        "network_megapixels_per_s": round(megapixels / network_s, 3),
        "watershed_megapixels_per_s": round(megapixels / watershed_s, 3),
        "end_to_end_megapixels_per_s": round(megapixels / (network_s + watershed_s), 3),
        "cells_found": int(labels.max()),
        "peak_process_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device.type == "cuda":
        report["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    save_report(report, args.output)
    print(
        f"{args.backbone} on {args.size}x{args.size} ({device}): network {network_s:.2f} s "
        f"({report['network_megapixels_per_s']} MP/s), watershed {watershed_s:.3f} s, end to end "
        f"{report['end_to_end_megapixels_per_s']} MP/s, peak memory {report['peak_process_memory_mib']} MiB; saved {args.output}"
    )


if __name__ == "__main__":
    main()
