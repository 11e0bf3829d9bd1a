import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from PIL import Image
from torch import nn

from common.data.histopathology import read_mask, read_patch_manifest
from common.errors import InputDataError
from common.handlers.pseudo_masks import ClassPrototypeBuilder, PseudoMaskWriter, assign_split
from common.inferers.cam import CAMInferer
from common.io.checkpoint import load_checkpoint, save_checkpoint
from common.networks.cam_classifier import CAMClassifier, PrototypeCAMClassifier, build_class_prototypes
from common.postprocessing.pseudo_masks import CAMToPseudoMaskd

SIZE = 8
NAMES = ("b-[1 0 0 1].png", "a-[1 0 0 0].png", "c-[1 0 0 1].png")  # in loading order
PINK, WHITE = (230.0, 160.0, 200.0), (240.0, 240.0, 240.0)


class StubCAMNetwork(nn.Module):
    """CAMs of class 0 on the left half and class 3 on the right half of every image; records the
    options it was called with and can fail on a given call, like a run killed half-way."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        super().__init__()
        self.calls: list[dict] = []
        self.fail_on_call = fail_on_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("CAMInferer must call cams(), not forward()")

    def cams(self, x: torch.Tensor, **options) -> torch.Tensor:
        self.calls.append(options)
        if len(self.calls) == self.fail_on_call:
            raise RuntimeError("simulated crash")
        cams = torch.zeros(x.shape[0], 4, *x.shape[2:])
        cams[:, 0, :, : SIZE // 2] = 1
        cams[:, 3, :, SIZE // 2 :] = 1
        return cams


def _image(path: Path) -> MetaTensor:
    """Pink tissue with a bottom row of white glass, written to ``path`` and returned as
    LoadHistologyImaged returns it."""
    image = torch.tensor(PINK)[:, None, None].repeat(1, SIZE, SIZE)
    image[:, -1] = torch.tensor(WHITE)[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy().astype(np.uint8)).save(path)
    return MetaTensor(image, meta={"filename_or_obj": str(path)})


def _data(tmp_path: Path) -> list[dict]:
    """The network sees a normalised image; the tissue mask needs the copy taken before normalising."""
    labels = ([1, 0, 0, 1], [1, 0, 0, 0], [1, 0, 0, 1])
    data = []
    for name, label in zip(NAMES, labels):
        raw = _image(tmp_path / "patches" / name)
        data.append({"image": (raw - 128) / 64, "image_raw": raw, "label": torch.tensor(label).float()})
    return data


def _evaluator(tmp_path: Path, network: nn.Module, batch_size: int = 2) -> SupervisedEvaluator:
    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(_data(tmp_path)), batch_size=batch_size),
        network=network,
        inferer=CAMInferer(flip=True),
        postprocessing=CAMToPseudoMaskd(keys="pred", image_key="image_raw"),
        val_handlers=[PseudoMaskWriter(tmp_path / "out", num_classes=4, val_fraction=0.5)],
    )


def test_evaluator_writes_masks_confidence_and_manifest(tmp_path):
    network = StubCAMNetwork()
    _evaluator(tmp_path, network).run()
    assert network.calls == [{"flip": True}, {"flip": True}]

    out = tmp_path / "out"
    two_classes = np.full((SIZE, SIZE), 4, np.uint8)
    two_classes[:-1, : SIZE // 2] = 0
    two_classes[:-1, SIZE // 2 :] = 3
    one_class = np.full((SIZE, SIZE), 4, np.uint8)
    one_class[:-1] = 0
    with Image.open(out / "masks" / "b-[1 0 0 1].png") as mask:
        assert mask.mode == "P"
    np.testing.assert_array_equal(read_mask(out / "masks" / "b-[1 0 0 1].png", 4), two_classes)
    np.testing.assert_array_equal(read_mask(out / "masks" / "a-[1 0 0 0].png", 4), one_class)
    with Image.open(out / "confidence" / "b-[1 0 0 1].png") as confidence:
        assert confidence.mode == "L"
        np.testing.assert_array_equal(np.asarray(confidence), 255)

    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [line["mask"] for line in lines] == [f"masks/{name}" for name in sorted(NAMES)]
    first = lines[0]
    assert first["image"] == str(tmp_path / "patches" / "a-[1 0 0 0].png")
    assert first["confidence"] == "confidence/a-[1 0 0 0].png"
    assert first["label"] == [1, 0, 0, 0]
    assert first["classes"] == [0, 4]
    assert lines[1]["classes"] == [0, 3, 4]
    assert first["origin"] == [0, 0] and first["level"] is None and first["mpp"] is None
    assert [line["split"] for line in lines] == [assign_split(Path(line["mask"]).stem, 0.5) for line in lines]

    # the manifest reads back as a training datalist (paths resolved against its folder)
    entries = read_patch_manifest(out / "manifest.jsonl", 4)
    assert entries[1]["mask"] == str(out / "masks" / "b-[1 0 0 1].png")


def test_crash_keeps_finished_masks_and_leaves_no_manifest(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").write_text('{"stale": true}\n')  # from an earlier, different run
    with pytest.raises(RuntimeError, match="simulated crash"):
        _evaluator(tmp_path, StubCAMNetwork(fail_on_call=2), batch_size=1).run()
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["b-[1 0 0 1].png"]
    assert not (out / "manifest.jsonl").exists()
    assert not list(out.rglob("*.tmp"))


def _sample(image: str, meta: dict | None = None) -> dict:
    mask = torch.zeros(1, 4, 4, dtype=torch.uint8)
    mask[0, 0] = 255
    return {
        "image": MetaTensor(torch.zeros(3, 4, 4), meta={"filename_or_obj": image, **(meta or {})}),
        "pseudo_mask": mask,
        "pseudo_confidence": torch.full((1, 4, 4), 0.5),
        "label": torch.tensor([1.0, 0.0]),
    }


def _run(writer: PseudoMaskWriter, batches: list[list[dict]]) -> Engine:
    engine = Engine(lambda engine, batch: batch)
    writer.attach(engine)
    engine.run(batches, max_epochs=1)
    return engine


def test_same_stem_of_two_images_is_an_error_naming_both(tmp_path):
    writer = PseudoMaskWriter(tmp_path / "out", num_classes=2)
    batches = [[_sample("/data/a/x.png")], [_sample("/data/b/x.png")]]
    with pytest.raises(InputDataError, match=r"/data/b/x\.png: has the same name as /data/a/x\.png"):
        _run(writer, batches)
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_repeated_image_is_listed_once_and_metadata_is_kept(tmp_path):
    # DistributedSampler pads by repeating images; a slide tile carries its location, level and mpp
    tile = {"location": torch.tensor([512, 1024]), "level": torch.tensor(1), "mpp": 0.5}
    batches = [
        [_sample("/data/tile.png", tile), _sample("/data/patch.png")],
        [_sample("/data/tile.png", tile)],
    ]
    _run(PseudoMaskWriter(tmp_path / "out", num_classes=2), batches)
    lines = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [Path(line["image"]).name for line in lines] == ["patch.png", "tile.png"]
    assert lines[1]["origin"] == [512, 1024] and lines[1]["level"] == 1 and lines[1]["mpp"] == 0.5
    assert lines[0]["classes"] == [0]  # 255 (uncertain) is not a class
    with Image.open(tmp_path / "out" / "confidence" / "tile.png") as confidence:
        np.testing.assert_array_equal(np.asarray(confidence), 128)


def test_missing_keys_and_names_are_reported(tmp_path):
    sample = _sample("/data/x.png")
    del sample["pseudo_confidence"]
    with pytest.raises(KeyError, match="no 'pseudo_confidence' in the engine output or batch"):
        _run(PseudoMaskWriter(tmp_path, num_classes=2), [[sample]])
    nameless = _sample("/data/x.png")
    nameless["image"] = torch.zeros(3, 4, 4)
    with pytest.raises(KeyError, match="a sample has no file name"):
        _run(PseudoMaskWriter(tmp_path, num_classes=2), [[nameless]])


def test_split_is_stable_seeded_and_close_to_the_fraction():
    names = [f"patch-{i}" for i in range(4000)]
    splits = [assign_split(name, 0.1) for name in names]
    assert splits == [assign_split(name, 0.1) for name in names]
    assert 0.08 < splits.count("val") / len(names) < 0.12
    assert splits != [assign_split(name, 0.1, seed=1) for name in names]
    assert {assign_split(name, 0.0) for name in names} == {"train"}
    assert {assign_split(name, 1.0) for name in names} == {"val"}
    with pytest.raises(ValueError, match="val_fraction must lie in 0..1"):
        PseudoMaskWriter("out", num_classes=4, val_fraction=1.5)


def _prototype_batches() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    images = torch.rand(4, 3, 32, 32, generator=generator)
    return [{"image": images[i : i + 2], "label": labels[i : i + 2]} for i in (0, 2)]


def _classifier(seed: int) -> CAMClassifier:
    torch.manual_seed(seed)
    model = CAMClassifier(3, backbone="resnet10t")
    with torch.no_grad():
        model.classifier.weight.abs_()  # every class activates somewhere
    return model


def test_prototype_builder_uses_the_best_weights_and_leaves_the_network_alone(tmp_path):
    best, trained = _classifier(0), _classifier(1)
    weights = save_checkpoint(best.state_dict(), tmp_path / "best.pt")
    trained_state = {k: v.clone() for k, v in trained.state_dict().items()}
    trainer = Engine(lambda engine, batch: None)
    builder = ClassPrototypeBuilder(
        nn.DataParallel(trained), _prototype_batches(), tmp_path / "prototypes.pt", weights, num_prototypes=2
    )
    builder.attach(trainer)
    trainer.run([0], max_epochs=1)

    restored = PrototypeCAMClassifier(CAMClassifier(3, backbone="resnet10t"), num_prototypes=2)
    restored.load_state_dict(load_checkpoint(tmp_path / "prototypes.pt"))
    expected = build_class_prototypes(best, _prototype_batches(), num_prototypes=2)
    assert torch.equal(restored.prototypes, expected)
    assert all(torch.equal(restored.classifier.state_dict()[k], v) for k, v in best.state_dict().items())
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in trained_state.items())


def test_disabled_prototype_builder_attaches_nothing_and_needs_a_cam_classifier(tmp_path):
    trainer = Engine(lambda engine, batch: None)
    builder = ClassPrototypeBuilder(_classifier(0), _prototype_batches(), tmp_path / "p.pt", enabled=False)
    builder.attach(trainer)
    trainer.run([0], max_epochs=1)
    assert not (tmp_path / "p.pt").exists()
    with pytest.raises(TypeError, match="needs a CAMClassifier, got Linear"):
        ClassPrototypeBuilder(nn.Linear(2, 2), [], tmp_path / "p.pt")
