"""The training loop in-process, where a test can decide exactly when things happen: a signal
that arrives while a given step's batch is drawn, a gradient that turns non-finite while the
loss stays finite. Also the sampler against the trained weights.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from signal_on_draw import SignalOnDraw as _SignalOnDraw

from idfuse_jax import method, train_lib
from idfuse_jax.config_lib import sibling_module
from idfuse_jax.errors import NonFiniteError

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "smoke.py")  # random tiny models; configs/tiny.py: the world


def tiny_config(**overrides):
    """configs/smoke.py (random tiny models, the synthetic subject) with `section__field=value`
    overrides, quick to run."""
    config = sibling_module(TINY, "smoke").get_config()
    config.sample.num_steps = 2
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


def checkpoint_steps(workdir) -> list[int]:
    folder = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def losses(workdir) -> list[float]:
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]
    return [r["loss"] for r in rows if "loss" in r]


COSINE = dict(
    optim__schedule="cosine",
    optim__warmup_steps=2,
    train__steps=7,
    train__checkpoint_every=100,
    train__sample_every=100,
)


def test_interrupted_run_saves_its_step_and_resumes_to_the_straight_run(tmp_path, monkeypatch):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train_lib.train_and_evaluate(tiny_config(**COSINE), straight)

    real_iterator = train_lib.index_iterator
    monkeypatch.setattr(
        train_lib, "index_iterator", lambda *a, **k: _SignalOnDraw(real_iterator(*a, **k), at=4)
    )
    train_lib.train_and_evaluate(tiny_config(**COSINE), interrupted)
    # The signal came while step 4's batch was drawn: step 4 completes, then the run saves.
    assert checkpoint_steps(interrupted) == [4]
    assert not (interrupted / "idfuse_weights.safetensors").exists()

    monkeypatch.setattr(train_lib, "index_iterator", real_iterator)
    train_lib.train_and_evaluate(tiny_config(**COSINE), interrupted)
    a = load_file(str(straight / "idfuse_weights.safetensors"))
    b = load_file(str(interrupted / "idfuse_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # warm-up and cosine decay continue where they were: bit-identical
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert losses(interrupted) == losses(straight)


@jax.custom_vjp
def _nan_gradient(x):
    return x


def _nan_gradient_fwd(x):
    return x, None


def _nan_gradient_bwd(_, g):
    return (jnp.where(g != 0, jnp.nan, 0.0),)


_nan_gradient.defvjp(_nan_gradient_fwd, _nan_gradient_bwd)


def test_non_finite_gradient_with_finite_loss_stops_the_run(tmp_path, monkeypatch):
    real_loss = method.training_loss

    def poisoned(models, config, frozen, trainable, *args):
        total, terms = real_loss(models, config, frozen, trainable, *args)
        # LoRA B starts at zero and moves at the first update: from step 2 on, add a term that
        # is 0 but has a NaN gradient.
        lora_b = jax.tree.leaves(trainable["unet_lora"])[1]
        x = jnp.sum(lora_b)
        poison = _nan_gradient(x) - jax.lax.stop_gradient(x)
        return total + jnp.where(jnp.any(lora_b != 0), poison, 0.0), terms

    monkeypatch.setattr(method, "training_loss", poisoned)
    config = tiny_config(train__steps=5, train__checkpoint_every=1)
    with pytest.raises(NonFiniteError, match="at step 2") as error:
        train_lib.train_and_evaluate(config, tmp_path)
    message = str(error.value)
    loss = float(message.split("loss=")[1].split(",")[0])
    assert np.isfinite(loss) and "grad_norm=nan" in message
    assert checkpoint_steps(tmp_path) == [1]  # the last good state
    assert not (tmp_path / "idfuse_weights.safetensors").exists()


# --------------------------------------------------------------------------------------------
# Sampling from a workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    train_lib.train_and_evaluate(tiny_config(train__steps=3, train__sample_every=100), workdir)
    return workdir


def _sample(workdir, **kwargs):
    from idfuse_jax import sample  # defines the sample CLI's flags: import once, here

    prompts = ["a {token} {class_name} in the snow"]
    return sample.sample_images(workdir, prompts, num_images=2, num_steps=2, **kwargs)


def test_sampler_is_deterministic_and_uses_the_trained_weights(trained, tmp_path):
    first, again = _sample(trained, seed=3), _sample(trained, seed=3)
    np.testing.assert_array_equal(first, again)  # same seed, same pixels
    assert first.shape == (2, 32, 32, 3) and first.dtype == np.uint8
    assert not np.array_equal(first[0], first[1])  # two images of a prompt differ
    assert not np.array_equal(_sample(trained, seed=4), first)

    # The same run with other trained weights: other pictures.
    other = tmp_path / "other"
    shutil.copytree(trained, other, ignore=shutil.ignore_patterns("checkpoints"))
    tensors = load_file(str(other / "idfuse_weights.safetensors"))
    tensors = {k: v * 3.0 if k.startswith("idfuse.ffm") else v for k, v in tensors.items()}
    save_file(tensors, str(other / "idfuse_weights.safetensors"))
    assert np.abs(_sample(other, seed=3).astype(int) - first).max() > 0


def test_reference_photo_changes_the_conditioning(trained, tmp_path):
    from PIL import Image

    photo = tmp_path / "reference.png"
    gradient = np.linspace(0, 255, 48 * 48 * 3).reshape(48, 48, 3).astype(np.uint8)
    Image.fromarray(gradient).save(photo)
    plain = _sample(trained, seed=3)
    with_reference = _sample(trained, seed=3, reference=str(photo))
    np.testing.assert_array_equal(with_reference, _sample(trained, seed=3, reference=str(photo)))
    assert np.abs(with_reference.astype(int) - plain).max() > 0
