"""Multi-head attention core shared by every model, with one implementation chosen per backend.

`jax.nn.dot_product_attention` with `implementation=None` lowers to the plain XLA
einsum-softmax-einsum on every backend (jax 0.10 `case None`): it materialises each [B, N, Tq, Tk]
score matrix, and cuDNN's fused kernel runs only when asked for by name. So the implementation is
chosen here, by name (config `model.attention`):

- "xla": `jax.nn.dot_product_attention`, materialised scores (the reference).
- "blockwise": portable flash attention in plain JAX. Blocks of `QUERY_BLOCK` queries one after
  the other, each with an online softmax over blocks of `BLOCK` keys; a custom VJP saves only the
  output and the softmax max and sum per query and recomputes each block's probabilities in the
  backward pass (flash-attention-2), so memory is O(T x BLOCK) instead of O(T^2). On the 2-core
  CPU it is also 4-10x faster than "xla" in fwd+bwd (the score tiles stay in cache).
- "cudnn": cuDNN's fused flash kernel (`implementation="cudnn"`), GPU only, fp16/bf16 and head
  size <= 128 (256 from Hopper on), multiple of 8, no explicit mask; otherwise "blockwise", with
  the reason logged once.
- "tpu_flash": the Pallas TPU flash-attention kernel shipped with jax
  (`jax.experimental.pallas.ops.tpu.flash_attention`), imported only when used. Head sizes above
  128 that are not a multiple of 128 (SD 1.5's 160), which the kernel refuses, are zero-padded
  to one (same scores, same scale; the padding is cut off the output).
- "auto" (default): "cudnn" on GPU (float32, e.g. the VAE, goes "blockwise"), "tpu_flash" on
  TPU, "blockwise" elsewhere; logged once.

The platform is that of the devices the program is compiled for (`models.placement`), not the
host's default backend. In a program over several devices the fused kernels (Pallas cannot be
partitioned by XLA at all) run under a `jax.shard_map` of the program's mesh: the batch split
over the placement's batch axes that divide it, then the heads over the remaining ones; an
enclosing `vmap(spmd_axis_name=...)` adds its own axis.

Layout is [batch, tokens, heads, head_dim]. Masks are boolean, broadcastable to [B, N, Tq, Tk]
(True means attend); a fully masked row attends uniformly to every key, as in jax. Softmax
statistics (max and sum) are float32 in every implementation; `upcast` (SD 2.x's
`upcast_attention`) also runs the matmuls in float32 where the kernel allows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import einops
import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec

from idfuse_jax.errors import ConfigError
from idfuse_jax.models import placement
from idfuse_jax.models.backward import after

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "tpu_flash")
# Keys per block of the blockwise kernel. 128 measured fastest on the 2-core CPU at
# [4, 1024, 8, 16] fwd+bwd (ms: 32 -> 181, 64 -> 153, 128 -> 113, 256 -> 148, 512 -> 260).
BLOCK = 128
# Query rows per block (one after the other): with BLOCK keys, a [B, N, 256, 128] tile stays in
# cache. Fwd+bwd ms at [4, 1024, 8, 8] / [4, 1024, 8, 16]: all queries at once 270 / 303,
# 512 -> 208 / 276, 256 -> 171 / 210, 128 -> 203 / 254 (keys 256), 64 -> 198 / 237 (keys 256).
QUERY_BLOCK = 256
# jax's masked-logit value (`_get_large_negative` for float32): a fully masked row stays uniform.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
TPU_BLOCK = 128  # the Pallas TPU kernel's key blocks must be multiples of its 128 lanes
_logged: set[str] = set()


def _log_once(message: str, warn: bool = False) -> None:
    """absl-log `message` the first time it is seen in this process (traces repeat it)."""
    if message not in _logged:
        _logged.add(message)
        (logging.warning if warn else logging.info)("%s", message)


def _check_name(name: str) -> None:
    if name not in IMPLEMENTATIONS:
        raise ConfigError(
            f"attention implementation {name!r} is not one of {list(IMPLEMENTATIONS)}"
        )


def _cudnn_refusal(where: placement.Placement, q: jax.Array, mask: jax.Array | None) -> str | None:
    """Why cuDNN's fused kernel cannot take these inputs, or None when it can."""
    if where.platform != "gpu":
        return f"platform is {where.platform}, not gpu"
    if q.dtype not in (jnp.float16, jnp.bfloat16):
        return f"dtype {q.dtype} (cuDNN flash attention needs float16/bfloat16)"
    head_max = 256 if float(where.compute_capability or 0) >= 9.0 else 128
    if q.shape[-1] > head_max or q.shape[-1] % 8:
        return f"head size {q.shape[-1]} (needs a multiple of 8, at most {head_max})"
    if mask is not None:
        return "an explicit mask (cuDNN takes it as a bias, which it trains only at even lengths)"
    return None


