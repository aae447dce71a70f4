"""Two processes on this machine train together as a multi-host job does on a TPU slice or GPU
nodes: a coordinator on 127.0.0.1, 4 CPU devices per process, one mesh over all 8, CPU
collectives across processes (gloo), started through `launch/gpu_node.sh` as users start them.

They must give what one process with the same 8-device mesh gives, write logs and samples from
process 0 alone, and stop together with a checkpoint when one of them gets SIGTERM.
"""

import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from test_train import REPO, TINY, _env, checkpoint_steps, exported, metrics, ok, train

from idfuse_jax import losses

STEPS = 6
STOP_EVERY = 2
SAMPLE_EVERY = 2
# The mesh of test_train's sharded run (its compiled programs are reused from the cache); "data"
# spans the two processes, "fsdp" the 4 devices of each.
RUN = (
    f"--config.train.steps={STEPS}",
    f"--config.train.stop_check_every={STOP_EVERY}",
    "--config.train.checkpoint_every=1000",
    f"--config.train.sample_every={SAMPLE_EVERY}",
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
                subprocess.Popen(
                    command,
                    env=env,
                    # Under pytest's output capture, an inherited stdin made the processes' gloo
                    # connections time out, every time; with /dev/null they connect.
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=REPO,
                    text=True,
                )
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
def two_processes(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path, int]:
    """A two-process job stopped by SIGTERM to process 1 alone.

    Returns (workdir, logs, the step it stopped at). On CPU, a process other than 0 compiles
    every program itself on every run (its compilation cache keys differ from process 0's, which
    alone writes the cache), so the test runs one two-process job, not two.
    """
    root = tmp_path_factory.mktemp("two")
    workdir, logs = root / "run", root / "logs"
    processes = _start(workdir, logs, *RUN)
    deadline = time.time() + 500
    while time.time() < deadline and all(p.poll() is None for p in processes):
        if (workdir / "metrics.jsonl").is_file() and metrics(workdir):
            break
        time.sleep(0.2)
    assert all(p.poll() is None for p in processes), (logs / "0.err").read_text()[-3000:]
    processes[1].send_signal(signal.SIGTERM)
    _wait(processes, logs)
    (stop_step,) = checkpoint_steps(workdir)
    return workdir, logs, stop_step


def test_sigterm_to_one_process_stops_both_at_the_same_step(two_processes):
    _, logs, stop_step = two_processes
    # Agreement happens every STOP_EVERY steps; the signal came after step 1, before the end.
    assert stop_step % STOP_EVERY == 0 and 0 < stop_step < STEPS, stop_step
    assert f"Received SIGTERM: saved a checkpoint at step {stop_step}" in _stdout(logs, 1)
    assert (
        f"Received a stop signal on another process: saved a checkpoint at step {stop_step}"
        in _stdout(logs, 0)
    )


def test_only_process_0_writes_logs_and_samples(two_processes):
    workdir, logs, stop_step = two_processes
    # Every step logged once (two writers would repeat rows), one TensorBoard event file.
    assert [r["step"] for r in metrics(workdir)] == list(range(1, stop_step + 1))
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    samples = [f"step_{s}.png" for s in range(SAMPLE_EVERY, stop_step + 1, SAMPLE_EVERY)]
    assert sorted(p.name for p in (workdir / "samples").iterdir()) == samples
    assert "samples written" in (logs / "0.err").read_text()
    assert "samples written" not in (logs / "1.err").read_text()
    assert (workdir / "config.json").is_file()


def test_two_processes_match_one_process_and_resume(two_processes, single_process, tmp_path):
    """Losses of the two-process steps equal the one-process run's; its checkpoint, resumed by
    one process to the end, gives the one-process run's parameters."""
    workdir, _, stop_step = two_processes
    two, one = metrics(workdir), metrics(single_process)
    assert [r["step"] for r in one] == list(range(1, STEPS + 1))
    for term in ("loss", *losses.TERMS, "grad_norm"):
        np.testing.assert_allclose(
            [r[term] for r in two],
            [r[term] for r in one[:stop_step]],
            rtol=1e-4,
            atol=1e-6,
            err_msg=term,
        )
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    result = ok(train(resumed, *RUN, devices=8))
    assert f"Resuming from step {stop_step}" in result.stdout
    a, b = exported(resumed), exported(single_process)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
