import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import StatsHandler
from monai.transforms import Lambdad
from torch.utils.data import DataLoader

from common.engines.detection import DetectionInferenceStep, DetectionTrainingStep, detection_collate
from common.errors import InputDataError
from common.handlers.samples import iteration_samples
from common.networks.vitdet import vit_mask_rcnn

SIZE = 64
LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_mask_rcnn(**kwargs):
    return vit_mask_rcnn(
        vit="vit_base_patch16_224",
        vit_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2},
        min_size=SIZE,
        max_size=SIZE,
        out_channels=16,
        **kwargs,
    )


def sample(name, boxes, height=SIZE, width=SIZE):
    """A lesion sample in the pipeline's instance form: one mask channel and one box per lesion."""
    instances = torch.zeros(len(boxes), height, width, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(instances, boxes):
        mask[y0:y1, x0:x1] = 1
    image = MetaTensor(torch.rand(3, height, width), meta={"filename_or_obj": f"/data/{name}.jpg"})
    return {
        "image": image,
        "instances": instances,
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.ones(len(boxes), dtype=torch.int64),
        "name": name,
    }


def lesion_samples():
    """One image with two lesions and one without any."""
    return [sample("two_lesions", [[4, 6, 30, 28], [36, 34, 60, 62]]), sample("no_lesion", [])]


def cpu_engine():
    engine = Engine(lambda e, b: None)
    engine.state.device = torch.device("cpu")
    return engine


def test_collate_keeps_per_sample_sizes_metadata_and_flattens_multi_sample_items():
    small, large = sample("small", [[1, 1, 9, 9]], 32, 48), sample("large", [], SIZE, SIZE)
    batch = detection_collate([small, [large, large]])
    assert list(batch) == ["image", "instances", "boxes", "labels", "name"]
    assert [tuple(i.shape) for i in batch["image"]] == [(3, 32, 48), (3, SIZE, SIZE), (3, SIZE, SIZE)]
    assert batch["image"][0].meta["filename_or_obj"] == "/data/small.jpg"
    assert [tuple(b.shape) for b in batch["boxes"]] == [(1, 4), (0, 4), (0, 4)]
    assert batch["name"] == ["small", "large", "large"]


def test_collate_rejects_empty_batches_and_mixed_keys():
    with pytest.raises(ValueError, match="empty batch"):
        detection_collate([])
    with pytest.raises(ValueError, match="same keys"):
        detection_collate([{"image": 1, "name": "a"}, {"image": 2}])


def test_trainer_runs_two_iterations_logs_every_loss_and_fires_monai_events(capsys):
    model = tiny_mask_rcnn()
    before = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(lesion_samples(), batch_size=1, collate_fn=detection_collate)
    outputs, events = [], []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=loader,
        network=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        loss_function=None,
        iteration_update=DetectionTrainingStep(),
        decollate=False,
        train_handlers=[StatsHandler(name="detection_test", output_transform=lambda x: x, tag_name="loss")],
    )
    for event in (
        IterationEvents.FORWARD_COMPLETED,
        IterationEvents.LOSS_COMPLETED,
        IterationEvents.BACKWARD_COMPLETED,
        IterationEvents.MODEL_COMPLETED,
    ):
        trainer.add_event_handler(event, lambda e, name=event.name: events.append(name))
    trainer.add_event_handler(IterationEvents.MODEL_COMPLETED, lambda e: outputs.append(e.state.output))
    trainer.run()

    assert trainer.state.iteration == 2
    assert events == ["FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED", "MODEL_COMPLETED"] * 2
    for output in outputs:  # the second batch holds only the image without lesions
        assert set(output) == {"loss"} | LOSSES
        assert all(v.ndim == 0 and not v.requires_grad and torch.isfinite(v) for v in output.values())
        torch.testing.assert_close(output["loss"], sum(output[k] for k in LOSSES))
    assert trainer.state.output is outputs[-1]
    logged = capsys.readouterr().out
    assert "loss: " in logged and "loss_mask: " in logged and "Iter: 2/2" in logged
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_loss_weights_scale_the_total_and_unknown_names_are_rejected():
    weights = {"loss_mask": 2.0, "loss_classifier": 0.0}
    model = tiny_mask_rcnn()
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=DataLoader(lesion_samples(), batch_size=2, collate_fn=detection_collate),
        network=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        loss_function=None,
        iteration_update=DetectionTrainingStep(loss_weights=weights),
        decollate=False,
    )
    trainer.run()
    out = trainer.state.output
    expected = sum(weights.get(k, 1.0) * out[k] for k in LOSSES)
    torch.testing.assert_close(out["loss"], expected)
    assert out["loss_classifier"] > 0  # reported even when weighted out

    trainer.state.iteration = 0
    with pytest.raises(ValueError, match="loss_maks"):
        DetectionTrainingStep({"loss_maks": 1.0})(trainer, detection_collate(lesion_samples()))
    with pytest.raises(ValueError, match=">= 0"):
        DetectionTrainingStep({"loss_mask": -1.0})


