"""The subject axis: several subjects trained in one jitted step.

Which subjects a config names (DreamBench folders, synthetic subjects, per-kind steps), how their
features are stacked, and the claim the design rests on: subject s of a job ends with the same
parameters as subject s trained alone with the same seed, on 1 device and on 8 devices with a
subject axis of 2, through an interruption and resume, while longer subjects go on after it
stopped. Then configs/dreambench.py:tiny run as its docstring says.
"""

import json
import pathlib
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import test_evaluate
from safetensors.numpy import load_file
from test_train import _env, last_error_line, ok, train
from test_train_loop import _SignalOnDraw, checkpoint_steps, tiny_config

from idfuse_jax import config_lib, method, train_lib
from idfuse_jax import subject as subject_lib
from idfuse_jax.data import dreambench
from idfuse_jax.errors import ConfigError, DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
DREAMBENCH = str(REPO / "configs" / "dreambench.py")


def load(name: str, arg=None):
    module = config_lib.sibling_module(str(REPO / "configs" / "default.py"), name)
    return module.get_config(arg) if arg is not None else module.get_config()


# --------------------------------------------------------------------------------------------
# Which subjects a config trains


def test_dreambench_config_trains_all_30_subjects_with_steps_per_kind(dreambooth_dir, tmp_path):
    config = load("dreambench")
    config.data.instance_dir = str(dreambooth_dir)
    config_lib.validate(config)
    runs = subject_lib.subject_runs(config, tmp_path)
    classes, _, _ = dreambench.parse_prompts_file(dreambooth_dir / dreambench.PROMPTS_FILE)
    assert [r.name for r in runs] == list(classes) and len(runs) == 30
    for run in runs:
        live = classes[run.name] in ("dog", "cat")
        assert run.steps == (1000 if live else 2000), run.name
        assert run.workdir == tmp_path / "subjects" / run.name
        single = run.config  # the subject as if trained alone
        assert single.data.instance_dir == str(dreambooth_dir / run.name)
        assert single.data.class_name == classes[run.name]
        assert (single.data.subjects, single.train.steps, single.train.object_steps) == (
            "", run.steps, 0)  # fmt: skip
        assert (single.mesh.subject, single.mesh.data) == (1, -1)
        assert single.model.pretrained == config.model.pretrained  # the SD 2.1-base setup
        config_lib.validate(single)
    assert sum(r.steps == 1000 for r in runs) == 9  # 2 cats, 7 dogs


def test_subject_lists_take_classes_from_the_folder_or_the_entry(dreambooth_dir, tmp_path):
    config = load("smoke")
    config.data.instance_dir = str(dreambooth_dir)
    config.data.subjects = "dog2, cat2:kitten"
    config.train.object_steps = 7
    runs = subject_lib.subject_runs(config, tmp_path)
    assert [(r.name, r.config.data.class_name, r.steps) for r in runs] == [
        ("dog2", "dog", 60), ("cat2", "kitten", 7)]  # fmt: skip


def test_synthetic_subjects_differ_by_name_and_keep_their_name_across_jobs(tmp_path):
    config = load("dreambench", "tiny")
    runs = subject_lib.subject_runs(config, tmp_path)
    assert [(r.name, r.config.data.class_name, r.steps) for r in runs] == [
        ("dog", "dog", 6), ("cat", "cat", 6), ("backpack", "backpack", 10),
        ("teapot", "teapot", 10)]  # fmt: skip
    variants = [r.config.data.synthetic_variant for r in runs]
    assert len(set(variants)) == 4 and 0 not in variants  # 0: the default synthetic subject
    config.data.subjects = "teapot:teapot"
    (alone,) = subject_lib.subject_runs(config, tmp_path)
    assert alone.config.data.synthetic_variant == variants[3]
    images = [subject_lib.subject_images(r.config, tmp_path)[0] for r in (runs[0], runs[1], alone)]
    assert not np.array_equal(images[0], images[1])
    np.testing.assert_array_equal(
        images[2], subject_lib.subject_images(runs[3].config, tmp_path)[0]
    )


