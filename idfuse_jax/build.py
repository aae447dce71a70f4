"""Building the networks a run needs: from a diffusers pipeline folder and a CLIP image-encoder
folder, or small random ones (tests, `configs/smoke.py`).

`build_models(config)` returns the modules (no parameters) and the frozen parameter trees as host
arrays; the caller places them on devices.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from idfuse_jax import diffusion, presets, weights
from idfuse_jax.errors import ConfigError
from idfuse_jax.models import clip, conditioning, unet, vae
from idfuse_jax.tokenizer import ByteTokenizer
from idfuse_jax.types import Params

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Storage dtype of the frozen UNet, text and image encoder weights ("": float32, as trained).
# The VAE stays float32 (diffusers' force_upcast).
WEIGHTS_DTYPES = {"": jnp.float32, "float32": jnp.float32, "bfloat16": jnp.bfloat16}
# SD 1.x/2.x training schedule, used for random models (real ones read scheduler/).
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


@dataclasses.dataclass(frozen=True)
class Models:
    """The networks (Flax modules, no parameters) and the fixed pieces around them."""

    unet: unet.UNet2DConditionModel
    vae: vae.AutoencoderKL
    text_encoder: clip.CLIPTextTransformer
    image_encoder: clip.CLIPVisionTransformer
    idfuse: conditioning.IdFuse
    tokenizer: Any
    schedule: diffusion.Schedule

    @property
    def latent_downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def with_attention(self, attention: str) -> Models:
        """The same networks with another attention implementation (same parameters)."""
        return dataclasses.replace(
            self,
            unet=self.unet.clone(attention=attention),
            vae=self.vae.clone(attention=attention),
            text_encoder=self.text_encoder.clone(attention=attention),
            image_encoder=self.image_encoder.clone(attention=attention),
        )


def _existing_folder(path: str, field: str, what: str) -> pathlib.Path:
    folder = pathlib.Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"config.{field}={path!r}: folder not found; set --config.{field}=PATH to {what}"
        )
    return folder


def random_models(config: ml_collections.ConfigDict) -> tuple[Models, dict[str, Params]]:
    """Small random models of `config.model.random` sizes (no files needed)."""
    models = random_modules(config)
    return models, random_weights(models, config)


def random_modules(config: ml_collections.ConfigDict) -> Models:
    """The networks of `random_models`, without their weights."""
    r = config.model.random
    dtype = DTYPES[config.model.dtype]
    attention = config.model.attention
    channels = tuple(r.unet_channels)
    n = len(channels)
    unet_config = unet.UNetConfig(
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        layers_per_block=1,
        attention_head_dim=r.unet_heads,
        cross_attention_dim=r.text_width,
        in_channels=r.latent_channels,
        out_channels=r.latent_channels,
        norm_num_groups=min(8, channels[0]),
        use_linear_projection=True,
    )
    vae_config = vae.VAEConfig(
        block_out_channels=tuple(r.vae_channels),
        latent_channels=r.latent_channels,
        norm_num_groups=min(8, r.vae_channels[0]),
        layers_per_block=1,
    )
    tokenizer = ByteTokenizer()
    text_config = clip.CLIPTextConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=r.text_width,
        intermediate_size=4 * r.text_width,
        num_hidden_layers=r.text_layers,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        eos_token_id=tokenizer.eos_token_id,
    )
    image_config = clip.CLIPVisionConfig(
        hidden_size=r.image_width,
        intermediate_size=4 * r.image_width,
        num_hidden_layers=r.image_layers,
        num_attention_heads=2,
        image_size=r.image_size,
        patch_size=r.image_patch,
        projection_dim=r.projection_dim,
    )
    return _assemble(
        config,
        unet.UNet2DConditionModel(
            unet_config, dtype=dtype, remat=config.model.remat, attention=attention
        ),
        # float32: it runs once per image, not per step
        vae.AutoencoderKL(vae_config, attention=attention),
        clip.CLIPTextTransformer(text_config, dtype=dtype, attention=attention),
        clip.CLIPVisionTransformer(image_config, dtype=dtype, attention=attention),
        tokenizer,
        diffusion.Schedule.from_config(SD_SCHEDULE),
    )


def random_weights(models: Models, config: ml_collections.ConfigDict) -> dict[str, Params]:
    """Random frozen weights of `random_modules`' networks, stored as config.model asks."""
    keys = jax.random.split(jax.random.key(config.seed + 1), 4)
    modules = (models.unet, models.vae, models.text_encoder, models.image_encoder)
    frozen = {
        name: weights.init_params(module, key)
        for name, module, key in zip(("unet", "vae", "text", "image"), modules, keys)
    }
    store = WEIGHTS_DTYPES[config.model.weights_dtype]
    for name in ("unet", "text", "image"):
        frozen[name] = jax.tree.map(lambda x: x.astype(store), frozen[name])
    return frozen


