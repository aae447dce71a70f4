"""The training program end to end, run as users run it: `python -m idfuse_jax.train ...`.

Each run is a subprocess (its own device count, signals, exit code); all share the persistent
compilation cache, so repeated shapes compile once.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from idfuse_jax import losses

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "smoke.py")  # random tiny models; configs/tiny.py: the world
# A short run: 3 steps, a checkpoint each step, a 2-step sampler at the end.
SHORT = (
    "--config.train.steps=3",
    "--config.train.checkpoint_every=1",
    "--config.train.keep_checkpoints=3",
    "--config.sample.num_steps=2",
)
TERMS = (
    "loss",
    *losses.TERMS,
    "denoise_full",
    "denoise_text_only",
    "grad_norm",
    "learning_rate",
    "router_entropy",
    "router_weight/0",
    "step_seconds",
)


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    inherited = [  # the test session's (conftest), less its device count
        f for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]  # fmt: skip
    env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}", *inherited])
    env["JAX_COMPILATION_CACHE_DIR"] = str(REPO / ".jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _command(workdir, *overrides, config=TINY) -> list[str]:
    return [
        sys.executable,
        "-m",
        "idfuse_jax.train",
        f"--config={config}",
        f"--workdir={workdir}",
        *overrides,
    ]


def train(workdir, *overrides, devices: int = 8, config=TINY) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(workdir, *overrides, config=config),
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(workdir) -> list[dict]:
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]
    return [r for r in rows if "loss" in r]


def exported(workdir) -> dict[str, np.ndarray]:
    return load_file(str(pathlib.Path(workdir) / "idfuse_weights.safetensors"))


def checkpoint_steps(workdir) -> list[int]:
    return sorted(
        int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit()
    )


def last_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[-1]


# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """configs/smoke.py as it is, on 8 devices (the README's first command trains configs/tiny.py,
    the world: tests/test_learning.py)."""
    workdir = tmp_path_factory.mktemp("tiny")
    result = ok(train(workdir))
    return workdir, result


def test_tiny_run_leaves_everything(tiny_run):
    workdir, result = tiny_run
    assert checkpoint_steps(workdir) == [30, 60]
    rows = metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, 61))
    for term in TERMS:
        assert all(np.isfinite(r[term]) for r in rows), term
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    sample = workdir / "samples" / "step_60.png"
    from PIL import Image

    with Image.open(sample) as image:  # one 32 px image per validation prompt, in a row
        assert image.size == (4 * 32, 32)
    weights = exported(workdir)
    assert any(k.startswith("unet.") and k.endswith("lora_A.weight") for k in weights)
    assert any(k.startswith("text_encoder.text_model.") for k in weights)
    assert any(k.startswith("idfuse.ffm.") for k in weights)
    assert "Exported trainable weights" in result.stdout
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["steps"] == 60


# configs/smoke.py's first losses as the first release computed them (1 CPU device): a change that
# alters the numbers of the default run (init, data order, noise, the loss) shows here.
TINY_FIRST_LOSSES = (1.4629779, 1.3751864, 1.4022045, 1.3447117, 1.3380153)


def test_tiny_run_reproduces_the_recorded_losses(tiny_run):
    workdir, _ = tiny_run
    losses = [r["loss"] for r in metrics(workdir)][: len(TINY_FIRST_LOSSES)]
    np.testing.assert_allclose(losses, TINY_FIRST_LOSSES, rtol=1e-5)


def test_tiny_run_loss_goes_down(tiny_run):
    workdir, _ = tiny_run
    losses = np.array([r["loss"] for r in metrics(workdir)])
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert last < 0.9 * first, (first, last)


def test_sample_cli_uses_the_exported_weights(tiny_run, tmp_path):
    workdir, _ = tiny_run
    out = tmp_path / "grid.png"
    command = [
        sys.executable,
        "-m",
        "idfuse_jax.sample",
        f"--workdir={workdir}",
        "--prompt=a {token} {class_name} in the snow",
        "--prompt=a red {token} {class_name}",
        "--num_images=2",
        "--num_steps=2",
        f"--out={out}",
    ]
    result = subprocess.run(command, env=_env(1), capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    from PIL import Image

    with Image.open(out) as image:  # a row of 2 images per prompt
        assert image.size == (2 * 32, 2 * 32)
    # Without the exported weights there is nothing to sample from: a one-line error.
    (workdir / "idfuse_weights.safetensors").rename(tmp_path / "moved.safetensors")
    try:
        result = subprocess.run(command, env=_env(1), capture_output=True, text=True, cwd=REPO)
    finally:
        (tmp_path / "moved.safetensors").rename(workdir / "idfuse_weights.safetensors")
    assert result.returncode == 1
    assert "idfuse_weights.safetensors: exported weights not found" in last_error_line(result)


@pytest.fixture(scope="module")
def three_steps_sharded(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sharded")
    ok(train(workdir, *SHORT, "--config.mesh.data=2", "--config.mesh.fsdp=4"))
    return workdir


def test_sharded_mesh_matches_one_device(three_steps_sharded, tmp_path):
    ok(train(tmp_path, *SHORT, "--config.mesh.data=1", "--config.mesh.fsdp=1", devices=1))
    sharded, single = metrics(three_steps_sharded), metrics(tmp_path)
    for term in ("loss", *losses.TERMS):
        np.testing.assert_allclose(
            [r[term] for r in sharded],
            [r[term] for r in single],
            rtol=1e-4,
            atol=1e-6,
            err_msg=term,
        )
    a, b = exported(three_steps_sharded), exported(tmp_path)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_batch_size_one_trains_on_one_device(tmp_path):
    """The paper's recipe (batch 1), through the CLI; a mesh it cannot split is one line."""
    one = ("--config.train.batch_size=1", "--config.mesh.data=1", "--config.mesh.fsdp=1")
    ok(train(tmp_path / "one", *SHORT, *one, devices=1))
    rows = metrics(tmp_path / "one")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "one" / "idfuse_weights.safetensors").is_file()
    result = train(tmp_path / "eight", *SHORT, "--config.train.batch_size=1", devices=8)
    assert result.returncode == 1
    assert "train.batch_size=1 is not divisible by the 8 devices" in last_error_line(result)


