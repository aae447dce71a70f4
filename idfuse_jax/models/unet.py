"""Stable Diffusion's UNet2DConditionModel (SD 1.x and 2.x configurations) in Flax, NHWC.

Matches diffusers' PyTorch UNet2DConditionModel for the configurations Stable Diffusion 1.x/2.x
(and their inpainting variants) use. `UNetConfig.from_diffusers` reads diffusers' config.json
and refuses every key whose value would ask for something not implemented here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from idfuse_jax.errors import WeightsError
from idfuse_jax.formats import check_config_keys, require_value
from idfuse_jax.models.backward import remat_call
from idfuse_jax.models.blocks import (
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    conv,
    timestep_embedding,
)

Dtype = Any
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# Keys of diffusers' config that select features we do not implement: each is accepted only at
# the value that turns the feature off (save_pretrained writes all of them, with defaults).
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu", "swish"),
    "dropout": (0.0,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "addition_embed_type_num_heads": (64,),
    "num_class_embeds": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    # diffusers passes this only to block types we do not support.
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}


def _per_block(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    """An int broadcast to every block, or a per-block sequence of the right length."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n or not all(isinstance(v, int) for v in value):
        raise ValueError(f"UNetConfig: {name}={value!r} must be an int or {n} ints (one a block)")
    return value


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """UNet hyper-parameters, with diffusers' names and defaults.

    `attention_head_dim` keeps diffusers' quirk: for these models it is the number of attention
    heads per block (the head width is the block's channels divided by it).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    layers_per_block: int | tuple[int, ...] = 2
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    cross_attention_dim: int = 1280
    use_linear_projection: bool = False
    upcast_attention: bool = False
    only_cross_attention: bool | tuple[bool, ...] = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    center_input_sample: bool = False
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    sample_size: int | tuple[int, int] | None = None  # latent size the model was trained at

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # JSON gives lists; the config must stay hashable
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("UNetConfig: block_out_channels is empty")
        for name, types, allowed in (
            ("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
            ("up_block_types", self.up_block_types, UP_BLOCK_TYPES),
        ):
            if len(types) != n:
                raise ValueError(
                    f"UNetConfig: {name} has {len(types)} entries, block_out_channels {n}"
                )
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"UNetConfig: unsupported {name} {bad} (supported: {allowed})")
        only_cross = self.only_cross_attention
        if any(only_cross) if isinstance(only_cross, tuple) else only_cross:
            raise ValueError("UNetConfig: only_cross_attention=True is not supported")
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError(
                f"UNetConfig: cross_attention_dim={self.cross_attention_dim!r} must be one int"
            )
        if not isinstance(self.norm_num_groups, int):
            raise ValueError(f"UNetConfig: norm_num_groups={self.norm_num_groups!r} must be an int")
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            _per_block(getattr(self, name), n, name)
        for channels, heads in zip(self.block_out_channels, self.heads):
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"UNetConfig: block width {channels} is not divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )
            if channels % heads:
                raise ValueError(
                    f"UNetConfig: block width {channels} is not divisible by its {heads} "
                    "attention heads (attention_head_dim)"
                )
        for name in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, name) % 2 != 1:
                raise ValueError(f"UNetConfig: {name}={getattr(self, name)} must be odd")
        if self.downsample_padding not in (0, 1):
            raise ValueError(
                f"UNetConfig: downsample_padding={self.downsample_padding} must be 0 or 1"
            )

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def layers(self) -> tuple[int, ...]:
        """Resnets per down block."""
        return _per_block(self.layers_per_block, self.num_blocks, "layers_per_block")

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        return _per_block(
            self.transformer_layers_per_block, self.num_blocks, "transformer_layers_per_block"
        )

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per block (diffusers' `attention_head_dim`)."""
        return _per_block(self.attention_head_dim, self.num_blocks, "attention_head_dim")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], *, where: str = "unet") -> UNetConfig:
        """Build from diffusers' config.json contents, refusing what we do not implement."""
        fields = {f.name for f in dataclasses.fields(cls)}
        check_config_keys(config, fields | set(_OFF_VALUES), where=where)
        for key, allowed in _OFF_VALUES.items():
            require_value(config, key, allowed, where=where, default=allowed[0])
        try:
            return cls(**{k: v for k, v in config.items() if k in fields})
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{where}: {e}") from None


def _run(module: nn.Module, remat: bool, *args: jax.Array) -> jax.Array:
    """`module(*args)`, rematerialised in the backward pass when `remat`."""
    return remat_call(module, *args) if remat else module(*args)


def _attention(cfg: UNetConfig, block: int, name: str, dtype: Dtype, attention: str) -> nn.Module:
    """The Transformer2DModel of down block `block` (or the up/mid block at its resolution)."""
    channels, heads = cfg.block_out_channels[block], cfg.heads[block]
    return Transformer2DModel(
        heads=heads,
        head_dim=channels // heads,
        num_layers=cfg.transformer_layers[block],
        num_groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention,
        dtype=dtype,
        attention=attention,
        name=name,
    )


