"""The training program: state, the sharded jitted step, and the loop with checkpoints and logs.

`train_and_evaluate(config, workdir)` is everything `python -m idfuse_jax.train` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import pathlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from idfuse_jax import (
    build,
    checkpoint,
    config_lib,
    export,
    method,
    metrics,
    optim,
    resources,
    sharding,
)
from idfuse_jax import subject as subject_lib
from idfuse_jax.errors import NonFiniteError
from idfuse_jax.types import Params


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Params  # trainable only: {"unet_lora", "text_lora", "idfuse"}
    opt_state: optax.OptState
    # False from the first non-finite step on: later updates are skipped, so the state stays the
    # last good one however far the host lags behind the device.
    healthy: jax.Array


# --------------------------------------------------------------------------------------------
# State


def init_train_state(trainable: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=trainable,
        opt_state=optimizer.init(trainable),
        healthy=jnp.ones((), jnp.bool_),
    )


# --------------------------------------------------------------------------------------------
# The step


def example_keys(key: jax.Array, step: jax.Array, batch_size: int) -> jax.Array:
    """One key per example of the global batch, from (seed key, step, position in the batch).

    Independent of how many devices share the batch: device count never enters the derivation.
    """
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(batch_size))


def train_step(
    state: TrainState,
    frozen: Params,
    subject: method.SubjectFeatures,
    indices: jax.Array,
    key: jax.Array,
    *,
    models: build.Models,
    config: ml_collections.ConfigDict,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on a batch of (augmented) subject images given by `indices`."""
    keys = example_keys(key, state.step, indices.shape[0])

    loss_fn = lambda trainable: method.training_loss(
        models, config, frozen, trainable, subject, indices, keys
    )
    (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    healthy = state.healthy & jnp.isfinite(total) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # Skip the update (keep the last good state) once anything is non-finite.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(healthy, n, o), new, old)
    new_state = TrainState(
        step=jnp.where(healthy, state.step + 1, state.step),
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
        healthy=healthy,
    )
    out = {
        "loss": total,
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step),
        "healthy": healthy,
        **terms,
    }
    return new_state, out


# --------------------------------------------------------------------------------------------
# Data order: a grain iterator over the augmented images, checkpointed with the state


def index_iterator(
    num_items: int, batch_size: int, seed: int, num_steps: int
) -> Iterator[np.ndarray]:
    """`num_steps` batches of shuffled indices into the precomputed per-image arrays.

    Each epoch is reshuffled and batches run across epoch boundaries. The repeat is finite:
    grain 0.2.18 computes an endless repeat's batched length as ceil(sys.maxsize / batch_size)
    in floating point, which overflows at batch size 1. The order does not depend on `num_steps`
    (a run resumed with more steps continues the same sequence), and the iterator's state is
    its next batch index.
    """
    epochs = max(1, math.ceil(num_steps * batch_size / num_items))
    dataset = grain.MapDataset.range(num_items).seed(seed).shuffle().repeat(epochs)
    dataset = dataset.batch(batch_size)
    # A stream of small ints: no prefetch threads needed.
    read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return iter(dataset.to_iter_dataset(read))


# --------------------------------------------------------------------------------------------
# Validation samples


def make_sampler(
    models: build.Models,
    config: ml_collections.ConfigDict,
    frozen: dict[str, Params],
    trainable: dict[str, Params],
    out_sharding: jax.sharding.Sharding | None = None,
):
    """A function (frozen, trainable) -> uint8 grid of one image per validation prompt.

    Compiled ahead of time for arguments laid out like `frozen` and `trainable`, so that a
    sampler that cannot compile or fit fails before training starts, not hundreds of steps in.
    """
    prompts = method.format_prompts(config, config.sample.prompts)
    prompt_ids = jnp.asarray(models.tokenizer(prompts))
    null_ids = jnp.asarray(models.tokenizer([""]))
    key = jax.random.key(config.sample.seed)
    fn = jax.jit(
        lambda f, t: method.generate(models, config, f, t, prompt_ids, null_ids, key),
        out_shardings=out_sharding,
    )
    compiled = fn.lower(frozen, trainable).compile()

    def sample(frozen: dict[str, Params], trainable: dict[str, Params]) -> np.ndarray:
        images = metrics.to_uint8(jax.device_get(compiled(frozen, trainable)))
        return metrics.image_grid(images, columns=len(prompts))

    return sample


# --------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the next step boundary."""

    signal_name: str | None = None

    def __call__(self, signum, frame):
        self.signal_name = signal.Signals(signum).name


def _should_stop(
    flag: _StopFlag, step: int, check_every: int, any_process: Callable[[bool], bool]
) -> bool:
    """Whether any process got a signal: all processes must stop (and save) at the same step.

    A lone process reads its own flag at every step. Several processes agree only at steps that
    are multiples of `check_every`, all at the same steps: the agreement is a collective, so the
    host waits there for the device to finish the steps in flight, which it must not do every step.
    """
    if jax.process_count() == 1:
        return flag.signal_name is not None
    if step % check_every:
        return False
    return any_process(flag.signal_name is not None)


