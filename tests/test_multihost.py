"""Two processes on this machine train together as a multi-host job does on a TPU slice or GPU
nodes: a coordinator on 127.0.0.1, 4 CPU devices per process, one mesh over all 8, CPU
collectives across processes (gloo), started through `launch/gpu_node.sh` as users start them.
As on a TPU slice, they share no local disk: the workdir and the photo folder are gs:// paths
on a GCS emulator (tests/gcs_emulator.py); process 0 prepares the photos and the others read
its output through the workdir.

They must give what one process with the same 8-device mesh gives, write logs and samples from
process 0 alone, and stop together with a checkpoint when one of them gets SIGTERM (sent as it
draws a given step's batch: tests/signal_on_draw.py). The cloud workdir is then resumed by one
process and evaluated.
"""

import json
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np
import pytest
import test_evaluate
from gcs_emulator import free_port
from safetensors.numpy import load
from test_train import REPO, TINY, _command, _env, exported, metrics, ok, train

from idfuse_jax import losses
from idfuse_jax.data import dreambench
from idfuse_jax.data.synthetic import write_synthetic_subject

STEPS = 6
STOP_EVERY = 2
SAMPLE_EVERY = 2
SIGTERM_AT = 3  # process 1 gets SIGTERM drawing step 3's batch: both stop at step 4
# The mesh of test_train's sharded run (its compiled programs are reused from the cache: 4
# photos and their flips are as many training images as the synthetic subject's); "data"
# spans the two processes, "fsdp" the 4 devices of each.
RUN = (
    f"--config.train.steps={STEPS}",
    f"--config.train.stop_check_every={STOP_EVERY}",
    "--config.train.checkpoint_every=1000",
    f"--config.train.sample_every={SAMPLE_EVERY}",
    "--config.sample.num_steps=2",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=4",
    "--config.data.class_name=dog",
)
PREFIX = "multihost"  # gs://bucket/multihost/...


def _start(
    workdir: pathlib.Path | str,
    logs: pathlib.Path,
    *overrides,
    env: dict[str, str] | None = None,
    rank_env: Sequence[dict[str, str]] = ({}, {}),
) -> list[subprocess.Popen]:
    """Both processes of one job, through launch/gpu_node.sh, with stdout/stderr in `logs`;
    `env` replaces the test environment of 4 CPU devices, `rank_env[r]` adds to process r's."""
    logs.mkdir(parents=True, exist_ok=True)
    coordinator = f"127.0.0.1:{free_port()}"
    processes = []
    for rank in range(2):
        process_env = dict(env or _env(4))
        process_env.update(
            PYTHON=sys.executable, COORDINATOR=coordinator, NUM_NODES="2", NODE_RANK=str(rank)
        )
        process_env.update(rank_env[rank])
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
                    env=process_env,
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


def _signal_python(folder: pathlib.Path) -> str:
    """An interpreter for launch/gpu_node.sh's PYTHON: this one, through signal_on_draw.py."""
    script = folder / "python"
    script.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests" / "signal_on_draw.py"}" "$@"\n'
    )
    script.chmod(0o755)
    return str(script)


def _cloud_rows(gcs, prefix: str) -> list[dict]:
    rows = [json.loads(line) for line in gcs.read(f"{prefix}/metrics.jsonl").splitlines()]
    return [r for r in rows if "loss" in r]


def _cloud_checkpoints(gcs, prefix: str) -> list[int]:
    names = gcs.names(f"{prefix}/checkpoints")
    return sorted({int(n.split("/")[0]) for n in names if n.split("/")[0].isdigit()})


@pytest.fixture(scope="module")
def photos(tmp_path_factory, gcs, dreambooth_dir) -> tuple[pathlib.Path, str]:
    """(local folder, the same on gs://): a DreamBooth-layout folder with one subject, 4
    photos with their masks (no GrabCut needed), and the DreamBench prompts file."""
    root = tmp_path_factory.mktemp("photos")
    write_synthetic_subject(root / "dog", 4, 40, 3, with_masks=True)
    shutil.copy(dreambooth_dir / dreambench.PROMPTS_FILE, root / dreambench.PROMPTS_FILE)
    return root / "dog", gcs.upload_folder(root, f"{PREFIX}/photos") + "/dog"


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, photos) -> pathlib.Path:
    """The reference: one process, 8 devices, the same mesh and global batch, local files."""
    workdir = tmp_path_factory.mktemp("single")
    ok(train(workdir, *RUN, f"--config.data.instance_dir={photos[0]}", devices=8))
    return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, gcs, photos) -> tuple[str, pathlib.Path, int]:
    """A two-process job on gs:// stopped by SIGTERM to process 1 alone.

    Returns (the workdir's prefix in the bucket, logs, the step it stopped at). On CPU, a
    process other than 0 compiles every program itself on every run (its compilation cache
    keys differ from process 0's, which alone writes the cache), so the test runs one
    two-process job, not two.
    """
    root = tmp_path_factory.mktemp("two")
    prefix, logs = f"{PREFIX}/run", root / "logs"
    processes = _start(
        f"gs://bucket/{prefix}",
        logs,
        *RUN,
        f"--config.data.instance_dir={photos[1]}",
        env=gcs.env(_env(4)),
        # Process 1 runs through signal_on_draw.py (launch/gpu_node.sh's $PYTHON).
        rank_env=({}, {"SIGTERM_AT_BATCH": str(SIGTERM_AT), "PYTHON": _signal_python(root)}),
    )
    _wait(processes, logs)
    return prefix, logs, _cloud_checkpoints(gcs, prefix)


