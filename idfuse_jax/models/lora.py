"""LoRA as a transform of a Flax parameter tree.

Targets are Dense kernels chosen by regular expressions over '/'-joined parameter paths (full
match), e.g. r".*attn[12]/(to_q|to_k|to_v|to_out_0)/kernel" for the UNet's attention and
r".*self_attn/(q|k|v|out)_proj/kernel" for the CLIP text encoder. The LoRA tree mirrors only the
targeted modules:

  {"down_blocks_0": {..., "to_q": {"lora_a": [in, r], "lora_b": [r, out]}}}

and `lora_collection` turns it into the Flax variable collection `LORA` through which every
targeted `models.blocks.Dense` computes y = x·W + (alpha / rank)·(x·A)·B, the branch kept apart
from the frozen kernel as peft keeps it (`lora_dense`): merged into a bfloat16 kernel, a small
delta would round away, and under the subject vmap every subject would hold its own merged copy
of the targeted kernels. `lora_merge` gives the merged tree W' = W + (alpha / rank)·A @ B for a
model without the branch. The frozen base tree is passed as a non-differentiated argument, so
gradients exist only for A and B.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from idfuse_jax.errors import ConfigError
from idfuse_jax.types import Params

_SEP = "/"
LORA = "lora"  # the variable collection the branch is applied through (models.blocks.Dense)


def _flatten(tree: Params) -> dict[str, Any]:
    return traverse_util.flatten_dict(dict(tree), sep=_SEP)


def lora_targets(params: Params, patterns: str | Sequence[str]) -> list[str]:
    """Sorted '/'-joined paths of the Dense kernels that `patterns` select.

    `patterns` is one regex or a sequence of them; each must fully match a path.
    Raises ConfigError for an invalid pattern, a pattern that matches nothing, or a match that is
    not a 2-D `kernel` (biases, norms and convolutions cannot carry this LoRA).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ConfigError("LoRA target patterns must be a regex or a non-empty list of regexes")
    flat = _flatten(params)
    selected: set[str] = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(
                f"LoRA target pattern {pattern!r} is not a valid regex ({e})"
            ) from None
        matches = [path for path in flat if regex.fullmatch(path)]
        if not matches:
            raise ConfigError(f"LoRA target pattern {pattern!r} matches no parameter")
        for path in matches:
            shape = tuple(flat[path].shape)
            if not path.endswith(_SEP + "kernel") or len(shape) != 2:
                raise ConfigError(
                    f"LoRA target {path} (shape {shape}) is not a 2-D Dense kernel "
                    f"(matched by {pattern!r})"
                )
        selected.update(matches)
    return sorted(selected)


