"""Backgrounds by a Stable Diffusion inpainting model (UNet in_channels 9), run with our modules.

Follows diffusers' StableDiffusionInpaintPipeline at strength 1: the UNet sees
[noisy latents, mask at latent size, latents of the photo with the hole zeroed], DDIM sampling
with classifier-free guidance against `negative_prompt`, then the VAE decodes. Two deliberate
differences: the masked photo's latent is the VAE posterior mean (diffusers samples it), so the
result depends only on `seed`; and the photo is resized so its long side is `size` (sides
rounded to the model's granularity), inpainted, resized back, and pasted into the dilated hole
only, so the rest of the photo keeps its own pixels.
"""

from __future__ import annotations

import pathlib
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from idfuse_jax import diffusion, weights
from idfuse_jax.errors import DataError
from idfuse_jax.prepare.keys import folder_fingerprint
from idfuse_jax.prepare.masks import dilate, dilation_pixels

PathLike = str | pathlib.Path


class SDInpainter:
    """`(image uint8 [H, W, 3], mask {0,1} [H, W]) -> background uint8 [H, W, 3]`."""

    def __init__(
        self,
        folder: PathLike,
        *,
        prompt: str = "background",
        negative_prompt: str = "",
        steps: int = 50,
        guidance_scale: float = 7.5,
        size: int = 512,
        seed: int = 0,
        dilate: float = 0.02,
        dtype: Any = jnp.float32,
    ):
        self.folder = pathlib.Path(folder)
        unet_config = weights.read_config(weights.component_dir(self.folder, "unet"))
        if unet_config.get("in_channels") != 9:
            raise DataError(
                f"{self.folder}: UNet has in_channels {unet_config.get('in_channels')}; SD "
                "inpainting needs an inpainting model (in_channels 9)"
            )
        self.prompt, self.negative_prompt, self.dtype = prompt, negative_prompt, dtype
        self.steps, self.guidance_scale, self.size = steps, guidance_scale, size
        self.seed, self.dilate = seed, dilate
        self._loaded = False
        # The cache key needs no weights: a run whose backgrounds are all cached loads nothing.
        self.key = (
            f"sd(model={folder_fingerprint(self.folder)},prompt={prompt!r},"
            f"negative={negative_prompt!r},steps={steps},guidance={guidance_scale},size={size},"
            f"seed={seed},dilate={dilate},dtype={jnp.dtype(dtype).name})"
        )

    def _load(self) -> None:
        """Load the models and encode the prompts, once, when the first photo needs them."""
        if self._loaded:
            return
        dtype = self.dtype
        self.unet, unet_params = weights.load_unet(self.folder, dtype=dtype)
        self.vae, vae_params = weights.load_vae(self.folder, dtype=dtype)
        text, text_params = weights.load_clip_text(self.folder, dtype=dtype)
        tokenizer = weights.load_tokenizer(self.folder)
        self.schedule = diffusion.load_schedule(self.folder)
        self.scale = 2 ** (len(self.vae.config.block_out_channels) - 1)  # VAE downsampling
        # Photo sides are multiples of this: the VAE's factor times the UNet's down-sampling.
        self.granularity = self.scale * 2 ** (len(self.unet.config.block_out_channels) - 1)
        prompts = [self.negative_prompt, self.prompt] if self.guided else [self.prompt]
        context = jax.jit(text.apply)({"params": text_params}, tokenizer(prompts))
        self.params = {
            "unet": unet_params,
            "vae": vae_params,
            "context": context.last_hidden_state.astype(jnp.float32),
        }
        self._generate = jax.jit(self._generate_impl)
        self._loaded = True

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1  # as diffusers: no CFG at guidance <= 1

    def _generate_impl(
        self, params: dict, image: jax.Array, mask: jax.Array, noise: jax.Array
    ) -> jax.Array:
        """image [1,H,W,3] in [-1,1], mask [1,H,W,1] in {0,1}, noise [1,h,w,C] -> [1,H,W,3]."""
        vae, cfg = self.vae, self.vae.config
        mean, _ = vae.apply({"params": params["vae"]}, image * (mask < 0.5), method=vae.encode)
        masked_latents = cfg.to_latents(mean.astype(jnp.float32))
        small_mask = mask[:, :: self.scale, :: self.scale].astype(jnp.float32)  # nearest
        context = params["context"]
        copies = context.shape[0]

        def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
            inputs = jnp.concatenate([x, small_mask, masked_latents], axis=-1)
            out = self.unet.apply(
                {"params": params["unet"]}, jnp.repeat(inputs, copies, axis=0), t, context
            ).astype(jnp.float32)
            if not self.guided:
                return out
            uncond, cond = out[:1], out[1:]
            return uncond + self.guidance_scale * (cond - uncond)

        latents = diffusion.ddim_sample(denoise, self.schedule, noise, self.steps)
        decoded = vae.apply({"params": params["vae"]}, cfg.from_latents(latents), method=vae.decode)
        return decoded.astype(jnp.float32)

    def generate(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The model's picture, float32 [H, W, 3] in [-1, 1], for a photo already sized for it:
        `image` float [H, W, 3] in [-1, 1], `mask` [H, W] (1 = fill); H, W multiples of
        `granularity`. The starting noise comes from `seed`."""
        self._load()
        h, w = mask.shape
        if h % self.granularity or w % self.granularity:
            raise DataError(f"SD inpainting: size {w}x{h} is not a multiple of {self.granularity}")
        shape = (1, h // self.scale, w // self.scale, self.vae.config.latent_channels)
        noise = jax.random.normal(jax.random.key(self.seed), shape, jnp.float32)
        out = self._generate(
            self.params,
            jnp.asarray(image, jnp.float32)[None],
            jnp.asarray(mask, jnp.float32)[None, ..., None],
            noise,
        )
        return np.asarray(out[0])

    def _work_shape(self, h: int, w: int) -> tuple[int, int]:
        scale = self.size / max(h, w)
        g = self.granularity
        return tuple(max(g, round(side * scale / g) * g) for side in (h, w))

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        hole = dilate(mask, dilation_pixels(mask.shape, self.dilate))
        if not hole.any():
            return image.copy()
        self._load()
        h, w = image.shape[:2]
        wh, ww = self._work_shape(h, w)
        small = cv2.resize(image, (ww, wh), interpolation=cv2.INTER_AREA)
        small_hole = cv2.resize(hole.astype(np.float32), (ww, wh), interpolation=cv2.INTER_LINEAR)
        small_hole = (small_hole > 0).astype(np.float32)  # cover every pixel the hole touches
        out = self.generate(small.astype(np.float32) / 127.5 - 1, small_hole)
        out = np.clip(np.round((out + 1) * 127.5), 0, 255).astype(np.uint8)
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_CUBIC)
        return np.where(hole[..., None] > 0, out, image)
