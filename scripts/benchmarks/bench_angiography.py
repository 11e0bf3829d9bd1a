"""Speed and memory of the angiography bundle's phase 2: Mask R-CNN on a RoPE ViT at 672 px.

    PYTHONPATH=. python scripts/benchmarks/bench_angiography.py --name vit_small_patch16_rope_224
    PYTHONPATH=. python scripts/benchmarks/bench_angiography.py --trunk sam3 --amp   # needs the sam3 package

Training is timed on full steps (forward with the RPN, box and mask losses, backward, AdamW update)
at the bundle's batch of 1 image per device; inference on single images in eval mode including
torchvision's resizing, RoI heads and mask pasting. Peak memory is the CUDA allocator's peak of each
phase on a GPU, and the process's peak resident memory on CPU (which covers everything run so far).
Random weights and one synthetic angiogram: speed does not depend on them (the segment labels of
the targets are arbitrary).
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

import numpy as np
import torch
from benchmark_utils import median_seconds, save_report

from common.data.synthetic.angiography import cass_labels, synthesize_angiogram
from common.networks.angiography import angiography_mask_rcnn


def sample(size: int, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A synthetic angiogram (3, size, size) and Mask R-CNN targets from its CASS segments."""
    frames, branches = synthesize_angiogram(np.random.default_rng(0), size)
    segments = cass_labels(branches)
    image = torch.from_numpy(frames[0]).float().expand(3, -1, -1).contiguous()
    ids = [int(i) for i in np.unique(segments) if i > 0]
    masks = torch.from_numpy(np.stack([segments == i for i in ids])).to(torch.uint8)
    boxes = []
    for mask in masks:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    labels = torch.tensor(ids)
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": labels, "masks": masks}
    return image.to(device), {k: v.to(device) for k, v in target.items()}


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    backbone = {"trunk": args.trunk} if args.trunk == "sam3" else {"trunk": "timm", "name": args.name}
    model = angiography_mask_rcnn(img_size=args.size, min_size=args.size, max_size=args.size,
                                  backbone_kwargs=backbone).to(device)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    image, target = sample(args.size, device)
    images, targets = [image] * args.batch_size, [target] * args.batch_size
    autocast = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": args.amp}

    def train_step() -> None:
        with torch.autocast(**autocast):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer() -> None:
        with torch.inference_mode(), torch.autocast(**autocast):
            model([image])

    results = {}
    for phase, function, n_images, mode in (("training", train_step, args.batch_size, True),
                                            ("inference", infer, 1, False)):  # fmt: skip
        model.train(mode)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, _ = median_seconds(function, args.repeats)
        results[phase] = {
            "images_per_second": round(n_images / seconds, 3),
            "peak_memory_mib": round(peak_memory_mib(device), 1),
        }
    return results


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--trunk", choices=("timm", "sam3"), default="timm")
    parser.add_argument("--name", default="vit_small_patch16_rope_224", help="timm RoPE ViT")
    parser.add_argument("--size", type=int, default=672, help="image side (the bundle's phase-2 size)")
    parser.add_argument("--batch-size", type=int, default=1, help="training images per step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast, as the bundle uses on GPUs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path("reports/benchmarks/angiography.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    results = measure(args, device)
    memory = "CUDA allocator peak" if device.type == "cuda" else "process peak RSS"
    report = {
        "benchmark": "angiography phase 2: Mask R-CNN on a RoPE ViT",
        "trunk": args.trunk if args.trunk == "sam3" else args.name,
        "image_size": args.size,
        "batch_size": args.batch_size,
        "device": str(device),
        "amp": args.amp,
        "memory": memory,
        **results,
    }
    save_report(report, args.output)
    train, infer = results["training"], results["inference"]
    print(
        f"{report['trunk']} on {device} at {args.size} px: training {train['images_per_second']} images/s "
        f"(peak {train['peak_memory_mib']} MiB), inference {infer['images_per_second']} images/s "
        f"(peak {infer['peak_memory_mib']} MiB; {memory})"
    )


if __name__ == "__main__":
    main()
