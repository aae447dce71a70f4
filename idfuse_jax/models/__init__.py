"""Flax modules: Stable Diffusion UNet and VAE, CLIP towers, ViT, and the IdFuse method's parts.

Conventions shared by every module here:
- NHWC images, [batch, tokens, width] sequences.
- Submodule names mirror the PyTorch reference's state-dict names, with list indices joined
  (`down_blocks.0` -> `down_blocks_0`), so `idfuse_jax.weights.convert_state_dict` loads them.
- Parameters are float32; `dtype` sets the compute dtype (e.g. jnp.bfloat16).
"""
