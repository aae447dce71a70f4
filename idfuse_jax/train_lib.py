"""The training program: state, the sharded jitted step, and the loop with checkpoints and logs.

`train_and_evaluate(config, workdir)` is everything `python -m idfuse_jax.train` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
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
    losses,
    method,
    metrics,
    optim,
    paths,
    resources,
    sharding,
)
from idfuse_jax import subject as subject_lib
from idfuse_jax.errors import NonFiniteError
from idfuse_jax.types import Params


@flax.struct.dataclass
class TrainState:
    """One subject's training state; in a job every leaf has a leading subject axis."""

    step: jax.Array  # the steps this subject has taken
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
    active: jax.Array | bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on a batch of (augmented) subject images given by `indices`.

    An inactive subject (one that has taken all its steps) keeps its state as it is.
    """
    keys = example_keys(key, state.step, indices.shape[0])

    loss_fn = lambda trainable: method.training_loss(
        models, config, frozen, trainable, subject, indices, keys
    )
    (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    healthy = state.healthy & (finite | jnp.logical_not(active))
    update = healthy & active
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # Skip the update (keep the last good state) once anything is non-finite, or once done.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(update, n, o), new, old)
    new_state = TrainState(
        step=jnp.where(update, state.step + 1, state.step),
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


def subjects_step(
    state: TrainState,
    frozen: Params,
    subjects: method.SubjectFeatures,
    indices: jax.Array,
    key: jax.Array,
    num_steps: jax.Array,
    *,
    models: build.Models,
    config: ml_collections.ConfigDict,
    spmd_axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step of every subject of a job: `train_step` mapped over the leading subject axis of
    `state`, `subjects`, `indices` [S, B] and `num_steps` [S]; frozen weights and the key are
    shared, so subject s follows exactly the run it would have alone with the same seed.

    Subject s trains while state.step[s] < num_steps[s], which also sets the length of its
    learning-rate schedule; then its state stays as it is while longer subjects go on.

    `spmd_axis_name`: the mesh axis the subject axis is split over, when jitted over a mesh
    (kernels under a shard_map inside then keep each subject on its own devices).
    """

    def one(state, subject, indices, num_steps):
        schedule = optim.learning_rate_schedule(config.optim, num_steps)
        optimizer = optim.make_optimizer(config.optim, schedule)
        return train_step(
            state,
            frozen,
            subject,
            indices,
            key,
            models=models,
            config=config,
            optimizer=optimizer,
            schedule=schedule,
            active=state.step < num_steps,
        )

    return jax.vmap(one, spmd_axis_name=spmd_axis_name)(state, subjects, indices, num_steps)


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


def jit_subjects_step(
    models: build.Models,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    frozen_shardings: Any,
    gather_metrics: bool = True,
):
    """`subjects_step` jitted as training runs it: the state, features and step lengths split
    over "subject", each subject's batch over the batch axes, frozen weights as placed, the key
    replicated; the state donated. Metrics come back whole on every process (each host reads
    every subject's, a few scalars each: the step's only collective on a subject-only mesh),
    or with `gather_metrics=False` split over "subject" like the state."""
    per_subject, replicated = sharding.subject_sharding(mesh), sharding.replicated(mesh)
    step = functools.partial(subjects_step, models=models, config=config, spmd_axis_name="subject")
    return sharding.jit_on(
        mesh,
        step,
        sharding.BATCH_AXES,
        in_shardings=(
            per_subject,
            frozen_shardings,
            per_subject,
            sharding.subject_batch_sharding(mesh),
            replicated,
            per_subject,
        ),
        out_shardings=(per_subject, replicated if gather_metrics else per_subject),
        donate_argnums=(0,),
    )


def model_flops(jitted_for: Callable[[build.Models], Any], models: build.Models, args) -> float:
    """FLOPs of a step's math: `jitted_for(models)` lowered (not compiled) with materialised
    attention. XLA's cost analysis counts a loop's body once (blockwise attention's key and
    query loops) and a fused kernel's custom call (cuDNN, Pallas) not at all, so the compiled
    step's own count misses most of the attention; MFU counts this instead."""
    cost = jitted_for(models.with_attention("xla")).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def subject_batches(
    iterators: list[Iterator[np.ndarray]], lengths: list[int], batch_size: int, step: int
) -> np.ndarray:
    """[S, B] indices of job step `step` (0-based): subject s draws from its own iterator while
    step < lengths[s], and gets (unused) zeros after; padding slots past the iterators too."""
    rows = [
        np.asarray(next(iterators[s]), np.int32)
        if s < len(iterators) and step < length
        else np.zeros((batch_size,), np.int32)
        for s, length in enumerate(lengths)
    ]
    return np.stack(rows)


