"""A federated run of the DINOCell bundle in NVFlare's simulator: 2 sites, 2 rounds, tiny data, CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

pytest.importorskip("nvflare", reason="federated training needs the fl extra: pip install .[fl]")

from common.data import cell_arrays
from common.data.synthetic.cells import generate_cell_dataset
from common.fl.job import JobSpec, write_job
from common.fl.persistor import initial_weights
from common.io.checkpoint import load_checkpoint
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow

BUNDLE = REPO_ROOT / "bundles" / "microscopy_dinocell_segmentation"
SITES = ("site-1", "site-2")
# the tiny ViT of the bundle's own tests: the run is about wiring, not accuracy
TINY = {
    "network_def#depth": 4,
    "network_def#embed_dim": 32,
    "network_def#num_heads": 2,
    "network_def#decoder_channels": [32, 16, 16, 8],
    "patch_size": [64, 64],
}
QUICK = {"pretrained": False, "num_workers": 0, "progress": False, "warmup_iterations": 2}
SIMULATOR_TIMEOUT_S = 240


def _site_dataset(root: Path, seed: int) -> Path:
    """A site's data as the bundle's docs prepare it: synthetic Cellpose folders, converted to arrays."""
    generate_cell_dataset(root / "raw", n_train=2, n_val=1, n_test=1, size=(96, 96), seed=seed)
    cell_arrays.main(
        [
            "--format",
            "cellpose",
            "--input",
            str(root / "raw"),
            "--splits",
            "train",
            "val",
            "--output",
            str(root / "arrays"),
        ]
    )
    return root / "arrays"


def _run_simulator(job: Path, workspace: Path) -> str:
    """``nvflare simulator`` in its own process group, killed by its PID if it outlives the timeout."""
    (workspace / "local").mkdir(parents=True)
    (workspace / "local" / "resources.json").write_bytes((job / "resources.json").read_bytes())
    command = [
        sys.executable,
        "-m",
        "nvflare.cli",
        "simulator",
        str(job),
        "-w",
        str(workspace),
        "-n",
        str(len(SITES)),
        "-t",
        str(len(SITES)),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = process.communicate(timeout=SIMULATOR_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(f"the simulator ran over {SIMULATOR_TIMEOUT_S} s:\n{log[-6000:]}")
    if process.returncode != 0:
        pytest.fail(f"the simulator failed ({process.returncode}):\n{log[-6000:]}")
    return log


@pytest.fixture(scope="module")
def federated(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fl")
    dataset_dirs = {site: str(_site_dataset(root / site, seed)) for seed, site in enumerate(SITES)}
    spec = JobSpec(
        BUNDLE, dataset_dirs, rounds=2, local_epochs=1, cross_site_eval=True, overrides={**TINY, **QUICK}
    )
    job = write_job(spec, root / "job")
    log = _run_simulator(job, root / "workspace")
    server_bundle = root / "workspace" / "server" / "simulate_job" / "app_server" / "config" / "bundle"
    assert "Round 1 finished" in log, log[-4000:]
    return {
        "root": root,
        "job": job,
        "bundle": server_bundle,
        "test_images": root / "site-1" / "raw" / "test",
    }


def test_global_model_is_trained(federated):
    """The global checkpoint is a plain state dict (weights_only) whose decoder moved away from the initial
    weights while the bundle's frozen backbone stayed as it was."""
    trained = load_checkpoint(federated["bundle"] / "models" / "model.pt")
    initial = initial_weights(BUNDLE, ["configs/train.json"], {**TINY, **QUICK})
    assert trained.keys() == initial.keys()
    changed = {name for name in initial if not torch.equal(trained[name], initial[name])}
    decoder = {name for name in initial if not name.startswith("backbone.")}
    assert changed and changed <= decoder
    assert len(changed) > len(decoder) // 2, f"only {len(changed)} of {len(decoder)} decoder tensors changed"


def test_every_site_scores_the_global_and_each_local_model(federated):
    scores = json.loads((federated["bundle"] / "eval" / "federated" / "site_scores.json").read_text())
    assert set(scores) == {"SRV_global", *SITES}
    for by_site in scores.values():
        assert set(by_site) == set(SITES)
        assert all(0.0 <= values["val_mse"] < 10.0 for values in by_site.values())
    table = (federated["bundle"] / "eval" / "federated" / "site_scores.md").read_text()
    assert "| global (server) |" in table and "| site-2 (local) |" in table
    # validating other models never replaced a site's own best checkpoint
    site_model = (
        federated["root"] / "workspace" / "site-1" / "simulate_job" / "app_site-1" / "config" / "bundle"
    )
    site_best = load_checkpoint(site_model / "models" / "model.pt")
    global_model = load_checkpoint(federated["bundle"] / "models" / "model.pt")
    assert any(not torch.equal(site_best[name], global_model[name]) for name in global_model)


def test_global_model_runs_in_the_bundle_inference(federated, tmp_path: Path):
    output_dir = tmp_path / "inference"
    workflow = ConfigWorkflow(
        config_file=str(BUNDLE / "configs" / "inference.json"),
        workflow_type="infer",
        logging_file=False,
        bundle_root=str(federated["bundle"]),
        input_dir=str(federated["test_images"]),
        output_dir=str(output_dir),
        num_workers=0,
        **TINY,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    image = next(federated["test_images"].glob("*_img.png"))
    assert next(output_dir.rglob(f"{image.stem}*instances*.tif")).is_file()
