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

`--toybench DIR` evaluates on ToyBench (`idfuse_jax.data.world.write_toybench`): DIR stands for
--dreambench, and the ground-truth scores (identity, prompt fidelity, background leakage; see
`idfuse_jax.evaluation.toybench`) go to OUT/toybench.md and toybench.json. --dino and --clip are
then optional.

Every folder may be local or gs://. `--multihost` (the same command on every host, as training
runs; launch/README.md) generates over every host's devices; process 0 writes and scores.
"""

from absl import app, flags, logging

from idfuse_jax import cli
from idfuse_jax.evaluation.report import HEADERS
from idfuse_jax.evaluation.run import evaluate

cli.define_evaluation_flags()  # --dino --clip --num_images --num_steps ... (shared with compare)
flags.DEFINE_string("workdir", None, "A training workdir, or a folder of them (one per subject).")
flags.DEFINE_string("out", None, "Output folder (default WORKDIR/eval, or beside --images).")
flags.DEFINE_bool("real_baseline", False, "Also score the real images among themselves.")
flags.DEFINE_string("images", None, "Score this folder (SUBJECT/PP_K.png) without generating.")
flags.DEFINE_string("dreambench", None, "DreamBench folder: real images DIR/SUBJECT, prompts.")
flags.DEFINE_string("toybench", None, "A ToyBench folder: prompts, photos, ground-truth scores.")
flags.DEFINE_bool("multihost", False, "Start jax.distributed: generate over every host's devices.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    results = cli.run_or_fail(
        evaluate,
        workdir=f.workdir,
        out=f.out,
        real_baseline=f.real_baseline,
        images=f.images,
        dreambench=f.dreambench,
        toybench_dir=f.toybench,
        **cli.evaluation_flag_values(),
        multihost=f.multihost,
    )
    if results is None:  # another process than 0 of a multi-host evaluation
        return
    o = results["overall"]
    scores = [f"{HEADERS[k]} {o[k]:.3f}" for k in HEADERS if o[k] is not None]
    if "toybench" in results:
        t = results["toybench"]
        scores += [
            f"{k} {t[k]:.3f}" for k in ("identity", "fidelity", "leakage") if t[k] is not None
        ]
    print(
        f"{'  '.join(scores)} over "
        f"{o['num_images']} images of {o['num_subjects']} subject(s); "
        f"{results['settings']['generated_this_run']} generated this run; report in "
        f"{results['inputs']['out'].rstrip('/')}/results.md",
        flush=True,
    )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
