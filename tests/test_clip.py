"""CLIP text and vision towers: parity with transformers on tiny random models saved to disk."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from parity_utils import meta_state_dict, nhwc_to_nchw, perturb_torch_, rel_err
from safetensors.numpy import load_file, save_file

from idfuse_jax import weights
from idfuse_jax.errors import WeightsError
from idfuse_jax.models import clip

F32_BOUND = 1e-4
# bf16 compute (float32 params, norms and softmax) against the float32 reference: measured
# worst cases on these tiny models 9.7e-3 (text) and 7.4e-3 (vision); 3x margin.
BF16_BOUND = 3e-2

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
VOCAB, LENGTH = 64, 16
# The configs real Stable Diffusion pipelines ship (text_encoder/config.json).
SD1_TEXT_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vocab_size": 49408,
}
SD2_TEXT_CONFIG = {
    **SD1_TEXT_CONFIG,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
}


def save(model, folder):
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def run(module, params, x):
    return jax.jit(module.apply)({"params": params}, x)


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """SD1-like (quick_gelu, legacy eos_token_id=2, inside a pipeline folder) and SD2-like (gelu,
    eos_token_id=60, with text_projection) tiny text encoders, saved as transformers does."""
    root = tmp_path_factory.mktemp("text")
    sd1 = transformers.CLIPTextConfig(
        **TINY, vocab_size=VOCAB, max_position_embeddings=LENGTH, hidden_act="quick_gelu",
        eos_token_id=2, bos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    sd2 = transformers.CLIPTextConfig(
        **TINY, vocab_size=VOCAB, max_position_embeddings=LENGTH, hidden_act="gelu",
        eos_token_id=60, bos_token_id=59, pad_token_id=0, projection_dim=24,
    )  # fmt: skip
    torch.manual_seed(0)
    pipe = root / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    models = {
        "sd1": (perturb_torch_(transformers.CLIPTextModel(sd1), 1), pipe, pipe / "text_encoder"),
        "sd2": (
            perturb_torch_(transformers.CLIPTextModelWithProjection(sd2), 2),
            root / "sd2",
            root / "sd2",
        ),
    }
    for model, _, folder in models.values():
        save(model, folder)
    return {k: (model, load_at) for k, (model, load_at, _) in models.items()}


def token_ids(kind: str) -> np.ndarray:
    """Three rows whose pooling position each rule must find (and the other rule would miss)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 59, size=(3, LENGTH))
    if kind == "sd1":  # legacy rule: the largest id marks EOS
        for row, pos in enumerate([5, 15, 9]):
            ids[row, pos] = VOCAB - 1
    else:  # first occurrence of eos_token_id=60; larger ids before it, eos padding after
        ids[:, 1] = 63
        for row, pos in enumerate([4, 15, 9]):
            ids[row, pos:] = 60
    return ids


def reference_text(model, ids):
    """transformers' outputs; a WithProjection model's pooled state comes from its text_model."""
    x = torch.from_numpy(ids)
    with torch.no_grad():
        if isinstance(model, transformers.CLIPTextModelWithProjection):
            return {
                "text_embeds": model(input_ids=x).text_embeds.numpy(),
                **reference_text(model.text_model, ids),
            }
        out = model(input_ids=x)
    return {"last_hidden_state": out.last_hidden_state.numpy(), "pooled": out.pooler_output.numpy()}


@pytest.mark.parametrize(
    "kind,dtype", [("sd1", "float32"), ("sd2", "float32"), ("sd2", "bfloat16")]
)
def test_text_parity(text_models, kind, dtype):
    model, folder = text_models[kind]
    module, params = weights.load_clip_text(folder, dtype=jnp.dtype(dtype))
    assert module.config.hidden_act == ("quick_gelu" if kind == "sd1" else "gelu")
    assert (module.config.projection_dim is None) == (kind == "sd1")
    ids = token_ids(kind)
    ours = run(module, params, jnp.asarray(ids))
    ref = reference_text(model, ids)
    bound = F32_BOUND if dtype == "float32" else BF16_BOUND
    errors = {name: rel_err(getattr(ours, name), value) for name, value in ref.items()}
    print(f"CLIP text {kind} {dtype} rel errors: {errors}")
    assert all(e <= bound for e in errors.values()), errors
    if kind == "sd1":
        assert ours.text_embeds is None


def test_eos_positions_rules():
    ids = jnp.asarray([[0, 5, 9, 7, 9, 1], [0, 9, 3, 7, 7, 7]])
    assert clip.eos_positions(ids, 2).tolist() == [2, 1]  # legacy: argmax of ids, first max
    assert clip.eos_positions(ids, 7).tolist() == [3, 3]  # first occurrence of eos


