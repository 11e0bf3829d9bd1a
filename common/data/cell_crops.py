"""Fixed-size crops around cell centres, the input of the cell classifier.

A cytology detector gives cell centres; the classifier sees a ``crop_size`` square around each centre,
resized to what the backbone expects. :func:`extract_crops` cuts all crops of one image in a single
``grid_sample`` call (sub-pixel centres, zero or mirror padding at the borders), so inference on an
image with hundreds of cells costs one kernel launch. :class:`CellCropDataset` serves the same crops
for training, one item per annotated cell.

Coordinates follow COCO: pixel ``i`` covers ``[i, i + 1)``, so the crop around an integer centre
``(x, y)`` is exactly ``image[:, y - s/2 : y + s/2, x - s/2 : x + s/2]``, the annotated box.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from torch.utils.data import Dataset

from common.data.cell_readers import read_image
from common.errors import InputDataError

__all__ = ["PADDING_MODES", "CellCropDataset", "extract_crops"]

# our names (as in numpy.pad) -> grid_sample's; "reflect" mirrors about the image edge, so the border
# pixel is repeated once (numpy's "symmetric"), which keeps texture continuous across the border.
PADDING_MODES = {"constant": "zeros", "reflect": "reflection"}


def extract_crops(
    image: torch.Tensor,
    points: torch.Tensor | np.ndarray,
    crop_size: int = 100,
    output_size: int = 224,
    padding_mode: str = "constant",
) -> torch.Tensor:
    """Crops of ``crop_size`` pixels centred on ``points``, resized bilinearly to ``output_size``.

    Sampling the resized grid straight from the image resizes and crops in one step, and a crop that
    reaches past the border is padded (zeros, or mirrored image content) rather than shifted, so the
    cell stays at the centre of its crop.

    Args:
        image: (C, H, W) image, any dtype (integer images are sampled as float32).
        points: (K, 2) centres as (x, y) in pixels; fractional values are allowed.
        crop_size: side of the square cut around each centre, in image pixels.
        output_size: side of the returned crops.
        padding_mode: ``"constant"`` (zeros) or ``"reflect"`` (mirror at the image edge).

    Returns:
        (K, C, output_size, output_size) crops, float32 unless ``image`` is a wider float type.
        Memory is about K x (C + 2) x output_size^2 floats: split very large K at the call site.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {sorted(PADDING_MODES)}, got {padding_mode!r}.")
    if crop_size < 1 or output_size < 1:
        raise ValueError(f"crop_size and output_size must be >= 1, got {crop_size} and {output_size}.")
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}.")
    dtype = image.dtype if image.is_floating_point() else torch.float32
    # plain tensors: a MetaTensor's per-image metadata would be copied onto every crop of the batch
    image = torch.as_tensor(image, dtype=dtype).as_subclass(torch.Tensor)
    points = torch.as_tensor(points, dtype=dtype, device=image.device).as_subclass(torch.Tensor)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must be (K, 2) as (x, y), got shape {tuple(points.shape)}.")
    height, width = image.shape[1:]
    n_crops = points.shape[0]

    # continuous position of each output pixel's centre, relative to the crop centre
    offsets = (torch.arange(output_size, dtype=dtype, device=image.device) + 0.5) * (crop_size / output_size)
    offsets = offsets - crop_size / 2
    # grid_sample with align_corners=False maps -1..1 onto the outer edges of the image: u = 2 x / W - 1
    grid_x = 2 * (points[:, 0:1] + offsets) / width - 1  # (K, O)
    grid_y = 2 * (points[:, 1:2] + offsets) / height - 1
    grid = torch.stack(
        (
            grid_x[:, None, :].expand(n_crops, output_size, output_size),
            grid_y[:, :, None].expand(n_crops, output_size, output_size),
        ),
        dim=-1,
    )
    # expand() repeats the image for every crop without copying it
    return F.grid_sample(
        image[None].expand(n_crops, -1, -1, -1),
        grid,
        mode="bilinear",
        padding_mode=PADDING_MODES[padding_mode],
        align_corners=False,
    )