def pretrained_models(
    config: ml_collections.ConfigDict, *, lazy: bool = False
) -> tuple[Models, dict[str, Params]]:
    """Models loaded from the diffusers pipeline folder and the CLIP image-encoder folder.

    With `lazy`, the parameter leaves are `formats.LazyArray`s still on disk, for
    `sharding.put` to read, place and drop one at a time.
    """
    dtype = DTYPES[config.model.dtype]
    sd = _existing_folder(
        config.model.pretrained, "model.pretrained", "a diffusers Stable Diffusion pipeline folder"
    )
    image_dir = _existing_folder(
        config.model.image_encoder,
        "model.image_encoder",
        "a transformers CLIP vision (or CLIPModel) folder",
    )
    options = weights.LoadOptions(
        variant=config.model.variant,
        lazy=lazy,
        param_dtype=WEIGHTS_DTYPES[config.model.weights_dtype],
    )
    attention = config.model.attention
    unet_model, unet_params = weights.load_unet(
        sd, dtype=dtype, remat=config.model.remat, options=options, attention=attention
    )
    # The VAE stays float32 (diffusers' force_upcast): it runs once per image, not per step.
    vae_options = dataclasses.replace(options, param_dtype=jnp.float32)
    vae_model, vae_params = weights.load_vae(sd, options=vae_options, attention=attention)
    text_model, text_params = weights.load_clip_text(
        sd, dtype=dtype, options=options, attention=attention
    )
    image_options = dataclasses.replace(options, variant="")  # another repo: no variants
    image_model, image_params = weights.load_clip_vision(
        image_dir, dtype=dtype, options=image_options, attention=attention
    )
    models = _assemble(
        config,
        unet_model,
        vae_model,
        text_model,
        image_model,
        weights.load_tokenizer(sd),
        diffusion.load_schedule(sd),
    )
    frozen = {"unet": unet_params, "vae": vae_params, "text": text_params, "image": image_params}
    return models, frozen


def idfuse_module(
    config: ml_collections.ConfigDict, image_width: int, text_width: int
) -> conditioning.IdFuse:
    """The method's adapter and FFM, as far as the config's preset has them."""
    preset = presets.of(config)
    if preset.explicit and not preset.image_branch and image_width != text_width:
        raise ConfigError(
            f"config.method.preset={config.method.preset!r} compares image features (width "
            f"{image_width}) with text features (width {text_width}) without an adapter to map "
            "one to the other: use an image encoder whose projection width equals the text width"
        )
    return conditioning.IdFuse(
        image_width=image_width,
        text_width=text_width,
        num_experts=config.method.num_experts,
        expert_hidden_mult=config.method.expert_hidden_mult,
        adapter_hidden_mult=config.method.adapter_hidden_mult,
        with_adapter=preset.image_branch,
        with_ffm=preset.ffm,
    )


def abstract_models(config: ml_collections.ConfigDict) -> tuple[Models, dict[str, Any]]:
    """(Models, frozen params {"unet", "vae", "text", "image"} as jax.ShapeDtypeStructs in their
    storage dtype), as `build_models` would build and load them, from config files alone.

    Nothing is allocated and no weights are read: a pretrained config needs only the
    config.json files and scheduler/ of its folders. The tokenizer is None (what compiles takes
    token ids). For compiling a run's programs ahead of time (`idfuse_jax.compile_check`).
    """
    if config.model.pretrained:
        dtype, remat, attention = (
            DTYPES[config.model.dtype],
            config.model.remat,
            config.model.attention,
        )
        sd = _existing_folder(
            config.model.pretrained,
            "model.pretrained",
            "a diffusers Stable Diffusion pipeline folder",
        )
        image_dir = _existing_folder(
            config.model.image_encoder, "model.image_encoder", "a transformers CLIP vision folder"
        )
        models = _assemble(
            config,
            weights.unet_module(sd, dtype=dtype, remat=remat, attention=attention),
            weights.vae_module(sd, attention=attention),
            # SD 1.x/2.x text encoders have no projection; image encoders for IEDM must have one.
            weights.clip_module(sd, "text", False, dtype=dtype, remat=remat, attention=attention),
            weights.clip_module(
                image_dir, "vision", True, dtype=dtype, remat=remat, attention=attention
            ),
            None,
            diffusion.load_schedule(sd),
        )
    else:
        models = random_modules(config)
    store = WEIGHTS_DTYPES[config.model.weights_dtype]
    modules = {
        "unet": models.unet,
        "vae": models.vae,
        "text": models.text_encoder,
        "image": models.image_encoder,
    }
    frozen = {}
    for name, module in modules.items():
        dt = jnp.float32 if name == "vae" else store
        frozen[name] = jax.tree.map(
            lambda x, dt=dt: jax.ShapeDtypeStruct(x.shape, dt), weights.abstract_params(module)
        )
    return models, frozen


def _assemble(config, unet_model, vae_model, text_model, image_model, tokenizer, schedule):
    text_width = text_model.config.hidden_size
    if unet_model.config.cross_attention_dim != text_width:
        raise ConfigError(
            f"the UNet's cross_attention_dim {unet_model.config.cross_attention_dim} != the text "
            f"encoder's width {text_width}"
        )
    image_width = image_model.config.projection_dim
    if image_width is None:
        raise ConfigError(
            "config.model.image_encoder: the CLIP vision folder has no visual_projection "
            "(use a CLIPVisionModelWithProjection or CLIPModel folder)"
        )
    idfuse = idfuse_module(config, image_width, text_width)
    return Models(unet_model, vae_model, text_model, image_model, idfuse, tokenizer, schedule)


def build_models(
    config: ml_collections.ConfigDict, *, lazy: bool = False
) -> tuple[Models, dict[str, Params]]:
    """(Models, frozen params {"unet", "vae", "text", "image"}) as the config asks.

    Loaded weights stay host (numpy) arrays, or with `lazy` on disk (`formats.LazyArray`): the
    caller places them (sharded) on devices.
    """
    if config.model.pretrained:
        return pretrained_models(config, lazy=lazy)
    return random_models(config)
