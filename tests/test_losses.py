"""Losses L1-L4: values on known vectors, signs under one optimiser step, gradient routing."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from idfuse_jax import losses
from idfuse_jax.losses import (
    ConfigError,
    cosine,
    idfuse_loss,
    image_background_loss,
    pool_text,
    text_background_loss,
    text_image_loss,
)
from idfuse_jax.models.conditioning import IdFuse, training_conditioning
from idfuse_jax.models.lora import lora_init, lora_merge

TEXT_PATTERN = r".*self_attn/(q|k|v|out)_proj/kernel"
B, T, D_IMG, D, RANK = 2, 4, 12, 16, 4


# ----------------------------------------------------------------------------- values


def test_cosine_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 7)).astype(np.float32)
    b = rng.normal(size=(5, 7)).astype(np.float32)
    a[1] = 0.0  # a zero vector: eps keeps the cosine finite (0)
    b[3] = 1e-8
    want = torch.nn.functional.cosine_similarity(
        torch.from_numpy(a), torch.from_numpy(b), dim=1, eps=1e-6
    ).numpy()
    np.testing.assert_allclose(cosine(a, b), want, rtol=1e-6, atol=1e-7)


def test_cosine_terms_on_known_vectors():
    # Tokens [3, 0] and [1, 2] pool (mean) to [2, 1]; the EOS pool picks token 1 = [1, 2].
    f_s = jnp.array([[[3.0, 0.0], [1.0, 2.0]], [[0.0, 1.0], [0.0, 1.0]]])
    f_i = jnp.array([[1.0, -2.0], [0.0, 5.0]])  # ⟂ [2, 1]; ∥ [0, 1]
    f_bg = jnp.array([[2.0, 1.0], [1.0, 0.0]])  # cos with f_i: 0 and 0
    pooled = pool_text(f_s, "mean")
    np.testing.assert_array_equal(pooled, [[2.0, 1.0], [0.0, 1.0]])
    assert float(text_image_loss(pooled, f_i)) == pytest.approx((0.0 + 1.0) / 2)
    assert float(image_background_loss(f_i, f_bg)) == pytest.approx(0.0, abs=1e-7)
    assert float(text_background_loss(pooled, f_bg)) == pytest.approx((1.0 + 0.0) / 2)
    f_bg2 = jnp.array([[1.0, -2.0], [3.0, 4.0]])  # cos with f_i: 1 and 0.8
    assert float(image_background_loss(f_i, f_bg2)) == pytest.approx(-(1.0 + 0.8) / 2)

    eos = pool_text(f_s, "eos", jnp.array([1, 0]))
    np.testing.assert_array_equal(eos, [[1.0, 2.0], [0.0, 1.0]])
    # cos([1, 2], [1, -2]) = -3/5; cos([0, 1], [0, 5]) = 1.
    assert float(text_image_loss(eos, f_i)) == pytest.approx((-0.6 + 1.0) / 2)


def test_total_is_weighted_sum_of_terms():
    keys = jax.random.split(jax.random.key(0), 6)
    pred, pred_t, target = (jax.random.normal(k, (B, 4, 4, 3)) for k in keys[:3])
    f_s = jax.random.normal(keys[3], (B, T, D))
    f_i, f_bg = jax.random.normal(keys[4], (B, D)), jax.random.normal(keys[5], (B, D))
    weights = {"denoise": 1.0, "text_image": 0.5, "image_background": 0.25, "text_background": 2.0}
    total, terms = idfuse_loss(
        pred, pred_t, target, f_s, f_i, f_bg, weights=weights, text_only_weight=0.1
    )
    assert set(terms) == {
        "loss",
        "denoise",
        "denoise_full",
        "denoise_text_only",
        "text_image",
        "image_background",
        "text_background",
    }
    mse_full = np.mean((np.asarray(pred) - np.asarray(target)) ** 2)
    mse_text = np.mean((np.asarray(pred_t) - np.asarray(target)) ** 2)
    assert float(terms["denoise_full"]) == pytest.approx(mse_full, rel=1e-6)
    assert float(terms["denoise_text_only"]) == pytest.approx(mse_text, rel=1e-6)
    assert float(terms["denoise"]) == pytest.approx(mse_full + 0.1 * mse_text, rel=1e-6)
    pooled = np.asarray(f_s).mean(1)
    assert float(terms["text_image"]) == pytest.approx(
        float(jnp.mean(cosine(pooled, f_i))), rel=1e-5
    )
    want = sum(w * float(terms[k]) for k, w in weights.items())
    assert float(total) == pytest.approx(want, rel=1e-6)
    # Defaults: λ = (1, 0.001, 0.001, 0.001), text-only weight 0.01 (DisenBooth).
    total_d, terms_d = idfuse_loss(pred, pred_t, target, f_s, f_i, f_bg)
    want_d = float(terms_d["denoise_full"]) + 0.01 * float(terms_d["denoise_text_only"])
    want_d += 0.001 * (
        float(terms_d["text_image"])
        + float(terms_d["image_background"])
        + float(terms_d["text_background"])
    )
    assert float(total_d) == pytest.approx(want_d, rel=1e-6)


def test_bad_inputs_are_refused():
    f_s, f = jnp.ones((B, T, D)), jnp.ones((B, D))
    eps = jnp.ones((B, 4, 4, 3))
    with pytest.raises(ConfigError, match=r"text_pool must be one of \('mean', 'eos'\), got 'max'"):
        idfuse_loss(eps, eps, eps, f_s, f, f, text_pool="max")
    with pytest.raises(ConfigError, match="needs the EOS index"):
        idfuse_loss(eps, eps, eps, f_s, f, f, text_pool="eos")
    with pytest.raises(ConfigError, match=r"eos_index \(3,\) must be \[B\]"):
        pool_text(f_s, "eos", jnp.zeros(3, jnp.int32))
    with pytest.raises(ConfigError, match=r"weights must name exactly .* got \['denoise'\]"):
        idfuse_loss(eps, eps, eps, f_s, f, f, weights={"denoise": 1.0})
    with pytest.raises(ConfigError, match=r"prediction \(2, 4, 4, 3\) and target \(2, 4, 4\)"):
        idfuse_loss(eps, eps, eps[..., 0], f_s, f, f)
    with pytest.raises(ConfigError, match=r"L3: .* got \(2, 16\) and \(2, 12\)"):
        idfuse_loss(eps, eps, eps, f_s, f, jnp.ones((B, D_IMG)))


def test_constant_text_background_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(losses, "_warned_constant_text_background", False)
    f_s, f = jnp.ones((B, T, D)), jnp.ones((B, D))
    eps = jnp.zeros((B, 4, 4, 3))
    with caplog.at_level(logging.WARNING, logger="absl"):
        idfuse_loss(eps, eps, eps, f_s, f, f)
        assert not caplog.records
        _, terms = idfuse_loss(eps, eps, eps, f_s, f, f, text_trainable=False)
        idfuse_loss(eps, eps, eps, f_s, f, f, text_trainable=False)
    assert "text_background" in terms  # still reported
    assert [r.getMessage()[:15] for r in caplog.records] == ["L4 is constant:"]


# ----------------------------------------------------------------------------- training signs


class _ToyTextEncoder(nn.Module):
    """Token embedding + one self-attention with CLIP's projection names."""

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = nn.Embed(10, D, name="token_embedding")(ids)
        return _SelfAttention(name="self_attn")(x) + x