@pytest.mark.parametrize(
    ("instance_dir", "subjects", "error", "message"),
    [
        ("synthetic", "a,b,a", ConfigError, "config.data.subjects='a,b,a' names 'a' twice"),
        ("synthetic", "a,,b", ConfigError, "config.data.subjects='a,,b': bad subject name ''"),
        ("synthetic", "../up", ConfigError, "bad subject name '../up'"),
        ("synthetic", "all", ConfigError, "config.data.subjects='all' needs a DreamBench folder"),
        ("DREAMBOOTH", "dog,nosuch", DataError, "lists no subject 'nosuch'"),
        ("DREAMBOOTH", "nosuch:dog", DataError, "no photo folder for subject 'nosuch'"),
    ],
)
def test_bad_subject_lists_name_the_culprit(
    dreambooth_dir, tmp_path, instance_dir, subjects, error, message
):
    config = load("smoke")
    config.data.instance_dir = instance_dir.replace("DREAMBOOTH", str(dreambooth_dir))
    config.data.subjects = subjects
    with pytest.raises(error, match=re.escape(message)):
        subject_lib.subject_runs(config, tmp_path)


def _features(num_items: int, value: float) -> method.SubjectFeatures:
    rows = lambda *shape: (
        jnp.full((num_items, *shape), value)
        + jnp.arange(num_items).reshape(-1, *([1] * len(shape)))
    )
    return method.SubjectFeatures(
        latent_mean=rows(2, 2, 4),
        latent_logvar=rows(2, 2, 4),
        image_embeds=rows(3),
        background_embeds=rows(3),
        prompt_ids=jnp.full((1, 5), int(value)),
        num_items=num_items,
        decouple=jnp.zeros(num_items) + value,
    )


def test_stacked_subjects_keep_each_subjects_rows():
    a, b = _features(2, 10.0), _features(3, 20.0)
    stacked = method.stack_subjects([a, b], count=4)
    assert stacked.num_items == 3 and stacked.image_embeds.shape == (4, 3, 3)
    assert stacked.prompt_ids.shape == (4, 1, 5)
    np.testing.assert_array_equal(stacked.image_embeds[0, :2], a.image_embeds)
    np.testing.assert_array_equal(stacked.image_embeds[0, 2], a.image_embeds[1])  # padding
    np.testing.assert_array_equal(stacked.decouple[1], b.decouple)
    for idle in (2, 3):  # slots of the mesh's padding repeat the last subject
        np.testing.assert_array_equal(stacked.latent_mean[idle], b.latent_mean)


def test_subject_batches_draw_from_each_subject_until_it_is_done():
    iterators = [iter([[1, 2], [3, 4]]), iter([[5, 6], [7, 8], [9, 0]])]
    lengths = [2, 3, 0]  # the last: an idle slot
    batches = [train_lib.subject_batches(iterators, lengths, 2, step) for step in range(3)]
    np.testing.assert_array_equal(batches[0], [[1, 2], [5, 6], [0, 0]])
    np.testing.assert_array_equal(batches[2], [[0, 0], [9, 0], [0, 0]])


# --------------------------------------------------------------------------------------------
# A job of two subjects against each trained alone

# Two synthetic subjects of different lengths (an object trains 4 steps, the dog 3), a cosine
# schedule with warm-up (its length is per subject), a 1-step sampler.
JOB = dict(
    data__subjects="dog:dog,teapot:teapot",
    train__steps=3,
    train__object_steps=4,
    optim__schedule="cosine",
    optim__warmup_steps=1,
    train__checkpoint_every=100,
    sample__num_steps=1,
)
NAMES = ("dog", "teapot")


