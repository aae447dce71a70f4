"""The first run: a ToyBench subject learned on a CPU in about 2 minutes, no download.

  python -m idfuse_jax.train --config configs/tiny.py --workdir runs/tiny

The model is the tiny Stable Diffusion shipped in idfuse_jax/assets/world (32 px, pretrained on
the procedural world, which never showed it this subject); the subject is ToyBench's
red_striped_ball, its five photos (sand, grass, brick, wood, road) rendered in-process
(`configs/world.py`, here shorter, with a higher learning rate and a smaller batch). Asked for
"a sks ball", the untrained model draws a magenta ball; after these 60 steps it draws a red one
in the prompts' places, new ones included (snow, water, pink fabric), some already striped.
Measured on the shared 2-core CPU (niced, under load): 2 minutes in all, of which 81 s of
compilation and 15 s for the 60 steps; runs/tiny holds checkpoints/, metrics.jsonl,
tensorboard/, samples/step_60.png (one image per place: docs/tiny_samples.png, ToyBench reads
colour right in 7 of 8, 1 of 8 untrained) and the exported weights.

tests/test_learning.py trains exactly this config (plus controls) and fails when it stops
learning the subject. The random-model smoke run the other tests use is configs/smoke.py.
"""

from idfuse_jax.config_lib import sibling_module
from idfuse_jax.data import world


def get_config():
    c = sibling_module(__file__, "world").get_config("red_striped_ball")
    c.optim.learning_rate = 3e-3  # 60 steps: faster than configs/world.py's 1e-3 over 200
    c.train.steps = 60
    c.train.batch_size = 4
    c.train.log_every = 10
    c.train.checkpoint_every = 60
    c.train.sample_every = 60
    # Every place of the world, in ToyBench's order: snow, water and fabric are new to it.
    c.sample.prompts = tuple(f"a {{token}} {{class_name}} {p}" for p, _ in world.PLACES.values())
    return c