class CellCropDataset(Dataset):
    """One item per annotated cell: the crop around its box centre and its class.

    Built from the cytology datalist (``{"image", "boxes", "labels", "name"}`` per image). Each item
    is ``{"image": (C, output_size, output_size) float MetaTensor in the image's 0..255 range with
    ``filename_or_obj``, "label": int64 class index, "name": image name, "point": (2,) centre (x, y)}``,
    passed through ``transform`` (MONAI dictionary transforms: flips, colour jitter, normalisation).

    Decoded images are kept in a small LRU cache, so the crops of one image read it once when they
    are requested together (evaluation order); with a shuffled sampler most requests miss, and a
    larger ``cache_size`` (up to the number of images, if memory allows) avoids re-decoding.

    Args:
        datalist: one dict per image with ``image`` (path), ``boxes`` (N, 4) xyxy pixels and
            ``labels`` (N,); ``name`` defaults to the file name.
        transform: callable applied to every item.
        crop_size: side of the square around each centre, in image pixels.
        output_size: side of the crops returned.
        padding_mode: ``"reflect"`` or ``"constant"`` for crops reaching past the image border; use
            the mode of inference. Mirroring commutes with per-pixel normalisation, so crops cut from
            a raw image and normalised equal crops cut from the normalised image; zeros do not.
        image_loader: path -> HxWxC uint8 array; the default reads PNG/TIFF/JPEG as RGB and raises
            :class:`~common.errors.InputDataError` naming an unreadable file.
        cache_size: decoded images kept in memory (per data-loader worker).

    Raises:
        InputDataError: an entry without ``image``, or ``boxes``/``labels`` of the wrong shape; when an
            item is read, an unreadable image or a box centre outside its image.
    """

    def __init__(
        self,
        datalist: Sequence[Mapping[str, Any]],
        transform: Callable[[dict[str, Any]], Any] | None = None,
        crop_size: int = 100,
        output_size: int = 224,
        padding_mode: str = "reflect",
        image_loader: Callable[[str], np.ndarray] = read_image,
        cache_size: int = 4,
    ) -> None:
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {sorted(PADDING_MODES)}, got {padding_mode!r}.")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}.")
        self.transform = transform
        self.crop_size = crop_size
        self.output_size = output_size
        self.padding_mode = padding_mode
        self.image_loader = image_loader
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

        self.paths: list[str] = []
        self.names: list[str] = []
        points, labels = [], []
        for index, entry in enumerate(datalist):
            path, boxes, entry_labels = _checked_entry(entry, index)
            self.paths.append(path)
            self.names.append(str(entry.get("name") or os.path.basename(path)))
            points.append((boxes[:, :2] + boxes[:, 2:]) / 2)
            labels.append(entry_labels)
        counts = [len(lab) for lab in labels]
        self._image_index = np.repeat(np.arange(len(counts)), counts)
        self._points = np.concatenate(points).astype(np.float32) if points else np.zeros((0, 2), np.float32)
        self._labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)

    @property
    def labels(self) -> np.ndarray:
        """Class index of every item, in item order (for samplers and class weights)."""
        return self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def _image(self, path: str) -> torch.Tensor:
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        pixels = self.image_loader(path)
        if pixels.ndim != 3:
            raise InputDataError(path, f"image loader returned shape {pixels.shape}; expected HxWxC")
        image = torch.from_numpy(np.require(pixels, requirements=["C", "W"])).permute(2, 0, 1)
        self._cache[path] = image
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return image

    def __getitem__(self, index: int) -> Any:
        image_index = int(self._image_index[index])
        path = self.paths[image_index]
        point = torch.tensor(self._points[index])
        window, origin = self._window(self._image(path), point, path)
        crops = extract_crops(
            window, (point - origin)[None], self.crop_size, self.output_size, self.padding_mode
        )
        item = {
            "image": MetaTensor(crops[0], meta={"filename_or_obj": path}),
            "label": torch.tensor(self._labels[index], dtype=torch.int64),
            "name": self.names[image_index],
            "point": point,
        }
        return self.transform(item) if self.transform is not None else item

    def _window(
        self, image: torch.Tensor, point: torch.Tensor, path: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The part of ``image`` one crop samples (with a pixel of margin for interpolation) and its
        top-left corner, so an item converts ``crop_size``^2 pixels to float rather than the image.

        Clipping the window at the image border changes nothing: zero padding starts there anyway, and
        mirrored content lies within ``crop_size / 2`` of a centre that is inside the image.
        """
        height, width = image.shape[1:]
        x, y = float(point[0]), float(point[1])
        if not (0 <= x < width and 0 <= y < height):
            raise InputDataError(path, f"cell centre ({x:g}, {y:g}) lies outside the {width}x{height} image")
        half = self.crop_size / 2
        x0, y0 = max(int(np.floor(x - half)) - 1, 0), max(int(np.floor(y - half)) - 1, 0)
        x1, y1 = min(int(np.ceil(x + half)) + 1, width), min(int(np.ceil(y + half)) + 1, height)
        return image[:, y0:y1, x0:x1].float(), torch.tensor([x0, y0], dtype=torch.float32)


def _checked_entry(entry: Mapping[str, Any], index: int) -> tuple[str, np.ndarray, np.ndarray]:
    """(path, boxes (N, 4) float, labels (N,) int) of one datalist entry, or an error naming it."""
    if "image" not in entry:
        raise InputDataError(None, f"datalist entry {index} has no 'image' path (keys: {sorted(entry)})")
    path = os.fspath(entry["image"])
    boxes = np.asarray(entry.get("boxes", np.zeros((0, 4))), dtype=np.float64)
    labels = np.asarray(entry.get("labels", np.zeros(0)))
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InputDataError(path, f"boxes have shape {boxes.shape}; expected (N, 4) as x1, y1, x2, y2")
    if labels.ndim != 1 or len(labels) != len(boxes):
        raise InputDataError(path, f"labels have shape {labels.shape} for {len(boxes)} boxes; expected (N,)")
    if len(labels) and not np.issubdtype(labels.dtype, np.integer):
        raise InputDataError(path, f"labels must be class indices, got dtype {labels.dtype}")
    if not np.isfinite(boxes).all():
        raise InputDataError(path, "boxes contain NaN or infinite coordinates")
    return path, boxes, labels.astype(np.int64)
