"""CLIP text and vision transformers (transformers' CLIPTextModel / CLIPVisionModel and their
`WithProjection` heads) as Flax modules, plus CLIP image preprocessing.

Parameter names mirror transformers' state dicts with the `text_model.` / `vision_model.`
prefix dropped (the loaders in `idfuse_jax.weights` strip it), e.g.

  text_model.encoder.layers.3.self_attn.q_proj.weight -> encoder/layers_3/self_attn/q_proj/kernel

and the projections sit at the top: `text_projection/kernel`, `visual_projection/kernel`.
Parameters are float32; `dtype` is the compute dtype. Layer norms and the attention softmax
always run in float32.

Not implemented (nothing in Stable Diffusion uses them): a padding `attention_mask` for the text
tower (SD 1.x/2.x pipelines call it without one), `interpolate_pos_encoding`, dropout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from idfuse_jax.errors import WeightsError
from idfuse_jax.formats import TRANSFORMERS_GENERIC_KEYS, check_config_keys, require_value
from idfuse_jax.models.attention import dot_product_attention, merge_heads, split_heads
from idfuse_jax.models.backward import remat_call
from idfuse_jax.models.blocks import dense, gelu
from idfuse_jax.models.image_stats import CLIP_MEAN, CLIP_STD


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names -> functions. "gelu" is the exact (erf) form, as in PyTorch.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": _quick_gelu,
    "gelu": gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# Keys transformers writes whose default is harmless but whose other values we do not implement.
HF_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "is_decoder": (False,),
    "is_encoder_decoder": (False,),
    "add_cross_attention": (False,),
    "pruned_heads": ({},),
    "dropout": (0, 0.0),
    "attention_dropout": (0, 0.0),
    "hidden_dropout_prob": (0, 0.0),
    "attention_probs_dropout_prob": (0, 0.0),
}


def check_transformers_config(
    config: Mapping[str, Any],
    implemented: Iterable[str],
    *,
    where: str,
    extra_inert: Iterable[str] = (),
    model_types: Iterable[str | None] = (),
) -> None:
    """Refuse keys we do not implement and non-default values of keys we only accept at default.

    Raises WeightsError naming the key (and value).
    """
    check_config_keys(
        config,
        set(implemented) | set(HF_DEFAULT_ONLY) | {"model_type"},
        TRANSFORMERS_GENERIC_KEYS | set(extra_inert),
        where=where,
    )
    for key, allowed in HF_DEFAULT_ONLY.items():
        require_value(config, key, allowed, where=where, default=allowed[0])
    model_types = list(model_types)
    if model_types:
        require_value(config, "model_type", model_types, where=where)


def square_size(config: Mapping[str, Any], key: str, *, where: str) -> int:
    """An int (or equal [h, w] pair) size from a transformers config; rectangles are refused."""
    value = config[key]
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise WeightsError(f"{where}: unsupported {key}={value!r} (supported: one int)")
    return value


def validate_widths(config: Any) -> None:
    """Shared checks of the transformer-width fields of a config dataclass."""
    name = type(config).__name__
    if config.hidden_size % config.num_attention_heads:
        raise WeightsError(
            f"{name}: hidden_size={config.hidden_size} is not a multiple of "
            f"num_attention_heads={config.num_attention_heads}"
        )
    if config.hidden_act not in ACTIVATIONS:
        raise WeightsError(
            f"{name}: unsupported hidden_act={config.hidden_act!r} "
            f"(supported: {sorted(ACTIVATIONS)})"
        )


def config_from_dict(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Build a config dataclass, turning validation errors into WeightsError for the folder."""
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in values.items() if k in names})
    except WeightsError as e:
        raise WeightsError(f"{where}: {e}") from None


