"""When the backward pass computes what: data dependencies that XLA's schedulers cannot move.

XLA's CPU backend schedules a program breadth-first by default
(`--xla_cpu_enable_concurrency_optimized_scheduler`, true in jax 0.10): an instruction runs as
soon as its operands exist. Two kinds of backward-pass work depend on nothing computed in the
backward pass and so run at the very start, all their results staying alive through the forward
pass: the reversed, transposed kernel copies of the backward-data convolutions (they depend on
the frozen weights alone) and the recomputed activations of rematerialised blocks (they depend
on the block's saved inputs alone). `jax.checkpoint` guards against this with an optimisation
barrier, but XLA's CPU compiler strips barriers before scheduling (OptimizationBarrierExpander),
so on CPU `remat` saved nothing.

`after(trigger, tree)` makes `tree` data-dependent on `trigger` by adding
min(|first element of trigger|, 0), which is exactly zero (NaN only where that element is NaN)
and which XLA's simplifier does not fold. With a layer's cotangent as the trigger, work on the
result waits for the backward pass to reach the layer (`conv_general_dilated`, `remat_call`, the
blockwise attention's accumulators); with the layer's input, for the forward pass to reach it
(`promote_dtype`: kernels cast to bfloat16).

Only where it helps and costs nothing: single-device programs on CPU, the only place it was
measured (`models.placement`). Elsewhere `after` returns `tree` as it is. On TPU and GPU the
schedulers are XLA's latency-hiding and memory-aware ones, which keep barriers; and in a program
over several devices the first element of a sharded trigger lives on one device, so every tie
would be a broadcast from it (an all-reduce per convolution, every subject waiting for the
first one's devices).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from idfuse_jax.models import placement


def after(trigger: jax.Array, tree: Any) -> Any:
    """`tree` unchanged in value, computed only once `trigger` exists (see module docstring).

    Under `jax.vmap` a leaf keeps its own batching: a frozen kernel shared by every subject of
    the subject axis stays one kernel even when the trigger (a cotangent) is per subject.
    Without that, each subject got its own copy of every conv kernel, and the convolutions
    became grouped convolutions over the subject axis, which XLA's SPMD partitioner gets wrong
    when that axis is split over devices (wrong gradients, measured).
    """
    if not ties_help():
        return tree
    return jax.tree.map(lambda x: _tie(trigger, x), tree)


def ties_help(where: placement.Placement | None = None) -> bool:
    """Whether `after` ties anything in a program placed `where` (default: the one being traced):
    on one CPU device only (see the module docstring)."""
    where = where or placement.current()
    return where.platform == "cpu" and not where.sharded


def _zero(trigger: jax.Array) -> jax.Array:
    return jnp.minimum(jnp.abs(jax.lax.stop_gradient(trigger).reshape(-1)[0]), 0)


@jax.custom_batching.custom_vmap
def _tied(trigger: jax.Array, x: jax.Array) -> jax.Array:
    return x + _zero(trigger).astype(x.dtype)


@_tied.def_vmap
def _tied_vmap(axis_size: int, in_batched: list[bool], trigger: jax.Array, x: jax.Array):
    del axis_size  # the trigger arrives with its batch axis; any element of it will do
    return _tied(trigger, x), in_batched[1]


@jax.custom_jvp
def _tie(trigger: jax.Array, x: jax.Array) -> jax.Array:
    return _tied(trigger, x)


@_tie.defjvp
def _tie_jvp(primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]):
    trigger, x = primals
    return _tie(trigger, x), tangents[1]  # x + 0: the identity


def promote_dtype(*args: Any, dtype: Any = None, inexact: bool = True) -> list[Any]:
    """flax's `promote_dtype` (the `promote_dtype` field of nn.Dense / nn.Conv), with a kernel
    that changes dtype cast once the layer's input exists.

    Otherwise the breadth-first schedule casts every frozen kernel to the compute dtype at the
    program's start (bfloat16 at 512 px: 1.0 GiB of cast conv kernels and 2.0 GiB of their
    float32 re-expansions alive at once). Float32 runs cast nothing and are unchanged.
    """
    promoted = nn.dtypes.promote_dtype(*args, dtype=dtype, inexact=inexact)
    inputs, kernel = args[0], args[1]
    if kernel is None or promoted[1].dtype == kernel.dtype:
        return promoted
    tied = after(inputs, kernel)
    return [promoted[0], tied.astype(promoted[1].dtype), *promoted[2:]]


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    """`jax.lax.conv_general_dilated` (same signature and gradients) whose backward pass makes the
    kernel's reversed copy when the layer's cotangent arrives, not at the program's start.

    At 512 px the copies of an SD 2.1 UNet's frozen conv kernels are 2.1 GiB, all alive at once
    under the breadth-first schedule; this way each lives only for its own convolution.
    """

    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(x, w, *args, **kwargs)

    @jax.custom_vjp
    def run(x: jax.Array, w: jax.Array) -> jax.Array:
        return conv(x, w)

    def forward(x: jax.Array, w: jax.Array):
        return conv(x, w), (x, w)

    def backward(residuals: tuple[jax.Array, jax.Array], g: jax.Array):
        x, w = residuals
        return jax.vjp(conv, x, after(g, w))[1](g)

    run.defvjp(forward, backward)
    return run(lhs, rhs)


def remat_call(module: nn.Module, *args: jax.Array) -> Any:
    """`module(*args)` rematerialised: the backward pass recomputes the module's forward from its
    inputs instead of keeping its activations, and starts the recomputation only when the
    output's cotangent arrives (unlike `nn.remat` on CPU, see the module docstring).

    Call it inside an `nn.compact` method with a submodule created there; parameters are the
    submodule's, as with a plain call. Gradients are those of `module(*args)`.
    """
    definition = module.clone(parent=None)

    def call(mdl: nn.Module, *inputs: jax.Array) -> Any:
        return mdl(*inputs)

    def forward(mdl: nn.Module, *inputs: jax.Array):
        return mdl(*inputs), (mdl.variables, inputs)

    def backward(residuals: tuple[Any, tuple[jax.Array, ...]], g: Any):
        variables, inputs = residuals
        inputs = after(jax.tree.leaves(g)[0], inputs)
        _, vjp = jax.vjp(lambda v, *xs: definition.apply(v, *xs), variables, *inputs)
        return vjp(g)

    return nn.custom_vjp(call, forward_fn=forward, backward_fn=backward)(module, *args)
