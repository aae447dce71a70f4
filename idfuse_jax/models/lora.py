"""LoRA as a transform of a Flax parameter tree.

Targets are Dense kernels chosen by regular expressions over '/'-joined parameter paths (full
match), e.g. r".*attn[12]/(to_q|to_k|to_v|to_out_0)/kernel" for the UNet's attention and
r".*self_attn/(q|k|v|out)_proj/kernel" for the CLIP text encoder. The LoRA tree mirrors only the
targeted modules:

  {"down_blocks_0": {..., "to_q": {"lora_a": [in, r], "lora_b": [r, out]}}}

and `lora_merge` returns the base tree with W' = W + (alpha / rank) * A @ B at every target. The
merge is a pure function meant to run inside the jitted step: the frozen base tree is passed as
a non-differentiated argument, so gradients exist only for A and B.
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


def lora_merge(params: Params, lora_params: Params, alpha: float, rank: int) -> dict[str, Any]:
    """`params` with W + (alpha/rank) * A @ B at every kernel `lora_params` holds factors for.

    The sum is formed in float32 and cast back to the kernel's dtype. Untargeted leaves are
    returned as they are (same objects), so the merge costs only the targeted matmuls.
    """
    scale = lora_scale(alpha, rank)
    flat = traverse_util.flatten_dict(dict(params))
    factors = traverse_util.flatten_dict(dict(lora_params))
    modules = {key[:-1] for key in factors}
    for module in sorted(modules):
        name = _SEP.join(module)
        extra = {k[-1] for k in factors if k[:-1] == module} - {"lora_a", "lora_b"}
        if extra or (*module, "lora_a") not in factors or (*module, "lora_b") not in factors:
            raise ConfigError(f"LoRA module {name} must hold exactly lora_a and lora_b")
        kernel_key = (*module, "kernel")
        if kernel_key not in flat:
            raise ConfigError(f"LoRA module {name} has no kernel in the base parameters")
        a, b = factors[(*module, "lora_a")], factors[(*module, "lora_b")]
        kernel = flat[kernel_key]
        if a.shape != (kernel.shape[0], rank) or b.shape != (rank, kernel.shape[-1]):
            raise ConfigError(
                f"LoRA module {name}: lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)} do not "
                f"fit kernel {tuple(kernel.shape)} at rank {rank}"
            )
        delta = scale * jnp.matmul(
            a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
        )
        flat[kernel_key] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)