@pytest.fixture(scope="module")
def vision_folders(tmp_path_factory):
    """The same-shaped vision tower as CLIPVisionModelWithProjection and inside a CLIPModel."""
    root = tmp_path_factory.mktemp("vision")
    vision = dict(**TINY, image_size=16, patch_size=4, hidden_act="quick_gelu")
    torch.manual_seed(0)
    with_proj = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**vision, projection_dim=24)
    )
    full = transformers.CLIPModel(
        transformers.CLIPConfig(
            text_config=dict(**TINY, vocab_size=VOCAB, max_position_embeddings=LENGTH),
            vision_config=vision,
            projection_dim=24,
        )
    )
    return {
        "vision_with_projection": (perturb_torch_(with_proj, 3), save(with_proj, root / "v")),
        "clip_model": (perturb_torch_(full, 4), save(full, root / "full")),
    }


def reference_image_embeds(model, pixels_nhwc):
    x = torch.from_numpy(nhwc_to_nchw(pixels_nhwc))
    with torch.no_grad():
        if isinstance(model, transformers.CLIPModel):
            vision = model.vision_model(pixel_values=x)
            return vision.last_hidden_state.numpy(), model.visual_projection(
                vision.pooler_output
            ).numpy()
        out = model(pixel_values=x)
    return out.last_hidden_state.numpy(), out.image_embeds.numpy()


@pytest.mark.parametrize(
    "kind,dtype",
    [
        ("vision_with_projection", "float32"),
        ("clip_model", "float32"),
        ("vision_with_projection", "bfloat16"),
    ],
)
def test_vision_parity(vision_folders, kind, dtype):
    model, folder = vision_folders[kind]
    module, params = weights.load_clip_vision(folder, dtype=jnp.dtype(dtype))
    assert module.config.projection_dim == 24 and module.config.patch_size == 4
    pixels = np.random.default_rng(1).standard_normal((2, 16, 16, 3)).astype(np.float32)
    ours = run(module, params, jnp.asarray(pixels))
    ref_hidden, ref_embeds = reference_image_embeds(model, pixels)
    errors = {
        "last_hidden_state": rel_err(ours.last_hidden_state, ref_hidden),
        "image_embeds": rel_err(ours.image_embeds, ref_embeds),
    }
    print(f"CLIP vision {kind} {dtype} rel errors: {errors}")
    bound = F32_BOUND if dtype == "float32" else BF16_BOUND
    assert all(e <= bound for e in errors.values()), errors


def test_clip_model_folder_loads_text_side(vision_folders):
    """A full CLIPModel folder gives the text tower with the top-level projection (CLIP-T)."""
    module, params = weights.load_clip_text(vision_folders["clip_model"][1])
    assert module.config.projection_dim == 24
    assert params["text_projection"]["kernel"].shape == (32, 24)
    assert "visual_projection" not in params


@pytest.mark.parametrize(
    "config,model_cls,make_config",
    [
        (SD1_TEXT_CONFIG, transformers.CLIPTextModel, transformers.CLIPTextConfig),
        (SD2_TEXT_CONFIG, transformers.CLIPTextModel, transformers.CLIPTextConfig),
    ],
    ids=["sd1_vit_l14", "sd2_openclip_h14_23_layers"],
)
def test_full_size_text_encoders_map_every_tensor(config, model_cls, make_config):
    """The real SD configs are accepted and every tensor of the full-size model finds its place."""
    ours = clip.CLIPTextConfig.from_transformers(config, with_projection=False)
    module = clip.CLIPTextTransformer(ours, remat=True)
    shapes = weights.abstract_params(module)
    state = meta_state_dict(model_cls, make_config(**config))
    params = weights.convert_state_dict(
        state, shapes, rename=lambda k: k.replace("text_model.", "")
    )
    count = sum(np.prod(p.shape) for p in jax.tree.leaves(params))
    assert count == sum(np.prod(v.shape) for v in state.values())
    assert len(params["encoder"]) == config["num_hidden_layers"]


def test_full_size_clip_vit_h14_vision_maps_every_tensor():
    config = dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
        image_size=224, patch_size=14, hidden_act="gelu", projection_dim=1024,
    )  # fmt: skip
    module = clip.CLIPVisionTransformer(
        clip.CLIPVisionConfig.from_transformers(config, with_projection=True)
    )
    shapes = weights.abstract_params(module)
    state = meta_state_dict(
        transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig(**config)
    )
    params = weights.convert_state_dict(
        state, shapes, rename=lambda k: k.replace("vision_model.", "")
    )
    assert params["embeddings"]["patch_embedding"]["kernel"].shape == (14, 14, 3, 1280)


