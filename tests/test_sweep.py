"""A loss-weight sweep in one program (config.loss.sweep): each value is a slot of the subject
axis, and each slot equals its setting trained alone, as tests/test_subjects.py shows for
subjects."""

import pytest
from test_subjects import _assert_same_parameters, _exports, _rows
from test_train_loop import tiny_config

from idfuse_jax import config_lib, train_lib
from idfuse_jax.errors import ConfigError
from idfuse_jax.subject import parse_sweep, subject_runs

# L2's weight at DisenBooth's 1e-3 and far above it (it then dominates the adapter's update).
SWEEP = dict(loss__sweep="text_image=0.001,2", train__steps=2, train__checkpoint_every=100,
             sample__num_steps=1)  # fmt: skip
SLOTS = {"text_image=0.001": 0.001, "text_image=2": 2.0}


@pytest.fixture(scope="module")
def sweep_job(tmp_path_factory):
    """The sweep on 8 devices, subject axis 2 (each slot's batch over 4 devices), in-process."""
    workdir = tmp_path_factory.mktemp("sweep")
    train_lib.train_and_evaluate(tiny_config(**SWEEP, mesh__subject=2), workdir)
    return workdir


def test_a_slot_of_the_sweep_equals_its_setting_trained_alone(sweep_job, tmp_path):
    """The slot far from the default, trained alone from the config the sweep wrote for it
    (one run: the other slot's program is the same with another weight)."""
    for name, weight in SLOTS.items():
        config = config_lib.load_run_config(sweep_job / "subjects" / name)
        assert config.loss.weights.text_image == weight and config.loss.sweep == ""
        assert config.mesh.subject == 1
    name = "text_image=2"
    config = config_lib.load_run_config(sweep_job / "subjects" / name)
    config.sample.num_steps = 1
    train_lib.train_and_evaluate(config, tmp_path)
    _assert_same_parameters(_exports(sweep_job / "subjects" / name), _exports(tmp_path))
    job_rows, alone_rows = _rows(sweep_job / "subjects" / name), _rows(tmp_path)
    assert [r["step"] for r in job_rows] == [1, 2]
    for key in ("loss", "text_image", "grad_norm"):
        assert [r[key] for r in job_rows] == pytest.approx(
            [r[key] for r in alone_rows], rel=1e-5
        ), key
    # The weight matters: the slots' losses and adapters differ.
    low, high = (_exports(sweep_job / "subjects" / n) for n in SLOTS)
    assert max(abs(low[k] - high[k]).max() for k in low if k.startswith("idfuse.adapter")) > 1e-4
    losses = [_rows(sweep_job / "subjects" / n)[0]["loss"] for n in SLOTS]
    assert losses[1] - losses[0] == pytest.approx(
        (2 - 0.001) * _rows(sweep_job / "subjects" / name)[0]["text_image"], rel=1e-4
    )


def test_bad_sweeps_are_one_line(tmp_path):
    assert parse_sweep("denoise=1,0.5") == ("denoise", [1.0, 0.5])
    for value, message in (
        ("lambda2=0.1", "expected TERM=V1,V2,... with TERM one of"),
        ("text_image=a,b", "the values must be numbers"),
        ("text_image=0.1,-1", "the weights must be non-negative"),
        ("text_image=0.1,0.10", "a value is given twice"),
    ):
        with pytest.raises(ConfigError, match=rf"^config\.loss\.sweep={value!r}: {message}"):
            subject_runs(tiny_config(loss__sweep=value), tmp_path)
    runs = subject_runs(tiny_config(data__subjects="a,b", loss__sweep="text_image=0,1"), tmp_path)
    assert [r.name for r in runs] == ["a@text_image=0", "a@text_image=1", "b@text_image=0",
                                      "b@text_image=1"]  # fmt: skip
    assert [r.config.loss.weights.text_image for r in runs] == [0.0, 1.0, 0.0, 1.0]
