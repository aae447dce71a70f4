"""Subject masks and inpainted backgrounds for a subject folder or a whole DreamBench folder.

  python -m idfuse_jax.prepare data/dreambooth/dog --out runs/dog/prepared
  python -m idfuse_jax.prepare data/dreambooth --out prepared/dreambench   # every subject
  python -m idfuse_jax.prepare data/dreambooth --out P --subjects dog,cat --masks grabcut
  python -m idfuse_jax.prepare gs://bucket/photos/dog --out gs://bucket/prepared/dog

A folder with prompts_and_classes.txt is a DreamBench folder: each subject goes to OUT/<subject>.
Input and output folders may be local or gs://.
"""

from absl import app, flags, logging

from idfuse_jax import cli, paths
from idfuse_jax.data import dreambench
from idfuse_jax.prepare.inpaint import INPAINTERS
from idfuse_jax.prepare.masks import MASK_SOURCES
from idfuse_jax.prepare.run import PrepareResult, prepare_dreambench, prepare_subject

flags.DEFINE_string("out", None, "Output folder (never inside the input).")
flags.DEFINE_enum("masks", "auto", MASK_SOURCES, "Where subject masks come from.")
flags.DEFINE_string("onnx_model", None, "Segmentation .onnx file (masks=onnx).")
flags.DEFINE_string("dino_model", None, "DINO ViT folder, transformers ViTModel (masks=dino).")
flags.DEFINE_enum("inpaint", "telea", INPAINTERS, "How backgrounds are inpainted.")
flags.DEFINE_string("inpaint_model", None, "SD inpainting model folder (inpaint=sd).")
flags.DEFINE_list("subjects", [], "DreamBench subjects to prepare (default: all).")
flags.DEFINE_integer("min_size", 0, "Refuse photos whose shorter side is smaller.")
flags.mark_flag_as_required("out")
FLAGS = flags.FLAGS


def prepare(input_dir: str) -> dict[str, PrepareResult]:
    """Prepare one subject folder, or the (chosen) subjects of a DreamBench folder."""
    input_dir = paths.as_path(input_dir)
    kwargs = dict(
        masks=FLAGS.masks,
        onnx_model=FLAGS.onnx_model,
        dino_model=FLAGS.dino_model,
        inpaint=FLAGS.inpaint,
        inpaint_model=FLAGS.inpaint_model,
        min_size=FLAGS.min_size,
    )
    if (input_dir / dreambench.PROMPTS_FILE).is_file():
        subjects = FLAGS.subjects or None
        return prepare_dreambench(input_dir, FLAGS.out, subjects=subjects, **kwargs)
    return {input_dir.name: prepare_subject(input_dir, FLAGS.out, **kwargs)}


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("expected one INPUT folder (a subject folder or a DreamBench folder)")
    logging.set_verbosity(logging.INFO)
    results = cli.run_or_fail(prepare, argv[1])
    done = sum(len(r.processed) for r in results.values())
    kept = sum(len(r.skipped) for r in results.values())
    print(f"prepared {done} image(s), {kept} already up to date, in {FLAGS.out}")
    rejected = [(f"{s}/{k}", why) for s, r in results.items() for k, why in r.rejected.items()]
    total = done + kept
    print(f"{total - len(rejected)} of {total} image(s) with explicit decoupling")
    for name, why in rejected:
        print(f"  without: {name}: {why}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
