"""LoRA: target selection, init, the branch kept apart from the kernel (and the merge), gradients,
parity with diffusers, and bfloat16 keeping a small delta."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from parity_utils import rel_err

from idfuse_jax.models import blocks
from idfuse_jax.models.lora import (
    LORA,
    ConfigError,
    lora_collection,
    lora_init,
    lora_merge,
    lora_scale,
    lora_targets,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
UNET_PATTERN = r".*attn[12]/(to_q|to_k|to_v|to_out_0)/kernel"
WIDTH, RANK, ALPHA = 16, 4, 8.0


class _Attention(nn.Module):
    """Single-head attention with the UNet's projection names."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = (
            blocks.dense(WIDTH, use_bias=False, name=n, dtype=jnp.float32)(x)
            for n in ("to_q", "to_k", "to_v")
        )
        a = jax.nn.softmax(q @ k.swapaxes(-1, -2) / WIDTH**0.5, axis=-1) @ v
        return blocks.dense(WIDTH, name="to_out_0", dtype=jnp.float32)(a)


class _Tiny(nn.Module):
    """Two attention blocks, a conv and a norm: targets and non-targets side by side."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(WIDTH, (1, 1), name="proj_in")(x[:, :, None, :])[:, :, 0, :]
        x = x + _Attention(name="attn1")(nn.LayerNorm(name="norm1")(x))
        x = x + _Attention(name="attn2")(x)
        return x


@pytest.fixture(scope="module")
def tiny():
    model = _Tiny()
    x = jax.random.normal(jax.random.key(0), (2, 5, WIDTH))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    apply = jax.jit(lambda p, x, branch=None: model.apply(_variables(p, branch), x))
    return model, params, x, apply


def _variables(params, branch=None):
    """Flax variables: `params`, and the LoRA branch collection when given."""
    return {"params": params} if branch is None else {"params": params, LORA: branch}


def test_targets_select_dense_kernels_only(tiny):
    _, params, _, _ = tiny
    got = lora_targets(params, [UNET_PATTERN])
    want = [
        f"{a}/{p}/kernel" for a in ("attn1", "attn2") for p in ("to_k", "to_out_0", "to_q", "to_v")
    ]
    assert got == sorted(want)
    # Two patterns overlapping on a kernel select it once.
    assert lora_targets(params, [UNET_PATTERN, r"attn1/to_q/kernel"]) == got
    assert lora_targets(params, UNET_PATTERN) == got  # a config's single string


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        ([r".*self_attn/q_proj/kernel"], r"pattern '\.\*self_attn/q_proj/kernel' matches no"),
        ([r"proj_in/kernel"], r"proj_in/kernel \(shape \(1, 1, 16, 16\)\) is not a 2-D Dense"),
        ([r"attn1/to_out_0/.*"], r"attn1/to_out_0/bias .* is not a 2-D Dense kernel"),
        ([r"attn1/(to_q"], r"'attn1/\(to_q' is not a valid regex"),
        ([], r"non-empty list"),
        ("", r"pattern '' matches no parameter"),
    ],
)
def test_bad_targets_are_refused_by_name(tiny, patterns, message):
    _, params, _, _ = tiny
    with pytest.raises(ConfigError, match=message):
        lora_init(jax.random.key(0), params, patterns, RANK)


@pytest.mark.parametrize("rank", [0, -1, 2.0, True])
def test_bad_rank_is_refused(tiny, rank):
    _, params, _, _ = tiny
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        lora_init(jax.random.key(0), params, [UNET_PATTERN], rank)


def test_init_mirrors_targets_with_zero_b(tiny):
    _, params, _, _ = tiny
    lora = lora_init(jax.random.key(2), params, [UNET_PATTERN], RANK)
    flat = traverse_util.flatten_dict(lora, sep="/")
    assert sorted(flat) == sorted(
        f"{a}/{p}/{f}"
        for a in ("attn1", "attn2")
        for p in ("to_q", "to_k", "to_v", "to_out_0")
        for f in ("lora_a", "lora_b")
    )
    bound = 1 / WIDTH**0.5
    a_leaves = [v for k, v in flat.items() if k.endswith("lora_a")]
    for a in a_leaves:
        assert a.shape == (WIDTH, RANK) and a.dtype == jnp.float32
        assert float(jnp.max(jnp.abs(a))) <= bound and float(jnp.std(a)) > 0.3 * bound
    # Different targets get different A (one key folded per target).
    assert not np.allclose(a_leaves[0], a_leaves[1])
    for k, b in flat.items():
        if k.endswith("lora_b"):
            assert b.shape == (RANK, WIDTH) and not np.any(np.asarray(b))


def test_zero_b_leaves_outputs_unchanged(tiny):
    _, params, x, apply = tiny
    lora = lora_init(jax.random.key(3), params, [UNET_PATTERN], RANK)
    merged = jax.jit(lora_merge, static_argnums=(2, 3))(params, lora, ALPHA, RANK)
    np.testing.assert_array_equal(apply(merged, x), apply(params, x))
    branch = lora_collection(params, lora, ALPHA, RANK)
    np.testing.assert_array_equal(apply(params, x, branch), apply(params, x))


def _random_b(lora, seed):
    """A trained-looking LoRA: B filled with distinct normal draws per target."""
    flat = traverse_util.flatten_dict(lora)
    for i, key in enumerate(sorted(flat)):
        if key[-1] == "lora_b":
            flat[key] = jax.random.normal(jax.random.key(seed + i), flat[key].shape)
    return traverse_util.unflatten_dict(flat)


def test_merge_equals_explicit_product(tiny):
    _, params, _, _ = tiny
    lora = _random_b(lora_init(jax.random.key(4), params, [UNET_PATTERN], RANK), 5)
    merged = lora_merge(params, lora, ALPHA, RANK)
    scale = ALPHA / RANK
    assert lora_scale(ALPHA, RANK) == scale
    flat_p = traverse_util.flatten_dict(params, sep="/")
    flat_m = traverse_util.flatten_dict(merged, sep="/")
    flat_l = traverse_util.flatten_dict(lora, sep="/")
    assert flat_m.keys() == flat_p.keys()
    for key, value in flat_m.items():
        module = key.rsplit("/", 1)[0]
        if f"{module}/lora_a" in flat_l and key.endswith("kernel"):
            a = np.asarray(flat_l[f"{module}/lora_a"], np.float64)
            b = np.asarray(flat_l[f"{module}/lora_b"], np.float64)
            want = np.asarray(flat_p[key], np.float64) + scale * a @ b
            assert rel_err(value, want) < 1e-6, key
        else:
            assert value is flat_p[key], key  # untargeted leaves pass through untouched


def test_branch_equals_merge_in_float32(tiny):
    """x·W + (x·A)·B' (kept apart) and x·(W + A·B') agree to float32 rounding; the branch
    collection holds A and the scaled B for the targeted modules only."""
    model = tiny[0]

    @jax.jit  # one program, draws included: its rounding does not depend on -O0 (conftest)
    def case():
        x = jax.random.normal(jax.random.key(0), (2, 5, WIDTH))
        params = model.init(jax.random.key(1), x)["params"]
        lora = _random_b(lora_init(jax.random.key(4), params, [UNET_PATTERN], RANK), 5)
        branch = lora_collection(params, lora, ALPHA, RANK)
        outputs = [
            model.apply(_variables(p, b), x)
            for p, b in ((params, branch), (lora_merge(params, lora, ALPHA, RANK), None),
                         (params, None))
        ]  # fmt: skip
        return lora, branch, outputs

    lora, branch, (kept_apart, merged, plain) = case()
    assert jax.tree.structure(branch) == jax.tree.structure(lora)
    np.testing.assert_array_equal(
        branch["attn1"]["to_q"]["lora_b"], 2.0 * lora["attn1"]["to_q"]["lora_b"]
    )
    assert rel_err(kept_apart, merged) < 1e-6  # measured 4.6e-7
    assert rel_err(merged, plain) > 0.1  # the LoRA does change the output


def test_merge_refuses_mismatched_trees(tiny):
    _, params, _, _ = tiny
    lora = lora_init(jax.random.key(6), params, [UNET_PATTERN], RANK)
    with pytest.raises(
        ConfigError, match=r"attn1/to_k: lora_a \(16, 4\) / lora_b \(4, 16\) do not"
    ):
        lora_merge(params, lora, ALPHA, 2)
    stray = {"attn3": {"to_q": lora["attn1"]["to_q"]}}
    with pytest.raises(ConfigError, match="attn3/to_q has no kernel"):
        lora_merge(params, stray, ALPHA, RANK)
    half = {"attn1": {"to_q": {"lora_a": lora["attn1"]["to_q"]["lora_a"]}}}
    with pytest.raises(ConfigError, match="attn1/to_q must hold exactly lora_a and lora_b"):
        lora_merge(params, half, ALPHA, RANK)
    # The branch collection checks the same way.
    with pytest.raises(ConfigError, match="attn3/to_q has no kernel"):
        lora_collection(params, stray, ALPHA, RANK)
    with pytest.raises(ConfigError, match=r"attn1/to_k: lora_a \(16, 4\) / lora_b \(4, 16\)"):
        lora_collection(params, lora, ALPHA, 2)


def test_gradients_reach_only_lora(tiny):
    model, params, x, _ = tiny
    lora = lora_init(jax.random.key(7), params, [UNET_PATTERN], RANK)

    @jax.jit
    def loss_and_grad(lora, params, x):
        def loss(lora):
            out = model.apply(_variables(params, lora_collection(params, lora, ALPHA, RANK)), x)
            return jnp.mean(jnp.square(out - 1.0))

        return jax.value_and_grad(loss)(lora)

    _, grads = loss_and_grad(lora, params, x)
    # The differentiated tree is the LoRA tree: nothing of the base model is in it.
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    flat = traverse_util.flatten_dict(grads, sep="/")
    for key, g in flat.items():
        if key.endswith("lora_b"):
            assert float(jnp.max(jnp.abs(g))) > 0, key
        else:  # dL/dA = x^T (dL/dy) B^T vanishes while B is zero, as in peft
            assert not np.any(np.asarray(g)), key


def test_matches_diffusers_lora_linear_layer():
    """Our Dense with the LoRA branch, and merged, equals torch Linear + diffusers'
    LoRALinearLayer (network_alpha)."""
    torch = pytest.importorskip("torch")
    from diffusers.models.lora import LoRALinearLayer

    torch.manual_seed(0)
    d_in, d_out = 12, 20
    base = torch.nn.Linear(d_in, d_out)
    with pytest.warns(FutureWarning):
        ref_lora = LoRALinearLayer(d_in, d_out, rank=RANK, network_alpha=ALPHA)
    torch.nn.init.normal_(ref_lora.up.weight)  # a trained, non-zero B
    x = torch.randn(3, d_in)
    with torch.no_grad():
        want = (base(x) + ref_lora(x)).numpy()

    params = {
        "layer": {"kernel": base.weight.detach().numpy().T, "bias": base.bias.detach().numpy()}
    }
    lora = {
        "layer": {
            "lora_a": ref_lora.down.weight.detach().numpy().T,
            "lora_b": ref_lora.up.weight.detach().numpy().T,
        }
    }
    merged = lora_merge(params, lora, ALPHA, RANK)
    dense = blocks.dense(d_out, name="layer", dtype=jnp.float32)
    got = dense.apply({"params": merged["layer"]}, x.numpy())
    assert rel_err(got, want) < 1e-5
    branch = lora_collection(params, lora, ALPHA, RANK)
    got = dense.apply(_variables(params["layer"], branch["layer"]), x.numpy())
    assert rel_err(got, want) < 1e-5


# A small delta in bfloat16: a layer the size of SD's (fan-in 1024, |W| ~ 0.03, rank 4), whose
# (alpha/rank)·A·B is below half a bfloat16 step of W. Merged into the bfloat16 kernel it rounded
# away: the share of x·ΔW left was 0.15 at |B| = 1e-4 and 0.89 at 1e-3 (scale 2, as here; 0.06
# and 0.63 at scale 1), in bfloat16 and float32 compute alike.
FAN_IN, FAN_OUT, TOKENS = 1024, 256, 256


def _surviving_share(delta, reference) -> float:
    """The share of `reference` (x·ΔW in float32) that the output change `delta` carries."""
    delta, reference = np.asarray(delta, np.float64), np.asarray(reference, np.float64)
    return float(np.sum(delta * reference) / np.sum(reference * reference))


@pytest.fixture(scope="module")
def wide():
    """A bfloat16 kernel [1024, 256] of |W| ~ 0.03, bfloat16 inputs, rank-4 LoRA factors."""
    k = jax.random.split(jax.random.key(10), 4)
    params = {"kernel": (0.03 * jax.random.normal(k[0], (FAN_IN, FAN_OUT))).astype(jnp.bfloat16)}
    x = jax.random.normal(k[1], (TOKENS, FAN_IN)).astype(jnp.bfloat16)
    a = lora_init(k[2], {"layer": params}, "layer/kernel", RANK)["layer"]["lora_a"]
    return params, x, a, jax.random.normal(k[3], (RANK, FAN_OUT))


@pytest.mark.parametrize("size", [1e-4, 1e-3])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_bfloat16_kernel_keeps_a_small_lora_delta(wide, size, dtype):
    params, x, a, b = wide
    lora = {"layer": {"lora_a": a, "lora_b": size * b}}
    branch = lora_collection({"layer": params}, lora, ALPHA, RANK)["layer"]
    dense = blocks.dense(FAN_OUT, name="layer", dtype=dtype, use_bias=False)
    run = jax.jit(lambda v: dense.apply(v, x).astype(jnp.float32))
    delta = run(_variables(params, branch)) - run(_variables(params))
    reference = np.asarray(x, np.float64) @ np.asarray(a, np.float64) @ np.asarray(branch["lora_b"])
    # Measured: 1.006 (|B| = 1e-4) and 0.999 (1e-3) in bfloat16 compute, 1.000 in float32.
    assert abs(_surviving_share(delta, reference) - 1) < 0.05


def test_bfloat16_lora_gradients_match_float32(wide):
    """Gradients reach A and B only, and in bfloat16 compute match float32 compute's."""
    params, x, a, b = wide
    lora = {"layer": {"lora_a": a, "lora_b": 1e-3 * b}}
    target = jax.random.normal(jax.random.key(11), (TOKENS, FAN_OUT))

    def grads(dtype):
        dense = blocks.dense(FAN_OUT, name="layer", dtype=dtype, use_bias=False)

        def loss(lora):
            branch = lora_collection({"layer": params}, lora, ALPHA, RANK)["layer"]
            out = dense.apply(_variables(params, branch), x).astype(jnp.float32)
            return jnp.mean(jnp.square(out - target))

        return jax.jit(jax.grad(loss))(lora)

    low, ref = grads(jnp.bfloat16), grads(jnp.float32)
    assert jax.tree.structure(low) == jax.tree.structure(lora)
    for name in ("lora_a", "lora_b"):
        assert low["layer"][name].dtype == jnp.float32
        # Measured: 3.0e-3 (A), 2.9e-3 (B); bfloat16 carries 8 bits.
        assert rel_err(low["layer"][name], ref["layer"][name]) < 1e-2, name


