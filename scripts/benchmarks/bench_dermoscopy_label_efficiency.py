"""Where MAE pretraining pays: Mask R-CNN from the MAE encoder vs from a random ViT, at 8, 16 and 32
labelled images, each cell the mean and standard deviation over seeds.

    PYTHONPATH=. python scripts/benchmarks/bench_dermoscopy_label_efficiency.py --work /tmp/label_efficiency

Synthetic dermoscopy images: a pool of labelled training images, unlabelled ones, and a held-out set
that neither stage sees. MAE pretrains once on every training image (labels unused), then the bundle's own train.json
fine-tunes each cell through ``monai.bundle run training``: the same optimizer steps for every cell
(``--steps``; fewer images means more epochs), the same recipe for both initialisations, validation on
the held-out images once at the end. A seed picks both the labelled subset and the training run.

The report is saved after every finished run, and a rerun with the same ``--work`` resumes: runs already in
``label_efficiency.json`` and an encoder already pretrained are reused (every run is deterministic for a
given thread count, so a resumed table is the table an uninterrupted run gives).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from benchmark_utils import save_report

from common.data.dermoscopy import read_isic_folder
from common.data.mask_to_coco import build_coco
from common.data.synthetic.dermoscopy import generate_dermoscopy_dataset
from common.io.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "bundles" / "dermoscopy_lesion_maskrcnn" / "configs"
METRICS = ("segm_AP", "jaccard")


def bundle(*args: str) -> None:
    """Run one ``monai.bundle`` command from the repository root, failing loudly."""
    subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=ROOT, check=True)


def write_coco(entries: list[dict[str, str]], path: Path, image_root: Path) -> None:
    text = json.dumps(build_coco(entries, image_root=image_root))
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def cells_of(runs: dict[str, dict[str, float]]) -> dict[str, dict[str, list[float]]]:
    """``{"<init>/<n>": {metric: [one value per seed]}}`` from the runs ``{"<init>/<n>/<seed>": metrics}``."""
    cells: dict[str, dict[str, list[float]]] = {}
    for key, metrics in runs.items():
        cell = cells.setdefault(key.rsplit("/", 1)[0], {name: [] for name in METRICS})
        for name in METRICS:
            cell[name].append(metrics[name])
    return cells


def finished_runs(report: Path) -> dict[str, dict[str, float]]:
    """The runs an earlier, interrupted invocation recorded in its report (none without a report)."""
    return json.loads(report.read_text()).get("runs", {}) if report.is_file() else {}


def write_report(args: argparse.Namespace, runs: dict[str, dict[str, float]]) -> None:
    """Print the table of finished cells (mean ± standard deviation over seeds) and save the report, so
    an interrupted run keeps what it measured."""
    cells = cells_of(runs)
    table = ["| labelled images | " + " | ".join(f"{m} MAE | {m} random" for m in METRICS) + " |"]
    table.append("|---" * (1 + 2 * len(METRICS)) + "|")
    for n in args.sizes:
        if f"mae/{n}" not in cells or f"random/{n}" not in cells:
            continue
        row = [str(n)]
        for name in METRICS:
            for init in ("mae", "random"):
                values = cells[f"{init}/{n}"][name]
                row.append(f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f} (n={len(values)})")
        table.append("| " + " | ".join(row) + " |")
    print("\n".join(table))
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    probe = json.loads((args.work / "probe.json").read_text())
    report = {"settings": settings, "runs": runs, "cells": cells, "probe": probe, "table": table}
    print(save_report(report, args.work / "label_efficiency.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for data, runs and the report")
    parser.add_argument("--vit", default="vit_tiny_patch16_224")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32], help="labelled training images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--held-out", type=int, default=12, help="validation images")
    parser.add_argument("--unlabelled", type=int, default=200, help="unlabelled images for MAE")
    parser.add_argument("--image-size", type=int, default=128, help="synthetic image side, pixels")
    parser.add_argument("--mae-epochs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=48, help="fine-tuning optimizer steps per cell")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--layer-decay", type=float, default=0.7)
    parser.add_argument("--rois", type=int, default=512, help="RoIs sampled per image for the box head")
    parser.add_argument("--encoder", type=Path, help="an MAE encoder of these images, instead of pretraining")
    args = parser.parse_args()

    data, test, size = args.work / "data", args.work / "test", args.image_size
    pool = max(args.sizes)
    generate_dermoscopy_dataset(data, pool, args.unlabelled, size, seed=0)
    generate_dermoscopy_dataset(test, args.held_out, 0, size, seed=1)
    labelled = data / "labelled"
    train_pool = read_isic_folder(labelled)
    val_json = args.work / "val.json"
    write_coco(read_isic_folder(test / "labelled"), val_json, test / "labelled")

    detector = [
        "--vit", args.vit, "--image_dir", str(labelled), "--working_size", str(size),
        "--train_sizes", f"[{size}]", "--max_size", str(2 * size), "--batch_size", str(args.batch_size),
        "--layer_decay", str(args.layer_decay), "--num_workers", "0", "--progress", "False",
        "--datalists#val#image_root", str(test / "labelled"), "--network_def#box_batch_size_per_image", str(args.rois),
    ]
    mae = args.work / "mae"
    encoder = args.encoder or mae / "models" / "ssl_vit_backbone.pt"
    pretrained = mae / "pretraining_finished"  # the encoder is also saved during pretraining: not a sign
    if args.encoder is None and not pretrained.is_file():
        bundle(
            "run", "pretraining", "--config_file", str(CONFIGS / "pretrain.json"), "--bundle_root", str(mae),
            "--unlabelled_dir", str(data), "--vit", args.vit, "--image_size", str(size), "--epochs",
            str(args.mae_epochs), "--warmup_epochs", str(max(args.mae_epochs // 10, 1)), "--batch_size", "16",
            "--network_def#decoder_dim", "128", "--network_def#decoder_depth", "2", "--network_def#decoder_heads",
            "4", "--num_workers", "0", "--progress", "False",
        )
        pretrained.touch()
    probe = [sys.executable, "-m", "common.metrics.probe", "--images", str(test / "labelled"), "--vit", args.vit,
             "--checkpoint", str(encoder), "--size", str(size), "--output", str(args.work / "probe.json")]
    subprocess.run(probe, cwd=ROOT, check=True)

    runs = finished_runs(args.work / "label_efficiency.json")
    for seed in args.seeds:  # every size once before the next seed, so an interrupted run has whole rows
        for n in args.sizes:
            subset = [train_pool[i] for i in sorted(np.random.default_rng(seed).permutation(pool)[:n])]
            coco = args.work / f"coco_n{n}_s{seed}"
            write_coco(subset, coco / "train.json", labelled)
            (coco / "val.json").write_bytes(val_json.read_bytes())
            epochs = max(round(args.steps * args.batch_size / n), 1)
            for init, checkpoint in (("mae", str(encoder)), ("random", "")):
                if f"{init}/{n}/{seed}" in runs:
                    continue
                run = args.work / f"{init}_n{n}_s{seed}"
                bundle(
                    "run", "training", "--config_file", str(CONFIGS / "train.json"), "--bundle_root", str(run),
                    "--coco_dir", str(coco), "--backbone_checkpoint", checkpoint, "--seed", str(seed),
                    "--epochs", str(epochs), "--val_interval", str(epochs), *detector,
                )
                metrics = json.loads((run / "runs" / "train" / "lesion_metrics.json").read_text())
                runs[f"{init}/{n}/{seed}"] = {name: metrics[name] for name in METRICS}
                write_report(args, runs)


if __name__ == "__main__":
    main()
