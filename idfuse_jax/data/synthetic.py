"""A synthetic subject with ground truth, for tiny training runs and tests (numpy only).

Every image shows the same distinctive object (an orange body, a yellow head with a blue eye, a
magenta stripe: all strongly saturated) at a random place, size and tilt, on a scene of
low-saturation patterns (gradient, stripes, checks or soft blobs). Because the object is pasted
with hard edges, the mask is exact and the background is exactly the scene without the object:
ground truth for the explicit decoupling branch. Image i depends only on (seed, i).
"""

from __future__ import annotations

import pathlib

import numpy as np

from idfuse_jax import paths
from idfuse_jax.data.images import BACKGROUNDS_DIR, MASKS_DIR
from idfuse_jax.errors import DataError
from idfuse_jax.types import PathLike

# Object parts in the object's own frame (unit = object radius), painted in this order.
_BODY, _HEAD, _STRIPE, _EYE = (
    np.array(c, np.float32) for c in ((240, 120, 20), (250, 210, 30), (215, 30, 160), (30, 80, 225))
)
# The object's extent from its centre, in object radii (see _object), to keep it off the border.
_EXTENT = 1.3
_MARGIN = 0.08  # free border band, as a fraction of the image side


def _scene(rng: np.random.Generator, res: int, kind: int) -> np.ndarray:
    """A low-saturation background pattern, float32 [res, res, 3] in [0, 255]."""
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) / res
    grey = rng.uniform(70, 200, size=2)
    tint = rng.uniform(-18, 18, size=(2, 3))
    c0, c1 = (grey[:, None] + tint).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == 0:  # linear gradient
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    elif kind == 1:  # soft stripes
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 5) * along)
    elif kind == 2:  # checks
        n = rng.integers(3, 7)
        t = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(np.float32)
    else:  # soft blobs
        t = np.zeros_like(xx)
        for cy, cx, r in rng.uniform((0, 0, 0.1), (1, 1, 0.3), size=(4, 3)):
            t = np.maximum(t, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
    scene = c0 + t[..., None] * (c1 - c0)
    scene += rng.normal(0, 3, size=scene.shape).astype(np.float32)  # sensor-like grain
    return np.clip(scene, 0, 255)


def _object(rng: np.random.Generator, res: int) -> tuple[np.ndarray, np.ndarray]:
    """The object's colour image (float32 [res, res, 3]) and its exact mask (bool [res, res])."""
    radius = rng.uniform(0.22, 0.3) * res
    lo, hi = _MARGIN * res + _EXTENT * radius, (1 - _MARGIN) * res - _EXTENT * radius
    cy, cx = rng.uniform(lo, hi, size=2)
    theta = rng.uniform(-0.4, 0.4)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5  # pixel centres
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    body = (u / 0.95) ** 2 + (v / 0.65) ** 2 <= 1
    head = (u - 0.6) ** 2 + (v + 0.6) ** 2 <= 0.42**2
    stripe = body & (np.abs(u + 0.15) < 0.16)
    eye = head & (np.abs(u - 0.7) < 0.12) & (np.abs(v + 0.65) < 0.12)
    colour = np.zeros((res, res, 3), np.float32)
    for part, c in ((body, _BODY), (head, _HEAD), (stripe, _STRIPE), (eye, _EYE)):
        colour[part] = c
    return colour, body | head


def synthetic_subject(
    num_images: int, resolution: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic subject photos with exact ground truth.

    Returns (images uint8 [N, R, R, 3], masks uint8 [N, R, R] in {0, 1},
    backgrounds uint8 [N, R, R, 3]); images == backgrounds wherever mask == 0.
    """
    if num_images < 1:
        raise DataError(f"num_images must be at least 1, got {num_images}")
    if resolution < 8:
        raise DataError(f"resolution must be at least 8 px, got {resolution}")
    images, masks, backgrounds = [], [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        scene = np.round(_scene(rng, resolution, kind=i % 4)).astype(np.uint8)
        colour, mask = _object(rng, resolution)
        images.append(np.where(mask[..., None], colour.astype(np.uint8), scene))
        masks.append(mask.astype(np.uint8))
        backgrounds.append(scene)
    return np.stack(images), np.stack(masks), np.stack(backgrounds)


def write_synthetic_subject(
    folder: PathLike,
    num_images: int,
    resolution: int,
    seed: int,
    *,
    with_masks: bool = False,
    truth_dir: PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Write `synthetic_subject(...)` as a subject folder (`NN.png`); returns the arrays.

    `with_masks` adds the exact masks as user-given `masks/NN.png` in the subject folder.
    `truth_dir` receives `masks/` and `backgrounds/` in the layout `idfuse_jax.prepare` writes,
    so `load_subject(folder, R, prepared_dir=truth_dir)` loads the exact ground truth.
    """
    images, masks, backgrounds = synthetic_subject(num_images, resolution, seed)
    folder = pathlib.Path(folder)
    width = max(2, len(str(num_images - 1)))
    for i in range(num_images):
        name = f"{i:0{width}d}.png"
        paths.save_png(folder / name, images[i])
        if with_masks:
            paths.save_png(folder / MASKS_DIR / name, masks[i] * 255)
        if truth_dir is not None:
            paths.save_png(pathlib.Path(truth_dir) / MASKS_DIR / name, masks[i] * 255)
            paths.save_png(pathlib.Path(truth_dir) / BACKGROUNDS_DIR / name, backgrounds[i])
    return images, masks, backgrounds
