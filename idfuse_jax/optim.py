"""The optimiser: AdamW with optional global-norm clipping, and the learning-rate schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(
    optim: ml_collections.ConfigDict, steps: int | jax.Array
) -> optax.Schedule:
    """Linear warm-up from 0 over optim.warmup_steps, then constant or a cosine decay to 0 at
    `steps`. `steps` may be traced: each subject of a job decays over its own length."""
    peak, warmup = optim.learning_rate, optim.warmup_steps

    def schedule(count: jax.Array) -> jax.Array:
        count = jnp.asarray(count, jnp.float32)
        if optim.schedule == "constant":
            value = jnp.full_like(count, peak)
        else:
            decay_steps = jnp.maximum(jnp.asarray(steps, jnp.float32) - warmup, 1.0)
            progress = jnp.clip(count - warmup, 0.0, decay_steps) / decay_steps
            value = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        if warmup == 0:
            return value
        return jnp.where(count < warmup, peak * count / warmup, value)

    return schedule


def make_optimizer(
    optim: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    adamw = optax.adamw(
        schedule,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
    )
    if optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
    return adamw
