"""Backgrounds x'_i: the photo with its subject inpainted away.

An inpainter is a function `(image uint8 [H, W, 3], mask {0, 1} [H, W]) -> uint8 [H, W, 3]`.
OpenCV Telea is the offline default; 'sd' runs a Stable Diffusion inpainting model with our own
UNet (`sd_inpaint.SDInpainter`, imported only when asked: it needs JAX and the models).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import cv2
import numpy as np

from idfuse_jax.errors import DataError
from idfuse_jax.prepare.masks import dilate, dilation_pixels, grow, shrink

PathLike = str | pathlib.Path
Inpainter = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (image, mask) -> uint8 [H, W, 3]

INPAINTERS = ("telea", "sd")


@dataclasses.dataclass(frozen=True)
class Telea:
    """OpenCV Telea inpainting of the mask dilated by `dilate` x the shorter side (covering the
    subject's soft edge and contact shadow), at a working size whose long side is `work_size`;
    pixels outside the dilated mask keep the photo's own values."""

    dilate: float = 0.02
    radius: int = 5
    work_size: int = 512

    @property
    def key(self) -> str:
        return f"telea(dilate={self.dilate},radius={self.radius},size={self.work_size})"

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        hole = dilate(mask, dilation_pixels(image.shape, self.dilate))
        if not hole.any():
            return image.copy()
        small = shrink(image, self.work_size, cv2.INTER_AREA)
        small_hole = grow(hole, small.shape)
        # The hole at working size must cover the full-size hole, or a seam of subject remains.
        small_hole = dilate(small_hole, 1) if small.shape != image.shape else small_hole
        filled = cv2.inpaint(
            np.ascontiguousarray(small[..., ::-1]), small_hole * 255, self.radius, cv2.INPAINT_TELEA
        )[..., ::-1]
        if filled.shape != image.shape:
            filled = cv2.resize(filled, image.shape[1::-1], interpolation=cv2.INTER_CUBIC)
        return np.where(hole[..., None] > 0, filled, image)


def make_inpainter(inpaint: str, inpaint_model: PathLike | None = None) -> Inpainter:
    """The inpainter for an `inpaint` choice (one of INPAINTERS; 'sd' needs a model folder)."""
    if inpaint not in INPAINTERS:
        raise DataError(f"inpaint must be one of {', '.join(INPAINTERS)}, got {inpaint!r}")
    if inpaint == "telea":
        return Telea()
    if not inpaint_model:
        raise DataError("inpaint='sd' needs the folder of an SD inpainting model")
    from idfuse_jax.prepare.sd_inpaint import SDInpainter  # heavy (JAX models): only when asked

    return SDInpainter(inpaint_model)