def test_config_refusals():
    with pytest.raises(weights.WeightsError, match=r"unsupported hidden_act='relu'"):
        clip.CLIPTextConfig.from_transformers({**SD1_TEXT_CONFIG, "hidden_act": "relu"},
                                              with_projection=False)  # fmt: skip
    with pytest.raises(weights.WeightsError, match=r"unsupported attention_dropout=0\.1"):
        clip.CLIPTextConfig.from_transformers({**SD1_TEXT_CONFIG, "attention_dropout": 0.1},
                                              with_projection=False)  # fmt: skip
    with pytest.raises(weights.WeightsError, match=r"unsupported config keys: rope_theta="):
        clip.CLIPTextConfig.from_transformers({**SD1_TEXT_CONFIG, "rope_theta": 1e4},
                                              with_projection=False)  # fmt: skip
    with pytest.raises(weights.WeightsError, match=r"unsupported image_size=\[16, 8\]"):
        clip.CLIPVisionConfig.from_transformers({"image_size": [16, 8]}, with_projection=True)
    with pytest.raises(WeightsError, match="not a multiple of num_attention_heads=5"):
        clip.CLIPTextConfig(hidden_size=32, num_attention_heads=5)


def test_missing_tensor_is_listed(text_models, tmp_path):
    _, folder = text_models["sd2"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    del state["text_model.encoder.layers.1.mlp.fc2.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(weights.WeightsError, match=r"1 missing \[encoder/layers_1/mlp/fc2/bias\]"):
        weights.load_clip_text(tmp_path)


def test_bad_inputs_are_refused(text_models):
    module, params = weights.load_clip_text(text_models["sd2"][1])
    with pytest.raises(WeightsError, match="17 tokens, more than max_position"):
        module.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))
    vision = clip.CLIPVisionTransformer(clip.CLIPVisionConfig(**TINY, image_size=16, patch_size=4))
    with pytest.raises(WeightsError, match=r"NHWC \[batch, 16, 16, 3\], got shape"):
        jax.eval_shape(vision.init, jax.random.key(0), jnp.zeros((1, 3, 16, 16)))


def test_init_params_random_tiny_model():
    module = clip.CLIPTextTransformer(
        clip.CLIPTextConfig(**TINY, vocab_size=VOCAB, max_position_embeddings=LENGTH)
    )
    params = weights.init_params(module, jax.random.key(3))
    out = run(module, params, jnp.asarray(token_ids("sd2")))
    assert out.last_hidden_state.shape == (3, LENGTH, 32) and out.pooled.shape == (3, 32)
    assert np.isfinite(np.asarray(out.last_hidden_state)).all()
    kernel = params["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.dtype == jnp.float32 and float(jnp.std(kernel)) > 0


def test_remat_keeps_names_and_gradients():
    config = clip.CLIPTextConfig(**TINY, vocab_size=VOCAB, max_position_embeddings=LENGTH)
    plain = clip.CLIPTextTransformer(config)
    params = weights.init_params(plain, jax.random.key(4))
    ids = jnp.asarray(token_ids("sd2"))

    def grads(module):
        loss = lambda p: jnp.sum(module.apply({"params": p}, ids).pooled ** 2)
        return jax.jit(jax.grad(loss))(params)

    remat_grads = grads(clip.CLIPTextTransformer(config, remat=True))
    for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(remat_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_preprocess_matches_clip_image_processor(dreambooth_dir):
    """Our numpy/jax preprocessing against transformers' PIL CLIPImageProcessor."""
    from PIL import Image

    path = sorted(p for p in (dreambooth_dir / "dog").iterdir() if p.suffix == ".jpg")[0]
    image = np.asarray(Image.open(path).convert("RGB"))
    image = image[:, : image.shape[1] * 3 // 4]  # not square: exercises the shortest-edge rule
    processor = transformers.CLIPImageProcessorPil()
    ref = processor(images=Image.fromarray(image), return_tensors="np")["pixel_values"][0]
    ours = clip.preprocess_image(image)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
    err = np.abs(ours - ref.transpose(1, 2, 0))
    print(f"CLIP preprocess vs CLIPImageProcessorPil: max {err.max():.4f}, mean {err.mean():.5f}")
    # PIL rounds its resized uint8 image; kernels differ slightly, so a pixel may land one uint8
    # level off: 1 / 255 / std = 0.015 at most.
    assert err.mean() < 0.005 and err.max() < 0.016
    assert clip.shortest_edge_size(480, 640, 224) == (224, 298)
    assert clip.shortest_edge_size(640, 480, 224) == (298, 224)


def test_config_json_of_clip_model_is_read(vision_folders):
    raw = json.loads((vision_folders["clip_model"][1] / "config.json").read_text())
    assert raw["vision_config"]["projection_dim"] == 512  # transformers' default, unused ...
    config = clip.CLIPVisionConfig.from_transformers(raw, with_projection=True)
    assert config.projection_dim == 24  # ... the CLIPModel's top-level projection_dim wins
