"""The IdFuse training losses L1-L4 (DESIGN.md §1), pure functions of arrays.

Each term has one name, used alike for its function, its weight in `config.loss.weights` and
its metric key:

- `denoise` (L1) = mse(pred(f_r), target) + text_only_weight * mse(pred(FFM(f_s)), target); the
  target is ε or v, whichever the scheduler predicts (see `idfuse_jax.diffusion`). Its two parts
  are logged as `denoise_full` and `denoise_text_only`.
- `text_image` (L2) = mean_i cos(pool(f_s), f_i): the implicit background feature must not look
  like the subject text.
- `image_background` (L3) = -mean_i cos(f_i, f'_i): the implicit background feature must agree
  with the explicit one.
- `text_background` (L4) = mean_i cos(pool(f_s), f'_i): the subject text must not look like the
  background.

L3 and L4 take optional per-example weights (`decouple`): a photo whose mask failed has no usable
background x'_i, so it counts with weight 0 in their means (not as a zero background).

Widths: f_s is [B, T, D] and f_i is already [B, D] (the adapter ends in the text width). f'_i is
a CLIP image embedding [B, D_img]; when D_img != D the caller brings it to D with the adapter's
own final projection, shared so that no new parameters appear, and applied without gradient so
that f'_i stays a fixed target (`conditioning.projected_background`). With D_img == D that
projection is the identity and L3, L4 compare the raw f'_i, exactly as the equations read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from absl import logging

from idfuse_jax.errors import ConfigError

TEXT_POOLS = ("mean", "eos")
# L1..L4 in the paper's order, and their default weights λ1..λ4 (DisenBooth's).
TERMS = ("denoise", "text_image", "image_background", "text_background")
DEFAULT_WEIGHTS = {
    "denoise": 1.0,
    "text_image": 0.001,
    "image_background": 0.001,
    "text_background": 0.001,
}
# DisenBooth's nn.CosineSimilarity(dim=1, eps=1e-6).
COS_EPS = 1e-6

_warned_constant_text_background = False


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


def weighted_mean(values: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """mean(values), or Σ w·v / max(Σ w, tiny) with per-example `weights` [B]: 0 when every
    weight is 0 (no example in the batch has a usable background)."""
    if weights is None:
        return jnp.mean(values)
    if weights.shape != values.shape:
        raise ConfigError(
            f"per-example weights {tuple(weights.shape)} must be [B] for {tuple(values.shape)}"
        )
    weights = weights.astype(jnp.float32)
    tiny = jnp.finfo(jnp.float32).tiny
    return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), tiny)


def image_background_loss(
    image_features: jax.Array, background_features: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """L3 = -mean_i cos(f_i, f'_i), over the examples with weight 1 when `weights` is given
    (`weighted_mean`: photos whose mask failed have no usable background f'_i)."""
    _check_pair("L3", image_features, background_features)
    return -weighted_mean(cosine(image_features, background_features), weights)


def text_background_loss(
    pooled_text: jax.Array, background_features: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """L4 = mean_i cos(pool(f_s), f'_i), weighted like L3."""
    _check_pair("L4", pooled_text, background_features)
    return weighted_mean(cosine(pooled_text, background_features), weights)


def denoise_loss(
    pred: jax.Array, pred_text_only: jax.Array | None, target: jax.Array, text_only_weight: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L1 = mse(pred, target) + text_only_weight * mse(pred_text_only, target), with both parts
    (without a text-only prediction: mse(pred, target) alone)."""
    full = mse(pred, target)
    if pred_text_only is None:
        return full, {"denoise_full": full}
    text_only = mse(pred_text_only, target)
    return full + text_only_weight * text_only, {
        "denoise_full": full,
        "denoise_text_only": text_only,
    }


def _warn_constant_text_background() -> None:
    global _warned_constant_text_background
    if not _warned_constant_text_background:
        _warned_constant_text_background = True
        logging.warning(
            "L4 is constant: the text encoder has no trainable part (no text-encoder LoRA), and "
            "L4 has a gradient only through the text features; it is reported but trains nothing"
        )


def idfuse_loss(
    pred: jax.Array,
    pred_text_only: jax.Array | None,
    target: jax.Array,
    text_features: jax.Array,
    image_features: jax.Array | None,
    background_features: jax.Array | None,
    *,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    text_only_weight: float = 0.01,
    text_pool: str = "mean",
    eos_index: jax.Array | None = None,
    text_trainable: bool = True,
    decouple: jax.Array | None = None,
    terms: Sequence[str] = TERMS,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = Σ_k weights[k] · L_k over the method's `terms` (default: all of `TERMS`), and every
    term for logging.

    Args:
      pred, pred_text_only: UNet outputs conditioned on f_r and on FFM(f_s).
      target: ε or v, as the scheduler's prediction type says.
      text_features: f_s [B, T, D]; image_features: f_i [B, D]; background_features: f'_i in the
        text width [B, D] (see the module docstring).
      weights: a weight for each name in `TERMS` (λ1..λ4), e.g. `config.loss.weights`.
      text_trainable: whether f_s depends on trained parameters; if not, L4 is constant and a
        warning says so once.
      decouple: optional per-example weights [B] of L3 and L4: 1 where f'_i is a usable
        background, 0 where the photo trains without explicit decoupling (its mask failed).
      terms: the terms the method has (`presets.Preset.terms`); the others are neither
        computed nor logged, and their features may be None.

    Returns:
      (total, terms): terms holds "loss", every name of `terms`, "denoise_full" and (with a
      text-only prediction) "denoise_text_only".
    """
    if set(weights) != set(TERMS):
        raise ConfigError(f"loss weights must name exactly {list(TERMS)}, got {sorted(weights)}")
    if not text_trainable and "text_background" in terms:
        _warn_constant_text_background()
    pooled = pool_text(text_features, text_pool, eos_index)
    denoise, denoise_parts = denoise_loss(pred, pred_text_only, target, text_only_weight)
    compute = {
        "text_image": lambda: text_image_loss(pooled, image_features),
        "image_background": lambda: image_background_loss(
            image_features, background_features, decouple
        ),
        "text_background": lambda: text_background_loss(pooled, background_features, decouple),
    }
    values = {"denoise": denoise, **denoise_parts}
    values.update({k: compute[k]() for k in TERMS if k in terms and k != "denoise"})
    # Python numbers from a config, or traced per-slot arrays of a loss-weight sweep.
    weight = lambda k: weights[k] if isinstance(weights[k], jax.Array) else float(weights[k])
    total = sum(weight(k) * values[k] for k in TERMS if k in terms)
    values["loss"] = total
    return total, values
