"""models.backward: same numbers as the plain ops, and the memory the data dependencies save.

Memory is XLA's compiled temporaries (`memory_analysis`, nothing run) on the default CPU
schedule, where without these helpers every kernel copy and every recomputation is scheduled at
the program's start.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from parity_utils import rel_err

from idfuse_jax.models import backward, placement

DN = ("NHWC", "HWIO", "NHWC")
LAYERS = 6


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _conv_stack_grad(conv):
    """d loss / d x through LAYERS frozen 3x3 convolutions (the kernels get no gradient)."""

    def loss(x, kernels):
        for w in kernels:
            x = jnp.tanh(conv(x, w, (1, 1), "SAME", dimension_numbers=DN))
        return jnp.sum(x**2)

    return jax.grad(loss)


def _conv_inputs(channels: int = 128, side: int = 4):
    keys = jax.random.split(jax.random.key(0), LAYERS + 1)
    x = jax.random.normal(keys[0], (2, side, side, channels))
    kernels = [0.05 * jax.random.normal(k, (3, 3, channels, channels)) for k in keys[1:]]
    return x, kernels


def test_conv_matches_lax_in_output_and_gradients():
    x, kernels = _conv_inputs(channels=8, side=5)
    w = kernels[0]
    args = ((2, 1), ((1, 1), (0, 2)))
    kwargs = dict(rhs_dilation=(1, 2), dimension_numbers=DN)

    def f(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, *args, **kwargs)))

    ours, ref = f(backward.conv_general_dilated), f(jax.lax.conv_general_dilated)
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-6)
    for got, want in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w), strict=True):
        assert rel_err(got, want) <= 1e-6


def test_conv_backward_keeps_one_kernel_copy_alive():
    x, kernels = _conv_inputs()
    kernel_bytes = kernels[0].size * 4
    plain = _temp_bytes(_conv_stack_grad(jax.lax.conv_general_dilated), x, kernels)
    ours = _temp_bytes(_conv_stack_grad(backward.conv_general_dilated), x, kernels)
    print(f"\nconv stack temporaries: plain {plain} B, ours {ours} B, one kernel {kernel_bytes} B")
    # Plain: a reversed copy of every kernel lives at once; ours: about one at a time.
    assert plain >= (LAYERS - 1) * kernel_bytes
    assert ours <= 2 * kernel_bytes


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x + nn.Dense(x.shape[-1])(jnp.tanh(nn.Dense(4 * x.shape[-1])(x)))


class _Stack(nn.Module):
    remat: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(LAYERS):
            layer = _Layer(name=f"layer_{i}")
            x = backward.remat_call(layer, x) if self.remat else layer(x)
        return x


def _stack_grad(remat: bool):
    return jax.grad(lambda p, x: jnp.sum(jnp.sin(_Stack(remat).apply(p, x))), argnums=(0, 1))


def test_remat_call_gradients_and_memory():
    x = jax.random.normal(jax.random.key(1), (512, 64))
    params = _Stack(False).init(jax.random.key(2), x)
    got, want = _stack_grad(True)(params, x), _stack_grad(False)(params, x)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(a, b) <= 1e-6
    plain = _temp_bytes(_stack_grad(False), params, x)
    ours = _temp_bytes(_stack_grad(True), params, x)
    print(f"\ndense stack temporaries: plain {plain} B, remat_call {ours} B")
    # Plain keeps each layer's [512, 256] hidden activations (512 KiB a layer) for the backward
    # pass; remat_call keeps only the layer inputs and recomputes one layer at a time.
    assert ours <= plain / 2


def test_after_leaves_values_unchanged_whatever_the_trigger():
    tree = {"a": jnp.array([1.5, -np.inf, 3e38]), "b": jnp.arange(3, dtype=jnp.bfloat16)}
    for trigger in (jnp.array([np.inf, 2.0]), jnp.array([-np.inf]), jnp.array([-3.0])):
        out = jax.jit(backward.after)(trigger, tree)
        np.testing.assert_array_equal(out["a"], tree["a"])
        assert out["b"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(out["b"], tree["b"])


def test_after_keeps_a_shared_leaf_unbatched_under_vmap():
    """A frozen kernel shared by the subjects of a vmapped step stays one kernel when the
    trigger is per subject (out_axes=None fails on a batched output), and gradients through
    `after` are the identity's, mapped or not. A per-subject copy turned the step's convolutions
    into grouped ones, which XLA's SPMD partitioner got wrong with the subject axis split."""
    w = jnp.arange(24.0).reshape(2, 3, 4)
    triggers = jnp.ones((5, 7))
    tied = jax.vmap(lambda g: backward.after(g, w), out_axes=None)(triggers)
    np.testing.assert_array_equal(tied, w)
    f = lambda w, g: jnp.sum(jnp.sin(backward.after(g, w)))
    expected = jnp.cos(w)
    np.testing.assert_allclose(jax.grad(f)(w, triggers[0]), expected, rtol=1e-6)
    per_trigger = jax.vmap(jax.grad(f), in_axes=(None, 0))(w, triggers)
    np.testing.assert_allclose(per_trigger, jnp.broadcast_to(expected, (5, *w.shape)), rtol=1e-6)


def test_ties_only_in_single_device_cpu_programs():
    """`after` ties where it was measured to help (one CPU device) and nowhere else."""
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    assert backward.ties_help(placement.Placement("cpu"))
    assert not backward.ties_help(placement.Placement("cpu", mesh, ("data",)))
    assert not backward.ties_help(placement.Placement("tpu"))
    assert not backward.ties_help(placement.Placement("gpu"))


def test_conv_backward_over_several_devices_has_no_collective():
    """The batch split over 8 devices, the kernels whole on each: the backward pass needs no
    communication. A tie to element [0] of the sharded cotangent made an all-reduce per conv."""
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    x, kernels = _conv_inputs(channels=8, side=4)
    x = jnp.concatenate([x] * 4)  # a batch of 8, one example per device
    grad = placement.traced_on(_conv_stack_grad(backward.conv_general_dilated), mesh, ("data",))
    split, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    compiled = jax.jit(grad, in_shardings=(split, whole), out_shardings=split)
    hlo = compiled.lower(x, kernels).compile().as_text()
    assert not re.search(r"\s(all-reduce|all-gather|reduce-scatter|collective-permute)", hlo)
