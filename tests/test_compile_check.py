"""`python -m idfuse_jax.compile_check`: the tiny run compiled for a v5e 2x2 slice (through
`launch/tpu_vm.sh --check`) and for 8 x H100, end to end as a user runs it; a run that does not
fit, a mesh the target cannot hold and an unknown target each end in one error line.

Each case is a subprocess with the persistent compilation cache of the other CLI tests.
"""

import json
import shlex
import subprocess
import sys

from test_launch import dry_run
from test_train import REPO, TINY, _env, last_error_line, ok

from idfuse_jax import compile_check, targets


def compile_check_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "idfuse_jax.compile_check", *args],
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )


def test_tpu_vm_check_compiles_the_run_for_the_slice(tmp_path):
    """`tpu_vm.sh --check v5e-4` runs compile_check with the training flags (less --workdir)
    before anything else; that command compiles the tiny run's programs on an fsdp mesh of the
    4 chips, prints the table and writes the report."""
    flags = ("--config", "configs/tiny.py", "--workdir", "/runs/my dog")
    overrides = ("--config.mesh.fsdp=2", "--config.train.batch_size=4")
    lines = dry_run("tpu_vm.sh", "--check", "v5e-4", "my-tpu", "zone-a", *flags, *overrides)
    check = shlex.split(lines[0])
    assert check == [
        *("python3", "-m", "idfuse_jax.compile_check", "--target", "v5e-4"),
        *("--config", "configs/tiny.py", *overrides),
    ]
    assert len(lines) == 5 and "idfuse_jax.train" in lines[-1]  # then pack, copy, install, run
    out = tmp_path / "report.json"
    # The features and the step (the samplers: 8xh100 below, evaluation's; CI time is short).
    result = ok(compile_check_cli(*check[3:], "--programs=features,step", f"--out={out}"))
    assert "| program | arguments GiB |" in result.stdout
    report = json.loads(out.read_text())
    assert report["target"] == "v5e-4" and report["device"] == "TPU v5 lite"
    assert report["mesh"] == {"subject": 1, "data": 2, "fsdp": 2}
    assert report["fits"] and report["complete"] and report["usable_bytes"] == 16 * 2**30
    programs = {r["program"]: r for r in report["programs"]}
    assert list(programs) == ["features: VAE encode", "features: image encoder", "step"]
    step = programs["step"]
    assert f"| step | {step['arguments'] / 2**30:.2f} |" in result.stdout
    parts = step["arguments"] + step["outputs"] + step["temporaries"]
    assert 0 < step["peak"] == parts - step["aliased"]
    assert step["aliased"] > 0  # the donated state
    assert step["model_flops_per_device"] > 0 and step["compile_seconds"] > 0
    # fsdp: the frozen weights are split over 2 chips and gathered where used; the batch is
    # split over the other 2, and the Pallas kernel is inside (data x fsdp on the TPU compiler:
    # tests/test_accelerators.py compiles subjects x fsdp).
    assert step["collectives"]["all-gather"] > 0
    assert step["kernels"]["mosaic"] > 0


def test_8xh100_cudnn_evaluation(tmp_path):
    """The tiny run's features and evaluation sampler in bfloat16 with cuDNN attention,
    compiled for 8 x H100 (deviceless): the batch split over the 8 GPUs."""
    out = tmp_path / "report.json"
    result = ok(
        compile_check_cli(
            f"--config={TINY}",
            "--target=8xh100",
            "--programs=features,evaluation",
            "--config.model.dtype=bfloat16",
            "--config.model.attention=cudnn",
            "--config.sample.num_steps=2",
            "--eval_batch_size=1",
            f"--out={out}",
        )
    )
    report = json.loads(out.read_text())
    assert report["device"] == "NVIDIA H100 80GB HBM3" and report["devices"] == 8
    assert report["usable_bytes"] == int(0.75 * targets.get("8xh100").memory_bytes)
    names = [r["program"] for r in report["programs"]]
    assert names == ["features: VAE encode", "features: image encoder", "evaluation"]
    assert all(r["fits"] for r in report["programs"])
    # cuDNN's fused attention: the VAE's float32 attention takes blockwise, the UNet's and the
    # text encoder's bfloat16 attention cuDNN.
    evaluation = report["programs"][-1]
    assert evaluation["kernels"]["cudnn"] > 0
    # Only the programs' own choices are logged, none made for the CPU host (parameter shapes).
    assert "platform is cpu" not in result.stderr
    assert "evaluation batches of 8 images" in result.stdout


def test_does_not_fit_is_an_error():
    result = compile_check_cli(
        f"--config={TINY}", "--target=1xh100", "--programs=features", "--memory_gib=0.0001"
    )
    assert result.returncode == 1
    assert "| features: VAE encode |" in result.stdout and "| **no** |" in result.stdout
    line = last_error_line(result)
    assert line.startswith("error: does not fit a 1xh100: features: VAE encode needs ")
    assert "GiB per device, of 0.00 GiB usable" in line


def test_mesh_the_target_cannot_hold_is_an_error():
    result = compile_check_cli(f"--config={TINY}", "--target=v5e-4", "--config.mesh.data=3")
    assert result.returncode == 1
    assert last_error_line(result).startswith("error: target v5e-4 (4 devices): mesh ")


def test_unknown_target_lists_the_targets():
    result = compile_check_cli(f"--config={TINY}", "--target=v9-8")
    assert result.returncode == 1
    assert last_error_line(result) == (
        f"error: unknown target 'v9-8'; known targets: {', '.join(targets.TARGETS)}"
    )


def test_count_collectives_reads_opcodes_not_names():
    hlo = (
        "%all-reduce.1 = f32[] all-reduce(f32[] %x), replica_groups={}\n"
        "%ags = (f32[2], f32[4]) all-gather-start(f32[2] %y)\n"
        "%agd = f32[4] all-gather-done((f32[2], f32[4]) %ags)\n"
        "%f = f32[4] fusion(f32[4] %agd), calls=%all-reduce.2\n"
    )
    counts = compile_check.count_collectives(hlo)
    assert counts == {
        "all-reduce": 1,
        "all-gather": 1,
        "reduce-scatter": 0,
        "all-to-all": 0,
        "collective-permute": 0,
    }
