"""The conditioning the UNet sees: adapter + FFM over text features (DESIGN.md §1).

Training:   f_com = f_s + f_i (f_i = A(E_I(x_i)) broadcast over tokens; `background="implicit"`,
            DisenBooth's conditioning) or f_s + f'_i (`background="explicit"`, the paper's
            literal f_com), and f_r = FFM(f_com); plus the text-only FFM(f_s) for the weak
            denoising term.
Inference:  FFM(E_T(prompt)), or FFM(E_T(prompt) + A(E_I(reference))) to preserve a chosen
            reference image's background.

`IdFuse` holds both trainable parts under one tree {"adapter": ..., "ffm": ...} (a preset may
drop either: `idfuse_jax.presets`); the functions
below are pure in (module, params, arrays) and meant to be called inside the jitted step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from idfuse_jax.errors import ConfigError
from idfuse_jax.models.adapter import ImageAdapter
from idfuse_jax.models.ffm import FFM
from idfuse_jax.types import Params

BACKGROUND_MODES = ("implicit", "explicit")


class IdFuse(nn.Module):
    """The method's trainable modules: the IEDM adapter and the FFM (either may be absent:
    `idfuse_jax.presets`).

    Attributes:
      image_width: D_img, width of the CLIP image embeddings.
      text_width: D, the text encoder's hidden width (the UNet's cross-attention width).
      num_experts: FFM experts K.
      expert_hidden_mult: FFM expert hidden width as a multiple of D.
      adapter_hidden_mult: adapter MLP hidden width as a multiple of D_img.
      dtype: compute dtype.
      with_adapter: whether the adapter (the image branch) exists; without it `project` is
        the identity, and needs D_img == D.
      with_ffm: whether the FFM exists; without it `fuse` passes its input on unchanged.
    """

    image_width: int
    text_width: int
    num_experts: int = 4
    expert_hidden_mult: float = 1.0
    adapter_hidden_mult: float = 1.0
    dtype: Any = jnp.float32
    with_adapter: bool = True
    with_ffm: bool = True

    def setup(self) -> None:
        if self.with_adapter:
            self.adapter = ImageAdapter(
                self.image_width, self.text_width, self.adapter_hidden_mult, dtype=self.dtype
            )
        if self.with_ffm:
            self.ffm = FFM(self.num_experts, self.expert_hidden_mult, dtype=self.dtype)

    def __call__(
        self, text_features: jax.Array, image_embeds: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """FFM(f_s + A(image_embeds)); touches every parameter, so it is the one to `init`."""
        if not self.with_adapter:
            return self.fuse(text_features)
        return self.fuse(combine(text_features, self.adapt(image_embeds)))

    def adapt(self, image_embeds: jax.Array) -> jax.Array:
        """f_i = A(f_i^(p)): [B, D_img] -> [B, D]."""
        return self.adapter(image_embeds)

    def project(self, image_embeds: jax.Array) -> jax.Array:
        """The adapter's final projection alone, [B, D_img] -> [B, D] (identity if equal)."""
        if self.with_adapter:
            return self.adapter.project(image_embeds)
        if image_embeds.shape[-1] != self.text_width:
            raise ConfigError(
                f"without the adapter, image features of width {image_embeds.shape[-1]} cannot "
                f"be compared with text features of width {self.text_width} (L4): use an image "
                "encoder whose projection width equals the text width"
            )
        return image_embeds.astype(self.dtype)

    def fuse(self, features: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(FFM(features), router stats); (features, {}) without the FFM."""
        if not self.with_ffm:
            return features, {}
        return self.ffm(features)


def combine(text_features: jax.Array, image_features: jax.Array) -> jax.Array:
    """f_s + f[:, None, :]: one image feature per example, added to every text token.

    Either batch may be 1 and broadcast against the other (one prompt for a batch of images).
    """
    if text_features.ndim != 3 or image_features.ndim != 2:
        raise ConfigError(
            f"expected text features [B, T, D] and image features [B, D], got "
            f"{tuple(text_features.shape)} and {tuple(image_features.shape)}"
        )
    b, _, d = text_features.shape
    n = image_features.shape[0]
    if image_features.shape[-1] != d or (n != b and 1 not in (n, b)):
        raise ConfigError(
            f"image features {tuple(image_features.shape)} do not fit text features "
            f"{tuple(text_features.shape)}"
        )
    return text_features + image_features[:, None, :].astype(text_features.dtype)


class TrainConditioning(NamedTuple):
    """Everything one training step needs from the method's modules."""

    full: jax.Array  # f_r = FFM(f_com), [B, T, D]
    text_only: jax.Array  # FFM(f_s), [B, T, D]
    image: jax.Array | None  # f_i = A(E_I(x)), [B, D]; None without the adapter
    # f'_i in the text width, projection without gradient, [B, D]; None without explicit
    # decoupling
    background: jax.Array | None
    stats: dict[str, jax.Array]  # router stats of the full path
    text_stats: dict[str, jax.Array]  # router stats of the text-only path


def _apply(model: IdFuse, params: Params, method: str, *args: jax.Array) -> Any:
    return model.apply({"params": params}, *args, method=method)


def projected_background(model: IdFuse, params: Params, background_embeds: jax.Array) -> jax.Array:
    """f'_i brought to the text width by the adapter's projection, with no gradient to it.

    f'_i is a frozen feature; letting the losses move the shared projection through it would
    reward collapsing the projection (cosines of a degenerate map are trivially high) and would
    give L4 gradients other than through f_s. Identity when D_img == D.
    """
    frozen = jax.tree.map(jax.lax.stop_gradient, params)
    return jax.lax.stop_gradient(_apply(model, frozen, "project", background_embeds))


def training_conditioning(
    model: IdFuse,
    params: Params,
    text_features: jax.Array,
    image_embeds: jax.Array,
    background_embeds: jax.Array,
    *,
    background: str = "implicit",
    decouple: jax.Array | None = None,
    explicit: bool = True,
) -> TrainConditioning:
    """The full and text-only conditionings plus the features the losses compare.

    Args:
      text_features: f_s, the text encoder's last hidden states [B, T, D].
      image_embeds: CLIP image embeddings of the training images [B, D_img].
      background_embeds: CLIP image embeddings of the inpainted backgrounds x'_i [B, D_img].
      background: "implicit" (f_com = f_s + f_i) or "explicit" (f_com = f_s + f'_i, with f'_i
        passed through the adapter's trainable projection when D_img != D).
      decouple: optional [B], 0 for a photo without a usable background (its mask failed):
        with background="explicit" that photo is conditioned on f_s + f_i instead.
      explicit: whether the method has explicit decoupling (f'_i is computed for L3, L4).

    Without the adapter (`IdFuse.with_adapter` False) f_com = f_s: the full conditioning is the
    text-only one.
    """
    if background not in BACKGROUND_MODES:
        raise ConfigError(
            f"method.background must be one of {BACKGROUND_MODES}, got {background!r}"
        )
    if background_embeds.shape != image_embeds.shape:
        raise ConfigError(
            f"background embeddings {tuple(background_embeds.shape)} do not match image "
            f"embeddings {tuple(image_embeds.shape)}"
        )
    f_bg = projected_background(model, params, background_embeds) if explicit else None
    if not model.with_adapter:
        full, stats = _apply(model, params, "fuse", text_features)
        return TrainConditioning(full, full, None, f_bg, stats, stats)
    f_i = _apply(model, params, "adapt", image_embeds)
    added = f_i
    if background == "explicit":
        added = _apply(model, params, "project", background_embeds)
        if decouple is not None:
            added = jnp.where(decouple[:, None] > 0, added, f_i)
    full, stats = _apply(model, params, "fuse", combine(text_features, added))
    text_only, text_stats = _apply(model, params, "fuse", text_features)
    return TrainConditioning(full, text_only, f_i, f_bg, stats, text_stats)


def text_conditioning(
    model: IdFuse, params: Params, text_features: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """FFM(E_T(prompt)): the inference conditioning (and its unconditional counterpart)."""
    if text_features.ndim != 3:
        raise ConfigError(f"expected text features [B, T, D], got {tuple(text_features.shape)}")
    return _apply(model, params, "fuse", text_features)


def reference_conditioning(
    model: IdFuse, params: Params, text_features: jax.Array, reference_embeds: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """FFM(E_T(prompt) + A(E_I(reference))): keeps a chosen reference image's background."""
    if not model.with_adapter:
        raise ConfigError("a reference image needs the adapter, which this run's method has not")
    f_ref = _apply(model, params, "adapt", reference_embeds)
    return _apply(model, params, "fuse", combine(text_features, f_ref))
