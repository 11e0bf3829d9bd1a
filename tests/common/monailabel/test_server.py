"""The real MONAI Label server, started once as a subprocess with the app, a datastore of one synthetic
image per bundle and tiny networks; driven through its REST API as a viewer would."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from common.data.angiography import CASS_CATEGORIES
from common.io.checkpoint import load_checkpoint, save_checkpoint
from common.monailabel.bundles import BUNDLES, label_names
from tests.common.monailabel.conftest import (
    ANGIOGRAM_SIZE,
    IMAGES,
    SIZE,
    SLIDE_SIZE,
    SMEAR_SIZE,
    write_studies,
    write_untrained_weights,
)
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow

COLD = "microscopy_dinocell_segmentation"  # starts without weights
SEGMENTS = "angiography_cass_segmentation"
VESSELS = "angiography_cass_segmentation_vessels"  # starts without weights
IMAGE_BUNDLES = ["dermoscopy_lesion_maskrcnn", "cytology_bethesda_detection", SEGMENTS]
SLIDE = "pathology_wsss_deeplab"
TIMEOUT = 120
IMAGE_SIZES = {
    "dermoscopy_lesion_maskrcnn": (SIZE, SIZE),
    "cytology_bethesda_detection": (SMEAR_SIZE, SMEAR_SIZE),
    SEGMENTS: (ANGIOGRAM_SIZE, ANGIOGRAM_SIZE),
    VESSELS: (ANGIOGRAM_SIZE, ANGIOGRAM_SIZE),
}


def _labels(name: str) -> dict[str, int]:
    """The label names a model's metadata gives."""
    entry = BUNDLES[name]
    return label_names(REPO_ROOT / "bundles" / entry.folder, entry.output)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, url: str, root: Path, truth: dict[str, np.ndarray]) -> None:
        self.url, self.root, self.truth = url, root, truth

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=TIMEOUT, **kwargs)

    def infer(self, model: str, image: str = "", output: str = "image", **kwargs) -> requests.Response:
        return self.post(f"/infer/{model}", params={"image": image, "output": output}, **kwargs)

    def info(self) -> dict:
        response = requests.get(self.url + "/info/", timeout=TIMEOUT)
        response.raise_for_status()
        return response.json()

    def save_label(self, image: str, label: np.ndarray, model: str, **region: list[int]) -> None:
        buffer = io.BytesIO()
        Image.fromarray(label).save(buffer, format="PNG")
        response = requests.put(
            self.url + "/datastore/label",
            params={"image": image, "tag": "final"},
            files={"label": ("label.png", buffer.getvalue(), "image/png")},
            data={"params": json.dumps({"model": model, **region})},
            timeout=TIMEOUT,
        )
        response.raise_for_status()

    def weights_file(self, model: str) -> Path:
        entry = BUNDLES[model]
        return self.root / "models" / entry.folder / entry.weights[0]

    def weights(self, model: str) -> bytes:
        return hashlib.sha256(self.weights_file(model).read_bytes()).digest()


