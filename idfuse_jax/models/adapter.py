"""IEDM implicit decoupling adapter: A(f) = MLP(σ(m)⊙f) + σ(m)⊙f, then a Dense to the text width.

Follows DisenBooth's `Image_adapter` (github forchchch/DisenBooth, disen_net.py): the mask m is a
learned vector initialised to zeros, so σ(m) = 0.5 everywhere at step 0, and the MLP is
Linear(D_img, D_img) - ReLU - Linear(D_img, D_img). DisenBooth pairs encoders of equal width
(SD 2.1 text 1024 with OpenCLIP ViT-H image embeds 1024); where the widths differ (e.g. a 512-wide
ViT-B image tower with SD 1.x's 768-wide text) a final Dense `proj` maps to the text width D.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from idfuse_jax.errors import ConfigError


class ImageAdapter(nn.Module):
    """Maps CLIP image embeddings [..., D_img] to implicit background features [..., D].

    Attributes:
      image_width: D_img, the width of the CLIP image embedding.
      text_width: D, the text encoder's hidden width; a Dense `proj` is added when it differs.
      hidden_mult: MLP hidden width = round(hidden_mult * D_img) (1 in DisenBooth).
      dtype: compute dtype (parameters stay float32).
    """

    image_width: int
    text_width: int
    hidden_mult: float = 1.0
    dtype: Any = jnp.float32

    def setup(self) -> None:
        for name in ("image_width", "text_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"ImageAdapter.{name} must be a positive integer, got {value!r}")
        if not self.hidden_mult > 0:
            raise ConfigError(
                f"ImageAdapter.hidden_mult must be positive, got {self.hidden_mult!r}"
            )
        # Zero init as DisenBooth: σ(0) = 0.5 halves every feature at step 0.
        self.mask = self.param("mask", nn.initializers.zeros_init(), (self.image_width,))
        self.fc1 = nn.Dense(max(1, round(self.hidden_mult * self.image_width)), dtype=self.dtype)
        self.fc2 = nn.Dense(self.image_width, dtype=self.dtype)
        self.proj = (
            nn.Dense(self.text_width, dtype=self.dtype)
            if self.image_width != self.text_width
            else None
        )

    def gate(self) -> jax.Array:
        """σ(m), the soft feature mask, in (0, 1)."""
        return jax.nn.sigmoid(self.mask)

    def __call__(self, image_embeds: jax.Array) -> jax.Array:
        self._check_width(image_embeds)
        gated = self.gate().astype(self.dtype) * image_embeds.astype(self.dtype)
        out = self.fc2(nn.relu(self.fc1(gated))) + gated
        return self.project(out)

    def project(self, features: jax.Array) -> jax.Array:
        """The final Dense to the text width (identity when the widths are equal).

        Also used to bring explicit background features f'_i into the text width, so that no
        extra parameters are needed to compare them with text and adapter features.
        """
        self._check_width(features)
        if self.proj is None:
            return features.astype(self.dtype)
        return self.proj(features)

    def _check_width(self, x: jax.Array) -> None:
        if x.shape[-1] != self.image_width:
            raise ConfigError(
                f"ImageAdapter expects image features of width {self.image_width}, "
                f"got shape {tuple(x.shape)}"
            )