def _resnet(
    cfg: UNetConfig, block: int, name: str, dtype: Dtype, output_scale: float = 1.0
) -> nn.Module:
    return ResnetBlock2D(
        out_channels=cfg.block_out_channels[block],
        num_groups=cfg.norm_num_groups,
        eps=cfg.norm_eps,
        output_scale_factor=output_scale,
        dtype=dtype,
        name=name,
    )


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D / DownBlock2D number `index`; returns (output, skip activations)."""

    config: UNetConfig
    index: int
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        cfg, i = self.config, self.index
        channels = cfg.block_out_channels[i]
        cross = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
        skips = []
        for j in range(cfg.layers[i]):
            x = _run(_resnet(cfg, i, f"resnets_{j}", self.dtype), self.remat, x, temb)
            if cross:
                attention = _attention(cfg, i, f"attentions_{j}", self.dtype, self.attention)
                x = _run(attention, self.remat, x, context)
            skips.append(x)
        if i < cfg.num_blocks - 1:
            x = Downsample2D(channels, cfg.downsample_padding, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) pairs."""

    config: UNetConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        cfg = self.config
        last = cfg.num_blocks - 1

        def resnet(j: int, h: jax.Array) -> jax.Array:
            block = _resnet(cfg, last, f"resnets_{j}", self.dtype, cfg.mid_block_scale_factor)
            return _run(block, self.remat, h, temb)

        x = resnet(0, x)
        attention = _attention(cfg, last, "attentions_0", self.dtype, self.attention)
        return resnet(1, _run(attention, self.remat, x, context))


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D / UpBlock2D number `index` (counting from the bottom)."""

    config: UNetConfig
    index: int
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        skips: Sequence[jax.Array],
        temb: jax.Array,
        context: jax.Array,
        upsample_size: tuple[int, int] | None,
    ) -> jax.Array:
        cfg, i = self.config, self.index
        rev = cfg.num_blocks - 1 - i  # the matching down block
        cross = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
        skips = list(skips)
        for j in range(cfg.layers[rev] + 1):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = _run(_resnet(cfg, rev, f"resnets_{j}", self.dtype), self.remat, x, temb)
            if cross:
                attention = _attention(cfg, rev, f"attentions_{j}", self.dtype, self.attention)
                x = _run(attention, self.remat, x, context)
        if upsample_size is not None:
            x = Upsample2D(cfg.block_out_channels[rev], self.dtype, name="upsamplers_0")(
                x, upsample_size
            )
        return x


class UNet2DConditionModel(nn.Module):
    """Noise prediction eps(sample, t, text): [B,H,W,C_in], [B] or scalar, [B,T,D] -> [B,H,W,C_out].

    Attributes:
      config: the architecture.
      dtype: compute dtype (parameters stay float32); the output comes back in it.
      remat: rematerialise resnet and transformer blocks in the backward pass (saves memory).
      attention: the attention implementation (`models.attention.IMPLEMENTATIONS`).
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"

    def example_inputs(self) -> tuple[jax.Array, ...]:
        """Small dummy inputs for init / eval_shape (parameters do not depend on their size)."""
        cfg = self.config
        side = 2 ** (cfg.num_blocks - 1)
        return (
            jnp.zeros((1, side, side, cfg.in_channels), jnp.float32),
            jnp.zeros((1,), jnp.float32),
            jnp.zeros((1, 1, cfg.cross_attention_dim), jnp.float32),
        )

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float | int,
        encoder_hidden_states: jax.Array,
    ) -> jax.Array:
        cfg = self.config
        _check_inputs(cfg, sample, encoder_hidden_states)
        batch = sample.shape[0]
        t = jnp.asarray(timesteps)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (batch,))
        if t.shape != (batch,):
            raise ValueError(f"UNet: timesteps of shape {t.shape} do not match batch {batch}")
        context = encoder_hidden_states.astype(self.dtype)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        base = cfg.block_out_channels[0]
        t_emb = timestep_embedding(
            t, base, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        ).astype(self.dtype)
        temb = TimestepEmbedding(4 * base, self.dtype, name="time_embedding")(t_emb)

        x = conv(base, cfg.conv_in_kernel, name="conv_in", dtype=self.dtype)(sample)
        skips: list[jax.Array] = [x]
        for i in range(cfg.num_blocks):
            x, res = DownBlock(
                cfg, i, self.dtype, self.remat, self.attention, name=f"down_blocks_{i}"
            )(x, temb, context)
            skips.extend(res)
        x = MidBlock(cfg, self.dtype, self.remat, self.attention, name="mid_block")(
            x, temb, context
        )
        for i in range(cfg.num_blocks):
            n = cfg.layers[cfg.num_blocks - 1 - i] + 1
            res, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size: x2 normally, and right for odd sizes too.
            size = tuple(skips[-1].shape[1:3]) if i < cfg.num_blocks - 1 else None
            x = UpBlock(cfg, i, self.dtype, self.remat, self.attention, name=f"up_blocks_{i}")(
                x, res, temb, context, size
            )
        x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, name="conv_norm_out")(x)
        return conv(cfg.out_channels, cfg.conv_out_kernel, name="conv_out", dtype=self.dtype)(
            nn.silu(x)
        )


def _check_inputs(cfg: UNetConfig, sample: jax.Array, context: jax.Array) -> None:
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
        raise ValueError(
            f"UNet: sample of shape {tuple(sample.shape)} is not [B, H, W, {cfg.in_channels}]"
        )
    if context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
        raise ValueError(
            f"UNet: encoder_hidden_states of shape {tuple(context.shape)} is not "
            f"[B, T, {cfg.cross_attention_dim}]"
        )
    if context.shape[0] != sample.shape[0]:
        raise ValueError(
            f"UNet: batch of encoder_hidden_states ({context.shape[0]}) != sample's "
            f"({sample.shape[0]})"
        )