def test_sigterm_saves_and_rerun_continues(tmp_path):
    process = subprocess.Popen(
        _command(
            tmp_path, *SHORT, "--config.train.steps=100000", "--config.train.checkpoint_every=1000"
        ),
        env=_env(8),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (tmp_path / "metrics.jsonl").is_file() and len(metrics(tmp_path)) >= 2:
            break
        time.sleep(0.5)
    assert process.poll() is None, process.communicate()[1][-3000:]
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "Received SIGTERM" in stdout
    # The exact step is checked in test_train_loop.py; here: a real signal from outside.
    (step,) = checkpoint_steps(tmp_path)
    assert step >= 2
    # Rows an interrupted run logged after its checkpoint are dropped on resume, not repeated.
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": step + 1, "loss": 99.0}) + "\n" + '{"step": ')
    rerun = ok(train(tmp_path, *SHORT, f"--config.train.steps={step + 2}"))
    assert f"Resuming from step {step}" in rerun.stdout
    assert checkpoint_steps(tmp_path)[-1] == step + 2
    steps = [r["step"] for r in metrics(tmp_path)]
    assert steps == list(range(1, step + 3)), steps


def test_diverging_run_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    # A learning rate of 1e30 genuinely diverges: step 1 is finite, step 2 is not.
    result = train(
        tmp_path,
        *SHORT,
        "--config.train.steps=6",
        "--config.optim.learning_rate=1e30",
    )
    assert result.returncode == 1
    line = last_error_line(result)
    assert "non-finite loss or gradient at step 2" in line
    assert "denoise=nan" in line and "text_background=" in line
    assert checkpoint_steps(tmp_path) == [1]
    assert not (tmp_path / "idfuse_weights.safetensors").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("--config.train.bogus=1",), "unknown config key 'bogus'"),
        (
            ("--config.loss.lambda_denoise=1",),
            "config.loss.lambda_denoise was renamed: use config.loss.weights.denoise",
        ),
        (("--config.data.instance_dir=/nonexistent/photos",), "/nonexistent/photos"),
        (
            ("--config.model.pretrained=/nonexistent/sd", "--config.model.image_encoder=/tmp"),
            "config.model.pretrained='/nonexistent/sd': folder not found",
        ),
        (("--config.model.dtype=float16",), "config.model.dtype='float16'"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, overrides, message):
    result = train(tmp_path, *overrides, devices=1)
    assert result.returncode != 0
    assert message in last_error_line(result)


def test_empty_instance_folder_is_one_line_error(tmp_path):
    empty = tmp_path / "photos"
    empty.mkdir()
    result = train(tmp_path / "run", f"--config.data.instance_dir={empty}", devices=1)
    assert result.returncode != 0
    assert str(empty) in last_error_line(result)


def test_photo_folder_is_prepared_once_under_workdir(tmp_path, dreambooth_dir):
    photos = dreambooth_dir / "cat"  # cat/00: the cat at the border, its mask collapses
    before = sorted((p.name, p.stat().st_mtime_ns) for p in photos.rglob("*"))
    one_step = (*SHORT, f"--config.data.instance_dir={photos}", "--config.data.min_size=0")
    first = ok(train(tmp_path, *one_step, "--config.train.steps=1"))
    # The photo without a usable background is named in the log, and counted out in metrics.
    lines = [line for line in first.stderr.splitlines() if "without explicit decoupling" in line]
    assert len(lines) == 1 and "photo 00 trains without explicit decoupling" in lines[0], lines
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["explicit_images"] for r in rows if "explicit_images" in r] == [8]  # 4 x 2 flips
    prepared = tmp_path / "prepared"
    stems = sorted(p.stem for p in photos.glob("*.jpg"))
    assert sorted(p.stem for p in (prepared / "masks").glob("*.png")) == stems
    assert sorted(p.stem for p in (prepared / "backgrounds").glob("*.png")) == stems
    assert (prepared / "preview.png").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (prepared / "masks").glob("*.png")}
    ok(train(tmp_path, *one_step, "--config.train.steps=2"))  # resumes; nothing prepared again
    assert {p: p.stat().st_mtime_ns for p in (prepared / "masks").glob("*.png")} == stamps
    assert sorted((p.name, p.stat().st_mtime_ns) for p in photos.rglob("*")) == before
