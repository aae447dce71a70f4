"""UNet2DConditionModel: parity with diffusers' PyTorch model, config validation, loading errors.

Tiny random diffusers models are saved with save_pretrained (safetensors) and loaded through
`weights.load_unet`, the real code path. Every parameter is perturbed so that zero or identity
initialisations cannot hide a wrong mapping.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from parity_utils import nchw_to_nhwc, nhwc_to_nchw, rel_err
from safetensors.numpy import save_file

from idfuse_jax import weights
from idfuse_jax.errors import WeightsError
from idfuse_jax.models import unet as unet_lib

F32_BOUND = 1e-4
# bfloat16 compute (float32 params) against the float32 reference: bf16 keeps 8 mantissa bits
# (~4e-3 relative per rounding); over four random models per config we measured 1.4e-2 to 2.0e-2
# (sd1 and sd2), so 4e-2 leaves margin while a wrong mapping or missing op (O(1)) still fails.
BF16_BOUND = 4e-2

_SD1 = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=2,
    cross_attention_dim=24,
    norm_num_groups=8,
)
CONFIGS: dict[str, dict[str, Any]] = {
    # SD 1.x: 1x1-conv projections, one head count for every block.
    "sd1": _SD1,
    # SD 2.x: Dense projections, per-block head counts, upcast attention.
    "sd2": {
        **_SD1,
        "use_linear_projection": True,
        "attention_head_dim": (2, 4, 4),
        "upcast_attention": True,
    },
    # Inpainting input; also exercises odd latent sizes (6 -> 3 -> 2 -> 3 -> 6), the other
    # timestep-embedding layout and the asymmetric-padding downsampler.
    "inpaint": {
        **_SD1,
        "in_channels": 9,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "downsample_padding": 0,
    },
}
SIZES = {"sd1": 8, "sd2": 8, "inpaint": 6}
TIMESTEPS = {  # ints for SD1, floats for SD2, a scalar for inpainting
    "sd1": np.array([3, 981], np.int32),
    "sd2": np.array([10.5, 500.25], np.float32),
    "inpaint": np.array(417, np.int32),
}
BATCH, TOKENS = 2, 5


def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Add noise to every parameter (norm scales too), in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@dataclasses.dataclass
class Case:
    folder: pathlib.Path
    sample: np.ndarray  # NHWC
    timesteps: np.ndarray
    context: np.ndarray
    reference: np.ndarray  # NHWC


def _make_case(root: pathlib.Path, name: str) -> Case:
    torch.manual_seed(0)
    model = TorchUNet(**CONFIGS[name]).eval()
    perturb_(model, seed=1)
    folder = root / name
    model.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(2)
    cfg, size = CONFIGS[name], SIZES[name]
    sample = rng.standard_normal((BATCH, size, size, cfg["in_channels"])).astype(np.float32)
    context = rng.standard_normal((BATCH, TOKENS, cfg["cross_attention_dim"])).astype(np.float32)
    t = TIMESTEPS[name]
    with torch.no_grad():
        ref = model(
            torch.from_numpy(nhwc_to_nchw(sample)), torch.from_numpy(t), torch.from_numpy(context)
        ).sample
    return Case(folder, sample, t, context, nchw_to_nhwc(ref.numpy()))


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("unets")
    return {name: _make_case(root, name) for name in CONFIGS}


def _run(model: unet_lib.UNet2DConditionModel, params: Any, case: Case) -> np.ndarray:
    out = jax.jit(model.apply)({"params": params}, case.sample, case.timesteps, case.context)
    return np.asarray(out.astype(jnp.float32))


@pytest.mark.parametrize(
    "name,dtype,bound",
    [
        ("sd1", jnp.float32, F32_BOUND),
        ("sd1", jnp.bfloat16, BF16_BOUND),
        ("sd2", jnp.float32, F32_BOUND),
        ("sd2", jnp.bfloat16, BF16_BOUND),
        ("inpaint", jnp.float32, F32_BOUND),
    ],
)
def test_unet_matches_diffusers(cases, name, dtype, bound):
    case = cases[name]
    model, params = weights.load_unet(case.folder, dtype=dtype)
    out = _run(model, params, case)
    assert out.shape == case.reference.shape
    err = rel_err(out, case.reference)
    print(f"\nUNet parity {name} {jnp.dtype(dtype).name}: rel err {err:.2e} (bound {bound:.0e})")
    assert err <= bound


def test_remat_gives_the_same_output_and_gradients(cases):
    case = cases["sd1"]
    plain, params = weights.load_unet(case.folder)
    remat, remat_params = weights.load_unet(case.folder, remat=True)
    assert jax.tree.structure(params) == jax.tree.structure(remat_params)
    np.testing.assert_allclose(
        _run(remat, params, case), _run(plain, params, case), rtol=1e-6, atol=1e-6
    )

    def grads(model: unet_lib.UNet2DConditionModel) -> list[np.ndarray]:
        def loss(params, sample, context):
            out = model.apply({"params": params}, sample, case.timesteps, context)
            return jnp.mean(out**2)

        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, case.sample, case.context)
        return [np.asarray(x) for x in jax.tree.leaves(g)]

    for got, want in zip(grads(remat), grads(plain), strict=True):
        assert rel_err(got, want) <= 1e-5


def test_pipeline_folder_and_config(cases, tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").symlink_to(cases["sd2"].folder)
    model, params = weights.load_unet(tmp_path)
    cfg = model.config
    assert cfg.heads == (2, 4, 4) and cfg.use_linear_projection and cfg.upcast_attention
    # SD2's Dense projections vs SD1's 1x1 convs; LoRA finds the attention layers by these names.
    attn = params["down_blocks_0"]["attentions_0"]
    assert attn["proj_in"]["kernel"].shape == (16, 16)
    block = attn["transformer_blocks_0"]
    assert set(block["attn2"]) == {"to_q", "to_k", "to_v", "to_out_0"}
    assert block["attn2"]["to_k"]["kernel"].shape == (24, 16)
    assert set(block["ff"]) == {"net_0", "net_2"}


def test_init_params_matches_loaded_structure(cases):
    model, params = weights.load_unet(cases["sd1"].folder)
    fresh = weights.init_params(model, jax.random.key(0))
    shapes = jax.tree.map(lambda x: x.shape, fresh)
    assert shapes == jax.tree.map(lambda x: x.shape, params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(fresh))


def _diffusers_config(name: str, **overrides: Any) -> dict[str, Any]:
    return {**json.loads((pathlib.Path(name) / "config.json").read_text()), **overrides}


@pytest.mark.parametrize(
    "key,value",
    [
        ("class_embed_type", "timestep"),
        ("attention_type", "gated"),
        ("addition_embed_type", "text_time"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("num_attention_heads", 8),
        ("dropout", 0.1),
        ("time_cond_proj_dim", 256),
    ],
)
def test_unsupported_config_values_are_refused(cases, key, value):
    config = _diffusers_config(cases["sd1"].folder, **{key: value})
    with pytest.raises(WeightsError, match=f"unsupported {key}={value!r}"):
        unet_lib.UNetConfig.from_diffusers(config)


def test_saved_config_is_accepted_in_full(cases):
    # save_pretrained writes every key with its default: all must be understood.
    config = _diffusers_config(cases["sd1"].folder)
    assert len(config) > 40
    assert unet_lib.UNetConfig.from_diffusers(config).cross_attention_dim == 24


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"some_new_option": 1}, r"unsupported config keys: some_new_option=1"),
        ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 3}, "unsupported down_block_types"),
        ({"attention_head_dim": [2, 4]}, "attention_head_dim=.* must be an int or 3 ints"),
        ({"attention_head_dim": 3}, "not divisible by its 3 attention heads"),
        ({"cross_attention_dim": [24, 24, 24]}, "cross_attention_dim=.* must be one int"),
    ],
)
def test_bad_configs_name_the_culprit(cases, overrides, message):
    with pytest.raises(WeightsError, match=message):
        unet_lib.UNetConfig.from_diffusers(_diffusers_config(cases["sd1"].folder, **overrides))


def test_missing_tensor_is_listed(cases, tmp_path):
    src = cases["sd1"].folder
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    state = weights.read_safetensors(src, weights.DIFFUSERS_WEIGHTS)
    del state["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    save_file(
        {k: np.ascontiguousarray(v) for k, v in state.items()}, tmp_path / weights.DIFFUSERS_WEIGHTS
    )
    with pytest.raises(
        WeightsError, match=r"1 missing .*mid_block/attentions_0/.*attn2/to_k/kernel"
    ):
        weights.load_unet(tmp_path)


def test_pickle_only_folder_says_how_to_convert(tmp_path):
    torch.manual_seed(0)
    TorchUNet(**CONFIGS["sd1"]).save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(WeightsError, match=r"only PyTorch pickle weights .*save_pretrained"):
        weights.load_unet(tmp_path)


def test_bad_inputs_are_refused(cases):
    model, params = weights.load_unet(cases["sd1"].folder)
    good = (np.zeros((2, 8, 8, 4)), np.zeros((2,)), np.zeros((2, 5, 24)))
    for i, bad, message in [
        (0, np.zeros((2, 8, 8, 3)), r"sample of shape \(2, 8, 8, 3\)"),
        (1, np.zeros((3,)), r"timesteps of shape \(3,\) do not match batch 2"),
        (2, np.zeros((2, 5, 7)), r"encoder_hidden_states of shape \(2, 5, 7\)"),
    ]:
        args = list(good)
        args[i] = bad
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(model.apply, {"params": params}, *args)
