"""Speed of the dermoscopy bundle's two stages: MAE pretraining images per second, and Mask R-CNN
inference time per 512x512 image.

    PYTHONPATH=. python scripts/benchmarks/bench_dermoscopy.py --vit vit_base_patch16_224

MAE is timed on full training steps (forward, masked-patch loss, backward, AdamW update) at 224 px
with the bundle's decoder (512 wide, 8 blocks); Mask R-CNN on single 512x512 images in eval mode
with the bundle's inference size, including torchvision's resizing, RoI heads and mask pasting.
Random weights and synthetic images: speed does not depend on them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from benchmark_utils import median_seconds, save_report

from common.data.synthetic.dermoscopy import synthesize_dermoscopy_image
from common.networks.mae import MaskedAutoencoderViT
from common.networks.vitdet import vit_mask_rcnn


def mae_images_per_second(args: argparse.Namespace, device: torch.device) -> float:
    model = MaskedAutoencoderViT(args.vit, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    images = torch.randn(args.mae_batch_size, 3, 224, 224, device=device)

    def step() -> None:
        with torch.autocast(device.type, enabled=args.amp and device.type == "cuda"):
            loss = model(images)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds, _ = median_seconds(step, args.repeats)
    return args.mae_batch_size / seconds


def mask_rcnn_seconds_per_image(args: argparse.Namespace, device: torch.device) -> float:
    model = vit_mask_rcnn(2, args.vit, min_size=args.inference_size, max_size=1024).to(device).eval()
    pixels, _ = synthesize_dermoscopy_image(np.random.default_rng(0), 512, 1)
    image = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255).to(device)

    def infer() -> None:
        with torch.inference_mode(), torch.autocast(device.type, enabled=args.amp and device.type == "cuda"):
            model([image])

    seconds, _ = median_seconds(infer, args.repeats)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vit", default="vit_base_patch16_224")
    parser.add_argument("--mae-batch-size", type=int, default=32)
    parser.add_argument("--decoder-dim", type=int, default=512)
    parser.add_argument("--decoder-depth", type=int, default=8)
    parser.add_argument("--inference-size", type=int, default=768, help="Mask R-CNN's shorter side at inference")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--amp", action="store_true", help="mixed precision on CUDA, as the bundle uses")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path("reports/benchmarks/dermoscopy.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    report = {
        "benchmark": "dermoscopy MAE pretraining and Mask R-CNN inference",
        "vit": args.vit,
        "device": str(device),
        "amp": args.amp and device.type == "cuda",
        "mae": {"batch_size": args.mae_batch_size, "image_size": 224, "decoder": [args.decoder_dim, args.decoder_depth],
                "images_per_second": round(mae_images_per_second(args, device), 2)},
        "mask_rcnn": {"image_size": [512, 512], "inference_size": args.inference_size,
                      "seconds_per_image": round(mask_rcnn_seconds_per_image(args, device), 3)},
    }
    save_report(report, args.output)
    print(
        f"{args.vit} on {device}: MAE pretraining {report['mae']['images_per_second']} images/s "
        f"(batch {args.mae_batch_size} at 224 px); Mask R-CNN {report['mask_rcnn']['seconds_per_image']} s per "
        f"512x512 image (resized to {args.inference_size})"
    )


if __name__ == "__main__":
    main()
