"""Config files, config validation, and the mesh/sharding rules (no compilation)."""

import json
import pathlib
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from idfuse_jax import config_lib, metrics, sharding
from idfuse_jax.errors import ConfigError

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load(name, arg=None):
    module = config_lib.sibling_module(str(CONFIG_DIR / "default.py"), name)
    return module.get_config(arg) if arg is not None else module.get_config()


def test_tiny_smoke_and_dog_configs_validate():
    for name in ("tiny", "smoke", "dog"):
        config_lib.validate(load(name))


def test_dog_variants_pick_subject_class_and_steps(tmp_path):
    from idfuse_jax.subject import subject_runs

    cat = load("dog", "cat2,cat")
    assert cat.data.instance_dir.endswith("dreambooth/cat2")
    (run,) = subject_runs(cat, tmp_path)
    assert (run.config.data.class_name, run.steps, run.workdir) == ("cat", 1000, tmp_path)
    (run,) = subject_runs(load("dog", "teapot,teapot"), tmp_path)
    assert (run.config.data.class_name, run.steps) == ("teapot", 2000)
    assert (run.config.train.steps, run.config.train.object_steps) == (2000, 0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("method.background", "both", "config.method.background='both' is not one of"),
        ("loss.text_pool", "max", "config.loss.text_pool='max'"),
        ("train.batch_size", 0, "config.train.batch_size=0 must be a positive integer"),
        ("optim.learning_rate", -1.0, "config.optim.learning_rate=-1.0 must be a non-negative"),
        ("data.instance_dir", "", "config.data.instance_dir is empty"),
        ("data.inpaint", "sd", "config.data.inpaint='sd' needs config.data.inpaint_model"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    config = load("smoke")
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.validate(config)


def test_pretrained_needs_image_encoder():
    config = load("smoke")
    config.model.pretrained = "/somewhere"
    with pytest.raises(
        config_lib.ConfigError, match=re.escape("config.model.image_encoder is empty")
    ):
        config_lib.validate(config)


def test_config_json_of_an_older_version_reads_in_todays_names(tmp_path):
    """sample/evaluate read a run's config.json; runs of the first release wrote the loss
    weights as loss.lambda_* and a train.inject_nan_at_step field."""
    saved = json.loads(load("smoke").to_json())
    weights = saved["loss"].pop("weights")
    saved["loss"].update(
        lambda_denoise=weights["denoise"],
        lambda_text_background=0.25,  # the first release's name for L2
        lambda_background_agree=weights["image_background"],
        lambda_subject_background=0.5,  # and for L4
    )
    saved["train"]["inject_nan_at_step"] = -1
    # Runs from before method presets, prior preservation and loss sweeps: IdFuse, none of them.
    for section, key in (("method", "preset"), ("method", "text_lora"), ("loss", "sweep")):
        del saved[section][key]
    del saved["prior"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = config_lib.load_run_config(tmp_path)
    assert config.loss.weights.text_image == 0.25
    assert config.loss.weights.text_background == 0.5
    assert "lambda_denoise" not in config.loss and "inject_nan_at_step" not in config.train
    assert (config.method.preset, config.method.text_lora, config.loss.sweep) == (
        "idfuse", "auto", "")  # fmt: skip
    assert config.prior.class_images == 0
    config_lib.validate(config)
    with pytest.raises(config_lib.ConfigError, match=r"config\.json: not found"):
        config_lib.load_run_config(tmp_path / "nowhere")


def test_choices_come_from_the_modules_that_implement_them():
    from idfuse_jax import diffusion, losses, presets

    assert config_lib.CHOICES["sample.sampler"] == tuple(diffusion.SAMPLERS)
    assert config_lib.CHOICES["loss.text_pool"] == losses.TEXT_POOLS
    assert config_lib.CHOICES["method.preset"] == tuple(presets.PRESETS)
    assert set(load("default").loss.weights) == set(losses.TERMS)


@pytest.mark.parametrize(
    ("subject", "data", "fsdp", "devices", "expected"),
    [
        (1, -1, 1, 8, (1, 8, 1)),
        (1, 2, 4, 8, (1, 2, 4)),
        (1, 2, -1, 8, (1, 2, 4)),
        (1, 1, 1, 1, (1, 1, 1)),
        (2, -1, 1, 8, (2, 4, 1)),
        (-1, 1, 1, 8, (8, 1, 1)),
        (-1, 1, 4, 32, (8, 1, 4)),
    ],
)
def test_mesh_shape(subject, data, fsdp, devices, expected):
    assert sharding.mesh_shape(data, fsdp, devices, subject) == expected


@pytest.mark.parametrize(
    ("subject", "data", "fsdp", "message"),
    [
        (1, 3, -1, "mesh size 3 does not divide the 8 devices"),
        (1, 2, 2, "mesh subject=1 x data=2 x fsdp=2 = 4 devices, but 8 are present"),
        (1, -1, -1, "only one of mesh.data, mesh.fsdp can be -1"),
        (-1, -1, 1, "only one of mesh.subject, mesh.data can be -1"),
        (0, -1, 1, "mesh.subject=0 must be a positive size or -1"),
    ],
)
def test_bad_mesh_is_refused(subject, data, fsdp, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        sharding.mesh_shape(data, fsdp, 8, subject)


def test_fsdp_spec_splits_largest_divisible_dimension():
    assert sharding.fsdp_spec((3, 3, 320, 640), 4) == PartitionSpec(None, None, None, "fsdp")
    assert sharding.fsdp_spec((1280, 320), 4) == PartitionSpec("fsdp", None)
    assert sharding.fsdp_spec((77, 3), 4) == PartitionSpec()  # nothing divides: replicated
    assert sharding.fsdp_spec((1024,), 1) == PartitionSpec()


def test_fsdp_shardings_place_shards_on_devices():
    mesh = sharding.make_mesh(2, 4)
    tree = {"kernel": np.zeros((8, 12), np.float32), "bias": np.zeros((3,), np.float32)}
    placed = jax.device_put(tree, sharding.fsdp_shardings(tree, mesh))
    assert placed["kernel"].addressable_shards[0].data.shape == (8, 3)
    assert placed["bias"].addressable_shards[0].data.shape == (3,)


def test_batch_must_divide_over_mesh():
    mesh = sharding.make_mesh(2, 4)
    sharding.check_batch_size(16, mesh)
    with pytest.raises(
        ConfigError, match=re.escape("train.batch_size=1 is not divisible by the 8")
    ):
        sharding.check_batch_size(1, mesh)


@pytest.mark.parametrize(
    ("kind", "override", "expected"),
    [
        ("NVIDIA H200", 0.0, 989.0),
        ("TPU v4", 0.0, 275.0),
        ("NVIDIA L40S", 0.0, None),
        ("cpu", 0.0, None),
        ("cpu", 12.5, 12.5),
    ],
)
def test_peak_tflops_lookup(kind, override, expected):
    assert metrics.peak_tflops(kind, override) == expected


def test_bool_and_float_counts_are_refused():
    config = load("smoke")
    config.train.steps = True
    with pytest.raises(config_lib.ConfigError, match=re.escape("config.train.steps=True")):
        config_lib.validate(config)
    config = load("smoke")
    config.sample.num_steps = 5000
    with pytest.raises(config_lib.ConfigError, match="exceeds the 1000 training timesteps"):
        config_lib.validate(config)
