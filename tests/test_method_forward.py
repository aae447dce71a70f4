"""The full IdFuse forward under jit: text encoder + LoRA, adapter, FFM, UNet + LoRA, losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from idfuse_jax import diffusion
from idfuse_jax.losses import idfuse_loss
from idfuse_jax.models.clip import CLIPTextConfig, CLIPTextTransformer, eos_positions
from idfuse_jax.models.conditioning import IdFuse, training_conditioning
from idfuse_jax.models.lora import lora_init, lora_merge
from idfuse_jax.models.unet import UNet2DConditionModel, UNetConfig
from idfuse_jax.weights import init_params

UNET_TARGETS = r".*attn[12]/(to_q|to_k|to_v|to_out_0)/kernel"
TEXT_TARGETS = r".*self_attn/(q_proj|k_proj|v_proj|out_proj)/kernel"
B, T, D, D_IMG, LATENT, RANK, ALPHA = 2, 8, 16, 12, 8, 4, 4.0


@pytest.fixture(scope="module")
def setup():
    text_model = CLIPTextTransformer(
        CLIPTextConfig(
            vocab_size=64,
            hidden_size=D,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=T,
            eos_token_id=63,
        )
    )
    unet = UNet2DConditionModel(
        UNetConfig(
            block_out_channels=(16, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            attention_head_dim=2,
            cross_attention_dim=D,
            norm_num_groups=8,
            use_linear_projection=True,
        )
    )
    idfuse = IdFuse(image_width=D_IMG, text_width=D, num_experts=4)
    schedule = diffusion.Schedule.from_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    )
    keys = jax.random.split(jax.random.key(0), 10)
    ids = jnp.array([[62, 5, 9, 63, 63, 63, 63, 63], [62, 7, 63, 63, 63, 63, 63, 63]])
    frozen = {
        "unet": init_params(unet, keys[0]),
        "text": jax.jit(text_model.init)(keys[1], ids)["params"],
    }
    batch = {
        "ids": ids,
        "latents": jax.random.normal(keys[2], (B, LATENT, LATENT, 4)),
        "image_embeds": jax.random.normal(keys[3], (B, D_IMG)),
        "background_embeds": jax.random.normal(keys[4], (B, D_IMG)),
        "noise": jax.random.normal(keys[5], (B, LATENT, LATENT, 4)),
        "t": jnp.array([10, 900]),
    }
    f_s0 = text_model.apply({"params": frozen["text"]}, ids).last_hidden_state
    trainable = {
        "unet_lora": lora_init(keys[6], frozen["unet"], UNET_TARGETS, RANK),
        "text_lora": lora_init(keys[7], frozen["text"], TEXT_TARGETS, RANK),
        "idfuse": jax.jit(idfuse.init)(keys[8], f_s0, batch["image_embeds"])["params"],
    }

    def loss_fn(trainable, frozen, batch):
        text_params = lora_merge(frozen["text"], trainable["text_lora"], ALPHA, RANK)
        unet_params = lora_merge(frozen["unet"], trainable["unet_lora"], ALPHA, RANK)
        f_s = text_model.apply({"params": text_params}, batch["ids"]).last_hidden_state
        cond = training_conditioning(
            idfuse, trainable["idfuse"], f_s, batch["image_embeds"], batch["background_embeds"]
        )
        x_t = diffusion.add_noise(schedule, batch["latents"], batch["noise"], batch["t"])
        target = diffusion.training_target(schedule, batch["latents"], batch["noise"], batch["t"])
        # Both conditionings in one UNet call: one batch of 2B is cheaper than two calls.
        preds = unet.apply(
            {"params": unet_params},
            jnp.concatenate([x_t, x_t]),
            jnp.concatenate([batch["t"], batch["t"]]),
            jnp.concatenate([cond.full, cond.text_only]),
        )
        pred, pred_text = jnp.split(preds, 2)
        total, terms = idfuse_loss(
            pred,
            pred_text,
            target,
            f_s,
            cond.image,
            cond.background,
            text_pool="eos",
            eos_index=eos_positions(batch["ids"], 63),
        )
        # What the pretrained models alone predict for f_s + f_i: step 0 must reproduce it.
        f_s_base = text_model.apply({"params": frozen["text"]}, batch["ids"]).last_hidden_state
        base = unet.apply(
            {"params": frozen["unet"]}, x_t, batch["t"], f_s_base + cond.image[:, None]
        )
        return total, (terms, pred, base)

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (total, (terms, pred, base)), grads = step(trainable, frozen, batch)
    return trainable, total, terms, pred, base, grads


def test_full_forward_gives_finite_losses(setup):
    _, total, terms, _, _, _ = setup
    assert np.isfinite(float(total))
    for name, value in terms.items():
        assert np.isfinite(float(value)), name
    assert float(terms["denoise_full"]) > 0 and float(terms["denoise_text_only"]) > 0


def test_step_zero_is_the_pretrained_model(setup):
    _, _, _, pred, base, _ = setup
    # LoRA B = 0 and FFM = identity: the UNet sees exactly what the base models give.
    np.testing.assert_allclose(pred, base, rtol=1e-5, atol=1e-5)


def test_gradients_cover_exactly_the_trainable_tree(setup):
    trainable, _, _, _, _, grads = setup
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    for part in ("unet_lora", "text_lora"):
        flat = traverse_util.flatten_dict(grads[part], sep="/")
        b = [float(jnp.max(jnp.abs(g))) for k, g in flat.items() if k.endswith("lora_b")]
        assert b and min(b) > 0, part  # every targeted projection learns
    unet_targets = traverse_util.flatten_dict(trainable["unet_lora"], sep="/")
    assert any("/attn2/to_k/" in k for k in unet_targets)  # cross-attention is targeted
    for part in ("adapter", "ffm"):
        norm = sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads["idfuse"][part]))
        assert norm > 0, part