def _clip_model_part(
    config: Mapping[str, Any], part: str, *, where: str
) -> tuple[dict[str, Any], Any]:
    """(sub-config dict, top-level projection_dim) of a full CLIPModel config.json."""
    check_transformers_config(
        config,
        {"text_config", "vision_config", "text_config_dict", "vision_config_dict"}
        | {"projection_dim", "logit_scale_init_value"},
        where=where,
        model_types=["clip", None],
    )
    sub = dict(config.get(part) or {})
    # Old CLIPModel configs carry overrides in `<part>_dict`; transformers applies them on top.
    sub.update(config.get(f"{part}_dict") or {})
    return sub, config.get("projection_dim", 512)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' CLIPTextConfig, the fields that shape the computation.

    projection_dim: width of `text_projection` (CLIPTextModelWithProjection); None for none.
    eos_token_id: 2 selects transformers' legacy pooling (argmax of the ids, as in SD 1.x/2.x
      configs); any other value pools at the first position holding that id.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        validate_widths(self)

    @classmethod
    def from_transformers(
        cls, config: Mapping[str, Any], *, with_projection: bool, where: str = "text encoder"
    ) -> CLIPTextConfig:
        """From a CLIPTextConfig config.json, or a CLIPModel's (its text_config).

        with_projection: whether the weights hold a text projection (its width is the config's
          projection_dim; a CLIPModel's top-level one).
        """
        projection_dim = config.get("projection_dim", 512)
        if "text_config" in config or config.get("model_type") == "clip":
            config, projection_dim = _clip_model_part(config, "text_config", where=where)
            where = f"{where} text_config"
        implemented = {f.name for f in dataclasses.fields(cls)}
        check_transformers_config(
            config, implemented, where=where, model_types=["clip_text_model", None]
        )
        eos = config.get("eos_token_id", cls.eos_token_id)
        if not isinstance(eos, int) or isinstance(eos, bool):
            raise WeightsError(f"{where}: unsupported eos_token_id={eos!r} (supported: one int)")
        values = {**config, "projection_dim": projection_dim if with_projection else None}
        return config_from_dict(cls, values, where)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' CLIPVisionConfig, the fields that shape the computation.

    projection_dim: width of `visual_projection` (image_embeds); None for a bare CLIPVisionModel.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512

    def __post_init__(self) -> None:
        validate_widths(self)
        if self.image_size % self.patch_size:
            raise WeightsError(
                f"CLIPVisionConfig: image_size={self.image_size} is not a multiple of "
                f"patch_size={self.patch_size}"
            )

    @classmethod
    def from_transformers(
        cls, config: Mapping[str, Any], *, with_projection: bool, where: str = "image encoder"
    ) -> CLIPVisionConfig:
        """From a CLIPVisionConfig config.json, or a CLIPModel's (its vision_config)."""
        projection_dim = config.get("projection_dim", 512)
        if "vision_config" in config or config.get("model_type") == "clip":
            config, projection_dim = _clip_model_part(config, "vision_config", where=where)
            where = f"{where} vision_config"
        implemented = {f.name for f in dataclasses.fields(cls)}
        check_transformers_config(
            config, implemented, where=where, model_types=["clip_vision_model", None]
        )
        values = {**config, "projection_dim": projection_dim if with_projection else None}
        for key in ("image_size", "patch_size"):
            if key in config:
                values[key] = square_size(config, key, where=where)
        return config_from_dict(cls, values, where)