def _exports(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    return load_file(str(workdir / "idfuse_weights.safetensors"))


def _rows(workdir: pathlib.Path) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    return [r for r in rows if "loss" in r]


def _assert_same_parameters(a: dict, b: dict, rtol: float = 1e-5) -> None:
    """Every tensor within `rtol` relative, in 2-norm (measured: at most 3.3e-6). Element-wise,
    a few LoRA B entries differ by up to 3e-5 of the tensor's largest value: B starts at 0 and
    each entry is a sum of Adam's normalised steps g / (|g| + eps), which carry the rounding of
    a small, cancelling gradient component (reduced over 4 devices here, 8 there) at full
    relative size."""
    assert a.keys() == b.keys()
    for key in a:
        error = np.linalg.norm(a[key] - b[key]) / np.linalg.norm(b[key])
        assert error <= rtol, (key, error)


@pytest.fixture(scope="module")
def job8(tmp_path_factory):
    """The job on 8 devices, subject axis 2 (each subject's batch over 4 devices), in-process."""
    workdir = tmp_path_factory.mktemp("job8")
    train_lib.train_and_evaluate(tiny_config(**JOB, mesh__subject=2), workdir)
    return workdir


@pytest.fixture(scope="module")
def alone(job8, tmp_path_factory):
    """Each subject trained alone, from the config its job wrote for it."""
    workdirs = {}
    for name in NAMES:
        config = config_lib.load_run_config(job8 / "subjects" / name)
        config.sample.num_steps = 1
        workdirs[name] = tmp_path_factory.mktemp(f"alone_{name}")
        train_lib.train_and_evaluate(config, workdirs[name])
    return workdirs


def test_job_writes_each_subjects_outputs(job8):
    assert (
        json.loads((job8 / "config.json").read_text())["data"]["subjects"] == JOB["data__subjects"]
    )
    for name, steps, class_name in (("dog", 3, "dog"), ("teapot", 4, "teapot")):
        folder = job8 / "subjects" / name
        config = config_lib.load_run_config(folder)
        assert (config.data.class_name, config.train.steps, config.data.subjects) == (
            class_name, steps, "")  # fmt: skip
        rows = _rows(folder)
        assert [r["step"] for r in rows] == list(range(1, steps + 1))  # it stopped at its end
        # Its own cosine: the warm-up step at the full rate, then decay to ~0 over its length.
        lr = [r["learning_rate"] for r in rows]
        assert lr[0] == 0.0 and lr[1] == pytest.approx(1e-3)
        assert lr[-1] == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * (steps - 2) / (steps - 1))))
        assert (folder / "samples" / f"step_{steps}.png").is_file()
        assert (folder / "idfuse_lora.safetensors").is_file()
    assert checkpoint_steps(job8) == [4]
    a, b = _exports(job8 / "subjects" / "dog"), _exports(job8 / "subjects" / "teapot")
    assert max(np.abs(a[k] - b[k]).max() for k in a) > 1e-3  # two subjects, two results


@pytest.mark.parametrize("name", NAMES)
def test_each_subject_of_the_job_equals_the_subject_trained_alone(job8, alone, name):
    _assert_same_parameters(_exports(job8 / "subjects" / name), _exports(alone[name]))
    job_rows, alone_rows = _rows(job8 / "subjects" / name), _rows(alone[name])
    assert [r["step"] for r in job_rows] == [r["step"] for r in alone_rows]
    for key in ("loss", "learning_rate", "grad_norm"):
        np.testing.assert_allclose(
            [r[key] for r in job_rows], [r[key] for r in alone_rows], rtol=1e-5, err_msg=key
        )


def test_one_device_job_equals_the_subjects_trained_alone(alone, tmp_path):
    """The same job through the CLI on one device: both subjects on the one device."""
    flags = [f"--config.{k.replace('__', '.')}={v}" for k, v in JOB.items()]
    ok(train(tmp_path, *flags, devices=1))
    for name in NAMES:
        _assert_same_parameters(_exports(tmp_path / "subjects" / name), _exports(alone[name]))


def test_interrupted_job_resumes_to_the_straight_job(job8, tmp_path, monkeypatch):
    """SIGTERM while step 3's batch is drawn: step 3 completes (the dog's last: it is exported),
    the job saves step 3 and stops; the rerun trains the teapot's step 4 alone and exports it
    as the straight job did."""
    real_iterator = train_lib.index_iterator

    def signalling(num_items, batch_size, seed, num_steps):
        inner = real_iterator(num_items, batch_size, seed, num_steps)
        return _SignalOnDraw(inner, at=3) if num_steps == 4 else inner  # the teapot's

    monkeypatch.setattr(train_lib, "index_iterator", signalling)
    train_lib.train_and_evaluate(tiny_config(**JOB, mesh__subject=2), tmp_path)
    assert checkpoint_steps(tmp_path) == [3]
    assert (tmp_path / "subjects" / "dog" / "idfuse_weights.safetensors").is_file()
    assert not (tmp_path / "subjects" / "teapot" / "idfuse_weights.safetensors").exists()
    monkeypatch.setattr(train_lib, "index_iterator", real_iterator)
    train_lib.train_and_evaluate(tiny_config(**JOB, mesh__subject=2), tmp_path)
    for name in NAMES:
        a, b = _exports(tmp_path / "subjects" / name), _exports(job8 / "subjects" / name)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {key}")
    assert [r["step"] for r in _rows(tmp_path / "subjects" / "teapot")] == [1, 2, 3, 4]


