"""Every attention implementation against jax.nn.dot_product_attention ("xla"): outputs and
gradients w.r.t. q, k, v, with masks, causal masking, odd lengths, bfloat16 upcast; the names."""

import logging
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_kernel

from idfuse_jax import config_lib
from idfuse_jax.errors import ConfigError
from idfuse_jax.models import attention

B, N, H = 2, 2, 8
TOL = 1e-5


def _inputs(tq: int, tk: int, dtype=jnp.float32, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, tq, N, H))
    k, v = (jax.random.normal(key, (B, tk, N, H)) for key in keys[1:3])
    d_out = jax.random.normal(keys[3], (B, tq, N, H))
    return tuple(x.astype(dtype) for x in (q, k, v)), d_out.astype(dtype)


def _mask(kind: str, tq: int, tk: int, empty_row: bool = True):
    """None, a full [B, 1, Tq, Tk] mask (one row fully masked), or key padding [B, 1, 1, Tk]."""
    if kind == "none":
        return None
    rng = np.random.default_rng(1)
    if kind == "keys":
        return jnp.asarray(
            np.arange(tk)[None, None, None, :] < np.array([tk, tk - 7])[:, None, None, None]
        )
    mask = rng.random((B, 1, tq, tk)) < 0.7
    mask[0, 0, 3] = not empty_row  # a row that attends nowhere: uniform over every key, as in jax
    return jnp.asarray(mask)


def _out_and_grads(implementation, qkv, d_out, mask, causal, upcast=False):
    @jax.jit
    def run(qkv, d_out, mask):
        def f(*qkv):
            return attention.dot_product_attention(
                *qkv, mask=mask, is_causal=causal, upcast=upcast, implementation=implementation
            )

        out, vjp = jax.vjp(f, *qkv)
        return out, vjp(d_out)

    return run(qkv, d_out, mask)


