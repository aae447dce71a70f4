"""All 30 DreamBench subjects in one job: the subject axis, with the SD 2.1-base setup of dog.py.

  python -m idfuse_jax.train --config configs/dreambench.py --workdir runs/dreambench \
      --config.model.pretrained=weights/sd21-base \
      --config.model.image_encoder=weights/clip-vit-h-14 \
      --config.data.instance_dir=data/dreambooth

data.instance_dir is a DreamBooth-layout folder (one sub-folder of photos per subject and
prompts_and_classes.txt, which gives each subject's class and kind); weights as in dog.py. Every
subject gets its own LoRA, adapter, FFM, optimiser state, data order and metrics, stacked along
a leading subject axis of one jitted step and split over the mesh's "subject" axis (-1: every
device; 30 subjects on 8 GPUs are padded to 32 slots, 2 of which never train). Live subjects
(dogs, cats) take 1000 steps, objects 2000 (DisenBooth's recipe): the job runs 2000 steps and a
live subject stops updating, and is exported, at its step 1000. `--config.data.subjects=dog,cat2`
trains some of them.

Memory per device grows with the subjects on it (each holds its own state and LoRA-merged
kernels). Before paying for a slice, compile the run for it here:
  python -m idfuse_jax.compile_check --config configs/dreambench.py --target v5e-32 \
      --config.model.pretrained=weights/sd21-base \
      --config.model.image_encoder=weights/clip-vit-h-14
(any target of idfuse_jax/targets.py: 8xh100, v5e-8, ...; README "Mesh shapes and memory per
device"). On one GPU, train parts of the benchmark with --config.data.subjects=NAME,..., each
with its own --workdir.

What to expect: runs/dreambench/subjects/NAME/ holds what a single-subject workdir holds
(config.json of the subject as if trained alone, metrics.jsonl, TensorBoard, samples/step_N.png,
prepared/, idfuse_weights.safetensors, idfuse_lora.safetensors); checkpoints/ (all subjects) is
at the top. Subject s ends with the weights it would have trained alone with the same seed.
Then, for every subject at once:
  python -m idfuse_jax.evaluate --workdir runs/dreambench --dino weights/dino-vits16 \
      --clip weights/clip-vit-base-patch32

On a CPU, `configs/dreambench.py:tiny` trains tiny random models on four synthetic subjects
named after DreamBench subjects (two live for 6 steps, two objects for 10), in about two minutes
on 2 cores; `--dreambench DIR` lets evaluate score them against those subjects' real photos:
  python -m idfuse_jax.train --config configs/dreambench.py:tiny --workdir runs/dreambench_tiny
  python -m idfuse_jax.sample --workdir runs/dreambench_tiny/subjects/dog \
      --prompt "a {token} {class_name} in the snow"
"""

from idfuse_jax.config_lib import sibling_module

TINY_SUBJECTS = "dog:dog,cat:cat,backpack:backpack,teapot:teapot"


def get_config(arg: str | None = None):
    if arg not in (None, "tiny"):
        raise ValueError(f"configs/dreambench.py takes no argument or 'tiny', not {arg!r}")
    if arg == "tiny":
        c = sibling_module(__file__, "smoke").get_config()
        c.data.subjects = TINY_SUBJECTS
        c.train.steps = 6
        c.train.object_steps = 10
        c.train.batch_size = 1
        c.train.checkpoint_every = 5
        c.train.sample_every = 100  # each subject samples at its last step
    else:
        c = sibling_module(__file__, "dog").get_config()
        c.data.instance_dir = "data/dreambooth"
        c.data.subjects = "all"
    # Batch 1 per subject (the paper's): subjects, not examples, fill the devices.
    c.mesh.subject = -1
    c.mesh.data = 1
    return c