def test_evaluator_returns_per_sample_predictions_at_input_size_beside_the_references():
    model = tiny_mask_rcnn(box_score_thresh=0.0, box_detections_per_img=5).train()
    samples = [sample("tall", [[4, 4, 20, 30]], SIZE, 48), sample("wide", [], 48, SIZE)]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(samples, batch_size=2, collate_fn=detection_collate),
        network=model,
        iteration_update=DetectionInferenceStep(),
        decollate=False,
        postprocessing=Lambdad("pred_masks", lambda m: m > 0.5),
    )
    evaluator.run()

    outputs = evaluator.state.output
    assert isinstance(outputs, list) and len(outputs) == 2
    for output, (height, width) in zip(outputs, [(SIZE, 48), (48, SIZE)]):
        k = len(output["pred_boxes"])
        assert k > 0
        assert output["pred_boxes"].shape == (k, 4)
        assert output["pred_scores"].shape == output["pred_labels"].shape == (k,)
        assert output["pred_masks"].shape == (k, 1, height, width)
        assert output["pred_masks"].dtype == torch.bool  # postprocessing ran per sample
    found = iteration_samples(evaluator)
    assert [s["name"] for s in found] == ["tall", "wide"]
    assert [tuple(s["instances"].shape) for s in found] == [(1, SIZE, 48), (0, 48, SIZE)]
    assert found[0]["image"].meta["filename_or_obj"] == "/data/tall.jpg"
    assert model.training  # eval mode only for the step


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update(instances=torch.zeros(2, SIZE, 32, dtype=torch.uint8)), r"must be \(2, 64, 64\)"),
        (lambda s: s.update(boxes=torch.tensor([[4.0, 6, 4, 28], [36, 34, 60, 62]])), "x1 > x0"),
        (lambda s: s.update(labels=torch.tensor([1, 0])), "labels must be >= 1"),
        (lambda s: s.update(labels=torch.tensor([1])), r"2 boxes but labels of shape \(1,\)"),
        (lambda s: s.pop("instances"), r"training needs \['instances'\]"),
        (lambda s: s.update(image=MetaTensor(torch.rand(SIZE, SIZE), meta=s["image"].meta)), r"\(C, H, W\)"),
    ],
)
def test_training_rejects_bad_samples_naming_the_file(change, message):
    bad, good = lesion_samples()
    change(bad)
    if "instances" not in bad:
        good.pop("instances")
    with pytest.raises(InputDataError, match=message) as error:
        DetectionTrainingStep()(cpu_engine(), detection_collate([bad, good]))
    assert error.value.path == "/data/two_lesions.jpg"


def test_steps_reject_batches_not_collated_for_detection():
    stacked = {"image": torch.rand(2, 3, SIZE, SIZE)}
    with pytest.raises(TypeError, match="detection_collate"):
        DetectionInferenceStep()(cpu_engine(), stacked)
    uneven = {"image": [torch.rand(3, SIZE, SIZE)] * 2, "name": ["a"]}
    with pytest.raises(ValueError, match="1 entries under 'name'"):
        DetectionTrainingStep()(cpu_engine(), uneven)


@pytest.mark.parametrize("step", [DetectionTrainingStep(), DetectionInferenceStep()])
def test_engines_built_with_decollation_are_rejected_with_the_fix(step):
    model = tiny_mask_rcnn()
    loader = DataLoader(lesion_samples(), batch_size=2, collate_fn=detection_collate)
    if isinstance(step, DetectionTrainingStep):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        engine = SupervisedTrainer(
            torch.device("cpu"), 1, loader, model, optimizer, None, iteration_update=step
        )
    else:
        engine = SupervisedEvaluator(torch.device("cpu"), loader, model, iteration_update=step)
    with pytest.raises(ValueError, match="decollate=False"):
        engine.run()


def test_mixed_precision_on_cpu_trains_and_predicts_in_float32():
    model = tiny_mask_rcnn(box_score_thresh=0.0, box_detections_per_img=3)
    loader = DataLoader(lesion_samples(), batch_size=2, collate_fn=detection_collate)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = SupervisedTrainer(
        torch.device("cpu"),
        1,
        loader,
        model,
        optimizer,
        None,
        iteration_update=DetectionTrainingStep(amp=True),
        decollate=False,
    )
    trainer.run()
    loss = trainer.state.output["loss"]
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    evaluator = SupervisedEvaluator(
        torch.device("cpu"), loader, model, iteration_update=DetectionInferenceStep(amp=True), decollate=False
    )
    evaluator.run()
    for output in evaluator.state.output:
        assert output["pred_masks"].dtype == output["pred_scores"].dtype == torch.float32
