"""Stable Diffusion's AutoencoderKL in Flax, NHWC, matching diffusers' PyTorch AutoencoderKL.

`encode` gives the latent distribution's moments (mean, log-variance); sampling and the
`scaling_factor`/`shift_factor` normalisation are the caller's (see VAEConfig.to_latents).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from idfuse_jax.errors import WeightsError
from idfuse_jax.formats import check_config_keys, require_value
from idfuse_jax.models.blocks import (
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    conv,
    multi_head_attention,
)

Dtype = Any
_EPS = 1e-6  # diffusers' Encoder/Decoder fix every norm's epsilon at 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution clamps the log-variance to this

_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu", "swish"),
    "latents_mean": (None,),
    "latents_std": (None,),
}
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL hyper-parameters, with diffusers' names and defaults."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    # Pipelines run the VAE in float32 when this is set and the rest is half precision.
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.block_out_channels, list):
            object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("VAEConfig: block_out_channels is empty")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"VAEConfig: block width {channels} is not divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )

    def to_latents(self, z: jax.Array) -> jax.Array:
        """VAE latent -> the diffusion model's latent: (z - shift) * scale."""
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def from_latents(self, latents: jax.Array) -> jax.Array:
        """Inverse of `to_latents`, before `decode`."""
        return latents / self.scaling_factor + (self.shift_factor or 0.0)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], *, where: str = "vae") -> VAEConfig:
        """Build from diffusers' config.json contents, refusing what we do not implement."""
        fields = {f.name for f in dataclasses.fields(cls)}
        check_config_keys(config, fields | set(_OFF_VALUES) | set(_BLOCK_TYPES), where=where)
        for key, allowed in _OFF_VALUES.items():
            require_value(config, key, allowed, where=where, default=allowed[0])
        n = len(config.get("block_out_channels", cls.block_out_channels))
        for key, block in _BLOCK_TYPES.items():
            types = list(config.get(key, [block]))
            if types != [block] * n:
                raise WeightsError(
                    f"{where}: unsupported {key}={types!r} (supported: {n} x {block!r})"
                )
        try:
            return cls(**{k: v for k, v in config.items() if k in fields})
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{where}: {e}") from None


class SpatialSelfAttention(nn.Module):
    """The VAE's single-head attention over pixels: group_norm, attention, residual."""

    num_groups: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, channels = x.shape
        h = GroupNorm(self.num_groups, _EPS, self.dtype, name="group_norm")(x)
        h = h.reshape(b, height * width, channels)
        # upcast: diffusers builds this attention with upcast_softmax=True.
        h = multi_head_attention(
            h,
            h,
            heads=1,
            head_dim=channels,
            qkv_bias=True,
            upcast=True,
            dtype=self.dtype,
            attention=self.attention,
        )
        return h.reshape(x.shape) + x.astype(h.dtype)


class VAEMidBlock(nn.Module):
    """UNetMidBlock2D without time embedding: resnet, attention (optional), resnet."""

    channels: int
    num_groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def resnet(j: int) -> ResnetBlock2D:
            return ResnetBlock2D(
                self.channels, self.num_groups, _EPS, dtype=self.dtype, name=f"resnets_{j}"
            )

        x = resnet(0)(x)
        if self.add_attention:
            x = SpatialSelfAttention(
                self.num_groups, self.dtype, self.attention, name="attentions_0"
            )(x)
        return resnet(1)(x)


class ResnetStack(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional down/up sampler."""

    channels: int
    num_layers: int
    num_groups: int
    direction: str  # "down" or "up"
    resample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(
                self.channels, self.num_groups, _EPS, dtype=self.dtype, name=f"resnets_{j}"
            )(x)
        if self.resample and self.direction == "down":
            # padding 0: diffusers' encoder pads (0, 1, 0, 1) before its stride-2 conv.
            x = Downsample2D(self.channels, 0, self.dtype, name="downsamplers_0")(x)
        elif self.resample:
            x = Upsample2D(self.channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image [B,H,W,in] -> moments [B,H/f,W/f,2*latent] (before quant_conv)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        widths = cfg.block_out_channels
        x = conv(widths[0], 3, name="conv_in", dtype=self.dtype)(x)
        for i, channels in enumerate(widths):
            x = ResnetStack(
                channels,
                cfg.layers_per_block,
                cfg.norm_num_groups,
                "down",
                i < len(widths) - 1,
                self.dtype,
                name=f"down_blocks_{i}",
            )(x)
        x = VAEMidBlock(
            widths[-1],
            cfg.norm_num_groups,
            cfg.mid_block_add_attention,
            self.dtype,
            self.attention,
            name="mid_block",
        )(x)
        x = GroupNorm(cfg.norm_num_groups, _EPS, self.dtype, name="conv_norm_out")(x)
        return conv(2 * cfg.latent_channels, 3, name="conv_out", dtype=self.dtype)(nn.silu(x))


class Decoder(nn.Module):
    """Latent [B,h,w,latent] -> image [B,h*f,w*f,out] (after post_quant_conv)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        widths = tuple(reversed(cfg.block_out_channels))
        x = conv(widths[0], 3, name="conv_in", dtype=self.dtype)(z)
        x = VAEMidBlock(
            widths[0],
            cfg.norm_num_groups,
            cfg.mid_block_add_attention,
            self.dtype,
            self.attention,
            name="mid_block",
        )(x)
        for i, channels in enumerate(widths):
            x = ResnetStack(
                channels,
                cfg.layers_per_block + 1,
                cfg.norm_num_groups,
                "up",
                i < len(widths) - 1,
                self.dtype,
                name=f"up_blocks_{i}",
            )(x)
        x = GroupNorm(cfg.norm_num_groups, _EPS, self.dtype, name="conv_norm_out")(x)
        return conv(cfg.out_channels, 3, name="conv_out", dtype=self.dtype)(nn.silu(x))


class AutoencoderKL(nn.Module):
    """Stable Diffusion's VAE. Call `encode` / `decode` through `apply(..., method=...)`.

    Attributes:
      config: the architecture.
      dtype: compute dtype (parameters stay float32).
      attention: the mid-block attention's implementation (`models.attention.IMPLEMENTATIONS`).
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype, self.attention)
        self.decoder = Decoder(cfg, self.dtype, self.attention)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, name=None, dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, name=None, dtype=self.dtype)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image in [-1, 1], [B,H,W,C] -> (mean, logvar) of the latent, each [B,h,w,latent]."""
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
            raise ValueError(
                f"VAE: image of shape {tuple(x.shape)} is not [B, H, W, {self.config.in_channels}]"
            )
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latent [B,h,w,latent] (before scaling) -> image [B,H,W,C], roughly in [-1, 1]."""
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(
                f"VAE: latent of shape {tuple(z.shape)} is not "
                f"[B, h, w, {self.config.latent_channels}]"
            )
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def example_inputs(self) -> tuple[jax.Array]:
        """A small dummy image for init / eval_shape."""
        side = 2 ** (len(self.config.block_out_channels) - 1)
        return (jnp.zeros((1, side, side, self.config.in_channels), jnp.float32),)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction from the latent mean (touches every parameter, for `init`)."""
        return self.decode(self.encode(x)[0])