def test_two_hosts_each_holding_one_subject_match_the_one_process_job(job8, tmp_path):
    """The job over two processes of 4 CPU devices (launch/gpu_node.sh, as in
    test_multihost.py), subject axis 2: each process's devices hold one subject's state, yet
    process 0 writes both subjects' metrics, samples and exports, equal to the one-process job
    on the same mesh."""
    from test_multihost import _start, _wait

    flags = [f"--config.{k.replace('__', '.')}={v}" for k, v in JOB.items()]
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    _wait(_start(workdir, logs, *flags, "--config.mesh.subject=2"), logs)
    for name in NAMES:
        folder, reference = workdir / "subjects" / name, job8 / "subjects" / name
        rows, expected = _rows(folder), _rows(reference)
        assert [r["step"] for r in rows] == [r["step"] for r in expected]
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(
                [r[key] for r in rows], [r[key] for r in expected], rtol=1e-5, err_msg=key
            )
        _assert_same_parameters(_exports(folder), _exports(reference))
        assert (folder / "samples" / f"step_{len(rows)}.png").is_file()
    assert "Exported" not in (logs / "1.out").read_text()


def test_resuming_with_other_subjects_is_refused_before_anything_is_built(
    job8, tmp_path, monkeypatch
):
    """Refused from the checkpoint's metadata alone: no model is built, no subject prepared,
    and the job's config.json is left as the checkpoint's run wrote it."""
    shutil.copytree(job8 / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "config.json").write_text("the checkpoint's run")

    def built(*args, **kwargs):
        raise AssertionError("models built before the resume was refused")

    monkeypatch.setattr(train_lib.build, "build_models", built)
    monkeypatch.setattr(train_lib.subject_lib, "prepare_subject_features", built)
    config = tiny_config(**{**JOB, "data__subjects": "dog:dog"}, mesh__subject=2)
    message = "config.data.subjects=dog:dog differs from the checkpoint's dog:dog,teapot:teapot"
    with pytest.raises(ConfigError, match=re.escape(message)):
        train_lib.train_and_evaluate(config, tmp_path)
    assert (tmp_path / "config.json").read_text() == "the checkpoint's run"


# --------------------------------------------------------------------------------------------
# configs/dreambench.py:tiny as its docstring runs it


metric_dirs = test_evaluate.metric_dirs  # the tiny DINO and CLIP folders (a fixture)


def test_dreambench_tiny_runs_end_to_end_and_sample_and_evaluate_read_it(
    tmp_path, metric_dirs, dreambooth_dir
):
    workdir = tmp_path / "runs" / "dreambench_tiny"
    result = ok(train(workdir, config=f"{DREAMBENCH}:tiny"))
    assert "4 subject(s) (+4 idle slots)" in result.stderr  # 8 devices: the subject axis is 8
    names = {"dog": 6, "cat": 6, "backpack": 10, "teapot": 10}
    for name, steps in names.items():
        folder = workdir / "subjects" / name
        assert [r["step"] for r in _rows(folder)] == list(range(1, steps + 1))
        assert (folder / "samples" / f"step_{steps}.png").is_file()
        assert str(folder / "idfuse_weights.safetensors") in result.stdout
    assert checkpoint_steps(workdir) == [5, 10]

    def sample(folder: pathlib.Path) -> subprocess.CompletedProcess:
        command = ["-m", "idfuse_jax.sample", f"--workdir={folder}"]
        command += ["--prompt", "a {token} {class_name} in the snow"]
        return subprocess.run(
            [sys.executable, *command],
            env=_env(1),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )

    sampled = ok(sample(workdir / "subjects" / "dog"))
    out = workdir / "subjects" / "dog" / "samples" / "sample.png"
    assert f"Wrote 4 images to {out}" in sampled.stdout and out.is_file()
    job = sample(workdir)  # the job's own folder holds no weights: one line says where they are
    assert job.returncode == 1 and last_error_line(job) == (
        f"error: {workdir} is a job of several subjects: pass --workdir "
        f"{workdir / 'subjects'}/NAME (NAME one of backpack, cat, dog, teapot)"
    )

    # The synthetic subjects carry DreamBench names: their real photos come from --dreambench.
    flags = test_evaluate.metric_flags(metric_dirs)
    bench = f"--dreambench={dreambooth_dir}"
    small = ("--max_prompts=1", "--num_images=1", "--num_steps=2")
    ok(test_evaluate.evaluate(f"--workdir={workdir}", *flags, bench, *small, devices=1))
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert sorted(results["subjects"]) == sorted(names)
    for name in names:
        sub = results["subjects"][name]
        assert sub["workdir"] == str(workdir / "subjects" / name)
        real = pathlib.Path(sub["real_dir"]).resolve()
        assert real == (dreambooth_dir / name).resolve() and sub["num_images"] == 1