def _assert_close(got, want, tol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol, rtol=tol
        )


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 keys and 32 queries: short sequences span several, with ragged last ones."""
    monkeypatch.setattr(attention, "BLOCK", 16)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 32)


# 77 text tokens (4 full blocks of 16 + 13), cross-attention 45 queries -> 77 keys, 16 (one block).
@pytest.mark.parametrize("implementation", ["blockwise", "auto"])
@pytest.mark.parametrize(
    "tq, tk, mask_kind, causal",
    [
        (77, 77, "none", False),
        (77, 77, "none", True),
        (45, 77, "full", False),
        (77, 77, "keys", True),
        (16, 16, "full", False),
    ],
)
def test_matches_xla(small_blocks, implementation, tq, tk, mask_kind, causal):
    qkv, d_out = _inputs(tq, tk)
    mask = _mask(mask_kind, tq, tk)
    want = _out_and_grads("xla", qkv, d_out, mask, causal)
    got = _out_and_grads(implementation, qkv, d_out, mask, causal)
    _assert_close(got, want, TOL)


def test_default_block_odd_length():
    """The real block sizes at lengths they do not divide (3 key blocks, the last of one key;
    2 query blocks)."""
    qkv, d_out = _inputs(257, 2 * attention.BLOCK + 1)
    _assert_close(
        _out_and_grads("blockwise", qkv, d_out, None, False),
        _out_and_grads("xla", qkv, d_out, None, False),
        TOL,
    )


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_upcast_bfloat16_matches_float32(small_blocks, implementation):
    """upcast: bfloat16 inputs, float32 math; only bfloat16 rounding of inputs and outputs left."""
    qkv, d_out = _inputs(77, 77, jnp.bfloat16)
    reference = _out_and_grads(
        "xla", tuple(x.astype(jnp.float32) for x in qkv), d_out.astype(jnp.float32), None, True
    )
    got = _out_and_grads(implementation, qkv, d_out, None, True, upcast=True)
    assert got[0].dtype == jnp.bfloat16
    _assert_close(got, reference, 2e-2)
    # Both kernels compute in float32 here: they agree to bfloat16 rounding of the same numbers.
    _assert_close(got, _out_and_grads("xla", qkv, d_out, None, True, upcast=True), 1e-2)


def test_unknown_name_is_a_config_error():
    qkv, _ = _inputs(4, 4)
    with pytest.raises(ConfigError, match="'flash2' is not one of"):
        attention.dot_product_attention(*qkv, implementation="flash2")


def test_config_refuses_unknown_attention():
    default = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
    config = config_lib.sibling_module(str(default), "smoke").get_config()
    config.model.attention = "flash"
    with pytest.raises(ConfigError, match=re.escape("config.model.attention='flash' is not one")):
        config_lib.validate(config)


def test_cudnn_on_cpu_falls_back_to_blockwise(monkeypatch, caplog):
    monkeypatch.setattr(attention, "_logged", set())
    qkv, d_out = _inputs(16, 16)
    with caplog.at_level(logging.INFO, logger="absl"):
        got = _out_and_grads("cudnn", qkv, d_out, None, False)
        _out_and_grads("cudnn", qkv, d_out, None, True)  # a second trace logs nothing more
    _assert_close(got, _out_and_grads("blockwise", qkv, d_out, None, False), 0.0)
    messages = [r.getMessage() for r in caplog.records if "cudnn" in r.getMessage()]
    assert messages == ["attention cudnn unavailable, using blockwise: platform is cpu, not gpu"]


def test_auto_on_cpu_is_blockwise_and_logged(monkeypatch, caplog):
    monkeypatch.setattr(attention, "_logged", set())
    qkv, _ = _inputs(4, 4)
    with caplog.at_level(logging.INFO, logger="absl"):
        assert attention.resolve("auto", qkv[0]) == "blockwise"
        attention.resolve("auto", qkv[0])
    assert [r.getMessage() for r in caplog.records] == ["attention auto on cpu: blockwise"]


def _kernel_by_reference(q, k, v, ab=None, segment_ids=None, *, causal, sm_scale, block_sizes):
    """The Pallas TPU kernel's own reference math, with the kernel's demands on block sizes."""
    for t, block in ((k.shape[2], block_sizes.block_k), (q.shape[2], block_sizes.block_q)):
        assert t % block == 0 and block % 128 == 0
    assert ab is None or ab.shape == (*q.shape[:3], k.shape[2])
    assert q.shape[-1] <= 128 or q.shape[-1] % 128 == 0  # the kernel's head-size rule
    return tpu_kernel.mha_reference_no_custom_vjp(
        q, k, v, ab, segment_ids, causal=causal, sm_scale=sm_scale
    )


@pytest.mark.parametrize("mask_kind, causal", [("none", False), ("full", False), ("none", True)])
def test_tpu_flash_wrapper(monkeypatch, mask_kind, causal):
    """tpu_flash's padding, segment ids and bias, with the TPU kernel replaced by its reference."""
    monkeypatch.setattr(tpu_kernel, "flash_attention", _kernel_by_reference)
    tq, tk = (77, 77) if causal else (45, 77)
    qkv, d_out = _inputs(tq, tk)
    # The kernel adds masks as a bias, so a fully masked row's dq is not zero there: no empty rows.
    mask = _mask(mask_kind, tq, tk, empty_row=False)
    want = _out_and_grads("xla", qkv, d_out, mask, causal)
    got = _out_and_grads("tpu_flash", qkv, d_out, mask, causal)
    _assert_close(got, want, TOL)


def test_tpu_flash_pads_head_sizes_the_kernel_refuses(monkeypatch):
    """SD 1.5's head size 160 (above 128, not a multiple of it) goes to the kernel as 256."""
    monkeypatch.setattr(tpu_kernel, "flash_attention", _kernel_by_reference)
    keys = jax.random.split(jax.random.key(3), 4)
    q, k, v, d_out = (jax.random.normal(key, (1, 20, 1, 160)) for key in keys)
    want = _out_and_grads("xla", (q, k, v), d_out, None, False)
    _assert_close(_out_and_grads("tpu_flash", (q, k, v), d_out, None, False), want, TOL)


