"""LoRA as a parameter-tree transform: target selection, init, merge, gradients, parity."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from parity_utils import rel_err

from idfuse_jax.models.lora import ConfigError, lora_init, lora_merge, lora_scale, lora_targets

UNET_PATTERN = r".*attn[12]/(to_q|to_k|to_v|to_out_0)/kernel"
WIDTH, RANK, ALPHA = 16, 4, 8.0


class _Attention(nn.Module):
    """Single-head attention with the UNet's projection names."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        q = nn.Dense(WIDTH, use_bias=False, name="to_q")(x)
        k = nn.Dense(WIDTH, use_bias=False, name="to_k")(x)
        v = nn.Dense(WIDTH, use_bias=False, name="to_v")(x)
        a = jax.nn.softmax(q @ k.swapaxes(-1, -2) / WIDTH**0.5, axis=-1) @ v
        return nn.Dense(WIDTH, name="to_out_0")(a)


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
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    return model, params, x, apply


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


def test_gradients_reach_only_lora(tiny):
    model, params, x, _ = tiny
    lora = lora_init(jax.random.key(7), params, [UNET_PATTERN], RANK)

    @jax.jit
    def loss_and_grad(lora, params, x):
        def loss(lora):
            out = model.apply({"params": lora_merge(params, lora, ALPHA, RANK)}, x)
            return jnp.mean(jnp.square(out - 1.0))

        return jax.value_and_grad(loss)(lora)

    _, grads = loss_and_grad(lora, params, x)
    # The differentiated tree is the LoRA tree: nothing of the base model is in it.
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    flat = traverse_util.flatten_dict(grads, sep="/")
    for key, g in flat.items():
        if key.endswith("lora_b"):
            assert float(jnp.max(jnp.abs(g))) > 0, key
        else:  # dL/dA = x^T (dL/dW') B^T vanishes while B is zero, as in peft
            assert not np.any(np.asarray(g)), key


def test_matches_diffusers_lora_linear_layer():
    """Our merged Dense equals torch Linear + diffusers' LoRALinearLayer (network_alpha)."""
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
    got = nn.Dense(d_out).apply({"params": merged["layer"]}, x.numpy())
    assert rel_err(got, want) < 1e-5