@contextlib.contextmanager
def _stop_on_signals(flag: _StopFlag):
    previous = {s: signal.signal(s, flag) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _compile(step_fn, args, logger_prefix: str = "train step"):
    """AOT-compile and log compile seconds, FLOPs per step and the memory analysis."""
    start = time.perf_counter()
    compiled = step_fn.lower(*args).compile()
    seconds = time.perf_counter() - start
    flops = None
    with contextlib.suppress(Exception):  # cost analysis is best effort on some backends
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        flops = float(cost.get("flops", 0.0)) or None
    logging.info(
        "%s compiled in %.1f s; %s FLOPs per step per device",
        logger_prefix,
        seconds,
        f"{flops:.3e}" if flops else "unknown",
    )
    with contextlib.suppress(Exception):
        memory = compiled.memory_analysis()
        logging.info(
            "%s memory per device: arguments %.1f MiB, outputs %.1f MiB, temporaries %.1f MiB",
            logger_prefix,
            memory.argument_size_in_bytes / 2**20,
            memory.output_size_in_bytes / 2**20,
            memory.temp_size_in_bytes / 2**20,
        )
    return compiled, seconds, flops


def _meta(config: ml_collections.ConfigDict, step: int, data_state: dict) -> dict[str, Any]:
    return {"step": step, "data_iterator": data_state, "config": json.loads(config.to_json())}


def _host_scalars(out: dict[str, jax.Array]) -> dict[str, Any]:
    host = jax.device_get(out)
    scalars = {}
    for key, value in host.items():
        value = np.asarray(value)
        if value.ndim == 0:
            scalars[key] = float(value)
        else:  # per-expert router weights
            scalars.update({f"{key}/{i}": float(v) for i, v in enumerate(value.reshape(-1))})
    return scalars


def _format_terms(scalars: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in scalars.items() if not k.startswith("router"))


def _check_resumable(meta: dict[str, Any], config: ml_collections.ConfigDict) -> None:
    """Refuse to resume with settings that would silently change the data order."""
    saved = meta.get("config", {})
    for section, key in (("train", "batch_size"), ("", "seed")):
        old = saved.get(section, {}).get(key) if section else saved.get(key)
        new = config[section][key] if section else config[key]
        if old is not None and old != new:
            name = f"{section}.{key}" if section else key
            raise config_lib.ConfigError(
                f"config.{name}={new} differs from the checkpoint's {old}; resume with the same "
                "value or use a new --workdir"
            )


@dataclasses.dataclass
class _Reporter:
    """Reads one step's metrics (a step late, so the device never waits for the host), stops on
    non-finite values, and writes logs and the progress bar.

    Step time is the interval between two consecutive metric fetches: in steady state, the time
    the device spends on one step.
    """

    config: ml_collections.ConfigDict
    writer: metrics.MetricsWriter
    progress: Any
    flops: float | None
    peak_tflops: float | None
    last_fetch: float = dataclasses.field(default_factory=time.perf_counter)

    def __call__(self, step: int, out: dict[str, jax.Array]) -> None:
        scalars = _host_scalars(out)
        now = time.perf_counter()
        seconds, self.last_fetch = now - self.last_fetch, now
        if not scalars.pop("healthy"):
            raise NonFiniteError(
                f"non-finite loss or gradient at step {step} ({_format_terms(scalars)}); stopped, "
                "the last good checkpoint is kept"
            )
        scalars["step_seconds"] = seconds
        scalars["steps_per_second"] = 1.0 / seconds if seconds > 0 else math.inf
        if self.flops:
            tflops = self.flops / seconds / 1e12  # cost analysis of the partitioned program
            scalars["tflops_per_device"] = tflops
            scalars["mfu"] = tflops / self.peak_tflops if self.peak_tflops else None
        if step % self.config.train.log_every == 0 or step == self.config.train.steps:
            self.writer.write(step, scalars)
        self.progress.set_postfix(
            loss=f"{scalars['loss']:.4f}", steps_per_s=f"{scalars['steps_per_second']:.2f}"
        )
        self.progress.update(1)

    def restart_clock(self) -> None:
        """Exclude checkpointing and sampling time from the next step's time."""
        self.last_fetch = time.perf_counter()


def _initial_state(
    config: ml_collections.ConfigDict,
    models: build.Models,
    frozen: Params,
    optimizer: optax.GradientTransformation,
    out_sharding: jax.sharding.Sharding,
) -> tuple[TrainState, jax.Array]:
    """(initial train state, the key of the per-step randomness), both placed by `out_sharding`.

    Computed by one jitted program that every process runs: a mesh spanning processes takes
    no host-to-device copies from a single process.
    """

    def init(frozen):
        init_key, step_key = jax.random.split(jax.random.key(config.seed))
        trainable = method.init_trainable(init_key, models, config, frozen)
        return init_train_state(trainable, optimizer), step_key

    return jax.jit(init, out_shardings=out_sharding)(frozen)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> None:
    """Train one subject; resume from workdir's latest checkpoint if there is one."""
    config_lib.validate(config)
    workdir = pathlib.Path(workdir)
    sharding.maybe_initialize_distributed(config.multihost)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    sharding.check_batch_size(config.train.batch_size, mesh)
    logging.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    # Frozen weights stream from disk to their fsdp shards, one tensor at a time.
    with resources.phase("load"):
        models, frozen = build.build_models(config, lazy=True)
        frozen = sharding.put(frozen, sharding.fsdp_shardings(frozen, mesh))
        jax.block_until_ready(frozen)
    replicated = sharding.replicated(mesh)
    subject = subject_lib.prepare_subject_features(config, models, frozen, workdir)
    explicit_images = int(np.sum(subject.decouple))
    logging.info(
        "subject: %d training images (with flips), %d with explicit decoupling",
        subject.num_items,
        explicit_images,
    )
    del frozen["image"]  # the image encoder's work is done: free its memory
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)

    schedule = optim.learning_rate_schedule(config.optim, config.train.steps)
    optimizer = optim.make_optimizer(config.optim, schedule)
    state, step_key = _initial_state(config, models, frozen, optimizer, replicated)
    subject = sharding.replicate(subject, mesh)

    step_fn = jax.jit(
        functools.partial(
            train_step, models=models, config=config, optimizer=optimizer, schedule=schedule
        ),
        in_shardings=(
            replicated,
            frozen_shardings,
            replicated,
            sharding.batch_sharding(mesh),
            replicated,
        ),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )

    mngr = checkpoint.manager(workdir / "checkpoints", config.train.keep_checkpoints)
    data_iter = index_iterator(
        subject.num_items, config.train.batch_size, config.seed, config.train.steps
    )
    restored = checkpoint.restore_latest(mngr, state)
    start_step = 0
    if restored is not None:
        start_step, state, meta = restored
        _check_resumable(meta, config)
        data_iter.set_state(meta["data_iterator"])
        logging.info("resuming from the checkpoint at step %d in %s", start_step, mngr.directory)
        print(f"Resuming from step {start_step} ({mngr.directory})", flush=True)

    example_indices = sharding.global_batch(np.zeros((config.train.batch_size,), np.int32), mesh)
    with resources.phase("compile"):
        compiled, compile_seconds, flops = _compile(
            step_fn, (state, frozen, subject, example_indices, step_key)
        )
        sampler = make_sampler(models, config, frozen, state.params, replicated)
    writer = metrics.MetricsWriter(workdir, resume_step=start_step)
    writer.write(
        start_step,
        {
            "compile_seconds": compile_seconds,
            "flops_per_step_per_device": flops,
            "explicit_images": explicit_images,  # training images (with flips) with L3, L4
        },
    )
    progress = _progress_bar(is_main, start_step, config.train.steps)
    peak = metrics.peak_tflops(jax.devices()[0].device_kind, config.train.peak_tflops_per_device)
    report = _Reporter(config, writer, progress, flops, peak)

    def save(step: int) -> None:
        checkpoint.save(mngr, step, state, _meta(config, step, data_iter.get_state()))

    def sample(step: int) -> None:
        grid = sampler(frozen, state.params)
        if is_main:
            path = metrics.save_png(workdir / "samples" / f"step_{step}.png", grid)
            writer.write_image(step, "samples", grid)
            logging.info("samples written to %s", path)

    any_process = sharding.any_process(mesh)
    # Everything is compiled: from here on no process can be late to a collective by a compile.
    sharding.sync_processes("idfuse_jax: ready to train")
    pending: tuple[int, dict[str, jax.Array]] | None = None
    stop = _StopFlag()
    step = start_step
    try:
        with _stop_on_signals(stop), resources.phase(f"steps {start_step}-{config.train.steps}"):
            check_every = config.train.stop_check_every
            while step < config.train.steps and not _should_stop(
                stop, step, check_every, any_process
            ):
                indices = sharding.global_batch(np.asarray(next(data_iter), np.int32), mesh)
                state, out = compiled(state, frozen, subject, indices, step_key)
                step += 1
                if pending is not None:  # the previous step, read while this one runs
                    report(*pending)
                pending = (step, out)
                checkpoint_now = step % config.train.checkpoint_every == 0
                sample_now = step % config.train.sample_every == 0
                if checkpoint_now or sample_now or step == config.train.steps:
                    report(*pending)  # never checkpoint a state that has not been checked
                    pending = None
                    if checkpoint_now or step == config.train.steps:
                        save(step)
                    if sample_now or step == config.train.steps:
                        sample(step)
                    report.restart_clock()
            if pending is not None:
                report(*pending)
        if step < config.train.steps:  # stopped by a signal
            if mngr.latest_step() != step:
                save(step)
            mngr.wait_until_finished()
            print(
                f"Received {stop.signal_name or 'a stop signal on another process'}: saved a "
                f"checkpoint at step {step}; rerun the same command to resume.",
                flush=True,
            )
            return
        if is_main:
            for exported in export.export_run(state.params, workdir, config):
                size = exported.stat().st_size
                print(
                    f"Exported trainable weights: {exported} ({size / 2**20:.2f} MiB)", flush=True
                )
    finally:
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
        progress.close()


def _progress_bar(enabled: bool, start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)
