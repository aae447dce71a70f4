"""The IdFuse training losses L1-L4 (DESIGN.md §1), pure functions of arrays.

- L1 = mse(pred(f_r), target) + text_only_weight * mse(pred(FFM(f_s)), target); the target is ε or
  v, whichever the scheduler predicts (see `idfuse_jax.diffusion`).
- L2 = mean_i cos(pool(f_s), f_i): the implicit background feature must not look like the text.
- L3 = -mean_i cos(f_i, f'_i): the implicit background feature must agree with the explicit one.
- L4 = mean_i cos(pool(f_s), f'_i): the subject text must not look like the background.

Widths: f_s is [B, T, D] and f_i is already [B, D] (the adapter ends in the text width). f'_i is
a CLIP image embedding [B, D_img]; when D_img != D the caller brings it to D with the adapter's
own final projection, shared so that no new parameters appear, and applied without gradient so
that f'_i stays a fixed target (`conditioning.projected_background`). With D_img == D that
projection is the identity and L3, L4 compare the raw f'_i, exactly as the equations read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from idfuse_jax.errors import ConfigError

TEXT_POOLS = ("mean", "eos")
DEFAULT_LAMBDAS = (1.0, 0.001, 0.001, 0.001)
# DisenBooth's nn.CosineSimilarity(dim=1, eps=1e-6).
COS_EPS = 1e-6

_log = logging.getLogger(__name__)
_warned_constant_l4 = False


def cosine(a: jax.Array, b: jax.Array, eps: float = COS_EPS) -> jax.Array:
    """a·b / (max(|a|, eps) max(|b|, eps)) over the last axis, in float32 (torch's formula)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    na = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
    nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
    return jnp.sum(a * b, axis=-1) / (na * nb)


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error in float32."""
    if pred.shape != target.shape:
        raise ConfigError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def pool_text(
    text_features: jax.Array, mode: str = "mean", eos_index: jax.Array | None = None
) -> jax.Array:
    """[B, T, D] -> [B, D]: mean over all tokens (DisenBooth) or the EOS token's feature.

    `eos_index` [B] is where the text encoder pools (`idfuse_jax.models.clip.eos_positions`).
    """
    if text_features.ndim != 3:
        raise ConfigError(f"text features must be [B, T, D], got {tuple(text_features.shape)}")
    if mode == "mean":
        return jnp.mean(text_features, axis=1)
    if mode == "eos":
        if eos_index is None:
            raise ConfigError('loss.text_pool="eos" needs the EOS index of every example')
        if eos_index.shape != text_features.shape[:1]:
            raise ConfigError(
                f"eos_index {tuple(eos_index.shape)} must be [B] for text features "
                f"{tuple(text_features.shape)}"
            )
        return jnp.take_along_axis(text_features, eos_index[:, None, None], axis=1)[:, 0]
    raise ConfigError(f"loss.text_pool must be one of {TEXT_POOLS}, got {mode!r}")


def _check_pair(name: str, a: jax.Array, b: jax.Array) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ConfigError(
            f"{name}: expected two [B, D] feature arrays of the same shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


def text_image_loss(pooled_text: jax.Array, image_features: jax.Array) -> jax.Array:
    """L2 = mean_i cos(pool(f_s), f_i)."""
    _check_pair("L2", pooled_text, image_features)
    return jnp.mean(cosine(pooled_text, image_features))


def image_background_loss(image_features: jax.Array, background_features: jax.Array) -> jax.Array:
    """L3 = -mean_i cos(f_i, f'_i)."""
    _check_pair("L3", image_features, background_features)
    return -jnp.mean(cosine(image_features, background_features))


def text_background_loss(pooled_text: jax.Array, background_features: jax.Array) -> jax.Array:
    """L4 = mean_i cos(pool(f_s), f'_i)."""
    _check_pair("L4", pooled_text, background_features)
    return jnp.mean(cosine(pooled_text, background_features))


def denoising_loss(
    pred: jax.Array, pred_text_only: jax.Array, target: jax.Array, text_only_weight: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L1 = mse(pred, target) + text_only_weight * mse(pred_text_only, target), with both parts."""
    full = mse(pred, target)
    text_only = mse(pred_text_only, target)
    return full + text_only_weight * text_only, {"l1_full": full, "l1_text_only": text_only}


def _warn_constant_l4() -> None:
    global _warned_constant_l4
    if not _warned_constant_l4:
        _warned_constant_l4 = True
        _log.warning(
            "L4 is constant: the text encoder has no trainable part (no text-encoder LoRA), and "
            "L4 has a gradient only through the text features; it is reported but trains nothing"
        )


def idfuse_loss(
    pred: jax.Array,
    pred_text_only: jax.Array,
    target: jax.Array,
    text_features: jax.Array,
    image_features: jax.Array,
    background_features: jax.Array,
    *,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    text_only_weight: float = 0.01,
    text_pool: str = "mean",
    eos_index: jax.Array | None = None,
    text_trainable: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = λ1 L1 + λ2 L2 + λ3 L3 + λ4 L4, and every term for logging.

    Args:
      pred, pred_text_only: UNet outputs conditioned on f_r and on FFM(f_s).
      target: ε or v, as the scheduler's prediction type says.
      text_features: f_s [B, T, D]; image_features: f_i [B, D]; background_features: f'_i in the
        text width [B, D] (see the module docstring).
      lambdas: (λ1, λ2, λ3, λ4).
      text_trainable: whether f_s depends on trained parameters; if not, L4 is constant and a
        warning says so once.

    Returns:
      (total, terms) with terms "loss", "l1", "l1_full", "l1_text_only", "l2", "l3", "l4".
    """
    lambdas = tuple(float(x) for x in lambdas)
    if len(lambdas) != 4:
        raise ConfigError(f"loss lambdas must be 4 numbers (λ1..λ4), got {lambdas!r}")
    if not text_trainable:
        _warn_constant_l4()
    pooled = pool_text(text_features, text_pool, eos_index)
    l1, l1_parts = denoising_loss(pred, pred_text_only, target, text_only_weight)
    terms = {
        "l1": l1,
        **l1_parts,
        "l2": text_image_loss(pooled, image_features),
        "l3": image_background_loss(image_features, background_features),
        "l4": text_background_loss(pooled, background_features),
    }
    total = sum(w * terms[k] for w, k in zip(lambdas, ("l1", "l2", "l3", "l4")))
    terms["loss"] = total
    return total, terms