class _SelfAttention(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = (nn.Dense(D, name=f"{n}_proj")(x) for n in "qkv")
        a = jax.nn.softmax(q @ k.swapaxes(-1, -2) / D**0.5, axis=-1) @ v
        return nn.Dense(D, name="out_proj")(a)


@pytest.fixture(scope="module")
def toy():
    """Frozen text encoder + its LoRA, IdFuse, and fixed CLIP-like image/background embeddings."""
    keys = jax.random.split(jax.random.key(0), 6)
    ids = jax.random.randint(keys[0], (B, T), 0, 10)
    image = jax.random.normal(keys[1], (B, D_IMG))
    background = jax.random.normal(keys[2], (B, D_IMG))
    text_model = _ToyTextEncoder()
    text_base = jax.jit(text_model.init)(keys[3], ids)["params"]
    idfuse = IdFuse(image_width=D_IMG, text_width=D, num_experts=2)
    f_s0 = text_model.apply({"params": text_base}, ids)
    idfuse_params = jax.jit(idfuse.init)(keys[4], f_s0, image)["params"]
    text_lora = lora_init(keys[5], text_base, [TEXT_PATTERN], RANK)
    trainable = {"text_lora": text_lora, "idfuse": idfuse_params}

    @jax.jit
    def features(trainable, text_base):
        text_params = lora_merge(text_base, trainable["text_lora"], 8.0, RANK)
        f_s = text_model.apply({"params": text_params}, ids)
        cond = training_conditioning(idfuse, trainable["idfuse"], f_s, image, background)
        pooled = pool_text(f_s)
        zero = jnp.zeros((B, 2, 2, 1))  # L1 plays no part in these tests
        _, terms = idfuse_loss(zero, zero, zero, f_s, cond.image, cond.background)
        cosines = {
            "text_image": jnp.mean(cosine(pooled, cond.image)),
            "image_background": jnp.mean(cosine(cond.image, cond.background)),
            "text_background": jnp.mean(cosine(pooled, cond.background)),
        }
        return terms, cosines

    return trainable, text_base, features


def _grads(toy, term_weights):
    trainable, text_base, features = toy

    def loss(tr):
        terms, _ = features(tr, text_base)
        return sum(w * terms[k] for k, w in term_weights.items())

    return jax.grad(loss)(trainable)


def _sgd_step(trainable, grads, lr=0.05):
    updates, _ = optax.sgd(lr).update(grads, optax.sgd(lr).init(trainable))
    return optax.apply_updates(trainable, updates)


@pytest.mark.parametrize(
    ("term", "direction"),
    [("text_image", -1), ("image_background", +1), ("text_background", -1)],
)
def test_one_step_moves_features_as_intended(toy, term, direction):
    cos_name = term  # each term is (minus) the cosine of the same name
    trainable, text_base, features = toy
    _, before = features(trainable, text_base)
    after_params = _sgd_step(trainable, _grads(toy, {term: 1.0}))
    _, after = features(after_params, text_base)
    change = float(after[cos_name] - before[cos_name])
    assert direction * change > 1e-5, (term, change)


def test_one_step_on_the_sum_moves_all_three(toy):
    trainable, text_base, features = toy
    weights = {"text_image": 1.0, "image_background": 1.0, "text_background": 1.0}
    terms0, cos0 = features(trainable, text_base)
    after_params = _sgd_step(trainable, _grads(toy, weights))
    terms1, cos1 = features(after_params, text_base)
    assert float(terms1["text_image"]) < float(terms0["text_image"])
    assert float(terms1["text_background"]) < float(terms0["text_background"])
    assert float(cos1["image_background"]) > float(cos0["image_background"])


def test_text_background_gradients_reach_text_lora_only(toy):
    trainable, _, _ = toy
    grads = _grads(toy, {"text_background": 1.0})
    # The frozen text encoder is closed over: the differentiated tree is LoRA + IdFuse only.
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    lora_g = traverse_util.flatten_dict(grads["text_lora"], sep="/")
    assert sorted({k.rsplit("/", 1)[0] for k in lora_g}) == [
        f"self_attn/{n}_proj" for n in ("k", "out", "q", "v")
    ]
    b_norm = sum(float(jnp.sum(jnp.abs(g))) for k, g in lora_g.items() if k.endswith("lora_b"))
    assert b_norm > 0
    # f'_i is frozen and L4 does not involve f_i: nothing of IdFuse moves.
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads["idfuse"]))
