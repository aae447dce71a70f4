"""ViT (transformers' ViTModel) as a Flax module, for DINO ViT-S/16 features in evaluation.

Parameter names mirror the state dict that ViTModel checkpoints hold on disk (and that
transformers' save_pretrained still writes), e.g.

  encoder.layer.0.attention.attention.query.weight
    -> encoder/layer_0/attention/attention/query/kernel

The DINO feature is the CLS token of the final layer norm's output, last_hidden_state[:, 0]
(`ViTOutput.cls`). The pooler (dense + tanh on the CLS token) is not part of the module: DINO
metrics do not use it, and the loader drops its tensors. Parameters are float32, `dtype` is the
compute dtype; layer norms and the attention softmax run in float32. Not implemented:
`interpolate_pos_encoding` (inputs must be image_size square), masked-image tokens, dropout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from idfuse_jax.models.attention import dot_product_attention, merge_heads, split_heads
from idfuse_jax.models.backward import remat_call
from idfuse_jax.models.blocks import dense
from idfuse_jax.models.clip import (
    ACTIVATIONS,
    WeightsError,
    check_image_input,
    check_transformers_config,
    config_from_dict,
    float32_layer_norm,
    patchify,
    square_size,
    validate_widths,
)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """transformers' ViTConfig, the fields that shape the computation (defaults: ViT-B/16)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        validate_widths(self)
        if self.image_size % self.patch_size:
            raise WeightsError(
                f"ViTConfig: image_size={self.image_size} is not a multiple of "
                f"patch_size={self.patch_size}"
            )

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any], *, where: str = "vit") -> ViTConfig:
        """From a ViTModel config.json; pooler and masked-image-modelling keys are inert here."""
        implemented = {f.name for f in dataclasses.fields(cls)}
        check_transformers_config(
            config,
            implemented,
            where=where,
            extra_inert={"encoder_stride", "pooler_output_size", "pooler_act"},
            model_types=["vit", None],
        )
        values = dict(config)
        for key in ("image_size", "patch_size"):
            if key in config:
                values[key] = square_size(config, key, where=where)
        if not isinstance(values.get("qkv_bias", True), bool):
            raise WeightsError(f"{where}: unsupported qkv_bias={values['qkv_bias']!r}")
        return config_from_dict(cls, values, where)