@pytest.mark.parametrize("implementation", ["tpu_flash", "cudnn"])
def test_fused_kernels_under_a_shard_map_of_the_mesh(monkeypatch, implementation):
    """In a program over 8 devices (subject x data x fsdp = 2 x 2 x 2) a fused kernel runs
    under a shard_map: subjects through the vmap's spmd_axis_name, the batch of 2 over "data",
    the heads over "fsdp" (data x fsdp does not divide the batch). The kernels' references stand
    in for them; the result is the materialised attention's."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from idfuse_jax.models import placement

    monkeypatch.setattr(tpu_kernel, "flash_attention", _kernel_by_reference)
    monkeypatch.setitem(attention._KERNELS, "cudnn", attention._xla)
    monkeypatch.setattr(attention, "_cudnn_refusal", lambda *a: None)
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("subject", "data", "fsdp"))
    shapes = []
    kernel = attention._KERNELS[implementation]
    monkeypatch.setitem(
        attention._KERNELS,
        implementation,
        lambda q, *a, **kw: shapes.append(q.shape) or kernel(q, *a, **kw),
    )
    keys = jax.random.split(jax.random.key(4), 3)
    q, k, v = (jax.random.normal(key, (2, B, 45, N, H)) for key in keys)

    def attend(name):
        f = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation=name)
        return jax.vmap(f, spmd_axis_name="subject")

    split = NamedSharding(mesh, PartitionSpec("subject", "data"))
    run = jax.jit(
        placement.traced_on(attend(implementation), mesh, ("data", "fsdp")),
        in_shardings=(split,) * 3,
    )
    hlo = run.lower(q, k, v).as_text()
    assert "shard_map" in hlo or "manual" in hlo
    assert shapes[-1] == (1, 45, 1, H)  # each device's block: one example, one head
    _assert_close(run(q, k, v), jax.jit(attend("xla"))(q, k, v), TOL)


def test_cudnn_odd_keys_under_the_subject_vmap_trace():
    """Several subject slots per device: the subject vmap over cuDNN with an odd key length
    (CLIP's 77 tokens: padded, with key lengths). jax 0.10's batching rule of the cuDNN call
    reshapes the lengths to the vmapped batch, so unbatched constant lengths failed to trace
    ("cannot reshape array of shape (2,) into shape (8,)"), which broke the DreamBench step of
    every preset whose UNet attends to the 77 text tokens. Tracing needs no GPU."""
    q = jax.ShapeDtypeStruct((4, 2, 64, 2, 8), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((4, 2, 77, 2, 8), jnp.bfloat16)
    attend = lambda q, k, v: attention._cudnn(q, k, v, None, False)
    loss = lambda q, k, v: (attend(q, k, v) * q).astype(jnp.float32).sum()
    assert jax.eval_shape(jax.vmap(attend), q, k, k).shape == q.shape
    assert jax.eval_shape(jax.vmap(jax.grad(loss)), q, k, k).shape == q.shape


def _small_models(implementation: str):
    """One small instance of every model with attention, all asking for `implementation`."""
    from idfuse_jax.models import clip, unet, vae, vit

    kw = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    unet_config = unet.UNetConfig(
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=8,
        norm_num_groups=4,
    )
    return [
        unet.UNet2DConditionModel(unet_config, attention=implementation),
        vae.AutoencoderKL(
            vae.VAEConfig(block_out_channels=(8,), norm_num_groups=4), attention=implementation
        ),
        clip.CLIPTextTransformer(
            clip.CLIPTextConfig(hidden_size=8, vocab_size=10, max_position_embeddings=5, **kw),
            attention=implementation,
        ),
        clip.CLIPVisionTransformer(
            clip.CLIPVisionConfig(hidden_size=8, image_size=8, patch_size=4, **kw),
            attention=implementation,
        ),
        vit.ViTModel(
            vit.ViTConfig(hidden_size=8, image_size=8, patch_size=4, **kw), attention=implementation
        ),
    ]


def test_every_model_passes_its_attention_down(monkeypatch):
    """Each model's `attention` field reaches every attention call inside it (traced, not run)."""
    asked: list[list[str]] = []
    resolve = attention.resolve
    monkeypatch.setattr(
        attention, "resolve", lambda name, *a: asked[-1].append(name) or resolve(name, *a)
    )
    for model in _small_models("xla"):
        asked.append([])
        jax.eval_shape(lambda key, m=model: m.init(key, *m.example_inputs()), jax.random.key(0))
        assert asked[-1] and set(asked[-1]) == {"xla"}, (type(model).__name__, asked[-1])
