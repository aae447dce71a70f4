"""Files shipped with the package: the world's tiny pretrained Stable Diffusion and ViT.

WORLD_SD is a diffusers StableDiffusionPipeline folder (32 px, 16 x 16 x 4 latents) and
WORLD_IMAGE_ENCODER a transformers CLIPVisionModelWithProjection folder (E_I), both trained from
scratch on `idfuse_jax.data.world` scenes by tools/pretrain_world.py; world/PROVENANCE.md says
how, and world/preview.png shows what it draws. WORLD_VIT is a transformers ViTModel folder (32
px, 4 px patches) trained by tools/pretrain_world_vit.py to name a scene's object: the encoder
of `prepare --masks=dino` on the world (world/vit/PROVENANCE.md).
"""

import pathlib

WORLD = pathlib.Path(__file__).resolve().parent / "world"
WORLD_SD = WORLD / "sd"
WORLD_IMAGE_ENCODER = WORLD / "image_encoder"
WORLD_VIT = WORLD / "vit"