class _DenseBlock(nn.Module):
    """A module holding one Dense named `dense` (transformers' ViTIntermediate / ViTOutput)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(self.features, name="dense", dtype=self.dtype)(x)


class ViTSelfAttention(nn.Module):
    """query / key / value projections and the attention core (no output projection)."""

    config: ViTConfig
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        q, k, v = (
            split_heads(
                dense(c.hidden_size, name=name, dtype=self.dtype, use_bias=c.qkv_bias)(x),
                c.num_attention_heads,
            )
            for name in ("query", "key", "value")
        )
        if self.is_mutable_collection("intermediates"):  # asked for by `cls_attention`
            self.sow("intermediates", "cls_attention", _cls_attention_row(q, k))
        return merge_heads(dot_product_attention(q, k, v, implementation=self.attention))


def _cls_attention_row(q: jax.Array, k: jax.Array) -> jax.Array:
    """softmax(q_cls k^T / sqrt(d)) averaged over heads, float32: [B, 1 + patches]."""
    q, k = q[:, 0].astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bnh,btnh->bnt", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)


class ViTAttention(nn.Module):
    config: ViTConfig
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ViTSelfAttention(self.config, self.dtype, self.attention, name="attention")(x)
        return _DenseBlock(self.config.hidden_size, self.dtype, name="output")(x)


class ViTLayer(nn.Module):
    """Pre-LN block: x + attention(layernorm_before(x)), then x + mlp(layernorm_after(x))."""

    config: ViTConfig
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = float32_layer_norm(x, c.layer_norm_eps, "layernorm_before", self.dtype)
        x = x + ViTAttention(c, self.dtype, self.attention, name="attention")(h)
        h = float32_layer_norm(x, c.layer_norm_eps, "layernorm_after", self.dtype)
        h = _DenseBlock(c.intermediate_size, self.dtype, name="intermediate")(h)
        return x + _DenseBlock(c.hidden_size, self.dtype, name="output")(
            ACTIVATIONS[c.hidden_act](h)
        )


class ViTEncoder(nn.Module):
    """`num_hidden_layers` ViTLayers named layer_0, layer_1, ...; remat recomputes activations."""

    config: ViTConfig
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"  # models.attention.IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            layer = ViTLayer(self.config, self.dtype, self.attention, name=f"layer_{i}")
            x = remat_call(layer, x) if self.remat else layer(x)
        return x


class ViTEmbeddings(nn.Module):
    """CLS token + patch embeddings (conv with bias) + position embeddings, raw parameters."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        d = c.hidden_size
        num_positions = (c.image_size // c.patch_size) ** 2 + 1
        init = nn.initializers.normal(0.02)
        cls = self.param("cls_token", init, (1, 1, d))
        positions = self.param("position_embeddings", init, (1, num_positions, d))
        patch_embeddings = _PatchEmbeddings(c, self.dtype, name="patch_embeddings")
        patches = patch_embeddings(pixels.astype(self.dtype))
        cls = jnp.broadcast_to(cls.astype(self.dtype), (patches.shape[0], 1, d))
        return jnp.concatenate([cls, patches], axis=1) + positions.astype(self.dtype)


class _PatchEmbeddings(nn.Module):
    """transformers' ViTPatchEmbeddings: one strided conv named `projection`."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        p = self.config.patch_size
        conv = nn.Conv(
            self.config.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="projection",
        )
        return patchify(pixels, conv)


@flax.struct.dataclass
class ViTOutput:
    last_hidden_state: jax.Array  # [B, 1 + patches, D], after the final layernorm
    cls: jax.Array  # [B, D], last_hidden_state[:, 0]: the DINO feature


class ViTModel(nn.Module):
    """transformers' ViTModel without its pooler.

    Call with normalised NHWC pixels [B, image_size, image_size, C]; returns ViTOutput.
    """

    config: ViTConfig
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"  # models.attention.IMPLEMENTATIONS

    def example_inputs(self) -> tuple[jax.Array]:
        """A dummy input of the right shape and dtype, for init / eval_shape."""
        c = self.config
        return (jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32),)

    @nn.compact
    def __call__(self, pixels: jax.Array) -> ViTOutput:
        c = self.config
        check_image_input(pixels, c.image_size, c.num_channels)
        x = ViTEmbeddings(c, self.dtype, name="embeddings")(pixels)
        x = ViTEncoder(c, self.dtype, self.remat, self.attention, name="encoder")(x)
        x = float32_layer_norm(x, c.layer_norm_eps, "layernorm", self.dtype)
        return ViTOutput(last_hidden_state=x, cls=x[:, 0])


def cls_attention(module: ViTModel, params: Mapping[str, Any], pixels: jax.Array) -> jax.Array:
    """The last layer's attention from the CLS token to each patch, averaged over heads:
    [B, grid, grid] (DINO's saliency map; the CLS token's attention to itself is left out).

    Equals transformers' `ViTModel(..., output_attentions=True).attentions[-1][:, :, 0, 1:]`
    averaged over heads. The rows come from `ViTSelfAttention`, which records them only when
    the `intermediates` collection is mutable, so plain calls pay nothing.
    """
    _, state = module.apply({"params": params}, pixels, mutable=["intermediates"])
    last = state["intermediates"]["encoder"][f"layer_{module.config.num_hidden_layers - 1}"]
    (row,) = last["attention"]["attention"]["cls_attention"]
    grid = module.config.image_size // module.config.patch_size
    return row[:, 1:].reshape(-1, grid, grid)
