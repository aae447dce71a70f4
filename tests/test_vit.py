"""ViT (DINO) features: parity with transformers' ViTModel on tiny random models saved to disk."""

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
from idfuse_jax.models import vit

F32_BOUND = 1e-4
# bf16 compute against the float32 reference: measured worst case 7.9e-3 on this tiny model
# (CLS feature); ~3x margin.
BF16_BOUND = 3e-2
TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    image_size=16, patch_size=4,
)  # fmt: skip
# facebook/dino-vits16's config.json.
DINO_VITS16_CONFIG = {
    "architectures": ["ViTModel"],
    "attention_probs_dropout_prob": 0.0,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "hidden_size": 384,
    "image_size": 224,
    "initializer_range": 0.02,
    "intermediate_size": 1536,
    "layer_norm_eps": 1e-12,
    "model_type": "vit",
    "num_attention_heads": 6,
    "num_channels": 3,
    "num_hidden_layers": 12,
    "patch_size": 16,
    "qkv_bias": True,
    "torch_dtype": "float32",
    "transformers_version": "4.13.0.dev0",
}


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    """A tiny ViTModel with its pooler, perturbed and saved as transformers does."""
    torch.manual_seed(0)
    model = perturb_torch_(transformers.ViTModel(transformers.ViTConfig(**TINY)), 5)
    folder = tmp_path_factory.mktemp("vit")
    model.save_pretrained(str(folder), safe_serialization=True)
    return model, folder


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vit_cls_parity(vit_folder, dtype):
    model, folder = vit_folder
    module, params = weights.load_vit(folder, dtype=jnp.dtype(dtype))
    pixels = np.random.default_rng(2).standard_normal((2, 16, 16, 3)).astype(np.float32)
    ours = jax.jit(module.apply)({"params": params}, jnp.asarray(pixels))
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(nhwc_to_nchw(pixels))).last_hidden_state.numpy()
    errors = {
        "last_hidden_state": rel_err(ours.last_hidden_state, ref),
        "cls": rel_err(ours.cls, ref[:, 0]),
    }
    print(f"ViT {dtype} rel errors: {errors}")
    bound = F32_BOUND if dtype == "float32" else BF16_BOUND
    assert all(e <= bound for e in errors.values()), errors


def test_dino_vits16_config_maps_every_tensor():
    """facebook/dino-vits16's config is accepted and every tensor of the full-size model fits."""
    config = vit.ViTConfig.from_transformers(DINO_VITS16_CONFIG)
    assert (config.hidden_size, config.patch_size, config.num_attention_heads) == (384, 16, 6)
    module = vit.ViTModel(config, remat=True)
    shapes = weights.abstract_params(module)
    state = meta_state_dict(transformers.ViTModel, transformers.ViTConfig(**DINO_VITS16_CONFIG))
    # In memory transformers 5 names differ; checkpoints (and save_pretrained) use the legacy ones.
    legacy = {_legacy_name(k): v for k, v in state.items() if not k.startswith("pooler.")}
    params = weights.convert_state_dict(legacy, shapes)
    assert params["embeddings"]["position_embeddings"].shape == (1, 197, 384)


def _legacy_name(key: str) -> str:
    """transformers 5's ViTModel module names -> the names its checkpoints use on disk."""
    for new, old in (
        ("layers.", "encoder.layer."),
        ("attention.q_proj", "attention.attention.query"),
        ("attention.k_proj", "attention.attention.key"),
        ("attention.v_proj", "attention.attention.value"),
        ("attention.o_proj", "attention.output.dense"),
        ("mlp.fc1", "intermediate.dense"),
        ("mlp.fc2", "output.dense"),
    ):
        key = key.replace(new, old)
    return key


def test_vit_refusals(vit_folder, tmp_path):
    with pytest.raises(weights.WeightsError, match=r"unsupported hidden_dropout_prob=0\.1"):
        vit.ViTConfig.from_transformers({**DINO_VITS16_CONFIG, "hidden_dropout_prob": 0.1})
    with pytest.raises(weights.WeightsError, match=r"unsupported model_type='deit'"):
        vit.ViTConfig.from_transformers({**DINO_VITS16_CONFIG, "model_type": "deit"})
    with pytest.raises(WeightsError, match="image_size=18 is not a multiple of patch"):
        vit.ViTConfig(**{**TINY, "image_size": 18})
    _, folder = vit_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    del state["embeddings.cls_token"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(weights.WeightsError, match=r"1 missing \[embeddings/cls_token\]"):
        weights.load_vit(tmp_path)
    module = vit.ViTModel(vit.ViTConfig(**TINY))
    with pytest.raises(WeightsError, match=r"\[batch, 16, 16, 3\], got shape \(1, 32"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_cls_attention_matches_transformers(vit_folder):
    """DINO's saliency map: the last layer's CLS attention to the patches, mean over heads."""
    _, folder = vit_folder
    reference = transformers.ViTModel.from_pretrained(str(folder), attn_implementation="eager")
    module, params = weights.load_vit(folder)
    pixels = np.random.default_rng(3).standard_normal((2, 16, 16, 3)).astype(np.float32)
    ours = vit.cls_attention(module, params, jnp.asarray(pixels))
    with torch.no_grad():
        out = reference(pixel_values=torch.from_numpy(nhwc_to_nchw(pixels)), output_attentions=True)
    ref = out.attentions[-1][:, :, 0, 1:].mean(dim=1).numpy().reshape(2, 4, 4)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert ours.std() > 1e-3  # not a uniform map: the comparison sees the weights