# --------------------------------------------------------------------------------------------
# Validation samples


def make_sampler(
    models: build.Models,
    config: ml_collections.ConfigDict,
    frozen: dict[str, Params],
    params: dict[str, Params],
    runs: list[subject_lib.SubjectRun],
    mesh: jax.sharding.Mesh,
):
    """A function (frozen, params, s) -> uint8 grid of one image per validation prompt of
    subject s, whose trainable weights are `params`' slot s along the subject axis.

    Compiled ahead of time for arguments laid out like `frozen` and `params`, so that a sampler
    that cannot compile or fit fails before training starts, not hundreds of steps in. Every
    process calls it (it is one program over the mesh); each gets the whole grid.
    """
    replicated = sharding.replicated(mesh)
    prompts = [method.format_prompts(run.config, config.sample.prompts) for run in runs]
    prompt_ids = np.stack([np.asarray(models.tokenizer(p)) for p in prompts])  # [R, P, T]
    prompt_ids = sharding.put(prompt_ids, replicated)
    index = lambda s: sharding.put(np.int32(s), replicated)
    fn = jit_sampler(models, config, mesh)
    compiled = fn.lower(frozen, params, prompt_ids, index(0)).compile()

    def sample(frozen: dict[str, Params], params: dict[str, Params], s: int) -> np.ndarray:
        images = metrics.to_uint8(jax.device_get(compiled(frozen, params, prompt_ids, index(s))))
        return metrics.image_grid(images, columns=len(config.sample.prompts))

    return sample


def jit_sampler(
    models: build.Models,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    null_ids: np.ndarray | None = None,
):
    """(frozen, params, prompt_ids [R, P, T], s) -> images [P, R, R, 3] of subject s (slot s of
    `params`' subject axis, prompts `prompt_ids[s]`), jitted over `mesh`, the images whole on
    every device. `null_ids` [1, T]: the empty prompt's ids (default: from the tokenizer)."""
    if null_ids is None:
        null_ids = np.asarray(models.tokenizer([""]))
    key = jax.random.key(config.sample.seed)

    def generate(frozen, params, prompt_ids, s):
        trainable = _take(params, s)
        return method.generate(models, config, frozen, trainable, prompt_ids[s], null_ids, key)

    return sharding.jit_on(mesh, generate, out_shardings=sharding.replicated(mesh))


def _take(tree: Any, s: jax.Array) -> Any:
    return jax.tree.map(lambda x: x[s], tree)


def subject_slice(params: Params, s: int, mesh: jax.sharding.Mesh) -> Params:
    """Slot s of trees with a leading subject axis, whole on every device (every process calls
    it: on several hosts the subject's shard may live on another's devices)."""
    replicated = sharding.replicated(mesh)
    return jax.jit(_take, out_shardings=replicated)(params, sharding.put(np.int32(s), replicated))


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


def _compile(step_fn, args, flops: float, logger_prefix: str = "train step"):
    """AOT-compile and log compile seconds, `flops` (model FLOPs per step per device) and the
    memory analysis."""
    start = time.perf_counter()
    compiled = step_fn.lower(*args).compile()
    seconds = time.perf_counter() - start
    logging.info(
        "%s compiled in %.1f s; %.3e model FLOPs per step per device", logger_prefix, seconds, flops
    )
    with contextlib.suppress(Exception):  # memory analysis is best effort on some backends
        memory = compiled.memory_analysis()
        logging.info(
            "%s memory per device: arguments %.1f MiB, outputs %.1f MiB, temporaries %.1f MiB",
            logger_prefix,
            memory.argument_size_in_bytes / 2**20,
            memory.output_size_in_bytes / 2**20,
            memory.temp_size_in_bytes / 2**20,
        )
    return compiled, seconds


