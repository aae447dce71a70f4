"""Saliency from a DINO ViT: the last layer's CLS-token attention, averaged over heads.

DINO's CLS token attends to the foreground object without ever being trained to segment; its
attention map seeds GrabCut (`masks.SaliencyGrabCut`) in place of the image border. The ViT is
ours (`idfuse_jax.models.vit`), loaded from a transformers ViTModel folder (e.g. DINO ViT-S/16,
the folder the DreamBench evaluation uses). Needs JAX: imported only when masks='dino'.
"""

from __future__ import annotations

import functools
import pathlib

import cv2
import jax
import numpy as np

from idfuse_jax import weights
from idfuse_jax.models import vit
from idfuse_jax.models.image_stats import IMAGENET_MEAN, IMAGENET_STD
from idfuse_jax.prepare.keys import folder_fingerprint

PathLike = str | pathlib.Path


class DinoSaliency:
    """`image uint8 [H, W, 3] -> float32 [grid, grid]`: a DINO ViT's CLS attention map.

    The whole photo is squashed to the model's square input (no crop, so that a subject at the
    border is seen), scaled to [0, 1] and normalised with ImageNet's mean and std, as DINO was
    trained.
    """

    def __init__(self, folder: PathLike):
        self.folder = pathlib.Path(folder)
        self.module, self.params = weights.load_vit(self.folder)
        self._attention = jax.jit(functools.partial(vit.cls_attention, self.module))
        self.key = f"dino(model={folder_fingerprint(self.folder)})"

    def pixels(self, image: np.ndarray) -> np.ndarray:
        """The model's input [1, S, S, 3] for one photo."""
        size = self.module.config.image_size
        x = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
        x = (x / 255 - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
        return x[None]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return np.asarray(self._attention(self.params, self.pixels(image))[0])
