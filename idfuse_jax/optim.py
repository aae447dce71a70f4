"""The optimiser: AdamW with optional global-norm clipping, and the learning-rate schedule."""

from __future__ import annotations

import ml_collections
import optax

SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(optim: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
    if optim.schedule == "constant":
        decay = optax.constant_schedule(optim.learning_rate)
    else:
        decay = optax.cosine_decay_schedule(optim.learning_rate, max(steps - optim.warmup_steps, 1))
    if optim.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps)
    return optax.join_schedules([warmup, decay], [optim.warmup_steps])


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