def _meta(config: ml_collections.ConfigDict, step: int, data_states: list) -> dict[str, Any]:
    """Checkpoint metadata: the job step, each subject's data iterator state, the config."""
    return {"step": step, "data_iterators": data_states, "config": json.loads(config.to_json())}


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
    """Refuse to resume with settings that would silently change the data order or the
    subjects, or from a checkpoint of a version without the subject axis."""
    saved = meta.get("config", {})
    keys = (("train", "batch_size"), ("", "seed"), ("data", "subjects"), ("loss", "sweep"))
    for section, key in keys:
        old = saved.get(section, {}).get(key, "") if section else saved.get(key)
        new = config[section][key] if section else config[key]
        if old is not None and old != new:
            name = f"{section}.{key}" if section else key
            raise config_lib.ConfigError(
                f"config.{name}={new} differs from the checkpoint's {old}; resume with the same "
                "value or use a new --workdir"
            )
    if "data_iterators" not in meta:
        raise config_lib.ConfigError(
            "the checkpoint was written by an older version of idfuse_jax (one subject, no "
            "subject axis); it cannot be resumed: use a new --workdir"
        )


@dataclasses.dataclass
class _Reporter:
    """Reads one step's metrics (a step late, so the device never waits for the host), stops on
    non-finite values, and writes each subject's logs and the progress bar.

    Step time is the interval between two consecutive metric fetches: in steady state, the time
    the device spends on one step (of every subject at once).
    """

    config: ml_collections.ConfigDict
    runs: list[subject_lib.SubjectRun]
    writers: list[metrics.MetricsWriter]
    progress: Any
    flops: float | None
    peak_tflops: float | None
    last_fetch: float = dataclasses.field(default_factory=time.perf_counter)

    def __call__(self, step: int, out: dict[str, jax.Array]) -> None:
        host = jax.device_get(out)  # every leaf [S, ...]
        now = time.perf_counter()
        seconds, self.last_fetch = now - self.last_fetch, now
        timing = {"step_seconds": seconds, "steps_per_second": 1.0 / seconds if seconds else 0.0}
        if self.flops:
            tflops = self.flops / seconds / 1e12  # model FLOPs (see model_flops)
            timing["tflops_per_device"] = tflops
            timing["mfu"] = tflops / self.peak_tflops if self.peak_tflops else None
        losses = []
        for s, (run, writer) in enumerate(zip(self.runs, self.writers, strict=True)):
            if step > run.steps:  # done: its state no longer changes
                continue
            scalars = _host_scalars({k: v[s] for k, v in host.items()})
            if not scalars.pop("healthy"):
                where = f" of subject {run.name}" if run.name else ""
                raise NonFiniteError(
                    f"non-finite loss or gradient{where} at step {step} "
                    f"({_format_terms(scalars)}); stopped, the last good checkpoint is kept"
                )
            losses.append(scalars["loss"])
            if step % self.config.train.log_every == 0 or step == run.steps:
                writer.write(step, {**scalars, **timing})
        self.progress.set_postfix(
            loss=f"{np.mean(losses):.4f}", steps_per_s=f"{timing['steps_per_second']:.2f}"
        )
        self.progress.update(1)

    def restart_clock(self) -> None:
        """Exclude checkpointing, sampling and export time from the next step's time."""
        self.last_fetch = time.perf_counter()


def initial_state(
    config: ml_collections.ConfigDict,
    models: build.Models,
    frozen: Params,
    count: int,
    mesh: jax.sharding.Mesh,
) -> tuple[TrainState, jax.Array]:
    """(initial train state of `count` subjects, stacked along a leading subject axis and split
    over "subject"; the key of the per-step randomness, replicated).

    Every subject starts where it would start alone with the same seed. Computed by one jitted
    program that every process runs: a mesh spanning processes takes no host-to-device copies
    from a single process.
    """
    return init_program(config, models, count, mesh)(frozen)


def init_program(
    config: ml_collections.ConfigDict, models: build.Models, count: int, mesh: jax.sharding.Mesh
) -> jax.stages.Wrapped:
    """`initial_state`'s program, jitted: frozen -> (state of `count` subjects, step key)."""
    optimizer = optim.make_optimizer(
        config.optim, optim.learning_rate_schedule(config.optim, config.train.steps)
    )

    def init(frozen):
        init_key, step_key = jax.random.split(jax.random.key(config.seed))
        trainable = method.init_trainable(init_key, models, config, frozen)
        state = init_train_state(trainable, optimizer)
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (count, *x.shape)), state)
        return stacked, step_key

    out_shardings = (sharding.subject_sharding(mesh), sharding.replicated(mesh))
    return jax.jit(init, out_shardings=out_shardings)


