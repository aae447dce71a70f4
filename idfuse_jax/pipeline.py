"""The method wired to the models: building them, per-subject fixed work, the loss and sampling.

Used by the training program (`train_lib`) and by tests; everything here that runs on device is a
pure function of (static modules, parameter trees, arrays).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util
from safetensors.numpy import save_file

from idfuse_jax import diffusion, losses, weights
from idfuse_jax.data import images as images_lib
from idfuse_jax.data import synthetic
from idfuse_jax.errors import ConfigError
from idfuse_jax.models import clip, conditioning, lora, unet, vae
from idfuse_jax.tokenizer import ByteTokenizer

Params = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
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


@flax.struct.dataclass
class SubjectFeatures:
    """Per-subject fixed work, computed once before the loop (index i: augmented image i)."""

    latent_mean: jax.Array  # [M, h, w, c] VAE moments of each (flipped) image
    latent_logvar: jax.Array  # [M, h, w, c]
    image_embeds: jax.Array  # [M, D_img] f_i^(p) = E_I(x_i)
    background_embeds: jax.Array  # [M, D_img] f'_i = E_I(x'_i)
    prompt_ids: jax.Array  # [1, T] token ids of the identity prompt P
    num_items: int = flax.struct.field(pytree_node=False, default=0)


# --------------------------------------------------------------------------------------------
# Building the models


def _existing_folder(path: str, field: str, what: str) -> pathlib.Path:
    folder = pathlib.Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"config.{field}={path!r}: folder not found; set --config.{field}=PATH to {what}"
        )
    return folder


def random_models(config: ml_collections.ConfigDict) -> tuple[Models, dict[str, Params]]:
    """Small random models of `config.model.random` sizes (no files needed)."""
    r = config.model.random
    dtype = DTYPES[config.model.dtype]
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
    models = _assemble(
        config,
        unet.UNet2DConditionModel(unet_config, dtype=dtype, remat=config.model.remat),
        vae.AutoencoderKL(vae_config),  # float32: it runs once per image, not per step
        clip.CLIPTextTransformer(text_config, dtype=dtype),
        clip.CLIPVisionTransformer(image_config, dtype=dtype),
        tokenizer,
        diffusion.Schedule.from_config(SD_SCHEDULE),
    )
    keys = jax.random.split(jax.random.key(config.seed + 1), 4)
    modules = (models.unet, models.vae, models.text_encoder, models.image_encoder)
    frozen = {
        name: weights.init_params(module, key)
        for name, module, key in zip(("unet", "vae", "text", "image"), modules, keys)
    }
    return models, frozen


def pretrained_models(config: ml_collections.ConfigDict) -> tuple[Models, dict[str, Params]]:
    """Models loaded from the diffusers pipeline folder and the CLIP image-encoder folder."""
    dtype = DTYPES[config.model.dtype]
    sd = _existing_folder(
        config.model.pretrained, "model.pretrained", "a diffusers Stable Diffusion pipeline folder"
    )
    image_dir = _existing_folder(
        config.model.image_encoder,
        "model.image_encoder",
        "a transformers CLIP vision (or CLIPModel) folder",
    )
    options = weights.LoadOptions(variant=config.model.variant)
    unet_model, unet_params = weights.load_unet(
        sd, dtype=dtype, remat=config.model.remat, options=options
    )
    # The VAE stays float32 (diffusers' force_upcast): it runs once per image, not per step.
    vae_model, vae_params = weights.load_vae(sd, options=options)
    text_model, text_params = weights.load_clip_text(sd, dtype=dtype, options=options)
    image_model, image_params = weights.load_clip_vision(image_dir, dtype=dtype)
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
    idfuse = conditioning.IdFuse(
        image_width=image_width,
        text_width=text_width,
        num_experts=config.method.num_experts,
        expert_hidden_mult=config.method.expert_hidden_mult,
        adapter_hidden_mult=config.method.adapter_hidden_mult,
    )
    return Models(unet_model, vae_model, text_model, image_model, idfuse, tokenizer, schedule)


def build_models(config: ml_collections.ConfigDict) -> tuple[Models, dict[str, Params]]:
    """(Models, frozen params {"unet", "vae", "text", "image"}) as the config asks.

    Loaded weights stay host (numpy) arrays: the caller places them (sharded) on devices.
    """
    return pretrained_models(config) if config.model.pretrained else random_models(config)


# --------------------------------------------------------------------------------------------
# Trainable parameters


def _patterns(pattern: str) -> list[str]:
    return [pattern] if pattern else []


def init_trainable(
    key: jax.Array, models: Models, config: ml_collections.ConfigDict, frozen: dict[str, Params]
) -> dict[str, Params]:
    """{"unet_lora", "text_lora", "idfuse"}: the only parameters that train."""
    m = config.method
    k_unet, k_text, k_idfuse = jax.random.split(key, 3)
    unet_lora = (
        lora.lora_init(k_unet, frozen["unet"], _patterns(m.unet_lora_targets), m.lora_rank)
        if m.unet_lora_targets
        else {}
    )
    text_lora = (
        lora.lora_init(k_text, frozen["text"], _patterns(m.text_lora_targets), m.lora_rank)
        if m.text_lora_targets
        else {}
    )
    text_width = models.idfuse.text_width
    dummy_text = jnp.zeros((1, 1, text_width), jnp.float32)
    dummy_image = jnp.zeros((1, models.idfuse.image_width), jnp.float32)
    idfuse = jax.jit(models.idfuse.init)(k_idfuse, dummy_text, dummy_image)["params"]
    return {"unet_lora": unet_lora, "text_lora": text_lora, "idfuse": idfuse}


def merged_params(
    frozen: dict[str, Params], trainable: dict[str, Params], config: ml_collections.ConfigDict
) -> tuple[Params, Params]:
    """(UNet params, text-encoder params) with their LoRA merged in."""
    m = config.method
    merge = lambda base, factors: (
        lora.lora_merge(base, factors, m.lora_alpha, m.lora_rank) if factors else base
    )
    return merge(frozen["unet"], trainable["unet_lora"]), merge(
        frozen["text"], trainable["text_lora"]
    )


# --------------------------------------------------------------------------------------------
# Fixed per-subject work


def subject_images(
    config: ml_collections.ConfigDict, workdir: pathlib.Path
) -> tuple[np.ndarray, np.ndarray]:
    """(images, backgrounds), uint8 [N, R, R, 3] at the training resolution.

    The synthetic subject brings exact backgrounds; a photo folder is prepared (masks and
    inpainted backgrounds) once, cached under workdir/prepared, never written into the input.
    """
    d = config.data
    if d.instance_dir == "synthetic":
        images, _, backgrounds = synthetic.synthetic_subject(
            d.synthetic_images, d.resolution, config.seed
        )
        return images, backgrounds
    from idfuse_jax import prepare  # OpenCV and friends only when a photo folder is used

    prepared = workdir / "prepared"
    if jax.process_index() == 0:
        prepare.prepare_subject(
            d.instance_dir,
            prepared,
            masks=d.masks,
            onnx_model=d.onnx_model or None,
            inpaint=d.inpaint,
            inpaint_model=d.inpaint_model or None,
            min_size=d.min_size,
        )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("prepared subject")
    subject = images_lib.load_subject(
        d.instance_dir, d.resolution, min_size=d.min_size, prepared_dir=prepared
    )
    return subject.images, subject.backgrounds


def clip_pixels(images: np.ndarray, image_size: int) -> np.ndarray:
    return np.stack(
        [clip.preprocess_image(x, resize_to=image_size, crop_to=image_size) for x in images]
    )


def prepare_subject_features(
    config: ml_collections.ConfigDict,
    models: Models,
    frozen: dict[str, Params],
    workdir: pathlib.Path,
) -> SubjectFeatures:
    """VAE moments, CLIP image and background features of every (flipped) image, and P's ids."""
    images, backgrounds = subject_images(config, workdir)
    if config.data.random_flip:
        images = np.concatenate([images, images[:, :, ::-1]])
        backgrounds = np.concatenate([backgrounds, backgrounds[:, :, ::-1]])

    encode = jax.jit(lambda p, x: models.vae.apply({"params": p}, x, method="encode"))
    embed = jax.jit(lambda p, x: models.image_encoder.apply({"params": p}, x).image_embeds)
    # One image at a time: a single compiled shape, and memory bounded at 512 px.
    moments = [encode(frozen["vae"], images_lib.to_model(x[None])) for x in images]
    size = models.image_encoder.config.image_size
    image_embeds = [embed(frozen["image"], clip_pixels(x[None], size)) for x in images]
    background_embeds = [embed(frozen["image"], clip_pixels(x[None], size)) for x in backgrounds]
    (prompt,) = format_prompts(config, [config.data.prompt])
    return SubjectFeatures(
        latent_mean=jnp.concatenate([m[0] for m in moments]).astype(jnp.float32),
        latent_logvar=jnp.concatenate([m[1] for m in moments]).astype(jnp.float32),
        image_embeds=jnp.concatenate(image_embeds).astype(jnp.float32),
        background_embeds=jnp.concatenate(background_embeds).astype(jnp.float32),
        prompt_ids=jnp.asarray(models.tokenizer([prompt])),
        num_items=len(images),
    )


