"""The quickest complete run: random tiny models, the synthetic subject (what most tests run).

  python -m idfuse_jax.train --config configs/smoke.py --workdir runs/smoke

Every code path of a real run (features, step, checkpoints, samples, export) in seconds, on any
machine; nothing is learned that a person could see (configs/tiny.py is the one that learns).

No files are needed: the UNet, VAE and CLIP towers are small random networks and the subject is
generated (a distinctive object on varied backgrounds, with exact masks and backgrounds). What to
expect on 2 CPU cores: about a minute of compilation, then 60 steps at several steps/s; the loss
falls; runs/smoke holds checkpoints/, metrics.jsonl (every loss term, grad norm, router
statistics), tensorboard/, samples/step_60.png (noise-like pictures: the models are random) and
idfuse_weights.safetensors (the trained LoRA, adapter and FFM).
"""

from idfuse_jax.config_lib import sibling_module


def get_config():
    c = sibling_module(__file__, "default").get_config()
    c.model.dtype = "float32"  # bfloat16 matmuls are emulated, hence slow, on CPUs
    c.data.instance_dir = "synthetic"
    c.data.resolution = 32
    c.data.min_size = 0
    c.data.synthetic_images = 4
    c.optim.learning_rate = 1e-3  # tiny random models learn faster than SD at 1e-4
    c.train.steps = 60
    c.train.batch_size = 8
    c.train.log_every = 1
    c.train.checkpoint_every = 30
    c.train.sample_every = 60
    c.sample.num_steps = 8
    c.sample.guidance_scale = 3.0
    return c
