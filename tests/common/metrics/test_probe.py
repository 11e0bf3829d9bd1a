import json

import numpy as np
import pytest
import torch

from common.data.dermoscopy import read_isic_folder
from common.data.synthetic.dermoscopy import generate_dermoscopy_dataset
from common.metrics.probe import (
    LESION,
    MIXED,
    SKIN,
    knn_balanced_accuracy,
    main,
    patch_colours,
    patch_labels,
    probe,
)
from common.networks.timm_backbone import create_vit_backbone, save_backbone


@pytest.fixture(scope="module")
def isic(tmp_path_factory):
    return generate_dermoscopy_dataset(tmp_path_factory.mktemp("probe") / "isic", 4, 0, size=128, seed=0)


def test_patch_labels_keep_pure_patches_and_leave_the_border_out():
    mask = np.zeros((32, 48), bool)
    mask[:16, :16] = True  # a whole lesion patch
    mask[:16, 16:24] = True  # half a patch: the border
    mask[16:, 32:33] = True  # 16 of 256 pixels: skin at purity 0.9
    assert patch_labels(mask, 16).tolist() == [[LESION, MIXED, SKIN], [SKIN, SKIN, SKIN]]
    with pytest.raises(ValueError, match="tile"):
        patch_labels(mask[:30], 16)


def test_separable_features_score_one_and_random_ones_about_half():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([SKIN] * 90 + [LESION] * 10)
    separable = torch.randn(100, 8, generator=generator) + 10 * torch.nn.functional.one_hot(labels, 8)
    assert knn_balanced_accuracy(separable, labels, separable, labels, k=5) == 1.0
    noise = torch.randn(100, 8, generator=generator)
    assert 0.3 < knn_balanced_accuracy(noise, labels, torch.randn(100, 8, generator=generator), labels) < 0.7


def test_votes_are_weighted_so_the_rare_class_is_not_outvoted():
    # 88 skin features at (1, 0); 2 skin and 1 lesion at (0, 1); the other 9 lesion ones at (-1, 0)
    train = torch.tensor([[1.0, 0.0]] * 88 + [[0.0, 1.0]] * 3 + [[-1.0, 0.0]] * 9)
    train_labels = torch.tensor([SKIN] * 90 + [LESION] * 10)
    test, test_labels = torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([LESION, SKIN])
    # (0, 1)'s 3 nearest are 2 skin and 1 lesion: a plain majority says skin (0.5); weighted by the
    # inverse class share (0.9 and 0.1), the lesion vote wins
    assert knn_balanced_accuracy(train, train_labels, test, test_labels, k=3) == 1.0


def test_bad_arguments_are_refused():
    labels = torch.tensor([SKIN, LESION])
    with pytest.raises(ValueError, match="k must be"):
        knn_balanced_accuracy(torch.eye(2), labels, torch.eye(2), labels, k=3)
    with pytest.raises(ValueError, match="both skin and lesion"):
        knn_balanced_accuracy(torch.eye(2), labels, torch.eye(2), torch.tensor([SKIN, SKIN]), k=1)


def test_lesions_differ_in_colour_from_skin(isic):
    assert probe(patch_colours, read_isic_folder(isic / "labelled"), size=128, k=3) > 0.8


def test_command_compares_pretrained_random_and_colour(isic, tmp_path, capsys):
    torch.manual_seed(1)
    save_backbone(create_vit_backbone("vit_tiny_patch16_224", depth=1), tmp_path / "enc.pt", "vit_tiny_patch16_224")
    # a 1-block encoder is not what vit_tiny builds: the shapes do not fit and the file is named
    with pytest.raises(SystemExit, match="enc.pt"):
        main(["--images", str(isic / "labelled"), "--vit", "vit_tiny_patch16_224", "--checkpoint",
              str(tmp_path / "enc.pt"), "--size", "128"])
    torch.manual_seed(1)
    save_backbone(create_vit_backbone("vit_tiny_patch16_224"), tmp_path / "enc.pt", "vit_tiny_patch16_224")
    main(["--images", str(isic / "labelled"), "--vit", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "enc.pt"),
          "--size", "128", "--k", "3", "--random-seeds", "1", "--output", str(tmp_path / "probe.json")])
    report = json.loads((tmp_path / "probe.json").read_text())
    assert report["knn_pretrained"] == report["knn_random"]  # the same seed builds the same random encoder
    assert report["knn_random_std"] == 0.0 and 0.0 <= report["knn_colour"] <= 1.0
    assert "pretrained" in capsys.readouterr().out
