"""`method.training_loss`, the loss the training step differentiates, against an independent
computation: one example at a time, each UNet pass a call of its own, the noising written out
from alpha-bar, the cosines and means in numpy, LoRA merged by `lora_merge` directly.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idfuse_jax import build, method
from idfuse_jax.models import conditioning, lora
from idfuse_jax.train_lib import example_keys

CONFIG_FILE = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "smoke.py")
INDICES = np.array([2, 0], np.int32)  # a batch of 2 from 3 precomputed images


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _perturbed(tree, key, scale=0.05):
    """Trainable parameters away from their init (LoRA B and the FFM's output layer start at 0,
    which would hide a wrong merge or a skipped expert)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


@pytest.fixture(scope="module")
def case():
    from idfuse_jax.config_lib import sibling_module

    config = sibling_module(CONFIG_FILE, "smoke").get_config()
    config.train.batch_size = len(INDICES)
    config.loss.weights.text_image = 0.3  # weights far from each other, so a swap shows
    config.loss.weights.image_background = 0.05
    config.loss.weights.text_background = 2.0
    models, frozen = build.random_models(config)
    keys = jax.random.split(jax.random.key(7), 8)
    trainable = _perturbed(method.init_trainable(keys[0], models, config, frozen), keys[1])
    side = config.data.resolution // models.latent_downsample
    channels = models.unet.config.in_channels
    d_img = models.idfuse.image_width
    subject = method.SubjectFeatures(
        latent_mean=jax.random.normal(keys[2], (3, side, side, channels)),
        latent_logvar=-2.0 + 0.1 * jax.random.normal(keys[3], (3, side, side, channels)),
        image_embeds=jax.random.normal(keys[4], (3, d_img)),
        background_embeds=jax.random.normal(keys[5], (3, d_img)),
        prompt_ids=jnp.asarray(models.tokenizer(["a photo of sks dog"])),
        num_items=3,
    )
    ex_keys = example_keys(keys[6], jnp.int32(4), len(INDICES))
    loss = jax.jit(
        lambda tr: method.training_loss(
            models, config, frozen, tr, subject, jnp.asarray(INDICES), ex_keys
        )
    )
    total, terms = loss(trainable)
    return config, models, frozen, trainable, subject, ex_keys, float(total), terms


def _reference(config, models, frozen, trainable, subject, ex_keys):
    m = config.method
    unet_params = lora.lora_merge(frozen["unet"], trainable["unet_lora"], m.lora_alpha, m.lora_rank)
    text_params = lora.lora_merge(frozen["text"], trainable["text_lora"], m.lora_alpha, m.lora_rank)
    idfuse_fns = {
        fn: jax.jit(
            lambda x, fn=fn: models.idfuse.apply({"params": trainable["idfuse"]}, x, method=fn)
        )
        for fn in ("adapt", "project", "fuse")
    }
    idfuse = lambda fn, x: idfuse_fns[fn](x)
    unet = jax.jit(lambda x, t, c: models.unet.apply({"params": unet_params}, x, t, c))
    encode = jax.jit(lambda ids: models.text_encoder.apply({"params": text_params}, ids))
    f_s = encode(subject.prompt_ids).last_hidden_state
    pooled = np.asarray(f_s[0]).mean(0)
    alpha_bar = np.asarray(models.schedule.alphas_cumprod)
    scaling = models.vae.config.scaling_factor
    full, text_only, text_image, image_bg, text_bg = [], [], [], [], []
    for i, idx in enumerate(INDICES):
        k_latent, k_noise, k_t = jax.random.split(ex_keys[i], 3)
        mean, logvar = np.asarray(subject.latent_mean[idx]), np.asarray(subject.latent_logvar[idx])
        eps_latent = np.asarray(jax.random.normal(k_latent, mean.shape))
        z = (mean + np.exp(0.5 * logvar) * eps_latent) * scaling
        noise = np.asarray(jax.random.normal(k_noise, mean.shape))
        t = int(jax.random.randint(k_t, (), 0, models.schedule.num_train_timesteps))
        x_t = np.sqrt(alpha_bar[t]) * z + np.sqrt(1 - alpha_bar[t]) * noise  # target: ε
        f_i = idfuse("adapt", subject.image_embeds[idx][None])
        f_bg = np.asarray(idfuse("project", subject.background_embeds[idx][None]))[0]
        cond_full, _ = idfuse("fuse", f_s + f_i[:, None, :])
        cond_text, _ = idfuse("fuse", f_s)
        for cond, out in ((cond_full, full), (cond_text, text_only)):
            pred = np.asarray(unet(jnp.asarray(x_t[None]), jnp.array([t]), cond))[0]
            out.append(np.mean((pred - noise) ** 2))
        f_i = np.asarray(f_i)[0]
        text_image.append(_cos(pooled, f_i))
        image_bg.append(-_cos(f_i, f_bg))
        text_bg.append(_cos(pooled, f_bg))
    terms = {
        "denoise_full": np.mean(full),
        "denoise_text_only": np.mean(text_only),
        "text_image": np.mean(text_image),
        "image_background": np.mean(image_bg),
        "text_background": np.mean(text_bg),
    }
    terms["denoise"] = terms["denoise_full"] + config.loss.text_only_weight * np.mean(text_only)
    w = config.loss.weights
    terms["loss"] = (
        w.denoise * terms["denoise"]
        + w.text_image * terms["text_image"]
        + w.image_background * terms["image_background"]
        + w.text_background * terms["text_background"]
    )
    return terms


