"""Multi-head attention core shared by every model: `jax.nn.dot_product_attention`.

On GPU, XLA picks a fused (cuDNN flash) kernel when shapes and dtypes allow; on CPU and TPU it
lowers to the plain einsum-softmax-einsum. Layout is [batch, tokens, heads, head_dim].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    upcast: bool = False,
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over [B, T, N, H] arrays.

    Args:
      mask: optional boolean mask broadcastable to [B, N, Tq, Tk]; True means attend.
      is_causal: apply a causal (lower-triangular) mask.
      upcast: compute in float32 whatever the input dtype (diffusers' `upcast_attention`,
        needed by SD 2.x in half precision); the result comes back in the input dtype.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    return out.astype(dtype)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[B, T, N*H] -> [B, T, N, H]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """[B, T, N, H] -> [B, T, N*H]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
