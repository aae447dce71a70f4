"""Two processes on this machine train together as a multi-host job does on a TPU slice or GPU
nodes: a coordinator on 127.0.0.1, 4 CPU devices per process, one mesh over all 8, CPU
collectives across processes (gloo), started through `launch/gpu_node.sh` as users start them.

They must give what one process with the same 8-device mesh gives, write logs, samples and
exports from process 0 alone, and stop together with a checkpoint when one of them gets SIGTERM.
"""

import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from test_train import REPO, TINY, _env, checkpoint_steps, exported, metrics, ok, train

STEPS = 6
STOP_EVERY = 2
# The mesh of test_train's sharded run (its compiled programs are reused from the cache); "data"
# spans the two processes, "fsdp" the 4 devices of each.
RUN = (
    f"--config.train.steps={STEPS}",
    f"--config.train.stop_check_every={STOP_EVERY}",
    "--config.train.checkpoint_every=1000",
    "--config.sample.num_steps=2",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=4",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir: pathlib.Path, logs: pathlib.Path, *overrides) -> list[subprocess.Popen]:
    """Both processes of one job, through launch/gpu_node.sh, with stdout/stderr in `logs`."""
    logs.mkdir(parents=True, exist_ok=True)
    coordinator = f"127.0.0.1:{_free_port()}"
    processes = []
    for rank in range(2):
        env = _env(4)
        env.update(
            PYTHON=sys.executable,
            COORDINATOR=coordinator,
            NUM_NODES="2",
            NODE_RANK=str(rank),
        )
        command = [
            "bash",
            str(REPO / "launch" / "gpu_node.sh"),
            "--config",
            TINY,
            "--workdir",
            str(workdir),
            *overrides,
        ]
        with (logs / f"{rank}.out").open("w") as out, (logs / f"{rank}.err").open("w") as err:
            processes.append(
                subprocess.Popen(command, env=env, stdout=out, stderr=err, cwd=REPO, text=True)
            )
    return processes


def _wait(processes: list[subprocess.Popen], logs: pathlib.Path, timeout: float = 600) -> None:
    """Wait for both; fail with the tail of each one's stderr unless both exit 0."""
    deadline = time.time() + timeout
    try:
        for p in processes:
            p.wait(timeout=max(deadline - time.time(), 1))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in processes]
    tails = "\n".join(
        f"--- process {r} (exit {c}):\n{(logs / f'{r}.err').read_text()[-2000:]}"
        for r, c in enumerate(codes)
    )
    assert codes == [0, 0], tails


def _stdout(logs: pathlib.Path, rank: int) -> str:
    return (logs / f"{rank}.out").read_text()


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> pathlib.Path:
    """The reference: one process, 8 devices, the same mesh and global batch."""
    workdir = tmp_path_factory.mktemp("single")
    ok(train(workdir, *RUN, devices=8))
    return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path, int]:
    """A two-process job stopped by SIGTERM to process 1 alone, then rerun to the end.

    Returns (workdir, logs of the stopped run, logs of the rerun, the step it stopped at).
    """
    root = tmp_path_factory.mktemp("two")
    workdir, stopped_logs, rerun_logs = root / "run", root / "stopped", root / "rerun"
    processes = _start(workdir, stopped_logs, *RUN)
    deadline = time.time() + 400
    while time.time() < deadline and all(p.poll() is None for p in processes):
        if (workdir / "metrics.jsonl").is_file() and metrics(workdir):
            break
        time.sleep(0.2)
    assert all(p.poll() is None for p in processes), (stopped_logs / "0.err").read_text()[-3000:]
    processes[1].send_signal(signal.SIGTERM)
    _wait(processes, stopped_logs)
    (stop_step,) = checkpoint_steps(workdir)
    _wait(_start(workdir, rerun_logs, *RUN), rerun_logs)
    return workdir, stopped_logs, rerun_logs, stop_step


def test_sigterm_to_one_process_stops_both_at_the_same_step(two_processes):
    _, stopped, _, stop_step = two_processes
    # Agreement happens every STOP_EVERY steps; the signal came after step 1, before the end.
    assert stop_step % STOP_EVERY == 0 and 0 < stop_step < STEPS, stop_step
    assert f"Received SIGTERM: saved a checkpoint at step {stop_step}" in _stdout(stopped, 1)
    assert (
        f"Received a stop signal on another process: saved a checkpoint at step {stop_step}"
        in _stdout(stopped, 0)
    )
    assert "Exported" not in _stdout(stopped, 0) + _stdout(stopped, 1)


def test_rerun_resumes_both_processes(two_processes):
    workdir, _, rerun, stop_step = two_processes
    for rank in range(2):
        assert f"Resuming from step {stop_step}" in _stdout(rerun, rank)
    assert checkpoint_steps(workdir)[-1] == STEPS


def test_only_process_0_writes_logs_samples_and_exports(two_processes):
    workdir, _, rerun, _ = two_processes
    # Every step logged once (two writers would repeat rows), one event file per run.
    assert [r["step"] for r in metrics(workdir)] == list(range(1, STEPS + 1))
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert sorted(p.name for p in (workdir / "samples").iterdir()) == [f"step_{STEPS}.png"]
    assert "Exported trainable weights" in _stdout(rerun, 0)
    assert "Exported trainable weights" not in _stdout(rerun, 1)
    assert "samples written" in (rerun / "0.err").read_text()
    assert "samples written" not in (rerun / "1.err").read_text()
    assert (workdir / "config.json").is_file()


def test_two_processes_match_one_process(two_processes, single_process):
    workdir = two_processes[0]
    two, one = metrics(workdir), metrics(single_process)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    for term in ("loss", "l1", "l2", "l3", "l4", "grad_norm"):
        np.testing.assert_allclose(
            [r[term] for r in two], [r[term] for r in one], rtol=1e-4, atol=1e-6, err_msg=term
        )
    a, b = exported(workdir), exported(single_process)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