def test_training_loss_matches_an_independent_computation(case):
    config, models, frozen, trainable, subject, ex_keys, total, terms = case
    want = _reference(config, models, frozen, trainable, subject, ex_keys)
    for name, value in want.items():
        assert float(terms[name]) == pytest.approx(value, rel=2e-5, abs=1e-6), name
    assert total == pytest.approx(want["loss"], rel=2e-5)
    # Nothing is degenerate: every term contributes.
    assert all(abs(value) > 1e-4 for value in want.values())


def test_router_statistics_are_reported(case):
    config, *_, terms = case
    weights = np.asarray(terms["router_weight"])
    assert weights.shape == (config.method.num_experts,)
    assert weights.sum() == pytest.approx(1.0, rel=1e-5)
    assert 0 < float(terms["router_entropy"]) <= np.log(config.method.num_experts) + 1e-6


def test_photos_without_a_background_leave_l3_and_l4(case):
    """A decouple weight of 0 takes an example out of the means of L3 and L4 (not as a zero
    background) and changes nothing else; with no background in the batch, both are 0."""
    config, models, frozen, trainable, subject, ex_keys, _, terms = case
    loss = jax.jit(
        lambda subj: method.training_loss(
            models, config, frozen, trainable, subj, jnp.asarray(INDICES), ex_keys
        )[1]
    )
    # The batch is images [2, 0]; image 2 has no usable background.
    masked = loss(subject.replace(decouple=jnp.array([1.0, 1.0, 0.0])))
    idfuse = lambda fn, x: np.asarray(
        models.idfuse.apply({"params": trainable["idfuse"]}, x[None], method=fn)
    )[0]
    text_params = lora.lora_merge(
        frozen["text"], trainable["text_lora"], config.method.lora_alpha, config.method.lora_rank
    )
    f_s = models.text_encoder.apply({"params": text_params}, subject.prompt_ids).last_hidden_state
    pooled = np.asarray(f_s[0]).mean(0)
    f_i, f_bg = (
        idfuse("adapt", subject.image_embeds[0]),
        idfuse("project", subject.background_embeds[0]),
    )
    assert float(masked["image_background"]) == pytest.approx(-_cos(f_i, f_bg), rel=2e-5)
    assert float(masked["text_background"]) == pytest.approx(_cos(pooled, f_bg), rel=2e-5)
    for name in ("denoise", "text_image"):
        assert float(masked[name]) == pytest.approx(float(terms[name]), rel=1e-6), name
    none = loss(subject.replace(decouple=jnp.zeros(3)))
    assert float(none["image_background"]) == 0 and float(none["text_background"]) == 0


def test_explicit_conditioning_falls_back_to_implicit_without_a_background(case):
    """method.background="explicit" conditions on f_s + f'_i, except for a photo without a
    usable background: f_s + f_i, as the implicit method does."""
    _, models, _, trainable, subject, *_ = case
    params = trainable["idfuse"]
    f_s = jax.random.normal(jax.random.key(3), (2, 4, models.idfuse.text_width))
    args = (models.idfuse, params, f_s, subject.image_embeds[:2], subject.background_embeds[:2])
    mixed = conditioning.training_conditioning(
        *args, background="explicit", decouple=jnp.array([1.0, 0.0])
    )
    explicit = conditioning.training_conditioning(*args, background="explicit")
    implicit = conditioning.training_conditioning(*args, background="implicit")
    np.testing.assert_array_equal(mixed.full[0], explicit.full[0])
    np.testing.assert_array_equal(mixed.full[1], implicit.full[1])
    assert not np.allclose(explicit.full[1], implicit.full[1])
