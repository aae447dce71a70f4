"""AutoencoderKL: parity with diffusers' PyTorch model (latent moments, decoded image), config
validation, and loading of legacy attention names."""

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
from diffusers import AutoencoderKL as TorchVAE
from parity_utils import nchw_to_nhwc, nhwc_to_nchw, rel_err
from safetensors.numpy import save_file

from idfuse_jax import weights
from idfuse_jax.errors import WeightsError
from idfuse_jax.models import vae as vae_lib

F32_BOUND = 1e-4
# bfloat16 compute (float32 params) against the float32 reference: measured 0.9e-2 (mean),
# 1.2e-2 (logvar), 1.6e-2 (decoded image); a wrong mapping or missing op is an O(1) error.
BF16_BOUND = 3e-2

CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)
BATCH, SIZE = 2, 16
# A large bias on the first log-variance channel pushes it past the clamp at 20.
CLAMPED_CHANNEL = CONFIG["latent_channels"]


@dataclasses.dataclass
class Case:
    folder: pathlib.Path
    image: np.ndarray  # NHWC, [-1, 1]
    latent: np.ndarray  # NHWC
    mean: np.ndarray
    logvar: np.ndarray
    decoded: np.ndarray


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    torch.manual_seed(0)
    model = TorchVAE(**CONFIG).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # no parameter keeps its zero/one/identity init
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.quant_conv.bias[CLAMPED_CHANNEL] += 100.0
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(2)
    image = rng.uniform(-1, 1, (BATCH, SIZE, SIZE, 3)).astype(np.float32)
    latent = rng.standard_normal((BATCH, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(nhwc_to_nchw(image))).latent_dist
        decoded = model.decode(torch.from_numpy(nhwc_to_nchw(latent))).sample
    mean, logvar, decoded = (nchw_to_nhwc(t.numpy()) for t in (dist.mean, dist.logvar, decoded))
    assert np.all(logvar[..., 0] == 20.0)  # the clamp is exercised
    return Case(folder, image, latent, mean, logvar, decoded)


def _encode_decode(model: vae_lib.AutoencoderKL, params: Any, case: Case) -> tuple[np.ndarray, ...]:
    variables = {"params": params}
    mean, logvar = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(variables, case.image)
    decoded = jax.jit(lambda v, z: model.apply(v, z, method="decode"))(variables, case.latent)
    return tuple(np.asarray(a.astype(jnp.float32)) for a in (mean, logvar, decoded))


@pytest.mark.parametrize("dtype,bound", [(jnp.float32, F32_BOUND), (jnp.bfloat16, BF16_BOUND)])
def test_vae_matches_diffusers(case, dtype, bound):
    model, params = weights.load_vae(case.folder, dtype=dtype)
    mean, logvar, decoded = _encode_decode(model, params, case)
    errors = {
        "mean": rel_err(mean, case.mean),
        # The clamped channel would dominate the scale; compare the others on their own.
        "logvar": rel_err(logvar[..., 1:], case.logvar[..., 1:]),
        "decoded": rel_err(decoded, case.decoded),
    }
    print(
        f"\nVAE parity {jnp.dtype(dtype).name}: "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
    )
    np.testing.assert_array_equal(logvar[..., 0], 20.0)
    assert max(errors.values()) <= bound, errors


def test_legacy_attention_names_load(case, tmp_path):
    state = weights.read_safetensors(case.folder, weights.DIFFUSERS_WEIGHTS)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in state.items():
        for new, old in legacy.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[key] = np.ascontiguousarray(value)
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in renamed
    save_file(renamed, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((case.folder / "config.json").read_text())
    _, expected = weights.load_vae(case.folder)
    _, params = weights.load_vae(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_pipeline_folder(case, tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "vae").symlink_to(case.folder)
    model, params = weights.load_vae(tmp_path)
    assert model.config.block_out_channels == (8, 16)
    assert params["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"].shape == (16, 16)


def _config(case: Case, **overrides: Any) -> dict[str, Any]:
    return {**json.loads((case.folder / "config.json").read_text()), **overrides}


def test_latent_scaling(case):
    cfg = vae_lib.VAEConfig.from_diffusers(_config(case, scaling_factor=0.5, shift_factor=0.25))
    z = jnp.array([1.25, -0.75])
    np.testing.assert_allclose(cfg.to_latents(z), [0.5, -0.5])
    np.testing.assert_allclose(cfg.from_latents(cfg.to_latents(z)), z)
    default = vae_lib.VAEConfig.from_diffusers(_config(case))
    assert default.scaling_factor == 0.18215 and default.shift_factor is None


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"latents_mean": [0.0] * 4}, r"unsupported latents_mean=\[0.0, 0.0, 0.0, 0.0\]"),
        ({"act_fn": "gelu"}, "unsupported act_fn='gelu'"),
        (
            {"down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]},
            "unsupported down_block_types=.*AttnDownEncoderBlock2D",
        ),
        ({"norm_num_groups": 3}, "block width 8 is not divisible by norm_num_groups=3"),
        ({"use_tiling": True}, r"unsupported config keys: use_tiling=True"),
    ],
)
def test_bad_configs_name_the_culprit(case, overrides, message):
    with pytest.raises(WeightsError, match=message):
        vae_lib.VAEConfig.from_diffusers(_config(case, **overrides))


def test_init_params_matches_loaded_structure(case):
    model, params = weights.load_vae(case.folder)
    fresh = weights.init_params(model, jax.random.key(0))
    assert jax.tree.map(lambda x: x.shape, fresh) == jax.tree.map(lambda x: x.shape, params)


def test_bad_inputs_are_refused(case):
    model, params = weights.load_vae(case.folder)
    with pytest.raises(ValueError, match=r"image of shape \(1, 16, 16, 4\)"):
        jax.eval_shape(
            lambda x: model.apply({"params": params}, x, method="encode"), np.zeros((1, 16, 16, 4))
        )
    with pytest.raises(ValueError, match=r"latent of shape \(1, 8, 8, 3\)"):
        jax.eval_shape(
            lambda z: model.apply({"params": params}, z, method="decode"), np.zeros((1, 8, 8, 3))
        )
