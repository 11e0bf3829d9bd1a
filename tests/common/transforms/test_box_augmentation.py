"""MONAI's box-aware transforms move box centres exactly as they move the image, once boxes are y-first.

A small Gaussian blob is drawn at every box centre; after each transform the blob centroids must sit
at the transformed box centres. Images are (C, H, W) and deliberately not square, so a transform
that mixed up x and y would be caught.
"""

import numpy as np
import pytest
import torch
from monai.apps.detection.transforms.dictionary import (
    FlipBoxd,
    RandFlipBoxd,
    RandRotateBox90d,
    RandZoomBoxd,
    RotateBox90d,
    ZoomBoxd,
)
from monai.transforms import Compose, RandTorchVisiond, ScaleIntensityRanged
from scipy import ndimage

from common.postprocessing.centernet import decode_centres
from common.transforms.boxes import ImageAxisBoxCompose
from common.transforms.centernet import CenterNetTargetd, SwapBoxXYd

HEIGHT, WIDTH = 64, 96
CENTRES = np.array([[30.5, 20.5], [60.25, 40.75], [45.0, 32.0]])  # x, y; continuous pixel coordinates
BOX_SIZE = 20.0


def blob_image(centres: np.ndarray, channels: int = 1) -> torch.Tensor:
    """(C, H, W) image with a Gaussian blob (sigma 1.5 px) centred at each continuous (x, y) point."""
    rows, cols = np.mgrid[:HEIGHT, :WIDTH] + 0.5  # pixel centres
    image = sum(np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * 1.5**2)) for x, y in centres)
    return torch.from_numpy(np.repeat(image[None], channels, axis=0).astype(np.float32))


def blob_centres(image: torch.Tensor) -> np.ndarray:
    """Intensity centroids (x, y) of the blobs, in continuous pixel coordinates, sorted by x."""
    plane = np.asarray(image)[0]
    labels, n = ndimage.label(plane > 0.3 * plane.max())
    centroids = np.array(ndimage.center_of_mass(plane, labels, range(1, n + 1)))[:, ::-1] + 0.5
    return centroids[np.argsort(centroids[:, 0])]


def box_centres(boxes: np.ndarray) -> np.ndarray:
    centres = (np.asarray(boxes)[:, :2] + np.asarray(boxes)[:, 2:]) / 2
    return centres[np.argsort(centres[:, 0])]


def sample() -> dict:
    boxes = np.concatenate([CENTRES - BOX_SIZE / 2, CENTRES + BOX_SIZE / 2], axis=1).astype(np.float32)
    return {"image": blob_image(CENTRES), "boxes": boxes}


def y_first(transform) -> Compose:
    """The way to call MONAI's box transforms on (C, H, W) images with x-first boxes."""
    return Compose([SwapBoxXYd("boxes"), transform, SwapBoxXYd("boxes")])