def resolve(name: str, q: jax.Array, mask: jax.Array | None = None) -> str:
    """The implementation that runs for `name` on these inputs (never "auto"), on the platform
    of the program being traced (`placement.current()`).

    Raises ConfigError for an unknown name. A "cudnn" (asked for, or chosen by "auto") that
    cannot run falls back to "blockwise" and logs why, once.
    """
    _check_name(name)
    where = placement.current()
    if name == "auto":
        chosen = {"gpu": "cudnn", "tpu": "tpu_flash"}.get(where.platform, "blockwise")
        if chosen == "cudnn" and (reason := _cudnn_refusal(where, q, mask)) is not None:
            chosen = "blockwise"
            _log_once(f"attention auto on gpu: blockwise for {q.shape} ({reason})")
        _log_once(f"attention auto on {where.platform}: {chosen}")
        return chosen
    if name == "cudnn" and (reason := _cudnn_refusal(where, q, mask)) is not None:
        _log_once(f"attention cudnn unavailable, using blockwise: {reason}", warn=True)
        return "blockwise"
    return name


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    upcast: bool = False,
    implementation: str = "auto",
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over [B, T, N, H] arrays, by the named implementation.

    Args:
      mask: optional boolean mask broadcastable to [B, N, Tq, Tk]; True means attend.
      is_causal: apply a causal (lower-triangular, top-left aligned) mask.
      upcast: compute in float32 whatever the input dtype (diffusers' `upcast_attention`,
        needed by SD 2.x in half precision); the result comes back in the input dtype. The fused
        GPU/TPU kernels already keep float32 scores and statistics, so they take the inputs as
        they are.
      implementation: one of IMPLEMENTATIONS.
    """
    chosen = resolve(implementation, q, mask)
    dtype = q.dtype
    if upcast and chosen in ("xla", "blockwise"):
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    kernel = functools.partial(_KERNELS[chosen], causal=is_causal)
    if chosen in _FUSED and placement.current().sharded:
        out = _shard_mapped(kernel, placement.current(), q, k, v, mask)
    else:
        out = kernel(q, k, v, mask)
    return out.astype(dtype)


def _split_axes(axes: tuple[str, ...], sizes: dict[str, int], n: int) -> tuple[str, ...]:
    """The leading `axes` whose sizes multiply to a divisor of n (the rest stay whole)."""
    taken: list[str] = []
    for axis in axes:
        if n % (sizes[axis] * math.prod(sizes[a] for a in taken)):
            break
        taken.append(axis)
    return tuple(taken)


def _shard_mapped(kernel: Callable, where: placement.Placement, q, k, v, mask) -> jax.Array:
    """`kernel(q, k, v, mask)` over [B, T, N, H] under a shard_map of the program's mesh.

    XLA cannot partition a Mosaic (Pallas) custom call at all, and cuDNN's own partitioning
    does not see through the subject vmap; inside the shard_map each device runs the kernel on
    its own block. The batch is split over the placement's batch axes that divide it, the heads
    over the rest that divide them; other axes (and a batch that divides none) hold whole copies.
    `check_vma=False`: the Pallas kernels carry no varying-axes annotations.
    """
    sizes = dict(where.mesh.shape)
    batch = _split_axes(where.batch_axes, sizes, q.shape[0])
    rest = tuple(a for a in where.batch_axes if a not in batch)
    heads = _split_axes(rest, sizes, q.shape[2])
    spec = PartitionSpec(batch or None, None, heads or None, None)
    if mask is None:
        body, args, in_specs = (lambda q, k, v: kernel(q, k, v, None)), (q, k, v), (spec,) * 3
    else:  # [b, n, Tq, Tk], b and n 1 or full: split only the full ones
        mask_spec = PartitionSpec(
            batch if mask.shape[0] > 1 and batch else None,
            heads if mask.shape[1] > 1 and heads else None,
        )
        body, args, in_specs = kernel, (q, k, v, mask), (spec,) * 3 + (mask_spec,)
    mapped = jax.shard_map(
        body, mesh=where.mesh, in_specs=in_specs, out_specs=spec, check_vma=False
    )
    return mapped(*args)


def _xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, causal: bool):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, causal: bool):
    """cuDNN's fused kernel over [B, T, N, H]. Its backward pass refuses odd lengths (jax 0.10
    always passes it a bias, and biased training needs even ones: CLIP's 77 tokens), so odd
    lengths are zero-padded by one: padded query rows are cut off; padded keys are cut off by
    the key lengths (a causal mask already hides a last key from every real query)."""
    del mask  # resolve() sends masked calls elsewhere
    tq, tk = q.shape[1], k.shape[1]
    q = _pad_even(q)
    k_padded, v = _pad_even(k), _pad_even(v)
    q_lengths = lengths = None
    if k_padded.shape[1] != tk and not causal:
        # Both lengths, computed from q rather than constants: under the subject vmap jax
        # 0.10's batching rule of the cuDNN call reshapes them to the vmapped batch, which an
        # unbatched [b] cannot be (several subject slots per device failed so).
        like_q = jnp.isnan(q[:, 0, 0, 0])  # batched as q is; always False
        q_lengths = jnp.where(like_q, q.shape[1], q.shape[1]).astype(jnp.int32)
        lengths = jnp.where(like_q, tk, tk).astype(jnp.int32)
    out = jax.nn.dot_product_attention(
        q,
        k_padded,
        v,
        is_causal=causal,
        query_seq_lengths=q_lengths,
        key_value_seq_lengths=lengths,
        implementation="cudnn",
    )
    return out[:, :tq]


def _pad_even(x: jax.Array) -> jax.Array:
    """[B, T, N, H] zero-padded to an even T."""
    return jnp.pad(x, [(0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)]) if x.shape[1] % 2 else x


def _to_heads_major(x: jax.Array) -> jax.Array:
    return einops.rearrange(x, "b t n h -> b n t h")


def _to_tokens_major(x: jax.Array) -> jax.Array:
    return einops.rearrange(x, "b n t h -> b t n h")


def _blockwise(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, causal: bool):
    """Flash attention over [B, T, N, H] in plain JAX (see `_flash`)."""
    q, k, v = (_to_heads_major(x) for x in (q, k, v))
    if mask is not None:
        mask = jnp.broadcast_to(mask, (*mask.shape[:-1], k.shape[2]))
    rows = jnp.arange(q.shape[2]) if causal else None
    return _to_tokens_major(_flash(q, k, v, mask, rows, min(BLOCK, k.shape[2])))


def _query_chunks(tq: int) -> int:
    """Number of QUERY_BLOCK-row chunks; 0 when all queries go at once."""
    return 0 if tq <= QUERY_BLOCK else -(-tq // QUERY_BLOCK)


def _chunk_rows(x: jax.Array | None, chunks: int, axis: int = 2) -> jax.Array | None:
    """[..., T, ...] (T on `axis`) -> [chunks, ..., QUERY_BLOCK, ...], zero-padded; None stays.

    A mask broadcast over rows (size 1 on `axis`) is left whole for every chunk (None returned
    by the caller's choice, see `_row_inputs`).
    """
    if x is None:
        return None
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, chunks * QUERY_BLOCK - x.shape[axis])
    x = jnp.pad(x, pad)
    x = x.reshape(*x.shape[:axis], chunks, QUERY_BLOCK, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _unchunk_rows(x: jax.Array, tq: int, axis: int = 2) -> jax.Array:
    """Inverse of `_chunk_rows`: [chunks, ..., QUERY_BLOCK, ...] -> [..., tq, ...]."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 0, tq, axis=axis)


def _row_inputs(q, mask, rows, chunks: int):
    """Per-chunk (q, mask, rows); a mask that does not vary by row is passed whole (None here)."""
    per_row_mask = mask is not None and mask.shape[2] > 1
    return (
        _chunk_rows(q, chunks),
        _chunk_rows(mask, chunks) if per_row_mask else None,
        None if rows is None else _chunk_rows(rows, chunks, axis=0),
    )


def _key_blocks(x: jax.Array, block: int) -> jax.Array:
    """[..., Tk, C] -> [num_blocks, ..., block, C], zero-padded to whole blocks."""
    pad = -x.shape[-2] % block
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)])
    x = x.reshape(*x.shape[:-2], x.shape[-2] // block, block, x.shape[-1])
    return jnp.moveaxis(x, -3, 0)


def _mask_blocks(mask: jax.Array, block: int) -> jax.Array:
    """Boolean [b, n, tq, Tk] -> [num_blocks, b, n, tq, block], padded with False."""
    return _key_blocks(jnp.swapaxes(mask, -1, -2), block).swapaxes(-1, -2)


def _unblock(x: jax.Array, length: int) -> jax.Array:
    """[num_blocks, B, N, block, C] -> [B, N, length, C]."""
    x = jnp.moveaxis(x, 0, -3)
    return x.reshape(*x.shape[:-3], -1, x.shape[-1])[..., :length, :]


def _prescaled(q: jax.Array) -> tuple[jax.Array, bool]:
    """(q times 1/sqrt(H), True) in float32: one pass over q instead of one over every score
    tile; other dtypes keep q (False) and scale the float32 scores, as jax does."""
    if q.dtype != jnp.float32:
        return q, False
    return q * (q.shape[-1] ** -0.5), True


def _scores(q, k_j, j, mask_j, rows, tk: int, block: int, transposed: bool, scaled: bool):
    """Scaled float32 scores of one key block, masked; and where they count (None: everywhere).

    [B, N, Tq, block], or [B, N, block, Tq] when `transposed` (then `mask_j` is transposed too).
    `scaled`: q already carries the 1/sqrt(H) factor (`_prescaled`).
    """
    if transposed:
        s = jnp.einsum("bnkh,bnqh->bnkq", k_j, q, preferred_element_type=jnp.float32)
    else:
        s = jnp.einsum("bnqh,bnkh->bnqk", q, k_j, preferred_element_type=jnp.float32)
    if not scaled:
        s = s * (q.shape[-1] ** -0.5)
    cols = j * block + jnp.arange(block)
    col = (lambda x: x[:, None]) if transposed else (lambda x: x[None, :])
    row = (lambda x: x[None, :]) if transposed else (lambda x: x[:, None])
    keep = mask_j
    if rows is not None:  # causal: query `rows[i]` sees keys up to its own position
        below = col(cols) <= row(rows)
        keep = below if keep is None else keep & below
    if keep is not None:
        s = jnp.where(keep, s, MASK_VALUE)
    if tk % block:
        s = jnp.where(col(cols < tk), s, -jnp.inf)
    return s, keep


def _scan_blocks(body, init, xs, num_blocks: int):
    """lax.scan over key blocks; a single block runs inline (no loop to compile)."""
    if num_blocks == 1:
        carry, y = body(init, jax.tree.map(lambda x: x[0], xs))
        return carry, jax.tree.map(lambda x: x[None], y)
    return jax.lax.scan(body, init, xs)


def _flash_forward(q, k, v, mask, rows, block: int):
    """Output [B, N, Tq, H] and float32 row max and 1 / row sum [B, N, Tq], by an online softmax.

    Max and sum stay apart (no log-sum-exp): in a fully masked row the max is the huge MASK_VALUE,
    which would swallow log(sum) in float32.
    """
    tk = k.shape[2]
    k_blocks, v_blocks = _key_blocks(k, block), _key_blocks(v, block)
    num_blocks = k_blocks.shape[0]
    masks = None if mask is None else _mask_blocks(mask, block)
    q_s, scaled = _prescaled(q)

    def body(carry, xs):
        m, total, acc = carry
        k_j, v_j, j, mask_j = xs
        s, _ = _scores(q_s, k_j, j, mask_j, rows, tk, block, False, scaled)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        correction = jnp.exp(m - m_new)
        total = total * correction + p.sum(-1)
        pv = jnp.einsum(
            "bnqk,bnkh->bnqh", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32
        )
        return (m_new, total, acc * correction[..., None] + pv), None

    stats = q.shape[:3]
    init = after(  # made when q exists, not at the program's start
        q,
        (
            jnp.full(stats, -jnp.inf, jnp.float32),
            jnp.zeros(stats, jnp.float32),
            jnp.zeros(q.shape, jnp.float32),
        ),
    )
    xs = (k_blocks, v_blocks, jnp.arange(num_blocks), masks)
    (m, total, acc), _ = _scan_blocks(body, init, xs, num_blocks)
    inv_l = 1.0 / total
    return (acc * inv_l[..., None]).astype(q.dtype), (m, inv_l)


def _flash_forward_rows(q, k, v, mask, rows, block: int):
    """`_flash_forward` over QUERY_BLOCK-row chunks one after the other (lax.map), so that
    every [B, N, QUERY_BLOCK, BLOCK] score tile stays in cache; statistics [B, N, Tq]."""
    tq, chunks = q.shape[2], _query_chunks(q.shape[2])
    if not chunks:
        return _flash_forward(q, k, v, mask, rows, block)
    # Padded query rows attend like any other and are cut off.
    q_c, mask_c, rows_c = _row_inputs(q, mask, rows, chunks)

    def one(xs):
        out, (m, inv_l) = _flash_forward(
            xs[0], k, v, mask if mask_c is None else xs[1], xs[2], block
        )
        return out, m, inv_l

    out, m, inv_l = jax.lax.map(one, (q_c, mask_c, rows_c))
    return _unchunk_rows(out, tq), (_unchunk_rows(m, tq), _unchunk_rows(inv_l, tq))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, mask, rows, block: int):
    """Blockwise attention over [B, N, T, H]; `mask` None or boolean [b, n, tq, Tk]; `rows` None
    or, for causal masking, the positions [Tq] of the query rows."""
    return _flash_forward_rows(q, k, v, mask, rows, block)[0]


