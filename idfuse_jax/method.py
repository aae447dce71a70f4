"""The method as pure functions of (modules, config, parameter trees, arrays): the trainable
parameters and their LoRA branch, the training loss L = Σ_k w_k L_k, and sampling.

No I/O here: the per-subject arrays come from `idfuse_jax.subject`, the modules from
`idfuse_jax.build`. Everything is traceable under `jax.jit`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections

from idfuse_jax import diffusion, losses, presets
from idfuse_jax.build import Models
from idfuse_jax.models import clip, conditioning, lora
from idfuse_jax.types import Params


@flax.struct.dataclass
class SubjectFeatures:
    """Per-subject fixed work, computed once before the loop (index i: augmented image i)."""

    latent_mean: jax.Array  # [M, h, w, c] VAE moments of each (flipped) image
    latent_logvar: jax.Array  # [M, h, w, c]
    image_embeds: jax.Array  # [M, D_img] f_i^(p) = E_I(x_i)
    background_embeds: jax.Array  # [M, D_img] f'_i = E_I(x'_i)
    prompt_ids: jax.Array  # [1, T] token ids of the identity prompt P
    num_items: int = flax.struct.field(pytree_node=False, default=0)
    # [M] float32: 1 where x'_i is a usable background (L3, L4 count it), 0 where the photo's
    # mask failed and it trains without explicit decoupling; None: every image has one.
    decouple: jax.Array | None = None
    # Prior preservation (config.prior): VAE moments [C, h, w, c] of the frozen model's class
    # images and the class prompt's ids [1, T]; None without it.
    class_latent_mean: jax.Array | None = None
    class_latent_logvar: jax.Array | None = None
    class_prompt_ids: jax.Array | None = None
    # A loss-weight sweep (config.loss.sweep): this slot's loss.weights [4] in losses.TERMS
    # order, traced so that the slots of one program differ; None: config.loss.weights.
    loss_weights: jax.Array | None = None


def stack_subjects(subjects: Sequence[SubjectFeatures], count: int) -> SubjectFeatures:
    """The features of several subjects as one SubjectFeatures with a leading subject axis of
    `count` (>= len(subjects)): [count, M, ...] with M the most images any subject has.

    A subject with fewer images is padded with copies of its last one, which its data order
    never draws; slots past the last subject (padding of the mesh's subject axis) repeat the
    last subject and never train.
    """
    most = max(s.num_items for s in subjects)

    def pad(x: jax.Array, to: int) -> jax.Array:
        return jnp.concatenate([x, jnp.repeat(x[-1:], to - x.shape[0], axis=0)])

    rows = [
        s.replace(
            **{
                name: pad(getattr(s, name), most)
                for name in ("latent_mean", "latent_logvar", "image_embeds", "background_embeds")
            },
            decouple=pad(s.decouple if s.decouple is not None else jnp.ones(s.num_items), most),
            num_items=most,
        )
        for s in subjects
    ]
    rows += [rows[-1]] * (count - len(rows))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)


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
    text_targets = presets.text_lora_targets(config)
    text_lora = (
        lora.lora_init(k_text, frozen["text"], _patterns(text_targets), m.lora_rank)
        if text_targets
        else {}
    )
    text_width = models.idfuse.text_width
    dummy_text = jnp.zeros((1, 1, text_width), jnp.float32)
    dummy_image = jnp.zeros((1, models.idfuse.image_width), jnp.float32)
    # A method without adapter and FFM (dreambooth_lora) has no parameters here.
    idfuse = jax.jit(models.idfuse.init)(k_idfuse, dummy_text, dummy_image).get("params", {})
    return {"unet_lora": unet_lora, "text_lora": text_lora, "idfuse": idfuse}


def model_variables(
    frozen: dict[str, Params], trainable: dict[str, Params], config: ml_collections.ConfigDict
) -> tuple[dict[str, Params], dict[str, Params]]:
    """Flax variables of the UNet and of the text encoder: the frozen weights as "params" and,
    where LoRA trains, its branch as the `lora.LORA` collection (kept apart from the kernels)."""
    m = config.method

    def variables(base: Params, factors: Params) -> dict[str, Params]:
        if not factors:
            return {"params": base}
        return {
            "params": base,
            lora.LORA: lora.lora_collection(base, factors, m.lora_alpha, m.lora_rank),
        }

    return variables(frozen["unet"], trainable["unet_lora"]), variables(
        frozen["text"], trainable["text_lora"]
    )


def diffusion_inputs(
    models: Models, mean: jax.Array, logvar: jax.Array, keys: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(latents, noise, timesteps) of a batch: latents sampled from the VAE moments [B, ...]
    and scaled, noise and t drawn from one key per example (each split in 3)."""
    split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
    sample_normal = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))
    latents = models.vae.config.to_latents(
        mean + jnp.exp(0.5 * logvar) * sample_normal(split[:, 0])
    )
    noise = sample_normal(split[:, 1])
    num_t = models.schedule.num_train_timesteps
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_t))(split[:, 2])
    return latents, noise, t