BOX_ARGS = {"image_keys": "image", "box_keys": "boxes", "box_ref_image_keys": "image"}
TRANSFORMS = {
    "flip_x": FlipBoxd(spatial_axis=1, **BOX_ARGS),
    "flip_y": FlipBoxd(spatial_axis=0, **BOX_ARGS),
    "rotate90": RotateBox90d(k=1, **BOX_ARGS),
    "rotate270": RotateBox90d(k=3, **BOX_ARGS),
    "zoom_in": ZoomBoxd(zoom=(1.25, 1.25), mode="bilinear", **BOX_ARGS),
    "zoom_out": ZoomBoxd(zoom=(0.8, 0.8), mode="bilinear", padding_mode="constant", **BOX_ARGS),
    "rand_flip_x": RandFlipBoxd(prob=1.0, spatial_axis=1, **BOX_ARGS),
    "rand_rotate90": RandRotateBox90d(prob=1.0, max_k=3, **BOX_ARGS),
    "rand_zoom": RandZoomBoxd(prob=1.0, min_zoom=0.85, max_zoom=1.15, mode="bilinear", **BOX_ARGS),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_box_centres_follow_the_image(name):
    out = y_first(TRANSFORMS[name]).set_random_state(0)(sample())
    blobs, centres = blob_centres(out["image"]), box_centres(out["boxes"])
    assert len(blobs) == len(centres) == 3
    np.testing.assert_allclose(blobs, centres, atol=1.0)
    if name.startswith("rotate"):
        assert out["image"].shape[1:] == (WIDTH, HEIGHT)


def test_without_the_swap_monai_flips_the_wrong_box_axis():
    out = FlipBoxd(spatial_axis=1, **BOX_ARGS)(sample())
    assert np.abs(blob_centres(out["image"]) - box_centres(out["boxes"])).max() > 10


def test_zoom_with_a_single_float_factor_is_broken_in_monai():
    """Why configs must give ZoomBoxd one zoom factor per axis."""
    with pytest.raises(TypeError):
        ZoomBoxd(zoom=1.25, **BOX_ARGS)(sample())


def test_empty_boxes_pass_through():
    data = {"image": blob_image(CENTRES), "boxes": np.zeros((0, 4), np.float32)}
    out = y_first(Compose([TRANSFORMS["flip_x"], TRANSFORMS["rotate90"], TRANSFORMS["zoom_in"]]))(data)
    assert out["boxes"].shape == (0, 4)


def test_training_chain_puts_target_peaks_on_the_blobs():
    """The chain recommended for train.json, through CenterNetTargetd: the target's centres are the blobs'."""
    torch.manual_seed(0)
    chain = Compose(
        [
            ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
            SwapBoxXYd("boxes"),
            RandFlipBoxd(prob=0.5, spatial_axis=0, **BOX_ARGS),
            RandFlipBoxd(prob=0.5, spatial_axis=1, **BOX_ARGS),
            RandRotateBox90d(prob=0.75, max_k=3, **BOX_ARGS),
            RandZoomBoxd(prob=0.5, min_zoom=0.8, max_zoom=1.2, mode="bilinear", padding_mode="constant", **BOX_ARGS),
            SwapBoxXYd("boxes"),
            RandTorchVisiond("image", name="ColorJitter", brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
            CenterNetTargetd(stride=4),
        ]
    ).set_random_state(0)
    shapes = set()
    for _ in range(6):
        data = sample()
        data["image"] = blob_image(CENTRES, channels=3) * 255  # 8-bit RGB range
        out = chain(data)
        shapes.add(tuple(out["image"].shape[1:]))
        assert out["label"].shape == (4, out["image"].shape[1] // 4, out["image"].shape[2] // 4)
        logits = torch.cat([torch.logit(out["label"][:1], eps=1e-6), out["label"][1:3]])
        [(points, _)] = decode_centres(logits, stride=4, threshold=0.99)
        points = points.numpy()[np.argsort(points[:, 0].numpy())]
        np.testing.assert_allclose(points, blob_centres(out["image"]), atol=1.0)
    assert shapes == {(HEIGHT, WIDTH), (WIDTH, HEIGHT)}  # some draws rotated, some not


@pytest.mark.parametrize("name", TRANSFORMS)
def test_image_axis_box_compose_moves_boxes_with_the_image(name):
    """The one-transform way configs write it: MONAI's box transforms listed as they are."""
    out = ImageAxisBoxCompose([TRANSFORMS[name]], box_keys="boxes").set_random_state(0)(sample())
    blobs, centres = blob_centres(out["image"]), box_centres(out["boxes"])
    assert len(blobs) == len(centres) == 3
    np.testing.assert_allclose(blobs, centres, atol=1.0)
    assert out["boxes"].shape == (3, 4)


def test_image_axis_box_compose_is_seeded_and_leaves_other_keys_alone():
    def chain():
        return Compose(
            [
                ImageAxisBoxCompose(
                    [
                        RandFlipBoxd(prob=0.5, spatial_axis=0, **BOX_ARGS),
                        RandRotateBox90d(prob=0.75, max_k=3, **BOX_ARGS),
                        RandZoomBoxd(prob=0.5, min_zoom=0.8, max_zoom=1.2, mode="bilinear", **BOX_ARGS),
                    ]
                )
            ]
        )

    first, second = chain().set_random_state(3), chain().set_random_state(3)
    for _ in range(4):
        data = {**sample(), "labels": np.arange(3)}
        a, b = first(dict(data)), second(dict(data))
        np.testing.assert_array_equal(np.asarray(a["boxes"]), np.asarray(b["boxes"]))
        np.testing.assert_array_equal(a["labels"], data["labels"])
        np.testing.assert_allclose(blob_centres(a["image"]), box_centres(a["boxes"]), atol=1.0)


def test_image_axis_box_compose_inverts_in_the_same_axis_order():
    data = sample()
    transform = ImageAxisBoxCompose([FlipBoxd(spatial_axis=1, **BOX_ARGS), RotateBox90d(k=1, **BOX_ARGS)])
    restored = transform.inverse(transform(data))
    np.testing.assert_allclose(np.asarray(restored["boxes"]), data["boxes"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(restored["image"]), np.asarray(data["image"]), atol=1e-5)