# --------------------------------------------------------------------------------------------
# The loss


def training_loss(
    models: Models,
    config: ml_collections.ConfigDict,
    frozen: dict[str, Params],
    trainable: dict[str, Params],
    subject: SubjectFeatures,
    indices: jax.Array,
    keys: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = λ1 L1 + λ2 L2 + λ3 L3 + λ4 L4 for a batch of subject images; every term for logging.

    `keys` holds one PRNG key per example (see train_lib.example_keys).
    """
    unet_params, text_params = merged_params(frozen, trainable, config)
    batch = indices.shape[0]
    # The identity prompt is the same for every example: encode it, and run its text-only FFM
    # pass, once (batch 1); broadcast only where per-example arrays meet.
    f_s = models.text_encoder.apply({"params": text_params}, subject.prompt_ids).last_hidden_state
    f_s = f_s.astype(jnp.float32)
    cond = conditioning.training_conditioning(
        models.idfuse,
        trainable["idfuse"],
        f_s,
        subject.image_embeds[indices],
        subject.background_embeds[indices],
        background=config.method.background,
    )

    mean, logvar = subject.latent_mean[indices], subject.latent_logvar[indices]
    split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
    sample_normal = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))
    latents = models.vae.config.to_latents(
        mean + jnp.exp(0.5 * logvar) * sample_normal(split[:, 0])
    )
    noise = sample_normal(split[:, 1])
    num_t = models.schedule.num_train_timesteps
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_t))(split[:, 2])
    noisy = diffusion.add_noise(models.schedule, latents, noise, t)
    target = diffusion.training_target(models.schedule, latents, noise, t)

    # Both UNet passes (full and text-only conditioning) as one batched call.
    pred = models.unet.apply(
        {"params": unet_params},
        jnp.concatenate([noisy, noisy]),
        jnp.concatenate([t, t]),
        jnp.concatenate([cond.full, jnp.broadcast_to(cond.text_only, cond.full.shape)]),
    )
    pred_full, pred_text_only = jnp.split(pred, 2)
    lam = config.loss
    eos = clip.eos_positions(subject.prompt_ids, models.text_encoder.config.eos_token_id)
    total, terms = losses.idfuse_loss(
        pred_full,
        pred_text_only,
        target,
        jnp.broadcast_to(f_s, (batch, *f_s.shape[1:])),
        cond.image,
        cond.background,
        lambdas=(
            lam.lambda_denoise,
            lam.lambda_text_background,
            lam.lambda_background_agree,
            lam.lambda_subject_background,
        ),
        text_only_weight=lam.text_only_weight,
        text_pool=lam.text_pool,
        eos_index=jnp.broadcast_to(eos, (batch,)),
        text_trainable=bool(trainable["text_lora"]),
    )
    terms = dict(terms)
    terms["router_entropy"] = cond.stats["router_entropy"]
    terms["router_weight"] = cond.stats["router_weight"]
    return total, terms


# --------------------------------------------------------------------------------------------
# Sampling


def format_prompts(config: ml_collections.ConfigDict, templates: Sequence[str]) -> list[str]:
    """Prompt templates with the run's {token} and {class_name} filled in."""
    d = config.data
    return [p.format(token=d.token, class_name=d.class_name) for p in templates]


def generate(
    models: Models,
    config: ml_collections.ConfigDict,
    frozen: dict[str, Params],
    trainable: dict[str, Params],
    prompt_ids: jax.Array,
    null_ids: jax.Array,
    key: jax.Array,
    reference_embeds: jax.Array | None = None,
) -> jax.Array:
    """Images [P, R, R, 3] in [-1, 1] for token ids [P, T], conditioned on FFM(E_T(prompt)) with
    classifier-free guidance against FFM(E_T("")).

    With `reference_embeds` ([1, D_img], E_I of a reference photo) the conditioning is
    FFM(E_T(prompt) + A(E_I(reference))): the background-preserving variant.
    """
    unet_params, text_params = merged_params(frozen, trainable, config)
    encode = lambda ids: models.text_encoder.apply({"params": text_params}, ids).last_hidden_state
    n = prompt_ids.shape[0]
    if reference_embeds is None:
        cond, _ = conditioning.text_conditioning(
            models.idfuse, trainable["idfuse"], encode(prompt_ids)
        )
    else:
        cond, _ = conditioning.reference_conditioning(
            models.idfuse,
            trainable["idfuse"],
            encode(prompt_ids),
            reference_embeds,
        )
    uncond, _ = conditioning.text_conditioning(models.idfuse, trainable["idfuse"], encode(null_ids))
    context = jnp.concatenate([cond, jnp.broadcast_to(uncond, cond.shape)])
    guidance = config.sample.guidance_scale

    def denoise(x, t):
        out = models.unet.apply({"params": unet_params}, jnp.concatenate([x, x]), t, context)
        c, u = jnp.split(out.astype(jnp.float32), 2)
        return u + guidance * (c - u)

    side = config.data.resolution // models.latent_downsample
    x_t = jax.random.normal(key, (n, side, side, models.unet.config.in_channels), jnp.float32)
    if config.sample.sampler == "ddim":
        latents = diffusion.ddim_sample(denoise, models.schedule, x_t, config.sample.num_steps)
    else:
        latents = diffusion.dpm_solver_pp_sample(
            denoise, models.schedule, x_t, config.sample.num_steps
        )
    z = models.vae.config.from_latents(latents)
    images = models.vae.apply({"params": frozen["vae"]}, z.astype(jnp.float32), method="decode")
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)