def _flash_fwd(q, k, v, mask, rows, block: int):
    out, stats = _flash_forward_rows(q, k, v, mask, rows, block)
    return out, (q, k, v, mask, rows, out, stats)


def _flash_bwd(block: int, residuals, d_out):
    """dq, dk, dv chunk by chunk of query rows (as in the forward pass), dk and dv summed over
    the chunks in a loop carry made when d_out arrives (not at the program's start)."""
    q, k, v, mask, rows, out, (m, inv_l) = residuals
    tq, tk, chunks = q.shape[2], k.shape[2], _query_chunks(q.shape[2])
    k_blocks, v_blocks = _key_blocks(k, block), _key_blocks(v, block)
    if not chunks:
        dq, dk, dv = _flash_bwd_rows(q, k_blocks, v_blocks, mask, rows, out, m, inv_l, d_out, tk)
    else:
        # Padded rows have a zero cotangent: they add nothing to dk and dv.
        q_c, mask_c, rows_c = _row_inputs(q, mask, rows, chunks)
        out_c, d_out_c = _chunk_rows(out, chunks), _chunk_rows(d_out, chunks)
        m_c, inv_l_c = _chunk_rows(m, chunks), _chunk_rows(inv_l, chunks)
        zeros = jnp.zeros(k_blocks.shape, jnp.float32)

        def one(carry, xs):
            q_i, mask_i, rows_i, out_i, d_out_i, m_i, inv_l_i = xs
            mask_i = mask if mask_c is None else mask_i
            dq_i, dk_i, dv_i = _flash_bwd_rows(
                q_i, k_blocks, v_blocks, mask_i, rows_i, out_i, m_i, inv_l_i, d_out_i, tk
            )
            return (carry[0] + dk_i, carry[1] + dv_i), dq_i

        xs = (q_c, mask_c, rows_c, out_c, d_out_c, m_c, inv_l_c)
        (dk, dv), dq = jax.lax.scan(one, after(d_out, (zeros, zeros)), xs)
        dq = _unchunk_rows(dq, tq)
    return (
        dq.astype(q.dtype),
        _unblock(dk, tk).astype(k.dtype),
        _unblock(dv, tk).astype(v.dtype),
        None,
        None,
    )


