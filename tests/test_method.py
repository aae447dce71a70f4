"""The IdFuse modules: IEDM adapter, FFM mixture of experts, and the conditioning they build."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from parity_utils import rel_err

from idfuse_jax.errors import ConfigError
from idfuse_jax.models.adapter import ImageAdapter
from idfuse_jax.models.conditioning import (
    IdFuse,
    combine,
    reference_conditioning,
    text_conditioning,
    training_conditioning,
)
from idfuse_jax.models.ffm import FFM

B, T, D_IMG, D, K = 2, 5, 12, 16, 4


def _randomise(params, seed: int, scale: float = 0.3):
    """Every leaf replaced by normal draws: a 'trained' tree with no zero layers left."""
    flat = traverse_util.flatten_dict(params)
    for i, key in enumerate(sorted(flat)):
        flat[key] = scale * jax.random.normal(jax.random.key(seed + i), flat[key].shape)
    return traverse_util.unflatten_dict(flat)


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _gelu(x):
    """Exact (erf) GELU, as torch.nn.GELU()."""
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


@pytest.fixture(scope="module")
def feats():
    keys = jax.random.split(jax.random.key(0), 4)
    return {
        "text": jax.random.normal(keys[0], (B, T, D)),
        "image": jax.random.normal(keys[1], (B, D_IMG)),
        "background": jax.random.normal(keys[2], (B, D_IMG)),
        "reference": jax.random.normal(keys[3], (1, D_IMG)),
    }


@pytest.fixture(scope="module")
def idfuse(feats):
    model = IdFuse(image_width=D_IMG, text_width=D, num_experts=K)
    params = jax.jit(model.init)(jax.random.key(1), feats["text"], feats["image"])["params"]
    return model, params


# ----------------------------------------------------------------------------- adapter


def _adapter_ref(p, f):
    """A(f) = fc2(relu(fc1(σ(m) f))) + σ(m) f, then proj: DisenBooth's Image_adapter + proj."""
    g = 1 / (1 + np.exp(-p["mask"])) * f
    h = np.maximum(g @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
    out = h @ p["fc2"]["kernel"] + p["fc2"]["bias"] + g
    return out @ p["proj"]["kernel"] + p["proj"]["bias"] if "proj" in p else out


def test_adapter_matches_formula(idfuse, feats):
    model, params = idfuse
    adapter = ImageAdapter(D_IMG, D)
    p = _randomise(params["adapter"], 10)
    got = adapter.apply({"params": p}, feats["image"])
    assert got.shape == (B, D)
    assert rel_err(got, _adapter_ref(_np(p), np.asarray(feats["image"], np.float64))) < 1e-5
    # The same numbers through IdFuse.adapt: the adapter sits at params["adapter"].
    via = model.apply({"params": {**params, "adapter": p}}, feats["image"], method="adapt")
    np.testing.assert_array_equal(via, got)


def test_adapter_equal_widths_has_no_projection(feats):
    adapter = ImageAdapter(D, D)
    f = jax.random.normal(jax.random.key(2), (B, D))
    params = jax.jit(adapter.init)(jax.random.key(3), f)["params"]
    assert sorted(params) == ["fc1", "fc2", "mask"]
    p = _randomise(params, 20)
    got = adapter.apply({"params": p}, f)
    assert rel_err(got, _adapter_ref(_np(p), np.asarray(f, np.float64))) < 1e-5
    np.testing.assert_array_equal(adapter.apply({"params": p}, f, method="project"), f)


def test_adapter_mask_in_open_unit_interval(idfuse):
    _, params = idfuse
    adapter = ImageAdapter(D_IMG, D)
    p = params["adapter"]
    np.testing.assert_array_equal(p["mask"], np.zeros(D_IMG))  # DisenBooth: σ(0) = 0.5
    np.testing.assert_array_equal(adapter.apply({"params": p}, method="gate"), 0.5)
    trained = {**p, "mask": 4.0 * jax.random.normal(jax.random.key(4), (D_IMG,))}
    gate = np.asarray(adapter.apply({"params": trained}, method="gate"))
    assert np.all(gate > 0) and np.all(gate < 1) and gate.min() < 0.1 and gate.max() > 0.9


def test_adapter_refuses_wrong_width(idfuse):
    _, params = idfuse
    with pytest.raises(ConfigError, match=r"width 12, got shape \(2, 16\)"):
        ImageAdapter(D_IMG, D).apply({"params": params["adapter"]}, jnp.zeros((B, D)))
    with pytest.raises(ConfigError, match=r"ImageAdapter\.text_width must be a positive integer"):
        ImageAdapter(D_IMG, 0).init(jax.random.key(0), jnp.zeros((B, D_IMG)))
    with pytest.raises(ConfigError, match=r"ImageAdapter\.hidden_mult must be positive, got -1"):
        ImageAdapter(D_IMG, D, hidden_mult=-1).init(jax.random.key(0), jnp.zeros((B, D_IMG)))


def test_adapter_hidden_width(feats):
    init = ImageAdapter(D_IMG, D, hidden_mult=2).init
    shapes = jax.eval_shape(init, jax.random.key(0), feats["image"])["params"]
    assert shapes["fc1"]["kernel"].shape == (D_IMG, 2 * D_IMG)
    assert shapes["fc2"]["kernel"].shape == (2 * D_IMG, D_IMG)
    assert shapes["proj"]["kernel"].shape == (D_IMG, D)


# ----------------------------------------------------------------------------- FFM


def test_ffm_is_identity_at_init(idfuse, feats):
    _, params = idfuse
    ffm_params = params["ffm"]
    assert ffm_params["w_in"].shape == (K, D, D) and ffm_params["w_out"].shape == (K, D, D)
    assert ffm_params["router"]["kernel"].shape == (D, K)
    out, stats = jax.jit(lambda p, x: FFM(K).apply({"params": p}, x))(ffm_params, feats["text"])
    np.testing.assert_array_equal(out, feats["text"])
    assert stats["router_weight"].shape == (K,)


def test_ffm_matches_explicit_mixture(idfuse, feats):
    _, params = idfuse
    p = _randomise(params["ffm"], 30)
    x = feats["text"]
    (out, stats), state = FFM(K).apply({"params": p}, x, mutable=["intermediates"])
    weights = np.asarray(state["intermediates"]["router_weights"][0], np.float64)
    assert weights.shape == (B, T, K)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)  # every token's weights sum to 1

    q, xn = _np(p), np.asarray(x, np.float64)
    logits = xn @ q["router"]["kernel"] + q["router"]["bias"]
    want_w = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert rel_err(weights, want_w) < 1e-5
    want = np.zeros_like(xn)
    for k in range(K):  # the reference loops over experts; the module must not
        mlp = _gelu(xn @ q["w_in"][k] + q["b_in"][k]) @ q["w_out"][k] + q["b_out"][k]
        want += want_w[..., k : k + 1] * (xn + mlp)
    assert rel_err(out, want) < 1e-5

    flat_w = want_w.reshape(-1, K)
    assert rel_err(stats["router_weight"], flat_w.mean(0)) < 1e-5
    entropy = np.mean(-(flat_w * np.log(flat_w)).sum(-1))
    assert abs(float(stats["router_entropy"]) - entropy) < 1e-5