def make_sampler(
    models: Models,
    config: ml_collections.ConfigDict,
    frozen: dict[str, Params],
    trainable: dict[str, Params],
    out_sharding: jax.sharding.Sharding | None = None,
):
    """A function (frozen, trainable) -> uint8 grid of one image per validation prompt.

    Compiled ahead of time for arguments laid out like `frozen` and `trainable`, so that a
    sampler that cannot compile or fit fails before training starts, not hundreds of steps in.
    """
    prompts = format_prompts(config, config.sample.prompts)
    prompt_ids = jnp.asarray(models.tokenizer(prompts))
    null_ids = jnp.asarray(models.tokenizer([""]))
    key = jax.random.key(config.sample.seed)
    fn = jax.jit(
        lambda f, t: generate(models, config, f, t, prompt_ids, null_ids, key),
        out_shardings=out_sharding,
    )
    compiled = fn.lower(frozen, trainable).compile()

    def sample(frozen: dict[str, Params], trainable: dict[str, Params]) -> np.ndarray:
        from idfuse_jax.metrics import image_grid, to_uint8

        images = to_uint8(jax.device_get(compiled(frozen, trainable)))
        return image_grid(images, columns=len(prompts))

    return sample


# --------------------------------------------------------------------------------------------
# Export


_LORA_PREFIXES = {"unet_lora": "unet.", "text_lora": "text_encoder.text_model."}
_LORA_NAMES = {"lora_a": "lora_A", "lora_b": "lora_B"}