def test_bfloat16_unet_keeps_a_small_lora_delta():
    """The tiny UNet with bfloat16 weights and compute, LoRA on its attention as training sets
    it (method.model_variables): the first attention's projections carry x·ΔW, x their input
    (norm1's output, the same with and without LoRA). At the UNet's output the delta is below
    bfloat16's rounding noise (~4e-3 here), so it is measured where it enters."""
    from idfuse_jax import build, method
    from idfuse_jax.config_lib import sibling_module

    config = sibling_module(str(REPO / "configs" / "smoke.py"), "smoke").get_config()
    config.model.dtype = config.model.weights_dtype = "bfloat16"
    models, frozen = build.random_models(config)
    trainable = method.init_trainable(jax.random.key(0), models, config, frozen)
    flat = traverse_util.flatten_dict(trainable["unet_lora"])
    for i, key in enumerate(sorted(flat)):
        if key[-1] == "lora_b":  # |(alpha/rank)·A·B| ~ 2e-5 against |W| ~ 0.14
            flat[key] = 1e-4 * jax.random.normal(jax.random.key(i), flat[key].shape)
    trainable["unet_lora"] = traverse_util.unflatten_dict(flat)
    without = dict(trainable, unet_lora=jax.tree.map(jnp.zeros_like, trainable["unet_lora"]))
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 4))
    t = jnp.arange(8) * 120
    context = jax.random.normal(jax.random.key(2), (8, 77, models.idfuse.text_width))
    projections = ("to_q", "to_k", "to_v")

    def first_attention(trainable):
        variables, _ = method.model_variables(frozen, trainable, config)
        _, state = models.unet.apply(
            variables, x, t, context, capture_intermediates=True, mutable=["intermediates"]
        )
        block = state["intermediates"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
        outputs = [block["attn1"][p]["__call__"][0] for p in projections]
        return block["norm1"]["__call__"][0], jnp.stack(outputs).astype(jnp.float32)

    (inputs, low), (_, base) = jax.jit(lambda a, b: (first_attention(a), first_attention(b)))(
        trainable, without
    )
    branch = method.model_variables(frozen, trainable, config)[0][LORA]
    branch = branch["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]
    inputs = np.asarray(inputs, np.float64)
    reference = [
        inputs @ np.asarray(branch[p]["lora_a"], np.float64) @ np.asarray(branch[p]["lora_b"])
        for p in projections
    ]
    # Measured: 1.015; the merged bfloat16 kernel gave 0.058.
    assert abs(_surviving_share(low - base, np.stack(reference)) - 1) < 0.1


def test_bfloat16_branch_backward_multiplies_in_bfloat16():
    """Every matmul of the bfloat16 Dense with LoRA, forward and backward, takes bfloat16
    operands (autodiff alone would run the backward ones in float32: the cotangent of the
    float32 sum is float32)."""
    x = jnp.ones((8, 64), jnp.bfloat16)
    params = {"kernel": jnp.ones((64, 32), jnp.bfloat16)}
    dense = blocks.dense(32, name="layer", dtype=jnp.bfloat16, use_bias=False)

    def loss(x, branch):
        return jnp.sum(dense.apply(_variables(params, branch), x).astype(jnp.float32) ** 2)

    branch = {"lora_a": jnp.ones((64, RANK)), "lora_b": jnp.ones((RANK, 32))}
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, branch).as_text()
    operands = re.findall(
        r"stablehlo.dot_general.*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)", hlo
    )
    # Forward x·W, x·A, h·B; backward dx (through W and A), dh, dA, dB.
    assert len(operands) == 8 and set(operands) == {("bf16", "bf16")}, operands
