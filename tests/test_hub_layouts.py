"""Checkpoints as the model hub ships them: configs of the published repositories, read as is.

tests/data/configs/<org>/<repo>/ holds the published config files (no weights) of SD 1.5,
SD 2.1-base, SD 2.1 (768, v-prediction), OpenAI CLIP ViT-L/14, laion CLIP ViT-H/14 (a
transformers-4.24-era config with every generic key and the *_config_dict copies) and DINO
ViT-S/16. Each must parse into our config with the published values, and build (shapes only).
"""

import json
import pathlib

import jax
import numpy as np
import pytest
import transformers

from idfuse_jax import diffusion, formats, weights
from idfuse_jax.errors import WeightsError
from idfuse_jax.models import clip, unet, vae, vit

CONFIGS = pathlib.Path(__file__).parent / "data" / "configs"
SD15 = CONFIGS / "runwayml" / "stable-diffusion-v1-5"
SD21_BASE = CONFIGS / "stabilityai" / "stable-diffusion-2-1-base"
SD21 = CONFIGS / "stabilityai" / "stable-diffusion-2-1"
CLIP_L = CONFIGS / "openai" / "clip-vit-large-patch14"
CLIP_H = CONFIGS / "laion" / "CLIP-ViT-H-14-laion2B-s32B-b79K"
DINO = CONFIGS / "facebook" / "dino-vits16"


def read(folder: pathlib.Path, name: str = "config.json") -> dict:
    return json.loads((folder / name).read_text())


def n_params(module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(weights.abstract_params(module)))