def test_sigterm_to_one_process_stops_both_at_the_same_step(two_processes):
    _, logs, checkpoints = two_processes
    # Agreement happens every STOP_EVERY steps: the signal during step 3 stops both at step 4.
    assert checkpoints == [4]
    assert "Received SIGTERM: saved a checkpoint at step 4" in _stdout(logs, 1)
    assert "Received a stop signal on another process: saved a checkpoint at step 4" in _stdout(
        logs, 0
    )


def test_only_process_0_writes_logs_and_samples_and_all_to_the_cloud(two_processes, gcs):
    prefix, logs, _ = two_processes
    names = gcs.names(prefix)
    # Every step logged once (two writers would repeat rows), one TensorBoard event file.
    assert [r["step"] for r in _cloud_rows(gcs, prefix)] == [1, 2, 3, 4]
    assert len([n for n in names if n.startswith("tensorboard/events.out.tfevents.")]) == 1
    assert [n for n in names if n.startswith("samples/")] == ["samples/step_2.png",
                                                              "samples/step_4.png"]  # fmt: skip
    assert "config.json" in names
    # Process 0 prepared the photos into the workdir; process 1 read them from there.
    assert {"prepared/manifest.json", "prepared/preview.png", "prepared/masks/00.png",
            "prepared/backgrounds/03.png"} <= set(names)  # fmt: skip
    assert "samples written" in (logs / "0.err").read_text()
    assert "samples written" not in (logs / "1.err").read_text()
    assert not (REPO / "gs:").exists()  # no local folder named after the URL


@pytest.fixture(scope="module")
def resumed(two_processes, gcs) -> tuple[str, subprocess.CompletedProcess]:
    """The stopped job, copied within the bucket and resumed there by one process."""
    prefix, _, _ = two_processes
    workdir = gcs.copy(prefix, f"{PREFIX}/resumed")
    result = subprocess.run(
        _command(workdir, *RUN, f"--config.data.instance_dir=gs://bucket/{PREFIX}/photos/dog"),
        env=gcs.env(_env(8)), capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    return f"{PREFIX}/resumed", ok(result)


def test_two_processes_match_one_process_and_resume(two_processes, resumed, single_process, gcs):
    """Losses of the two-process steps equal the one-process run's; its checkpoint, resumed by
    one process to the end, gives the one-process run's parameters."""
    prefix, _, _ = two_processes
    two, one = _cloud_rows(gcs, prefix), metrics(single_process)
    assert [r["step"] for r in one] == list(range(1, STEPS + 1))
    for term in ("loss", *losses.TERMS, "grad_norm"):
        np.testing.assert_allclose(
            [r[term] for r in two], [r[term] for r in one[:4]], rtol=1e-4, atol=1e-6,
            err_msg=term,
        )  # fmt: skip
    resumed_prefix, result = resumed
    assert "Resuming from step 4" in result.stdout
    assert [r["step"] for r in _cloud_rows(gcs, resumed_prefix)] == list(range(1, STEPS + 1))
    a = load(gcs.read(f"{resumed_prefix}/idfuse_weights.safetensors"))
    b = exported(single_process)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert "idfuse_lora.safetensors" in gcs.names(resumed_prefix)
    assert _cloud_checkpoints(gcs, resumed_prefix) == [4, STEPS]


metric_dirs = test_evaluate.metric_dirs  # the tiny DINO and CLIP folders (a fixture)


def test_cloud_workdir_is_evaluated_in_the_cloud(resumed, gcs, metric_dirs):
    """evaluate reads the run (config, weights, the photos beside the prompts file) from gs://
    and writes its images and report there."""
    prefix, _ = resumed
    flags = test_evaluate.metric_flags(metric_dirs)
    # test_evaluate's settings and device count: its compiled programs come from the cache.
    result = subprocess.run(
        [sys.executable, "-m", "idfuse_jax.evaluate", f"--workdir=gs://bucket/{prefix}", *flags,
         *test_evaluate.SMALL],
        env=gcs.env(_env(8)), capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    ok(result)
    assert f"report in gs://bucket/{prefix}/eval/results.md" in result.stdout
    names = gcs.names(f"{prefix}/eval")
    assert {"images/dog/01_0.png", "images/dog/01_1.png", "results.json", "results.md",
            "grids/dog.png"} <= set(names)  # fmt: skip
    results = json.loads(gcs.read(f"{prefix}/eval/results.json"))
    assert results["inputs"]["out"] == f"gs://bucket/{prefix}/eval"
    sub = results["subjects"]["dog"]
    assert sub["real_dir"] == f"gs://bucket/{PREFIX}/photos/dog" and sub["num_real"] == 4
    assert not (REPO / "gs:").exists()