def _label(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array(Image.open(io.BytesIO(response.content)))


@pytest.fixture(scope="module")
def server(tmp_path_factory, overrides_file) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("monailabel")
    truth = write_studies(root / "studies")
    for name in [*IMAGE_BUNDLES, SLIDE]:
        write_untrained_weights(root / "models", name)
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "common.monailabel",
        "serve",
        "--studies",
        str(root / "studies"),
        "--models-dir",
        str(root / "models"),
        "--overrides",
        str(overrides_file),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = (root / "server.log").open("w")
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert process.poll() is None, (root / "server.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "server did not start"
            try:
                if requests.get(url + "/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        yield Server(url, root, truth)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        log.close()


def test_info_lists_every_bundle_with_its_labels(server: Server):
    info = server.info()
    assert set(info["models"]) == set(BUNDLES)
    for name, model in info["models"].items():
        assert model["labels"] == _labels(name)
    assert info["models"][SLIDE]["labels"]["necrosis"] == 1
    assert info["models"]["cytology_bethesda_detection"]["labels"]["SCC"] == 8
    assert info["models"][SEGMENTS]["labels"] == {name: i for i, name in enumerate(CASS_CATEGORIES, start=1)}
    assert info["models"][VESSELS]["labels"] == {"vessel": 1}
    for cold in (COLD, VESSELS):
        assert info["models"][cold]["trained"] is False and "untrained" in info["models"][cold]["description"]
    assert set(info["trainers"]) == {COLD, "dermoscopy_lesion_maskrcnn", SLIDE, SEGMENTS, VESSELS}
    assert "flip_disagreement" in info["strategies"]


@pytest.mark.parametrize("name", IMAGE_BUNDLES)
def test_inference_on_an_uploaded_and_a_datastore_image(server: Server, name: str):
    image_id = Path(IMAGES[name]).stem
    from_store = _label(server.infer(name, image_id))
    upload = (server.root / "studies" / IMAGES[name]).read_bytes()
    uploaded = _label(server.infer(name, files={"file": (IMAGES[name], upload)}))
    assert from_store.shape == IMAGE_SIZES[name] and from_store.dtype == np.uint8
    np.testing.assert_array_equal(uploaded, from_store)
    assert set(np.unique(from_store)) <= {0, *_labels(name).values()}
    if name == SEGMENTS:  # the random tiny detector with score threshold 0 paints some segments
        segments = server.infer(name, image_id, output="json").json()["segments"]
        assert {s["label"] for s in segments} >= set(np.unique(from_store)) - {0}
        assert all(s["name"] == CASS_CATEGORIES[s["label"] - 1] for s in segments)
    if name == "cytology_bethesda_detection":
        detections = server.infer(name, image_id, output="json").json()["detections"]
        assert detections and {"x", "y", "box", "class", "score"} <= set(detections[0])
        x0, y0, x1, y1 = detections[0]["box"]
        assert x1 - x0 == pytest.approx(100) and y1 - y0 == pytest.approx(100)
        centres = np.array([[d["y"], d["x"]] for d in detections])
        assert (centres < SMEAR_SIZE).all()  # none in the detector's padding to a multiple of 32
        assert from_store[int(detections[0]["y"]), int(detections[0]["x"])] > 0


def test_region_of_a_whole_slide(server: Server):
    region = {"location": [96, 40], "size": [200, 120]}  # x, y, width, height in level-0 pixels
    label = _label(server.infer(SLIDE, "slide", data={"params": json.dumps(region)}))
    assert label.shape == (120, 200) and label.dtype == np.uint8
    assert label.max() <= len(_labels(SLIDE))


def test_tiled_whole_slide_inference_for_qupath(server: Server):
    wsi = {
        "location": [0, 0],
        "size": [0, 0],
        "tile_size": [256, 256],
        "min_poly_area": 0,
    }  # 0 x 0: whole slide
    response = server.post(f"/infer/wsi/{SLIDE}", params={"image": "slide", "output": "asap"}, json=wsi)
    assert response.status_code == 200, response.text
    root = ElementTree.fromstring(response.content)
    assert root.tag == "ASAP_Annotations"
    assert [root.find("Annotations").get(k) for k in ("W", "H")] == [str(SLIDE_SIZE[1]), str(SLIDE_SIZE[0])]
    polygons = root.findall("Annotations/Annotation")
    assert polygons and {p.get("Name") for p in polygons} <= set(_labels(SLIDE))  # background has none
    points = np.array([[float(c.get("X")), float(c.get("Y"))] for c in root.iter("Coordinate")])
    assert (points >= 0).all() and (points <= [SLIDE_SIZE[1], SLIDE_SIZE[0]]).all()
    region = {"location": [128, 64], "size": [300, 200], "tile_size": [256, 256]}
    answer = server.post(
        f"/infer/wsi_v2/{SLIDE}", params={"image": "slide"}, data={"wsi": json.dumps(region)}
    )
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["annotations"]) == 2 and answer.json()["size"] == [300, 200]
    not_a_slide_model = server.post(
        "/infer/wsi/dermoscopy_lesion_maskrcnn", params={"image": "lesion"}, json=wsi
    )
    assert not_a_slide_model.status_code == 400 and SLIDE in not_a_slide_model.json()["detail"]


def test_bad_requests_get_clear_errors_and_the_server_stays_up(server: Server):
    unknown = server.infer("no_such_model", "lesion")
    assert unknown.status_code == 400 and "no_such_model" in unknown.json()["detail"]
    not_image = server.infer("dermoscopy_lesion_maskrcnn", files={"file": ("notes.png", b"not an image")})
    assert not_image.status_code == 422 and ".png" in not_image.json()["detail"]
    outside = {"location": [SLIDE_SIZE[1] - 10, 0], "size": [100, 100]}
    region = server.infer(SLIDE, "slide", data={"params": json.dumps(outside)})
    assert region.status_code == 422 and "outside the slide" in region.json()["detail"]
    assert set(server.info()["models"]) == set(BUNDLES)


def test_cold_bundle_serves_after_its_first_training(server: Server):
    untrained = server.infer(COLD, "cells")
    assert untrained.status_code == 409 and "untrained" in untrained.json()["detail"]
    server.save_label("cells", server.truth["cells"].astype(np.uint16), COLD)
    result = server.post(f"/train/{COLD}", params={"run_sync": True}, json={"max_epochs": 1})
    assert result.status_code == 200, result.text
    assert server.info()["models"][COLD]["trained"] is True
    label = _label(server.infer(COLD, "cells"))
    assert label.shape == (SIZE, SIZE) and label.dtype == np.uint16
    cells = server.infer(COLD, "cells", output="json").json()["cells"]
    assert len(cells) == len(np.unique(label)) - int((label == 0).any())


def test_training_on_a_saved_label_changes_the_served_weights(server: Server):
    name = "dermoscopy_lesion_maskrcnn"
    before = server.weights(name)
    server.save_label("lesion", server.truth["lesion"].astype(np.uint8), name)
    result = server.post(f"/train/{name}", params={"run_sync": True}, json={"max_epochs": 1})
    assert result.status_code == 200 and result.json()["samples"] == 1, result.text
    assert server.weights(name) != before
    assert _label(server.infer(name, "lesion")).shape == (SIZE, SIZE)


def test_training_on_a_region_drawn_on_a_whole_slide(server: Server):
    region = {"location": [128, 64], "size": [160, 96]}
    corrected = _label(server.infer(SLIDE, "slide", data={"params": json.dumps(region)}))
    corrected[:48] = 1  # the annotator paints necrosis over the top half
    before = server.weights(SLIDE)
    server.save_label("slide", corrected, SLIDE, **region)
    result = server.post(f"/train/{SLIDE}", params={"run_sync": True}, json={"max_epochs": 1})
    assert result.status_code == 200 and result.json()["samples"] == 1, result.text
    assert server.weights(SLIDE) != before
    patches = sorted((server.root / "studies" / ".monailabel" / "runs" / SLIDE / "regions").glob("*.png"))
    assert [p.name for p in patches] == ["slide_x128_y64_160x96.png", "slide_x128_y64_160x96_mask.png"]
    assert Image.open(patches[0]).size == (
        80,
        48,
    )  # read at the bundle's 1 um/px: level 1 of a 0.5 um/px slide


def test_active_learning_ranks_unlabelled_images_by_flip_disagreement(server: Server):
    name = "cytology_bethesda_detection"
    marked = requests.put(
        server.url + "/datastore/image/info",
        params={"image": "smear"},
        data={"info": json.dumps({"model": name})},
        timeout=TIMEOUT,
    )
    assert marked.status_code == 200, marked.text
    response = server.post("/activelearning/flip_disagreement", json={"model": name})
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "smear" and 0.0 <= response.json()["score"] <= 1.0
    assert set(response.json()["scores"]) == {"smear"}  # the other bundles' images are not ranked


def test_angiography_vessels_serve_after_training_and_follow_new_weights(server: Server):
    untrained = server.infer(VESSELS, "coronary")
    assert untrained.status_code == 409 and "vessels.pt" in untrained.json()["detail"]
    server.save_label("coronary", server.truth["vessels"], VESSELS)
    result = server.post(f"/train/{VESSELS}", params={"run_sync": True}, json={"max_epochs": 1})
    assert result.status_code == 200 and result.json()["samples"] == 1, result.text
    assert server.info()["models"][VESSELS]["trained"] is True
    upload = (server.root / "studies" / IMAGES[VESSELS]).read_bytes()
    for request in ({"image": "coronary"}, {"files": {"file": (IMAGES[VESSELS], upload)}}):
        label = _label(server.infer(VESSELS, **request))
        assert (
            label.shape == IMAGE_SIZES[VESSELS]
            and label.dtype == np.uint8
            and set(np.unique(label)) <= {0, 1}
        )
    # weights written while the server runs are served at once: a head that calls every pixel a vessel
    state = load_checkpoint(server.weights_file(VESSELS))
    state["head.bias"] = torch.full_like(state["head.bias"], 100.0)
    save_checkpoint(state, server.weights_file(VESSELS))
    assert (_label(server.infer(VESSELS, "coronary")) == 1).all()


def test_angiography_segments_train_on_a_saved_cass_label_map(server: Server):
    before = server.weights(SEGMENTS)
    assert set(np.unique(server.truth["cass"])) - {0}  # the saved map holds segments
    server.save_label("angiogram", server.truth["cass"], SEGMENTS)
    result = server.post(f"/train/{SEGMENTS}", params={"run_sync": True}, json={"max_epochs": 1})
    assert result.status_code == 200 and result.json()["samples"] == 1, result.text
    assert server.weights(SEGMENTS) != before
    assert _label(server.infer(SEGMENTS, "angiogram")).shape == IMAGE_SIZES[SEGMENTS]