def _flash_bwd_rows(q, k_blocks, v_blocks, mask, rows, out, m, inv_l, d_out, tk: int):
    """Recompute each key block's probabilities from the saved statistics (flash-attention-2):
    float32 dq [B, N, Tq, H] and key-blocked dk, dv [num_blocks, B, N, block, H].

    In transposed [B, N, block, Tq] tiles: then dv = p^T do, dk = ds^T q and dp contract over
    the tiles' minor axis, the form XLA's CPU backend hands to XNNPACK (4x faster than
    contracting over the major axis). dq is accumulated transposed, dq^T = k^T ds, which
    XNNPACK also takes: 0.21 / 0.40 / 0.75 ms a [4, 8, 128, 256] tile at head sizes 8 / 16 / 32
    against 1.5 / 1.7 / 1.9 ms for ds^T contracted over its major axis into dq.
    """
    num_blocks, block = k_blocks.shape[0], k_blocks.shape[-2]
    scale = q.shape[-1] ** -0.5
    masks = None if mask is None else _key_blocks(jnp.swapaxes(mask, -1, -2), block)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)
    q_s, scaled = _prescaled(q)
    by_row = lambda x: x[..., None, :]  # [B, N, Tq] statistics against [B, N, block, Tq] tiles

    def body(dq_t, xs):
        k_j, v_j, j, mask_j = xs
        s, keep = _scores(q_s, k_j, j, mask_j, rows, tk, block, True, scaled)
        p = jnp.exp(s - by_row(m)) * by_row(inv_l)
        dv = jnp.einsum(
            "bnkq,bnqh->bnkh", p.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32
        )
        dp = jnp.einsum("bnkh,bnqh->bnkq", v_j, d_out, preferred_element_type=jnp.float32)
        ds = p * (dp - by_row(delta)) * scale
        if keep is not None:  # masked scores are constants: no gradient flows through them
            ds = jnp.where(keep, ds, 0.0)
        ds = ds.astype(q.dtype)
        dq_t = dq_t + jnp.einsum("bnkh,bnkq->bnhq", k_j, ds, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bnkq,bnqh->bnkh", ds, q, preferred_element_type=jnp.float32)
        return dq_t, (dk, dv)

    xs = (k_blocks, v_blocks, jnp.arange(num_blocks), masks)
    init = after(d_out, jnp.zeros(jnp.swapaxes(q, -1, -2).shape, jnp.float32))
    dq_t, (dk, dv) = _scan_blocks(body, init, xs, num_blocks)
    return jnp.swapaxes(dq_t, -1, -2), dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


def _tpu_flash(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, causal: bool):
    """Pallas TPU flash attention: [B, N, T, H], sequences padded to whole 128-blocks.

    The kernel wants kv lengths divisible by its key block (a multiple of 128 lanes), so keys are
    padded and the padding is cut off by segment ids (queries segment 1, padded keys 0); an
    explicit mask becomes the kernel's additive bias (full [B, N, Tq, Tk], as it requires).
    Padded query rows are dropped from the output. A fully masked row (none in our models) gets
    the uniform output of the other kernels but a non-zero dq, since the mask is a bias here.
    A head size above 128 must be a multiple of 128: other ones are zero-padded to the next
    (zero columns add nothing to q.k and give zero output columns, cut off; scale unchanged).
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu  # TPU-only, lazy

    (b, tq, n, h), tk = q.shape, k.shape[1]
    tq_pad, tk_pad = (-t % TPU_BLOCK for t in (tq, tk))
    h_pad = -h % TPU_BLOCK if h > TPU_BLOCK else 0
    if h_pad:
        _log_once(f"attention tpu_flash: head size {h} zero-padded to {h + h_pad}")
    q, k, v = (
        _pad(_to_heads_major(x), tokens, h_pad)
        for x, tokens in ((q, tq_pad), (k, tk_pad), (v, tk_pad))
    )
    segments = None
    if tk_pad:
        kv_ids = (jnp.arange(tk + tk_pad) < tk).astype(jnp.int32)
        segments = tpu.SegmentIds(
            q=jnp.ones((b, tq + tq_pad), jnp.int32), kv=jnp.broadcast_to(kv_ids, (b, tk + tk_pad))
        )
    bias = None
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, n, tq, tk))
        mask = jnp.pad(mask, [(0, 0), (0, 0), (0, tq_pad), (0, tk_pad)], constant_values=True)
        bias = jnp.where(mask, 0.0, MASK_VALUE).astype(jnp.float32)
    out = tpu.flash_attention(
        q,
        k,
        v,
        ab=bias,
        segment_ids=segments,
        causal=causal,
        sm_scale=h**-0.5,
        block_sizes=_tpu_block_sizes(tq + tq_pad, tk + tk_pad, tpu.BlockSizes),
    )
    return _to_tokens_major(out[:, :, :tq, :h])


def _pad(x: jax.Array, tokens: int, features: int) -> jax.Array:
    """Zero-pad [B, N, T, H] along T and H."""
    if not (tokens or features):
        return x
    return jnp.pad(x, [(0, 0), (0, 0), (0, tokens), (0, features)])


def _tpu_block_sizes(tq: int, tk: int, block_sizes: Callable):
    """Forward and backward tiles of the Pallas kernel: the largest of 512/256/128 dividing T."""
    bq, bk = (next(s for s in (512, 256, 128) if t % s == 0) for t in (tq, tk))
    return block_sizes(
        block_q=bq,
        block_k_major=bk,
        block_k=bk,
        block_b=1,
        block_q_major_dkv=bq,
        block_k_major_dkv=bk,
        block_k_dkv=bk,
        block_q_dkv=bq,
        block_k_major_dq=bk,
        block_k_dq=bk,
        block_q_dq=bq,
    )


_FUSED = ("cudnn", "tpu_flash")  # custom calls: under a shard_map in multi-device programs
_KERNELS = {
    "xla": _xla,
    "blockwise": _blockwise,
    "cudnn": _cudnn,
    "tpu_flash": _tpu_flash,
}
assert set(_KERNELS) == set(IMPLEMENTATIONS) - {"auto"}


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[B, T, N*H] -> [B, T, N, H]."""
    return einops.rearrange(x, "... t (n h) -> ... t n h", n=num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """[B, T, N, H] -> [B, T, N*H]."""
    return einops.rearrange(x, "... t n h -> ... t (n h)")