def test_ffm_uniform_router_has_max_entropy(idfuse, feats):
    _, params = idfuse
    p = jax.tree.map(jnp.zeros_like, params["ffm"])  # zero router logits: w_k = 1/K
    _, stats = FFM(K).apply({"params": p}, feats["text"])
    np.testing.assert_allclose(stats["router_weight"], 1 / K, rtol=1e-6)
    np.testing.assert_allclose(stats["router_entropy"], np.log(K), rtol=1e-6)


def test_ffm_hidden_width_and_bad_config(feats):
    x = feats["text"]
    shapes = jax.eval_shape(FFM(2, hidden_mult=0.5).init, jax.random.key(0), x)["params"]
    assert shapes["w_in"].shape == (2, D, D // 2) and shapes["b_out"].shape == (2, D)
    with pytest.raises(ConfigError, match="num_experts must be a positive integer, got 0"):
        FFM(0).init(jax.random.key(0), x)
    with pytest.raises(ConfigError, match="hidden_mult must be positive, got 0"):
        FFM(2, hidden_mult=0).init(jax.random.key(0), x)
    with pytest.raises(ConfigError, match=r"token features \[..., T, D\], got shape \(16,\)"):
        FFM(2).init(jax.random.key(0), x[0, 0])


# ----------------------------------------------------------------------------- conditioning


def test_idfuse_tree_and_identity_at_init(idfuse, feats):
    model, params = idfuse
    assert sorted(params) == ["adapter", "ffm"]
    cond = training_conditioning(model, params, feats["text"], feats["image"], feats["background"])
    f_i = model.apply({"params": params}, feats["image"], method="adapt")
    np.testing.assert_array_equal(cond.image, f_i)
    # FFM is the identity at step 0: the UNet sees exactly f_s + f_i and f_s.
    np.testing.assert_array_equal(cond.full, feats["text"] + f_i[:, None, :])
    np.testing.assert_array_equal(cond.text_only, feats["text"])
    proj = _np(params["adapter"]["proj"])
    want_bg = np.asarray(feats["background"], np.float64) @ proj["kernel"] + proj["bias"]
    assert cond.background.shape == (B, D) and rel_err(cond.background, want_bg) < 1e-5


def test_conditioning_paths_with_trained_params(idfuse, feats):
    model, params = idfuse
    p = _randomise(params, 40)

    def ffm(x):
        return FFM(K).apply({"params": p["ffm"]}, x)[0]

    f_s = feats["text"]
    f_i = model.apply({"params": p}, feats["image"], method="adapt")
    f_bg = model.apply({"params": p}, feats["background"], method="project")
    implicit = training_conditioning(model, p, f_s, feats["image"], feats["background"])
    explicit = training_conditioning(
        model, p, f_s, feats["image"], feats["background"], background="explicit"
    )
    np.testing.assert_allclose(implicit.full, ffm(f_s + f_i[:, None]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(explicit.full, ffm(f_s + f_bg[:, None]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(implicit.text_only, ffm(f_s), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(explicit.image, implicit.image)
    assert not np.allclose(implicit.full, explicit.full)
    assert implicit.stats["router_weight"].shape == (K,)
    assert implicit.text_stats["router_entropy"].shape == ()

    text_only, _ = text_conditioning(model, p, f_s)
    np.testing.assert_array_equal(text_only, implicit.text_only)
    # Background preservation: one reference image's f_i added to every prompt of the batch.
    f_ref = model.apply({"params": p}, feats["reference"], method="adapt")
    with_ref, _ = reference_conditioning(model, p, f_s, feats["reference"])
    np.testing.assert_allclose(with_ref, ffm(f_s + f_ref[:, None]), rtol=1e-6, atol=1e-6)


def test_background_feature_carries_no_gradient(idfuse, feats):
    model, params = idfuse
    p = _randomise(params, 50)

    def grads(field):
        def f(p):
            cond = training_conditioning(
                model, p, feats["text"], feats["image"], feats["background"]
            )
            return jnp.sum(getattr(cond, field))

        return jax.grad(f)(p)

    bg = grads("background")
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(bg))
    image = grads("image")  # the projection is trained through f_i
    assert float(jnp.max(jnp.abs(image["adapter"]["proj"]["kernel"]))) > 0


def test_conditioning_refuses_bad_input(idfuse, feats):
    model, params = idfuse
    text, image, bg = feats["text"], feats["image"], feats["background"]
    with pytest.raises(ConfigError, match=r"method.background must be one of .* 'both'"):
        training_conditioning(model, params, text, image, bg, background="both")
    with pytest.raises(ConfigError, match=r"background embeddings \(1, 12\) do not match"):
        training_conditioning(model, params, text, image, bg[:1])
    with pytest.raises(ConfigError, match=r"image features \(3, 16\) do not fit"):
        combine(text, jnp.zeros((3, D)))
    with pytest.raises(ConfigError, match=r"got \(2, 16\) and \(2, 16\)"):
        combine(text[:, 0], jnp.zeros((B, D)))
    with pytest.raises(ConfigError, match=r"expected text features \[B, T, D\]"):
        text_conditioning(model, params, text[0])


def test_one_prompt_broadcasts_over_a_batch_of_images(idfuse, feats):
    """The trainer encodes its single identity prompt once (batch 1): same result as B copies."""
    model, params = idfuse
    one = feats["text"][:1]
    copies = jnp.broadcast_to(one, feats["text"].shape)
    a = training_conditioning(model, params, one, feats["image"], feats["background"])
    b = training_conditioning(model, params, copies, feats["image"], feats["background"])
    np.testing.assert_allclose(a.full, b.full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        jnp.broadcast_to(a.text_only, b.text_only.shape), b.text_only, rtol=1e-6, atol=1e-6
    )
    assert a.text_only.shape[0] == 1
