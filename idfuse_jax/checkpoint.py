"""Checkpoints with orbax: trainable state (sharded arrays) plus JSON metadata.

Metadata holds the step, the data iterator's state and the config, so a rerun of the same
command resumes exactly where the last checkpoint left off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import flags

from idfuse_jax import paths


def manager(directory: paths.PathLike, keep: int) -> ocp.CheckpointManager:
    """Every process calls this, and then save/restore/wait, alike; process 0 writes metadata.

    Several processes: orbax's barriers go through jax's coordination service (host only, with
    timeouts) rather than device collectives, which would wait for the steps in flight.
    `directory` may be local or gs:// (orbax writes array data with tensorstore, the rest with
    epath; on gs:// it marks a finished checkpoint with a commit file instead of renaming).
    """
    if jax.process_count() > 1 and flags.FLAGS.is_parsed():
        flags.FLAGS.experimental_orbax_use_distributed_barrier = True
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(paths.absolute(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Save asynchronously; `mngr.wait_until_finished()` before the process exits."""
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )


def latest_meta(mngr: ocp.CheckpointManager) -> dict[str, Any] | None:
    """The JSON metadata of the latest checkpoint (no array is read), or None if there is none:
    enough to refuse a resume before anything is built."""
    step = mngr.latest_step()
    if step is None:
        return None
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore_latest(
    mngr: ocp.CheckpointManager,
    abstract_state: Any,
    check_meta: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the latest checkpoint, laid out like `abstract_state`, or None.

    `abstract_state` leaves are arrays or jax.ShapeDtypeStruct with shardings: restored arrays
    land directly on the devices the train step expects. `check_meta` sees the metadata first
    and may refuse it (by raising) before any array is read.
    """
    step = mngr.latest_step()
    if step is None:
        return None
    if check_meta is not None:
        check_meta(latest_meta(mngr))
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
    )
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
    )
    return step, restored.state, restored.meta