def torch_params(model_cls, config, **kwargs) -> int:
    """Parameter count of the transformers model, built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in model_cls(config, **kwargs).parameters())


@pytest.mark.parametrize(
    ("folder", "heads", "cross", "linear", "upcast", "prediction"),
    [
        (SD15, 8, 768, False, False, "epsilon"),
        (SD21_BASE, (5, 10, 20, 20), 1024, True, False, "epsilon"),
        (SD21, (5, 10, 20, 20), 1024, True, True, "v_prediction"),
    ],
    ids=["sd15", "sd21_base", "sd21"],
)
def test_stable_diffusion_configs(folder, heads, cross, linear, upcast, prediction):
    u = unet.UNetConfig.from_diffusers(read(folder / "unet"))
    assert u.block_out_channels == (320, 640, 1280, 1280)
    assert u.attention_head_dim == heads and u.cross_attention_dim == cross
    assert (u.use_linear_projection, u.upcast_attention) == (linear, upcast)
    v = vae.VAEConfig.from_diffusers(read(folder / "vae"))
    assert v.block_out_channels == (128, 256, 512, 512) and v.scaling_factor == 0.18215
    schedule = diffusion.load_schedule(folder)
    assert schedule.prediction_type == prediction and schedule.steps_offset == 1
    assert schedule.alphas_cumprod.shape == (1000,)
    text_config = read(folder / "text_encoder")
    t = clip.CLIPTextConfig.from_transformers(text_config, with_projection=False)
    assert t.eos_token_id == 2  # legacy argmax pooling, as transformers does for this config
    assert (t.hidden_size, t.num_hidden_layers) == ((768, 12) if folder is SD15 else (1024, 23))
    assert t.hidden_act == ("quick_gelu" if folder is SD15 else "gelu")
    # The SD 2.1 text encoder at full size: shapes only (no init).
    if folder is SD21_BASE:
        reference = transformers.CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))
        count = torch_params(transformers.CLIPTextModel, reference)
        assert n_params(clip.CLIPTextTransformer(t)) == count == 340_387_840


def test_openai_clip_vit_l14():
    config = read(CLIP_L)
    t = clip.CLIPTextConfig.from_transformers(config, with_projection=True)
    assert (t.hidden_size, t.num_hidden_layers, t.projection_dim) == (768, 12, 768)
    v = clip.CLIPVisionConfig.from_transformers(config, with_projection=True)
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.projection_dim) == (
        1024, 24, 14, 768,
    )  # fmt: skip
    assert v.hidden_act == "quick_gelu"


def test_laion_clip_vit_h14_transformers_4_24_config():
    """The *_config_dict copies override the nested configs, as transformers applies them."""
    config = read(CLIP_H)
    v = clip.CLIPVisionConfig.from_transformers(config, with_projection=True)
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers) == (1280, 5120, 32)
    assert (v.num_attention_heads, v.patch_size, v.image_size) == (16, 14, 224)
    assert v.hidden_act == "gelu" and v.projection_dim == 1024  # CLIPModel's, not the sub-config's
    t = clip.CLIPTextConfig.from_transformers(config, with_projection=True)
    assert (t.hidden_size, t.num_hidden_layers, t.projection_dim) == (1024, 24, 1024)
    reference = transformers.CLIPConfig.from_pretrained(str(CLIP_H))
    for ours, theirs in ((v, reference.vision_config), (t, reference.text_config)):
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "hidden_act"):
            assert getattr(ours, field) == getattr(theirs, field), field
    # A CLIPModel's visual projection has the top-level projection_dim (1024), not the 512 of
    # its vision_config.
    reference.vision_config.projection_dim = reference.projection_dim
    count = torch_params(transformers.CLIPVisionModelWithProjection, reference.vision_config)
    assert n_params(clip.CLIPVisionTransformer(v)) == count


def test_dino_vit_s16():
    c = vit.ViTConfig.from_transformers(read(DINO))
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (384, 12, 6)
    assert (c.patch_size, c.image_size, c.layer_norm_eps) == (16, 224, 1e-12)
    reference = transformers.ViTConfig.from_pretrained(str(DINO))
    count = torch_params(transformers.ViTModel, reference, add_pooling_layer=False)
    assert n_params(vit.ViTModel(c)) == count


def test_generic_keys_cover_what_installed_transformers_writes():
    """Every key PretrainedConfig serialises or drops as a generation option is known."""
    written = set(transformers.PretrainedConfig().to_dict())
    generation = set(transformers.GenerationConfig._get_default_generation_params())
    model_keys = {"model_type"} | set(clip.HF_DEFAULT_ONLY)
    unknown = {k for k in written | generation if not k.startswith("_")}
    assert unknown - formats.TRANSFORMERS_GENERIC_KEYS - model_keys == set()


@pytest.mark.parametrize(
    ("reader", "folder", "key", "value", "message"),
    [
        ("vision", CLIP_H, "per_layer_config", {"3": {"hidden_act": "relu"}},
         "unsupported config keys: per_layer_config={'3': {'hidden_act': 'relu'}}"),
        ("vision", CLIP_H, "pruned_heads", {"1": [0]}, "unsupported pruned_heads={'1': [0]}"),
        ("unet", SD21 / "unet", "quantization_config", {"load_in_4bit": True},
         "unsupported config keys: quantization_config={'load_in_4bit': True}"),
        ("unet", SD21 / "unet", "class_embed_type", "timestep",
         "unsupported class_embed_type='timestep'"),
        ("scheduler", SD21 / "scheduler", "thresholding", True,
         "scheduler config thresholding=True is not supported"),
        ("scheduler", SD21 / "scheduler", "variance_norm", 2,
         "scheduler config key variance_norm=2 is not supported"),
    ],
)  # fmt: skip
def test_settings_that_change_the_math_are_refused_by_key_and_value(
    reader, folder, key, value, message
):
    name = "scheduler_config.json" if reader == "scheduler" else "config.json"
    config = read(folder, name)
    if reader == "vision":
        config["vision_config"][key] = value
    else:
        config[key] = value
    parse = {
        "vision": lambda c: clip.CLIPVisionConfig.from_transformers(c, with_projection=True),
        "unet": unet.UNetConfig.from_diffusers,
        "scheduler": diffusion.Schedule.from_config,
    }[reader]
    with pytest.raises(WeightsError) as error:
        parse(config)
    assert message in str(error.value)
