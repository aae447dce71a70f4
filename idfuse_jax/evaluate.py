r"""DreamBench evaluation of trained subjects: DINO, CLIP-I and CLIP-T beside the published rows.

  python -m idfuse_jax.evaluate --workdir runs/dreambench --dino weights/dino-vits16 \
      --clip weights/clip-vit-base-patch32

--workdir is a training workdir (config.json, idfuse_weights.safetensors) or a folder of them,
one per subject. For each subject: the 25 DreamBench prompts of its kind, --num_images images
per prompt from fixed per-image seeds, with the run's sampler settings unless --num_steps /
--guidance_scale say otherwise, generated in batches split over every device. Writes to --out
(default WORKDIR/eval): images/SUBJECT/PP_K.png, results.json, results.md and
grids/SUBJECT.png. A rerun reuses the images already written (each is checked; a broken one is
drawn again), so an interrupted evaluation continues where it stopped. `--images FOLDER
--dreambench DIR` scores a folder laid out like OUT/images (any method's images) without
generating; `--real_baseline` adds DINO and CLIP-I among the real images of each subject.

Every folder may be local or gs://. `--multihost` (the same command on every host, as training
runs; launch/README.md) generates over every host's devices; process 0 writes and scores.
"""

from absl import app, flags, logging

from idfuse_jax import cli
from idfuse_jax.evaluation.run import evaluate

flags.DEFINE_string("workdir", None, "A training workdir, or a folder of them (one per subject).")
flags.DEFINE_string("dino", None, "A transformers ViTModel folder (facebook/dino-vits16).")
flags.DEFINE_string("clip", None, "A transformers CLIPModel folder (openai/clip-vit-base-patch32).")
flags.DEFINE_string("out", None, "Output folder (default WORKDIR/eval, or beside --images).")
flags.DEFINE_integer("num_images", 4, "Images per prompt (the protocol: 4).")
flags.DEFINE_integer("num_steps", None, "Sampler steps (default: each run's sample.num_steps).")
flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance (default: each run's).")
flags.DEFINE_integer("seed", 0, "Seed from which every image's own seed is derived.")
flags.DEFINE_bool("real_baseline", False, "Also score the real images among themselves.")
flags.DEFINE_string("images", None, "Score this folder (SUBJECT/PP_K.png) without generating.")
flags.DEFINE_string("dreambench", None, "DreamBench folder: real images DIR/SUBJECT, prompts.")
flags.DEFINE_integer("max_prompts", None, "Only the first N prompts (default: all 25).")
flags.DEFINE_integer("batch_size", 4, "Images generated per device per batch.")
flags.DEFINE_bool("multihost", False, "Start jax.distributed: generate over every host's devices.")
flags.mark_flags_as_required(["dino", "clip"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    results = cli.run_or_fail(
        evaluate,
        dino=f.dino,
        clip=f.clip,
        workdir=f.workdir,
        out=f.out,
        num_images=f.num_images,
        num_steps=f.num_steps,
        guidance_scale=f.guidance_scale,
        seed=f.seed,
        real_baseline=f.real_baseline,
        images=f.images,
        dreambench=f.dreambench,
        max_prompts=f.max_prompts,
        batch_size=f.batch_size,
        multihost=f.multihost,
    )
    if results is None:  # another process than 0 of a multi-host evaluation
        return
    o = results["overall"]
    print(
        f"DINO {o['dino']:.3f}  CLIP-I {o['clip_i']:.3f}  CLIP-T {o['clip_t']:.3f} over "
        f"{o['num_images']} images of {o['num_subjects']} subject(s); "
        f"{results['settings']['generated_this_run']} generated this run; report in "
        f"{results['inputs']['out'].rstrip('/')}/results.md",
        flush=True,
    )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