def _write_configs(
    config: ml_collections.ConfigDict, runs: list[subject_lib.SubjectRun], workdir: paths.Path
) -> None:
    """WORKDIR/config.json: the job's config (one subject: its resolved config); in a job of
    several, also WORKDIR/subjects/NAME/config.json, each subject's config as if trained
    alone, which `sample` and `evaluate` read."""
    job = config if runs[0].name else runs[0].config
    paths.write_text(workdir / "config.json", job.to_json_best_effort(indent=2))
    for run in runs:
        if run.name:
            paths.write_text(run.workdir / "config.json", run.config.to_json_best_effort(indent=2))


def _subject_features(
    runs: list[subject_lib.SubjectRun],
    models: build.Models,
    frozen: Params,
    sweep: bool = False,
) -> list[method.SubjectFeatures]:
    features = []
    for run in runs:
        subject = subject_lib.prepare_subject_features(run.config, models, frozen, run.workdir)
        if sweep:  # each slot's own loss weights, as arrays the one program maps over
            weights = [run.config.loss.weights[k] for k in losses.TERMS]
            subject = subject.replace(loss_weights=jnp.asarray(weights, jnp.float32))
        logging.info(
            "subject %s: %d training images (with flips), %d with explicit decoupling, %d steps",
            run.name or run.config.data.instance_dir,
            subject.num_items,
            int(np.sum(subject.decouple)),
            run.steps,
        )
        features.append(subject)
    return features


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: paths.PathLike) -> None:
    """Train the job's subjects; resume from workdir's latest checkpoint if there is one.

    `workdir` may be local or gs://; every output goes there, and nothing else is shared
    between the processes of a multi-host job.
    """
    config_lib.validate(config)
    workdir = paths.as_path(workdir)
    if config.data.instance_dir != "synthetic":
        paths.as_path(config.data.instance_dir)  # a gs:// folder without gcsfs: refused now
    sharding.maybe_initialize_distributed(config.multihost)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, subject=config.mesh.subject)
    sharding.check_batch_size(config.train.batch_size, mesh)
    runs = subject_lib.subject_runs(config, workdir)
    # The subject axis is padded to a multiple of its mesh size with slots that never train.
    count = -(-len(runs) // mesh.shape["subject"]) * mesh.shape["subject"]
    lengths = [run.steps for run in runs] + [0] * (count - len(runs))
    total_steps = max(lengths)
    logging.info(
        "mesh %s over %d processes; %d subject(s)%s, %d steps",
        dict(mesh.shape),
        jax.process_count(),
        len(runs),
        f" (+{count - len(runs)} idle slots)" if count > len(runs) else "",
        total_steps,
    )
    # A resume that will be refused fails now, in seconds, before any model is built (and
    # before config.json is replaced).
    mngr = checkpoint.manager(workdir / "checkpoints", config.train.keep_checkpoints)
    try:
        meta = checkpoint.latest_meta(mngr)
        if meta is not None:
            _check_resumable(meta, config)
    except BaseException:
        mngr.close()
        raise
    is_main = jax.process_index() == 0
    if is_main:
        _write_configs(config, runs, workdir)

    # Frozen weights stream from disk to their fsdp shards, one tensor at a time.
    with resources.phase("load"):
        models, frozen = build.build_models(config, lazy=True)
        frozen = sharding.put(frozen, sharding.fsdp_shardings(frozen, mesh))
        jax.block_until_ready(frozen)
    features = _subject_features(runs, models, frozen, sweep=bool(config.loss.sweep))
    del frozen["image"]  # the image encoder's work is done: free its memory
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    subject_sharding = sharding.subject_sharding(mesh)
    subjects = sharding.reshard(method.stack_subjects(features, count), subject_sharding)
    num_steps = sharding.put(np.asarray(lengths, np.int32), subject_sharding)

    state, step_key = initial_state(config, models, frozen, count, mesh)
    step_for = lambda models: jit_subjects_step(models, config, mesh, frozen_shardings)

    iterators = [
        index_iterator(f.num_items, config.train.batch_size, config.seed, run.steps)
        for f, run in zip(features, runs, strict=True)
    ]
    restored = checkpoint.restore_latest(mngr, state)
    start_step = 0
    if restored is not None:
        start_step, state, meta = restored
        for iterator, data_state in zip(iterators, meta["data_iterators"], strict=True):
            iterator.set_state(data_state)
        logging.info("resuming from the checkpoint at step %d in %s", start_step, mngr.directory)
        print(f"Resuming from step {start_step} ({mngr.directory})", flush=True)

    batch_size = config.train.batch_size
    example_indices = sharding.global_batch(np.zeros((count, batch_size), np.int32), mesh)
    args = (state, frozen, subjects, example_indices, step_key, num_steps)
    with resources.phase("compile"):
        flops = model_flops(step_for, models, args) / mesh.size
        compiled, compile_seconds = _compile(step_for(models), args, flops)
        sampler = make_sampler(models, config, frozen, state.params, runs, mesh)
    writers = [metrics.MetricsWriter(run.workdir, resume_step=start_step) for run in runs]
    for writer, subject in zip(writers, features, strict=True):
        writer.write(
            start_step,
            {
                "compile_seconds": compile_seconds,
                "flops_per_step_per_device": flops,
                # training images (with flips) with L3, L4
                "explicit_images": int(np.sum(subject.decouple)),
            },
        )
    progress = _progress_bar(is_main, start_step, total_steps)
    peak = metrics.peak_tflops(jax.devices()[0].device_kind, config.train.peak_tflops_per_device)
    report = _Reporter(config, runs, writers, progress, flops, peak)

    def save(step: int) -> None:
        data_states = [iterator.get_state() for iterator in iterators]
        checkpoint.save(mngr, step, state, _meta(config, step, data_states))

    def sample(step: int, s: int) -> None:
        grid = sampler(frozen, state.params, s)
        if is_main:
            path = metrics.save_png(runs[s].workdir / "samples" / f"step_{step}.png", grid)
            writers[s].write_image(step, "samples", grid)
            logging.info("samples written to %s", path)

    def export_subject(s: int) -> None:
        trainable = jax.device_get(subject_slice(state.params, s, mesh))
        if is_main:
            for exported in export.export_run(trainable, runs[s].workdir, runs[s].config):
                size = exported.stat().length / 2**20
                print(f"Exported trainable weights: {exported} ({size:.2f} MiB)", flush=True)

    any_process = sharding.any_process(mesh)
    # Everything is compiled: from here on no process can be late to a collective by a compile.
    sharding.sync_processes("idfuse_jax: ready to train")
    pending: tuple[int, dict[str, jax.Array]] | None = None
    stop = _StopFlag()
    step = start_step
    try:
        with _stop_on_signals(stop), resources.phase(f"steps {start_step}-{total_steps}"):
            check_every = config.train.stop_check_every
            while step < total_steps and not _should_stop(stop, step, check_every, any_process):
                batch = subject_batches(iterators, lengths, batch_size, step)
                indices = sharding.global_batch(batch, mesh)
                state, out = compiled(state, frozen, subjects, indices, step_key, num_steps)
                step += 1
                if pending is not None:  # the previous step, read while this one runs
                    report(*pending)
                pending = (step, out)
                checkpoint_now = step % config.train.checkpoint_every == 0 or step == total_steps
                every = config.train.sample_every
                sampling = [
                    s
                    for s, run in enumerate(runs)
                    if step == run.steps or (step < run.steps and step % every == 0)
                ]
                if checkpoint_now or sampling:
                    report(*pending)  # never checkpoint a state that has not been checked
                    pending = None
                    for s in sampling:
                        if step == runs[s].steps:  # done: export before any later checkpoint
                            export_subject(s)
                    if checkpoint_now:
                        save(step)
                    for s in sampling:
                        sample(step, s)
                    report.restart_clock()
            if pending is not None:
                report(*pending)
        if step < total_steps:  # stopped by a signal
            if mngr.latest_step() != step:
                save(step)
            mngr.wait_until_finished()
            print(
                f"Received {stop.signal_name or 'a stop signal on another process'}: saved a "
                f"checkpoint at step {step}; rerun the same command to resume.",
                flush=True,
            )
    finally:
        mngr.wait_until_finished()
        mngr.close()
        for writer in writers:
            writer.close()
        progress.close()


def _progress_bar(enabled: bool, start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)