def _check_rank(rank: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")


def lora_init(
    rng: jax.Array, params: Params, patterns: str | Sequence[str], rank: int
) -> dict[str, Any]:
    """LoRA factors for every kernel selected by `patterns`.

    A [in, r] is uniform in ±1/sqrt(in) (peft's kaiming_uniform(a=sqrt(5)) default) and B [r, out]
    is zero, so the merged tree equals the base tree at step 0. Factors are float32 whatever the
    base dtype, since they are the trained parameters.
    """
    _check_rank(rank)
    paths = lora_targets(params, patterns)
    flat = _flatten(params)
    lora: dict[tuple[str, ...], jax.Array] = {}
    for i, path in enumerate(paths):
        fan_in, fan_out = flat[path].shape
        bound = 1.0 / float(fan_in) ** 0.5
        module = tuple(path.split(_SEP)[:-1])
        lora[(*module, "lora_a")] = jax.random.uniform(
            jax.random.fold_in(rng, i), (fan_in, rank), jnp.float32, -bound, bound
        )
        lora[(*module, "lora_b")] = jnp.zeros((rank, fan_out), jnp.float32)
    return traverse_util.unflatten_dict(lora)


def lora_scale(alpha: float, rank: int) -> float:
    """The factor alpha / rank that multiplies A @ B."""
    _check_rank(rank)
    return float(alpha) / rank


def _checked_factors(
    params: Params, lora_params: Params, rank: int
) -> list[tuple[tuple[str, ...], jax.Array, jax.Array]]:
    """(module path, A, B) of every module `lora_params` holds factors for, checked against
    the kernel of that module in `params` (ConfigError naming the module otherwise)."""
    flat = traverse_util.flatten_dict(dict(params))
    factors = traverse_util.flatten_dict(dict(lora_params))
    checked = []
    for module in sorted({key[:-1] for key in factors}):
        name = _SEP.join(module)
        extra = {k[-1] for k in factors if k[:-1] == module} - {"lora_a", "lora_b"}
        if extra or (*module, "lora_a") not in factors or (*module, "lora_b") not in factors:
            raise ConfigError(f"LoRA module {name} must hold exactly lora_a and lora_b")
        if (*module, "kernel") not in flat:
            raise ConfigError(f"LoRA module {name} has no kernel in the base parameters")
        a, b = factors[(*module, "lora_a")], factors[(*module, "lora_b")]
        kernel = flat[(*module, "kernel")]
        if a.shape != (kernel.shape[0], rank) or b.shape != (rank, kernel.shape[-1]):
            raise ConfigError(
                f"LoRA module {name}: lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)} do not "
                f"fit kernel {tuple(kernel.shape)} at rank {rank}"
            )
        checked.append((module, a, b))
    return checked


def lora_collection(params: Params, lora_params: Params, alpha: float, rank: int) -> dict[str, Any]:
    """The LoRA branch as the Flax variable collection `LORA` that `models.blocks.Dense` reads:
    {module: {"lora_a": A, "lora_b": (alpha/rank) * B}}, checked against `params`' kernels.

    Apply a model with {"params": params, LORA: lora_collection(...)}: each targeted Dense adds
    x·A·B' to x·W, the kernel itself untouched (no merged copy of it is made).
    """
    scale = lora_scale(alpha, rank)
    branch: dict[tuple[str, ...], jax.Array] = {}
    for module, a, b in _checked_factors(params, lora_params, rank):
        branch[(*module, "lora_a")] = a
        branch[(*module, "lora_b")] = scale * b
    return traverse_util.unflatten_dict(branch)


def lora_merge(params: Params, lora_params: Params, alpha: float, rank: int) -> dict[str, Any]:
    """`params` with W + (alpha/rank) * A @ B at every kernel `lora_params` holds factors for:
    the merged form, for a model without the branch (the training and sampling code keep the
    branch apart, see `lora_collection`).

    The sum is formed in float32 and cast back to the kernel's dtype, so with a bfloat16 kernel
    a delta below half a bfloat16 step of W is lost. Untargeted leaves are returned as they are
    (same objects).
    """
    scale = lora_scale(alpha, rank)
    flat = traverse_util.flatten_dict(dict(params))
    for module, a, b in _checked_factors(params, lora_params, rank):
        kernel = flat[(*module, "kernel")]
        delta = scale * jnp.matmul(
            a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
        )
        flat[(*module, "kernel")] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def _matmul(x: jax.Array, w: jax.Array, out: Any = None) -> jax.Array:
    """x [..., in] · w [in, out] (output dtype `out`, default the operands')."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=out)


@jax.custom_vjp
def _matmul_f32(x: jax.Array, w: jax.Array) -> jax.Array:
    """x · w with a float32 result for operands of a narrower dtype (the accumulator is
    float32 anyway), so that the branch is added before the single rounding."""
    return _matmul(x, w, jnp.float32)


def _matmul_f32_forward(x: jax.Array, w: jax.Array):
    return _matmul_f32(x, w), (x, w)


def _matmul_f32_backward(residuals: tuple[jax.Array, jax.Array], g: jax.Array):
    # Autodiff would promote the bfloat16 operand to the float32 cotangent's dtype: float32
    # backward matmuls (seen in the lowered StableHLO). The cotangent arrives through a cast of
    # the output to x's dtype, so it holds values of that dtype exactly: cast back, the backward
    # matmuls run in x's dtype (accumulating in float32 on GPU/TPU as any bfloat16 matmul).
    x, w = residuals
    g = g.astype(x.dtype)
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
    lead = tuple(range(x.ndim - 1))
    dw = jax.lax.dot_general(x, g, ((lead, lead), ((), ())))
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul_f32.defvjp(_matmul_f32_forward, _matmul_f32_backward)


def lora_dense(x: jax.Array, kernel: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """x·W + (x·A)·B' in x's dtype (x and W already in the compute dtype, B' the scaled B).

    The branch is kept apart from W, as peft does: merged into a bfloat16 kernel, a delta below
    half a bfloat16 step of W would round away. In a narrower compute dtype the three products
    run on operands of that dtype with float32 results, and base and branch are summed in
    float32 before the one rounding of the output; in float32 this is x·W + (x·A)·B'.
    """
    if x.dtype == jnp.float32:
        return _matmul(x, kernel) + _matmul(_matmul(x, a), b)
    low = x.dtype
    h = _matmul_f32(x, a.astype(low))
    return (_matmul_f32(x, kernel) + _matmul_f32(h.astype(low), b.astype(low))).astype(low)
