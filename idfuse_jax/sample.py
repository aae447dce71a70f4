"""Generate images of a trained subject from a training workdir.

  python -m idfuse_jax.sample --workdir runs/dog --prompt "a {token} {class_name} in the snow" \
      --prompt "a {token} {class_name} on the moon" --num_images 4

Reads WORKDIR/config.json (models, token, class) and WORKDIR/idfuse_weights.safetensors (the
trained LoRA, adapter and FFM); writes one row of `--num_images` images per prompt to `--out`
(default WORKDIR/samples/sample.png); WORKDIR and --out may be local or gs://.
`--reference PHOTO` keeps that photo's background (FFM(E_T(prompt) + A(E_I(reference)))).
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from idfuse_jax import build, cli, config_lib, export, method, metrics, paths, subject
from idfuse_jax.data import images as images_lib
from idfuse_jax.errors import ConfigError

flags.DEFINE_string(
    "workdir", None, "A training workdir (config.json, idfuse_weights.safetensors)."
)
flags.DEFINE_multi_string("prompt", None, "Prompt; {token} and {class_name} are filled in.")
flags.DEFINE_integer("num_images", 4, "Images per prompt.")
flags.DEFINE_string("reference", None, "Optional photo whose background the images keep.")
flags.DEFINE_integer("num_steps", None, "Sampler steps (default: the run's sample.num_steps).")
flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance (default: the run's).")
flags.DEFINE_integer("seed", 0, "Seed of the initial noise.")
flags.DEFINE_string("out", None, "Output PNG (default WORKDIR/samples/sample.png).")
flags.mark_flags_as_required(["workdir", "prompt"])


def sample_images(
    workdir: paths.PathLike,
    prompts: list[str],
    *,
    num_images: int = 4,
    reference: str | None = None,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """uint8 images [len(prompts) * num_images, R, R, 3], prompt-major."""
    workdir = paths.as_path(workdir)
    config = config_lib.load_run_config(workdir)
    if config.data.subjects or config.loss.get("sweep"):
        folder = workdir / subject.SUBJECTS_DIR
        names = sorted(p.parent.name for p in folder.glob("*/config.json"))
        raise ConfigError(
            f"{workdir} is a job of several subjects: pass --workdir {folder}/NAME "
            f"(NAME one of {', '.join(names) or 'none yet'})"
        )
    if num_steps is not None:
        config.sample.num_steps = num_steps
    if guidance_scale is not None:
        config.sample.guidance_scale = guidance_scale
    models, frozen = build.build_models(config)
    template = method.init_trainable(jax.random.key(0), models, config, frozen)
    trainable = export.import_trainable(workdir / "idfuse_weights.safetensors", template)
    d = config.data
    texts = method.format_prompts(config, prompts)
    ids = jnp.asarray(models.tokenizer([t for t in texts for _ in range(num_images)]))
    null_ids = jnp.asarray(models.tokenizer([""]))
    reference_embeds = None
    if reference is not None:
        photo = images_lib.resize_crop(images_lib.read_image(reference), d.resolution)
        size = models.image_encoder.config.image_size
        pixels = subject.clip_pixels(photo[None], size)
        reference_embeds = models.image_encoder.apply({"params": frozen["image"]}, pixels)
        reference_embeds = reference_embeds.image_embeds
    fn = jax.jit(
        lambda f, t, key, ref: method.generate(models, config, f, t, ids, null_ids, key, ref)
    )
    images = fn(frozen, trainable, jax.random.key(seed), reference_embeds)
    return metrics.to_uint8(jax.device_get(images))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    images = cli.run_or_fail(
        sample_images,
        f.workdir,
        f.prompt,
        num_images=f.num_images,
        reference=f.reference,
        num_steps=f.num_steps,
        guidance_scale=f.guidance_scale,
        seed=f.seed,
    )
    out = f.out or paths.as_path(f.workdir) / "samples" / "sample.png"
    out = cli.run_or_fail(metrics.save_png, out, metrics.image_grid(images, columns=f.num_images))
    print(f"Wrote {len(images)} images to {out}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