def prior_inputs(
    models: Models, subject: SubjectFeatures, keys: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`diffusion_inputs` of one class image per example, drawn uniformly from the subject's
    class images by keys of their own (the instance draws stay as without the prior)."""
    prior_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    count = subject.class_latent_mean.shape[0]
    pick = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 2), (), 0, count))
    index = pick(keys)
    mean, logvar = subject.class_latent_mean[index], subject.class_latent_logvar[index]
    return diffusion_inputs(models, mean, logvar, prior_keys)


def training_loss(
    models: Models,
    config: ml_collections.ConfigDict,
    frozen: dict[str, Params],
    trainable: dict[str, Params],
    subject: SubjectFeatures,
    indices: jax.Array,
    keys: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = Σ_k w_k L_k (`losses.idfuse_loss`) over the terms of the config's method preset
    (`idfuse_jax.presets`) for a batch of subject images, plus prior.weight x the prior loss
    when the subject has class images; every term for logging.

    `keys` holds one PRNG key per example (see train_lib.example_keys).
    """
    preset = presets.of(config)
    unet_vars, text_vars = model_variables(frozen, trainable, config)
    batch = indices.shape[0]
    encode = lambda ids: models.text_encoder.apply(text_vars, ids).last_hidden_state
    # The identity prompt is the same for every example: encode it, and run its text-only FFM
    # pass, once (batch 1); broadcast only where per-example arrays meet.
    f_s = encode(subject.prompt_ids).astype(jnp.float32)
    decouple = None if subject.decouple is None else subject.decouple[indices]
    cond = conditioning.training_conditioning(
        models.idfuse,
        trainable["idfuse"],
        f_s,
        subject.image_embeds[indices],
        subject.background_embeds[indices],
        background=config.method.background,
        decouple=decouple,
        explicit=preset.explicit,
    )
    latents, noise, t = diffusion_inputs(
        models, subject.latent_mean[indices], subject.latent_logvar[indices], keys
    )
    noisy = diffusion.add_noise(models.schedule, latents, noise, t)
    target = diffusion.training_target(models.schedule, latents, noise, t)

    # Every UNet pass (full, text-only, prior) as one batched call. Without the adapter the full
    # conditioning is the prompt's alone: one row, broadcast over the batch.
    full = jnp.broadcast_to(cond.full, (batch, *cond.full.shape[1:]))
    passes = [(noisy, t, full)]
    if preset.text_only:
        passes.append((noisy, t, jnp.broadcast_to(cond.text_only, full.shape)))
    prior = subject.class_latent_mean is not None
    if prior:
        class_latents, class_noise, class_t = prior_inputs(models, subject, keys)
        class_cond, _ = conditioning.text_conditioning(
            models.idfuse, trainable["idfuse"], encode(subject.class_prompt_ids)
        )
        class_noisy = diffusion.add_noise(models.schedule, class_latents, class_noise, class_t)
        passes.append((class_noisy, class_t, jnp.broadcast_to(class_cond, full.shape)))
    pred = models.unet.apply(
        unet_vars, *(jnp.concatenate(part) for part in zip(*passes, strict=True))
    )
    preds = jnp.split(pred, len(passes))
    eos = clip.eos_positions(subject.prompt_ids, models.text_encoder.config.eos_token_id)
    total, terms = losses.idfuse_loss(
        preds[0],
        preds[1] if preset.text_only else None,
        target,
        jnp.broadcast_to(f_s, (batch, *f_s.shape[1:])),
        cond.image,
        cond.background,
        weights=(
            config.loss.weights
            if subject.loss_weights is None
            else dict(zip(losses.TERMS, subject.loss_weights, strict=True))
        ),
        text_only_weight=presets.text_only_weight(config),
        text_pool=config.loss.text_pool,
        eos_index=jnp.broadcast_to(eos, (batch,)),
        text_trainable=bool(trainable["text_lora"]),
        decouple=decouple,
        terms=preset.terms,
    )
    terms = dict(terms)
    if prior:
        class_target = diffusion.training_target(
            models.schedule, class_latents, class_noise, class_t
        )
        terms["prior"] = losses.mse(preds[-1], class_target)
        total = total + config.prior.weight * terms["prior"]
        terms["loss"] = total
    terms.update(cond.stats)  # router statistics, when the method has the FFM
    return total, terms


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

    `key`: one typed PRNG key (`jax.random.key`) for the whole batch, or a batch [P] of them,
    one per image (its initial noise then does not depend on the batch it is generated in).

    With `reference_embeds` ([1, D_img], E_I of a reference photo) the conditioning is
    FFM(E_T(prompt) + A(E_I(reference))): the background-preserving variant.
    """
    unet_vars, text_vars = model_variables(frozen, trainable, config)
    encode = lambda ids: models.text_encoder.apply(text_vars, ids).last_hidden_state
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
        out = models.unet.apply(unet_vars, jnp.concatenate([x, x]), t, context)
        c, u = jnp.split(out.astype(jnp.float32), 2)
        return u + guidance * (c - u)

    side = config.data.resolution // models.latent_downsample
    shape = (side, side, models.unet.config.in_channels)
    if key.shape:  # one key per image: each image's noise is independent of the batch
        x_t = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(key)
    else:
        x_t = jax.random.normal(key, (n, *shape), jnp.float32)
    sampler = diffusion.SAMPLERS[config.sample.sampler]
    latents = sampler(denoise, models.schedule, x_t, config.sample.num_steps)
    z = models.vae.config.from_latents(latents)
    images = models.vae.apply({"params": frozen["vae"]}, z.astype(jnp.float32), method="decode")
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
