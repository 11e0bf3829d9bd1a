import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from common.writers.detection_overlays import (
    SaveDetectionOverlayd,
    class_colours,
    display_rgb,
    draw_detections,
    main,
)
from common.writers.detections import DetectionCSVWriter

GREY = 128
COLOURS = class_colours(8)


def _grey(height=96, width=128):
    return np.full((height, width, 3), GREY, dtype=np.uint8)


def test_class_colours_are_distinct_and_extend_past_the_palette():
    colours = class_colours(12)
    assert len(set(colours)) == 12
    assert colours[:8] == COLOURS


def test_point_becomes_box_outlined_in_its_class_colour():
    image = _grey()
    overlay = draw_detections(image, np.array([[60.0, 50.0]]), np.array([3]), box_size=40, line_width=2)
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    assert (image == GREY).all()  # the input is not drawn on
    assert tuple(overlay[70, 40]) == COLOURS[3]  # left edge of the box x = 40..80, y = 30..70
    assert tuple(overlay[50, 80]) == COLOURS[3]  # right edge
    assert tuple(overlay[50, 60]) == (GREY,) * 3  # inside the box stays clear
    assert (overlay[75:, :] == GREY).all() and (overlay[:, 85:] == GREY).all()  # nothing beyond it


def test_boxes_of_two_classes_and_confidence_labels():
    boxes = np.array([[5, 40, 45, 90], [70, 40, 120, 90]], dtype=np.float32)
    bare = draw_detections(_grey(), boxes, torch.tensor([1, 5]), font_size=10)
    assert tuple(bare[80, 5]) == COLOURS[1] and tuple(bare[80, 70]) == COLOURS[5]
    scored = draw_detections(_grey(), torch.from_numpy(boxes), torch.tensor([1, 5]), torch.tensor([0.5, 0.25]))
    label_area = (slice(20, 40), slice(5, 70))  # labels sit above the boxes
    assert (bare[label_area] == COLOURS[1]).all(axis=-1).any()
    assert (scored[label_area] != bare[label_area]).any()  # the confidence is written too
    assert (draw_detections(_grey(), np.zeros((0, 4)), np.zeros(0)) == GREY).all()


def test_label_stays_on_the_image_for_boxes_at_its_edges():
    overlay = draw_detections(_grey(), np.array([[10, 0, 60, 50]]), np.array([0]), font_size=10)
    assert (overlay[3:12, 12:40] == COLOURS[0]).all(axis=-1).any()  # inside the box, under its top
    # the box spans x = -5..15; its 30-pixel label "ASCH" is moved to start at x = 0, so it reaches x = 30
    corner = draw_detections(_grey(), np.array([[5.0, 5.0]]), np.array([6]), box_size=20, font_size=10)
    assert (corner[3:10, 26:30] == COLOURS[6]).all(axis=-1).any()


def test_draw_refuses_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        draw_detections(np.zeros((8, 8)), np.zeros((0, 2)), np.zeros(0))
    with pytest.raises(ValueError, match="0..7"):
        draw_detections(_grey(), np.array([[1.0, 1.0]]), np.array([8]))
    with pytest.raises(ValueError, match="\\(K, 4\\) boxes or \\(K, 2\\) points"):
        draw_detections(_grey(), np.array([[1.0, 1.0]]), np.array([0, 1]))


def test_display_rgb_rescales_normalised_images_per_channel():
    normalised = torch.stack([torch.linspace(-2, 2, 20).reshape(4, 5), torch.full((4, 5), 0.3), torch.zeros(4, 5)])
    normalised[1, 0, 0] = -1
    rgb = display_rgb(normalised)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 0, 0], rgb[-1, -1, 0], rgb[0, 0, 1], rgb[1, 1, 1]) == (0, 255, 0, 255)
    assert (rgb[..., 2] == 0).all()
    np.testing.assert_array_equal(display_rgb(np.full((4, 5, 3), 0.5)), 128)  # [0, 1] floats
    np.testing.assert_array_equal(display_rgb(_grey()), _grey())
    assert display_rgb(torch.ones(1, 4, 5)).shape == (4, 5, 3)


def test_overlay_transform_writes_png_named_after_the_image(tmp_path):
    image = MetaTensor((torch.rand(3, 96, 128) - 0.5) * 4, meta={"filename_or_obj": "/data/slide_7.tif"})
    data = {"image": image, "points": torch.tensor([[60.0, 50.0]]), "scores": torch.tensor([0.8]), "classes": [2]}
    transform = SaveDetectionOverlayd(output_dir=tmp_path, box_size=40)
    assert transform(data) is not data
    with Image.open(tmp_path / "slide_7_overlay.png") as written:
        overlay = np.asarray(written)
    assert overlay.shape == (96, 128, 3)
    assert tuple(overlay[50, 40]) == COLOURS[2]


def _dataset(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    image = _grey()
    image[0, 0] = 0  # the reader refuses images of one flat value
    for name in ("a.png", "b.png"):
        Image.fromarray(image).save(images / name)
    annotations = tmp_path / "annotations.csv"
    annotations.write_text("image_filename,x,y,width,height,class\na.png,60,50,40,40,HSIL\n")
    return images, annotations


def test_command_draws_ground_truth_and_predictions(tmp_path):
    images, annotations = _dataset(tmp_path)
    main(["--images", str(images), "--csv", str(annotations), "--ground-truth", "--output", str(tmp_path / "gt")])
    with Image.open(tmp_path / "gt" / "a_overlay.png") as written:
        assert tuple(np.asarray(written)[50, 40]) == COLOURS[5]
    with DetectionCSVWriter(tmp_path) as writer:
        writer.write("b.png", np.array([[30.0, 60.0]]), np.array([0.7]), np.array([4]))
    main(["--images", str(images), "--csv", str(writer.path), "--output", str(tmp_path / "pred")])
    with Image.open(tmp_path / "pred" / "a_overlay.png") as bare, Image.open(tmp_path / "pred" / "b_overlay.png") as drawn:
        np.testing.assert_array_equal(np.asarray(bare), np.asarray(Image.open(images / "a.png")))  # drawn bare
        assert tuple(np.asarray(drawn)[60, 80]) == COLOURS[4]  # right edge of the 100-pixel box at x = 80


def test_command_reports_detections_of_images_not_in_the_folder(tmp_path):
    images, _ = _dataset(tmp_path)
    with DetectionCSVWriter(tmp_path) as writer:
        writer.write("zz.png", np.array([[30.0, 60.0]]), np.array([0.7]), np.array([4]))
    with pytest.raises(SystemExit, match="detections for images not in .*: zz.png"):
        main(["--images", str(images), "--csv", str(writer.path), "--output", str(tmp_path / "pred")])
