"""idfuse_jax: identity-preserving subject-driven text-to-image fine-tuning in JAX/Flax."""

__version__ = "0.1.0"