def _torch_key(path: Sequence[str]) -> str:
    """('down_blocks_0', 'attentions_1', 'to_out_0') -> 'down_blocks.0.attentions.1.to_out.0'."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path)


def export_names(trainable: dict[str, Params]) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Trainable-tree path -> (name in the exported file, stored transposed?).

    LoRA factors get diffusers/peft names (`unet.<module>.lora_A.weight` [r, in],
    `lora_B.weight` [out, r]; `text_encoder.text_model.<module>...`), the adapter and FFM
    `idfuse.<flax path>`.
    """
    names = {}
    for path in traverse_util.flatten_dict(dict(trainable)):
        part, module, leaf = path[0], path[1:-1], path[-1]
        if part in _LORA_PREFIXES:
            name = f"{_LORA_PREFIXES[part]}{_torch_key(module)}.{_LORA_NAMES[leaf]}.weight"
            names[path] = (name, True)
        else:
            names[path] = (".".join(path), False)
    return names


def export_trainable(
    trainable: dict[str, Params],
    path: str | pathlib.Path,
    config: ml_collections.ConfigDict | None = None,
) -> pathlib.Path:
    """The trained weights alone as one safetensors file (names: `export_names`)."""
    flat = traverse_util.flatten_dict(jax.device_get(dict(trainable)))
    tensors = {}
    for key, (name, transposed) in export_names(trainable).items():
        value = np.asarray(flat[key], np.float32)
        tensors[name] = np.ascontiguousarray(value.T if transposed else value)
    metadata = {"format": "idfuse_jax"}
    if config is not None:
        metadata.update(
            lora_rank=str(config.method.lora_rank), lora_alpha=str(config.method.lora_alpha)
        )
    path = pathlib.Path(path)
    save_file(tensors, str(path), metadata=metadata)
    logging.info("exported %d tensors to %s", len(tensors), path)
    return path


