"""FFM: mixture-of-experts feature fusion, f_r = Σ_k R(x)_k · E_k(x), per token.

The router R is a Dense D -> K followed by a softmax: dense routing, every expert runs on every
token (no top-k), and the weights sum to 1. Expert k is residual, E_k(x) = x + MLP_k(x) with
MLP_k = Dense(D, H) - GELU - Dense(H, D). The K experts are stored stacked ([K, D, H], [K, H, D])
and run as einsums, no Python loop. Their output layers are zero-initialised, so FFM(x) == x
exactly at step 0 and the pretrained UNet first sees the conditioning it was trained on.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from idfuse_jax.errors import ConfigError


def router_entropy(weights: jax.Array) -> jax.Array:
    """Mean over tokens of -Σ_k w_k log w_k for router weights [..., K] (0 log 0 taken as 0)."""
    safe = jnp.where(weights > 0, weights, 1.0)
    return jnp.mean(-jnp.sum(weights * jnp.log(safe), axis=-1))


class FFM(nn.Module):
    """Dense softmax mixture of K residual MLP experts over [..., T, D] token features.

    Returns (f_r, stats) with stats = {"router_weight": mean weight per expert [K],
    "router_entropy": mean per-token router entropy []}, both float32, for logging. The
    per-token weights [..., T, K] are sown as intermediates/router_weights.

    Attributes:
      num_experts: K.
      hidden_mult: expert hidden width H = round(hidden_mult * D).
      dtype: compute dtype (parameters and router softmax stay float32).
    """

    num_experts: int = 4
    hidden_mult: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ConfigError(
                f"FFM.num_experts must be a positive integer, got {self.num_experts!r}"
            )
        if not self.hidden_mult > 0:
            raise ConfigError(f"FFM.hidden_mult must be positive, got {self.hidden_mult!r}")
        if x.ndim < 2:
            raise ConfigError(f"FFM expects token features [..., T, D], got shape {tuple(x.shape)}")
        k, d = self.num_experts, x.shape[-1]
        h = max(1, round(self.hidden_mult * d))
        # Fan-in scaling per expert: the leading K axis is a batch axis, not a fan axis.
        stacked_init = nn.initializers.lecun_normal(batch_axis=(0,))
        w_in = self.param("w_in", stacked_init, (k, d, h))
        b_in = self.param("b_in", nn.initializers.zeros_init(), (k, h))
        w_out = self.param("w_out", nn.initializers.zeros_init(), (k, h, d))
        b_out = self.param("b_out", nn.initializers.zeros_init(), (k, d))

        logits = nn.Dense(k, name="router")(x.astype(jnp.float32))
        weights = jax.nn.softmax(logits, axis=-1)
        # Per-token weights for analysis: apply(..., mutable=["intermediates"]) returns them.
        self.sow("intermediates", "router_weights", weights)

        xc = x.astype(self.dtype)
        hidden = nn.gelu(
            jnp.einsum("...d,kdh->...kh", xc, w_in.astype(self.dtype)) + b_in.astype(self.dtype),
            approximate=False,
        )
        # Σ_k w_k (x + MLP_k(x)) = x + Σ_k w_k MLP_k(x) because Σ_k w_k = 1; weighting the hidden
        # units first contracts the K experts' output layers in one einsum without ever
        # materialising the [..., K, D] per-expert outputs.
        wc = weights.astype(self.dtype)
        mixed = jnp.einsum("...kh,khd->...d", wc[..., None] * hidden, w_out.astype(self.dtype))
        mixed = mixed + wc @ b_out.astype(self.dtype)
        f_r = xc + mixed

        flat = weights.reshape(-1, k)
        stats = {"router_weight": jnp.mean(flat, axis=0), "router_entropy": router_entropy(flat)}
        return f_r, stats
