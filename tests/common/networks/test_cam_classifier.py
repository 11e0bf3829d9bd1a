import pytest
import timm
import torch
import torch.nn.functional as F

from common.errors import InputDataError
from common.io.checkpoint import load_checkpoint, save_checkpoint
from common.networks.cam_classifier import (
    CAMClassifier,
    PrototypeCAMClassifier,
    build_class_prototypes,
    kmeans,
)
from common.networks.param_groups import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"backbone": "resnet10t"}


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return CAMClassifier(3, **SMALL).eval()


@pytest.fixture(scope="module")
def active_classifier():
    """Every class activates somewhere: backbone features are non-negative, so are these weights."""
    torch.manual_seed(0)
    model = CAMClassifier(3, **SMALL).eval()
    with torch.no_grad():
        model.classifier.weight.abs_()
    return model


def bank(labels, size=64, batch_size=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(labels, dtype=torch.float32)
    images = torch.rand(len(labels), 3, size, size, generator=generator) * 255
    return [
        {"image": images[i : i + batch_size], "label": labels[i : i + batch_size]}
        for i in range(0, len(labels), batch_size)
    ]


@pytest.mark.parametrize("output_stride", [8, 16])
def test_feature_map_has_the_requested_output_stride(output_stride):
    model = CAMClassifier(4, output_stride=output_stride, **SMALL).eval()
    with torch.no_grad():
        features = model.features(torch.rand(2, 3, 64, 96))
    assert features.shape == (2, model.num_features, 64 // output_stride, 96 // output_stride)
    assert model.output_stride == output_stride


def test_logits_and_cam_shapes(classifier):
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert classifier(x).shape == (2, 3)
        assert classifier.cams(x).shape == (2, 3, 64, 64)
        assert classifier.cams(x, size=(32, 48)).shape == (2, 3, 32, 48)


def test_cams_are_relu_of_classifier_weights_dot_features(classifier):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = classifier.features(x)
        weights = classifier.classifier.weight[:, :, 0, 0]
        scores = torch.einsum("cf,bfhw->bchw", weights, features)
        expected = F.interpolate(scores.clamp(min=0), size=(64, 64), mode="bilinear", align_corners=False)
        cams = classifier.cams(x)
        logits = classifier(x)
    assert classifier.classifier.bias is None
    assert (cams >= 0).all() and (scores < 0).any()  # the ReLU did something
    assert torch.allclose(cams, expected, atol=1e-5)
    # global average pooling + linear: the logit is the mean of the pre-ReLU score map
    assert torch.allclose(logits, scores.mean(dim=(2, 3)), atol=1e-5)


def test_flip_and_multiscale_average_the_views(classifier):
    torch.manual_seed(2)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        plain = classifier.cams(x)
        mirrored = classifier.cams(x.flip(-1)).flip(-1)
        assert torch.allclose(classifier.cams(x, flip=True), (plain + mirrored) / 2, atol=1e-5)
        small = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        half = classifier.cams(small, size=(64, 64))
        assert torch.allclose(classifier.cams(x, scales=(1.0, 0.5)), (plain + half) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="positive factors"):
        classifier.cams(x, scales=())


def test_gradient_step_with_multilabel_loss_and_param_groups():
    torch.manual_seed(3)
    model = CAMClassifier(3, **SMALL)
    groups = param_groups(model, 0.1, backbone_lr_scale=0.1)
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.1])
    assert groups[1]["params"] == [model.classifier.weight]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = torch.optim.SGD(groups, lr=0.01)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    F.binary_cross_entropy_with_logits(model(torch.rand(2, 3, 64, 64)), labels).backward()
    before = model.classifier.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.classifier.weight)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 0}, "num_classes must be a positive integer"),
        ({"output_stride": 32}, r"output_stride must be one of \(8, 16\)"),
        ({"backbone": "vit_tiny_patch16_224"}, "cannot be dilated"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CAMClassifier(**{"num_classes": 3, **SMALL, **kwargs})


def test_local_backbone_checkpoint_loads(tmp_path):
    torch.manual_seed(4)
    source = timm.create_model("resnet10t", num_classes=7)
    path = save_checkpoint({"state_dict": source.state_dict()}, tmp_path / "resnet10t.pt")
    model = CAMClassifier(3, checkpoint=path, **SMALL)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_kmeans_finds_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = (centres[:, None] + 0.1 * torch.randn(3, 50, 2, generator=generator)).reshape(-1, 2)
    found = kmeans(points, 3, seed=1)
    order = found[:, 0].argsort(descending=True)  # (10, 0) first
    found = found[order]
    assert torch.allclose(found[0], centres[1], atol=0.1)
    assert torch.allclose(found.sort(dim=0).values, centres.sort(dim=0).values, atol=0.1)
    assert torch.equal(kmeans(points, 3, seed=1), kmeans(points, 3, seed=1))
    with pytest.raises(ValueError, match="1 <= k <= number of points"):
        kmeans(points[:2], 3)


def test_prototypes_have_shape_classes_k_features_and_unit_length(active_classifier):
    labels = [[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 1]]
    running_mean = active_classifier.backbone.bn1.running_mean.clone()
    active_classifier.train()
    try:
        prototypes = build_class_prototypes(
            active_classifier, bank(labels), num_prototypes=2, max_vectors_per_class=5
        )
        # built in eval mode (batch-norm statistics untouched), training mode restored
        assert active_classifier.training
        assert torch.equal(active_classifier.backbone.bn1.running_mean, running_mean)
    finally:
        active_classifier.eval()
    assert prototypes.shape == (3, 2, active_classifier.num_features)
    assert torch.allclose(prototypes.norm(dim=-1), torch.ones(3, 2), atol=1e-5)
    again = build_class_prototypes(active_classifier, bank(labels), num_prototypes=2, max_vectors_per_class=5)
    assert torch.equal(prototypes, again)


def test_prototypes_accept_image_label_pairs(active_classifier):
    labels = [[1, 1, 1], [1, 1, 1]]
    pairs = [(b["image"], b["label"]) for b in bank(labels)]
    prototypes = build_class_prototypes(active_classifier, pairs, num_prototypes=1)
    assert prototypes.shape == (3, 1, active_classifier.num_features)


def test_one_prototype_is_the_mean_direction_of_confident_features_in_labelled_images(active_classifier):
    batches = bank([[1, 0, 1], [0, 1, 1]])
    threshold = 0.7
    prototypes = build_class_prototypes(active_classifier, batches, num_prototypes=1, cam_threshold=threshold)
    images, labels = batches[0]["image"], batches[0]["label"]
    with torch.no_grad():
        features = active_classifier.features(images)
        cams = active_classifier.feature_cams(images)
    for c in range(3):
        vectors = []
        for b in range(2):
            if labels[b, c]:
                confident = cams[b, c] >= threshold * cams[b, c].max()
                vectors.append(features[b].permute(1, 2, 0)[confident])
        expected = F.normalize(F.normalize(torch.cat(vectors), dim=1).mean(dim=0), dim=0)
        assert torch.allclose(prototypes[c, 0], expected, atol=1e-5), c


def test_a_class_absent_from_the_labels_is_named(active_classifier):
    with pytest.raises(InputDataError, match="class 1: it never occurs in the label vectors"):
        build_class_prototypes(active_classifier, bank([[1, 0, 1], [1, 0, 0]]), num_prototypes=1)


def test_too_few_confident_vectors_is_named(active_classifier):
    # at output stride 16 a 64-px image has 16 positions: fewer than 20 prototypes
    with pytest.raises(InputDataError, match="class 0: it occurs in 1 images but only"):
        build_class_prototypes(active_classifier, bank([[1, 1, 1]], batch_size=1), num_prototypes=20)


def test_labels_must_match_the_classes(active_classifier):
    with pytest.raises(ValueError, match=r"shape \(B, 3\)"):
        build_class_prototypes(active_classifier, bank([[1, 0]]), num_prototypes=1)


def test_a_feature_equal_to_a_prototype_has_similarity_one(active_classifier):
    torch.manual_seed(5)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        features = active_classifier.features(x)
        prototypes = torch.randn(3, 2, active_classifier.num_features)
        prototypes[1, 1] = 3.0 * features[0, :, 2, 1]  # cosine similarity ignores the length
        model = PrototypeCAMClassifier(active_classifier, prototypes)
        maps = model.feature_cams(x)
        cams = model.cams(x)
        logits = model(x)
    assert maps.shape == (1, 3, 4, 4)
    assert maps[0, 1, 2, 1].item() == pytest.approx(1.0, abs=1e-5)
    assert (maps >= 0).all() and (maps <= 1 + 1e-5).all()
    similarities = torch.stack(
        [F.cosine_similarity(features[0], p[:, None, None], dim=0) for p in prototypes[0]]
    )
    assert torch.allclose(maps[0, 0], similarities.amax(dim=0).clamp(min=0), atol=1e-5)
    assert cams.shape == (1, 3, 64, 64)
    assert torch.equal(logits, active_classifier(x))


def test_prototype_model_round_trips_through_its_state_dict(tmp_path, active_classifier):
    prototypes = build_class_prototypes(active_classifier, bank([[1, 1, 1], [1, 1, 1]]), num_prototypes=2)
    model = PrototypeCAMClassifier(active_classifier, prototypes)
    path = save_checkpoint(model.state_dict(), tmp_path / "prototypes.pt")

    torch.manual_seed(6)  # a different random classifier, overwritten by the checkpoint
    restored = PrototypeCAMClassifier(CAMClassifier(3, **SMALL), num_prototypes=2).eval()
    restored.load_state_dict(load_checkpoint(path))
    assert torch.equal(restored.prototypes, prototypes)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(restored.cams(x), model.cams(x))


def test_prototypes_must_fit_the_classifier(active_classifier):
    with pytest.raises(ValueError, match=r"shape \(num_classes=3, k, num_features=512\)"):
        PrototypeCAMClassifier(active_classifier, torch.zeros(2, 3, 512))