def float32_layer_norm(x: jax.Array, eps: float, name: str, dtype: Any) -> jax.Array:
    """A LayerNorm computed in float32 whatever the compute dtype (call inside nn.compact)."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name)(x).astype(dtype)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with q_proj, k_proj, v_proj, out_proj (LoRA targets)."""

    hidden_size: int
    num_heads: int
    causal: bool = False
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = (
            split_heads(dense(self.hidden_size, name=name, dtype=self.dtype)(x), self.num_heads)
            for name in ("q_proj", "k_proj", "v_proj")
        )
        out = dot_product_attention(q, k, v, is_causal=self.causal, implementation=self.attention)
        return dense(self.hidden_size, name="out_proj", dtype=self.dtype)(merge_heads(out))


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ACTIVATIONS[self.hidden_act](
            dense(self.intermediate_size, name="fc1", dtype=self.dtype)(x)
        )
        return dense(self.hidden_size, name="fc2", dtype=self.dtype)(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: CLIPTextConfig | CLIPVisionConfig
    causal: bool = False
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = float32_layer_norm(x, c.layer_norm_eps, "layer_norm1", self.dtype)
        x = x + CLIPAttention(
            c.hidden_size,
            c.num_attention_heads,
            self.causal,
            self.dtype,
            self.attention,
            name="self_attn",
        )(h)
        h = float32_layer_norm(x, c.layer_norm_eps, "layer_norm2", self.dtype)
        return x + CLIPMLP(
            c.hidden_size, c.intermediate_size, c.hidden_act, self.dtype, name="mlp"
        )(h)


class CLIPEncoder(nn.Module):
    """`num_hidden_layers` CLIPEncoderLayers named layers_0, layers_1, ...

    remat: recompute each layer's activations in the backward pass (saves memory when the text
    encoder trains with LoRA).
    """

    config: CLIPTextConfig | CLIPVisionConfig
    causal: bool = False
    dtype: Any = jnp.float32
    attention: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            layer = CLIPEncoderLayer(
                self.config, self.causal, self.dtype, self.attention, name=f"layers_{i}"
            )
            x = remat_call(layer, x) if self.remat else layer(x)
        return x


@flax.struct.dataclass
class CLIPTextOutput:
    last_hidden_state: jax.Array  # [B, T, D], after final_layer_norm
    pooled: jax.Array  # [B, D], the EOS token's state
    text_embeds: jax.Array | None = None  # [B, P], text_projection(pooled), when projected


@flax.struct.dataclass
class CLIPVisionOutput:
    last_hidden_state: jax.Array  # [B, 1 + patches, D], before post_layernorm (as transformers)
    pooled: jax.Array  # [B, D], post_layernorm(CLS state)
    image_embeds: jax.Array | None = None  # [B, P], visual_projection(pooled), when projected


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Where transformers' CLIPTextModel pools: per row, the index of the EOS token.

    eos_token_id == 2 is the legacy rule (configs before transformers PR #24773, SD 1.x/2.x):
    the position of the largest id. Otherwise: the first position holding eos_token_id.
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned position embedding of positions 0..T-1."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        init = nn.initializers.normal(0.02)
        token = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, name="token_embedding")
        position = nn.Embed(
            c.max_position_embeddings, c.hidden_size, embedding_init=init, name="position_embedding"
        )
        return token(input_ids) + position(jnp.arange(input_ids.shape[1]))[None]


class CLIPTextTransformer(nn.Module):
    """CLIPTextModel, or CLIPTextModelWithProjection when config.projection_dim is set.

    Call with int token ids [B, T] (T <= max_position_embeddings); returns CLIPTextOutput.
    Attention is causal; no padding mask (as Stable Diffusion calls it).
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"  # models.attention.IMPLEMENTATIONS

    def example_inputs(self) -> tuple[jax.Array]:
        """A dummy input of the right shape and dtype, for init / eval_shape."""
        return (jnp.zeros((1, self.config.max_position_embeddings), jnp.int32),)

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        c = self.config
        if input_ids.ndim != 2:
            raise WeightsError(f"input_ids must be [batch, tokens], got {input_ids.shape}")
        if input_ids.shape[1] > c.max_position_embeddings:
            raise WeightsError(
                f"input_ids has {input_ids.shape[1]} tokens, more than max_position_embeddings="
                f"{c.max_position_embeddings}"
            )
        x = CLIPTextEmbeddings(c, name="embeddings")(input_ids).astype(self.dtype)
        x = CLIPEncoder(
            c,
            causal=True,
            dtype=self.dtype,
            remat=self.remat,
            attention=self.attention,
            name="encoder",
        )(x)
        x = float32_layer_norm(x, c.layer_norm_eps, "final_layer_norm", self.dtype)
        pooled = x[jnp.arange(x.shape[0]), eos_positions(input_ids, c.eos_token_id)]
        embeds = None
        if c.projection_dim is not None:
            embeds = dense(
                c.projection_dim, name="text_projection", dtype=self.dtype, use_bias=False
            )(pooled)
        return CLIPTextOutput(last_hidden_state=x, pooled=pooled, text_embeds=embeds)


def check_image_input(pixels: jax.Array, image_size: int, num_channels: int) -> None:
    """Refuse anything but NHWC [B, image_size, image_size, num_channels]."""
    expected = (image_size, image_size, num_channels)
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
        raise WeightsError(
            f"pixel input must be NHWC [batch, {image_size}, {image_size}, {num_channels}], "
            f"got shape {tuple(pixels.shape)}"
        )


def patchify(pixels: jax.Array, conv: nn.Conv) -> jax.Array:
    """Patch-embedding conv over NHWC, flattened row-major to [B, patches, D] (as torch)."""
    x = conv(pixels)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class CLIPVisionEmbeddings(nn.Module):
    """CLS embedding + patch embeddings (conv without bias) + learned position embedding."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        d = c.hidden_size
        cls = self.param("class_embedding", nn.initializers.normal(d**-0.5), (d,))
        conv = nn.Conv(
            d,
            (c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="patch_embedding",
        )
        patches = patchify(pixels.astype(self.dtype), conv)
        num_positions = (c.image_size // c.patch_size) ** 2 + 1
        position = nn.Embed(
            num_positions, d, embedding_init=nn.initializers.normal(0.02), name="position_embedding"
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (patches.shape[0], 1, d))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + position(jnp.arange(num_positions))[None].astype(self.dtype)


class CLIPVisionTransformer(nn.Module):
    """CLIPVisionModel, or CLIPVisionModelWithProjection when config.projection_dim is set.

    Call with normalised NHWC pixels [B, image_size, image_size, C] (see `preprocess_image`);
    returns CLIPVisionOutput (image_embeds is what CLIP-I and the IEDM adapter use).
    """

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"  # models.attention.IMPLEMENTATIONS

    def example_inputs(self) -> tuple[jax.Array]:
        """A dummy input of the right shape and dtype, for init / eval_shape."""
        c = self.config
        return (jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32),)

    @nn.compact
    def __call__(self, pixels: jax.Array) -> CLIPVisionOutput:
        c = self.config
        check_image_input(pixels, c.image_size, c.num_channels)
        x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixels)
        x = float32_layer_norm(
            x, c.layer_norm_eps, "pre_layrnorm", self.dtype
        )  # sic, transformers' name
        x = CLIPEncoder(
            c,
            causal=False,
            dtype=self.dtype,
            remat=self.remat,
            attention=self.attention,
            name="encoder",
        )(x)
        pooled = float32_layer_norm(x[:, 0], c.layer_norm_eps, "post_layernorm", self.dtype)
        embeds = None
        if c.projection_dim is not None:
            embeds = dense(
                c.projection_dim, name="visual_projection", dtype=self.dtype, use_bias=False
            )(pooled)
        return CLIPVisionOutput(last_hidden_state=x, pooled=pooled, image_embeds=embeds)


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(h, w) with the short side = shortest_edge, the long side scaled and truncated.

    transformers' get_resize_output_image_size(default_to_square=False) rule.
    """
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if height <= width else (new_long, shortest_edge)


def preprocess_image(
    image: np.ndarray,
    *,
    resize_to: int = 224,
    crop_to: int = 224,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> np.ndarray:
    """One RGB image [H, W, 3] -> normalised float32 [crop_to, crop_to, 3], as CLIPImageProcessor.

    Steps: resize so the shortest side is `resize_to` (bicubic, antialiased when shrinking);
    centre crop `crop_to` x `crop_to`; scale to [0, 1]; (x - mean) / std per channel.
    Input: uint8 in 0..255 (then the resized image is rounded to uint8 levels, as PIL does in
    transformers' processor) or float in [0, 1]. Defaults are CLIP's (224, OpenAI mean/std); for
    DINO ViT pass ImageNet's mean/std (`models.image_stats`).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise WeightsError(f"image must be RGB [H, W, 3], got shape {image.shape}")
    if crop_to > resize_to:
        raise WeightsError(f"crop_to={crop_to} is larger than resize_to={resize_to}")
    is_uint8 = image.dtype == np.uint8
    x = image.astype(np.float32) * (1.0 if is_uint8 else 255.0)
    h, w = shortest_edge_size(image.shape[0], image.shape[1], resize_to)
    x = np.asarray(jax.image.resize(x, (h, w, 3), method="bicubic", antialias=True))
    if is_uint8:
        x = np.clip(np.round(x), 0, 255)
    top, left = (h - crop_to) // 2, (w - crop_to) // 2
    x = x[top : top + crop_to, left : left + crop_to] / 255.0
    return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)
