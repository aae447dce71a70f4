"""The paper's setup on the DreamBooth dog: SD 2.1-base + OpenCLIP ViT-H/14, LoRA, IEDM, FFM.

Weights (no hub access at run time; fetch them once, on a machine with internet):
  - Stable Diffusion 2.1-base, diffusers pipeline folder with safetensors
    (`stabilityai/stable-diffusion-2-1-base` on the Hugging Face hub):
      huggingface-cli download stabilityai/stable-diffusion-2-1-base --local-dir weights/sd21-base
  - OpenCLIP ViT-H/14 image encoder in transformers' format, projection width 1024 = SD 2.1's text
    width (`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`; config.json + model.safetensors suffice):
      huggingface-cli download laion/CLIP-ViT-H-14-laion2B-s32B-b79K config.json \
          model.safetensors --local-dir weights/clip-vit-h-14
  - The DreamBooth dataset (google/dreambooth on GitHub); this config reads its dog/ folder.
Whole-repo downloads work as they are: from each model folder only the file its library loads is
read (`diffusion_pytorch_model.safetensors`, `model.safetensors`); .bin, .ckpt, fp16 variants and
open_clip's files are ignored with one log line (`--config.model.variant=fp16` reads the fp16
files instead).

Run (one device; on N devices also set --config.train.batch_size to a multiple of N, and
--config.mesh.fsdp=N to shard the frozen weights over them):
  python -m idfuse_jax.train --config configs/dog.py --workdir runs/dog \
      --config.model.pretrained=weights/sd21-base \
      --config.model.image_encoder=weights/clip-vit-h-14 \
      --config.data.instance_dir=data/dreambooth/dog

Variants: `configs/dog.py:SUBJECT[,CLASS]` trains another DreamBench subject, e.g.
`--config configs/dog.py:cat2,cat` or `--config configs/dog.py:teapot,teapot` (objects get
DisenBooth's 2000 steps instead of 1000).

What to expect: masks and backgrounds are prepared once (runs/dog/prepared/, with preview.png),
then 1000 steps at batch 1 (DisenBooth's recipe), loss terms in runs/dog/metrics.jsonl and
TensorBoard, sample grids of the dog in new scenes in runs/dog/samples/step_N.png every 250 steps,
checkpoints in runs/dog/checkpoints/, and at the end two exports: idfuse_weights.safetensors
(everything trained: 46.1 MiB, of which the FFM 32.1, the adapter 8.0, the LoRA 6.0) and
idfuse_lora.safetensors (the LoRA alone, 6.0 MiB, for diffusers' load_lora_weights;
examples/diffusers_sample.py samples the subject in diffusers). The total loss is dominated by
the noisy diffusion term and drifts down only slowly; judge the run by the samples.

Memory and time (the log prints time, host and device memory per start-up phase: load, prepare,
features, compile, steps). Loading streams the frozen weights to the devices tensor by tensor:
7.2 GiB of them in float32, 3.7 GiB with --config.model.weights_dtype=bfloat16; on the project's
2-core CPU the load took 49 s / 32 s with a host peak of 7.5 / 4.1 GiB (there the device memory
is host memory; the earlier all-at-once loader peaked at 14.7 GiB in float32;
benchmarks/bench_load.py). Measured when the batch-1 and hub-layout problems were reported, not
re-measured since: a 3-step float32 run at 256 px, batch 2, on that CPU compiled in 45 s and took
22-29 s a step with 6.9 GB of XLA temporaries. No accelerator figures yet: train at 512 px in
bfloat16 (the default model.dtype) on a GPU or TPU.
"""

from idfuse_jax.config_lib import sibling_module


def get_config(arg: str | None = None):
    subject, _, class_name = (arg or "dog").partition(",")
    class_name = class_name or "dog"
    c = sibling_module(__file__, "default").get_config()
    c.model.pretrained = "weights/sd21-base"
    c.model.image_encoder = "weights/clip-vit-h-14"
    c.model.dtype = "bfloat16"
    c.data.instance_dir = f"data/dreambooth/{subject}"
    c.data.class_name = class_name
    c.data.resolution = 512
    c.train.steps = 1000  # DisenBooth's recipe: dogs and cats
    c.train.object_steps = 2000  # everything else
    c.train.batch_size = 1
    return c
