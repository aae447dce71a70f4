"""transformers' image processors for the metric models, in numpy and PIL (no torch).

`ViTImageProcessor` (DINO) and `CLIPImageProcessor` with their PIL backend, step for step
(transformers 5.x `PilBackend._preprocess`): resize the uint8 image with PIL (to a fixed
height x width, or so that the shortest side is `shortest_edge`, the long side truncated),
centre crop, rescale by 1/255 in float64 then float32, normalise (x - mean) / std in float32.
A folder's `preprocessor_config.json` overrides the class defaults, as `from_pretrained` does.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from idfuse_jax.errors import WeightsError
from idfuse_jax.formats import read_json
from idfuse_jax.models.image_stats import CLIP_MEAN, CLIP_STD

PROCESSOR_FILE = "preprocessor_config.json"
COMBINED_FILE = "processor_config.json"
# PIL's filter numbers (PILImageResampling), as processor configs store them.
BILINEAR, BICUBIC = 2, 3
IMAGENET_STANDARD = (0.5, 0.5, 0.5)  # ViTImageProcessor's default mean and std


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """What one processor does. `size` is (height, width), or `shortest_edge` is set instead;
    `crop` is (height, width) or None; `rescale` and `mean`/`std` None when switched off."""

    size: tuple[int, int] | None = None
    shortest_edge: int | None = None
    resample: int = BILINEAR
    crop: tuple[int, int] | None = None
    rescale: float | None = 1 / 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the input's aspect."""
        if self.crop is not None:
            return self.crop
        return self.size


# The class defaults of ViTImageProcessor and CLIPImageProcessor (transformers 5.x).
VIT_DEFAULTS = {
    "do_resize": True, "size": {"height": 224, "width": 224}, "resample": BILINEAR,
    "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": IMAGENET_STANDARD, "image_std": IMAGENET_STANDARD,
}  # fmt: skip
CLIP_DEFAULTS = {
    "do_resize": True, "size": {"shortest_edge": 224}, "resample": BICUBIC,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
}  # fmt: skip


def _size(value: Any, *, square: bool, key: str, where: str) -> dict[str, int]:
    """transformers' get_size_dict: an int is a square (ViT) or a shortest edge (CLIP)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, Mapping):
        keys = set(value)
        if keys == {"height", "width"} or keys == {"shortest_edge"}:
            return {k: int(v) for k, v in value.items()}
    raise WeightsError(f"{where}: unsupported {key}={value!r} (supported: height and width, or "
                       "shortest_edge)")  # fmt: skip


def processing_from_dict(
    config: Mapping[str, Any], defaults: Mapping[str, Any], *, where: str
) -> ImageProcessing:
    """An `ImageProcessing` from a processor config over the class `defaults`."""
    c = {**defaults, **config}
    square = "shortest_edge" not in defaults["size"]  # default_to_square of the class
    kwargs: dict[str, Any] = {"resample": int(c["resample"])}
    if c["do_resize"]:
        size = _size(c["size"], square=square, key="size", where=where)
        if "shortest_edge" in size:
            kwargs["shortest_edge"] = size["shortest_edge"]
        else:
            kwargs["size"] = (size["height"], size["width"])
    if c.get("do_center_crop"):
        crop = _size(c["crop_size"], square=True, key="crop_size", where=where)
        kwargs["crop"] = (crop["height"], crop["width"])
        smallest = kwargs.get("shortest_edge") or min(kwargs.get("size") or (0,))
        if smallest and max(kwargs["crop"]) > smallest:
            raise WeightsError(f"{where}: crop_size {kwargs['crop']} is larger than the resize")
    kwargs["rescale"] = float(c["rescale_factor"]) if c["do_rescale"] else None
    if c["do_normalize"]:
        kwargs["mean"] = tuple(float(v) for v in np.broadcast_to(c["image_mean"], 3))
        kwargs["std"] = tuple(float(v) for v in np.broadcast_to(c["image_std"], 3))
    return ImageProcessing(**kwargs)


def processing_from_folder(
    folder: str | pathlib.Path, defaults: Mapping[str, Any]
) -> ImageProcessing:
    """The processing of a model folder: its preprocessor_config.json (or the image_processor
    part of a processor_config.json, as transformers 5 saves a CLIPProcessor) over `defaults`."""
    path = pathlib.Path(folder) / PROCESSOR_FILE
    config = read_json(path) if path.is_file() else {}
    combined = pathlib.Path(folder) / COMBINED_FILE
    if not path.is_file() and combined.is_file():
        path, config = combined, read_json(combined).get("image_processor") or {}
    return processing_from_dict(config, defaults, where=str(path))


def resize_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False): (height, width)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre (height, width) window of an HWC image (top-left rounded down)."""
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return image[top : top + height, left : left + width]


def preprocess(image: np.ndarray, processing: ImageProcessing) -> np.ndarray:
    """One uint8 RGB image [H, W, 3] -> float32 [h, w, 3] model input (NHWC side of the
    processor's NCHW pixel_values)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    p = processing
    if p.size is not None or p.shortest_edge is not None:
        height, width = p.size or resize_size(*image.shape[:2], p.shortest_edge)
        image = np.asarray(Image.fromarray(image).resize((width, height), resample=p.resample))
    if p.crop is not None:
        image = center_crop(image, *p.crop)
    x = image.astype(np.float64) * p.rescale if p.rescale is not None else image
    x = x.astype(np.float32)
    if p.mean is not None:
        x = (x - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
    return x