LORA_FILE = "idfuse_lora.safetensors"
# diffusers (`lora_base.LORA_ADAPTER_METADATA_KEY`): per-model peft LoraConfig kwargs, as JSON.
_LORA_METADATA_KEY = "lora_adapter_metadata"


def diffusers_lora(
    trainable: dict[str, Params], config: ml_collections.ConfigDict
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a LoRA file that diffusers' `load_lora_weights` takes as it is.

    Tensors: the UNet and text-encoder LoRA factors in diffusers/peft names (`export_names`).
    Metadata: diffusers reads `lora_adapter_metadata` (`"unet.r"`, `"unet.lora_alpha"`,
    `"unet.target_modules"`, likewise `"text_encoder.*"`) as the peft LoraConfig of each model;
    without it diffusers takes alpha = rank (scale 1), which is wrong for lora_alpha != rank.
    Text-encoder module names drop `text_model.`: peft matches a target as a name suffix, so
    they fit transformers 4.x (`text_model.encoder...`) and 5.x (`encoder...`) models alike.
    """
    flat = traverse_util.flatten_dict(jax.device_get(dict(trainable)))
    tensors: dict[str, np.ndarray] = {}
    adapters: dict[str, Any] = {}
    for key, (name, transposed) in export_names(trainable).items():
        if key[0] not in _LORA_PREFIXES:
            continue
        value = np.asarray(flat[key], np.float32)
        tensors[name] = np.ascontiguousarray(value.T if transposed else value)
        model, module = name.split(".", 1)
        module = module.rsplit(".lora_", 1)[0].removeprefix("text_model.")
        adapters.setdefault(model, set()).add(module)
    metadata = {"format": "pt"}
    if adapters:
        kwargs = {}
        for model, modules in adapters.items():
            kwargs[f"{model}.r"] = int(config.method.lora_rank)
            kwargs[f"{model}.lora_alpha"] = float(config.method.lora_alpha)
            kwargs[f"{model}.target_modules"] = sorted(modules)
        metadata[_LORA_METADATA_KEY] = json.dumps(kwargs, sort_keys=True)
    return tensors, metadata


def export_run(
    trainable: dict[str, Params], workdir: str | pathlib.Path, config: ml_collections.ConfigDict
) -> list[pathlib.Path]:
    """A finished run's exports: idfuse_weights.safetensors (everything trained, for
    `idfuse_jax.sample`) and, when LoRA is on, idfuse_lora.safetensors (for diffusers'
    `load_lora_weights`; examples/diffusers_sample.py adds the adapter and FFM)."""
    workdir = pathlib.Path(workdir)
    paths = [export_trainable(trainable, workdir / "idfuse_weights.safetensors", config)]
    tensors, metadata = diffusers_lora(trainable, config)
    if tensors:
        save_file(tensors, str(workdir / LORA_FILE), metadata=metadata)
        paths.append(workdir / LORA_FILE)
    return paths


def import_trainable(path: str | pathlib.Path, template: dict[str, Params]) -> dict[str, Params]:
    """Read an `export_trainable` file into a tree shaped like `template`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise weights.WeightsError(f"{path}: exported weights not found")
    tensors = weights.read_safetensors_file(path)
    flat_template = traverse_util.flatten_dict(dict(template))
    flat, missing = {}, []
    for key, (name, transposed) in export_names(template).items():
        if name not in tensors:
            missing.append(name)
            continue
        value = tensors[name].T if transposed else tensors[name]
        if value.shape != tuple(flat_template[key].shape):
            raise weights.WeightsError(
                f"{path}: {name} has shape {value.shape}, the model needs "
                f"{tuple(flat_template[key].shape)} (trained with another config?)"
            )
        flat[key] = jnp.asarray(value, jnp.float32)
    if missing:
        raise weights.WeightsError(
            f"{path}: {len(missing)} tensors missing ({', '.join(missing[:4])}, ...); "
            "trained with another config?"
        )
    # Empty sub-trees (e.g. no text LoRA) have no leaves; keep them as in the template.
    tree = traverse_util.unflatten_dict(flat)
    return {part: tree.get(part, {}) for part in template}
