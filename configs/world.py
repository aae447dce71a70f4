"""A ToyBench subject on the world's shipped tiny Stable Diffusion: learning you can see, on a CPU.

  python -m idfuse_jax.train --config configs/world.py --workdir runs/world
  python -m idfuse_jax.train --config configs/world.py:yellow_checked_box --workdir runs/box

No files are needed: the model is the one shipped in idfuse_jax/assets/world (32 px, trained
from scratch on the procedural world by tools/pretrain_world.py) and the subject's five photos
(and their exact masks and backgrounds) are rendered in-process from `idfuse_jax.data.world`
(default: red_striped_ball, photographed on sand, grass, brick, wood and road). The identifier
binds the instance to "sks"; samples/ shows it in the prompts' contexts. Score it on ToyBench:

  python -m idfuse_jax.data.world --out runs/toybench
  python -m idfuse_jax.evaluate --workdir runs/world --toybench runs/toybench --num_images 2
"""

from idfuse_jax.assets import WORLD_IMAGE_ENCODER, WORLD_SD
from idfuse_jax.config_lib import sibling_module
from idfuse_jax.data import world


def get_config(subject: str = "red_striped_ball"):
    toy = world.toy_subject(subject)
    c = sibling_module(__file__, "default").get_config()
    c.model.pretrained = str(WORLD_SD)
    c.model.image_encoder = str(WORLD_IMAGE_ENCODER)
    c.model.dtype = "float32"  # bfloat16 matmuls are emulated, hence slow, on CPUs
    c.data.instance_dir = world.PREFIX + toy.name
    c.data.class_name = toy.instance.shape
    c.data.prompt = "a {token} {class_name}"  # the world's captions have no "photo of"
    c.data.resolution = 32
    c.data.min_size = 0
    c.optim.learning_rate = 1e-3
    c.train.steps = 200
    c.train.batch_size = 8
    c.train.log_every = 10
    c.train.checkpoint_every = 200
    c.train.sample_every = 200
    c.sample.num_steps = 12
    c.sample.guidance_scale = 4.0
    c.sample.prompts = tuple(
        f"a {{token}} {{class_name}} {world.PLACES[p][0]}"
        for p in ("snow", "water", "fabric", "sand")
    )
    return c
