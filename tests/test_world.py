"""The procedural world: seeded scenes with exact masks, and ToyBench as a DreamBench folder."""

import pathlib

import numpy as np
import pytest

from idfuse_jax.data import dreambench, world
from idfuse_jax.data.images import load_subject
from idfuse_jax.errors import DataError

RES = 32


def test_scenes_are_seeded_and_their_truth_is_exact():
    a, b = world.world_batch(6, RES, seed=3), world.world_batch(6, RES, seed=3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.image, y.image)
    assert any(
        not np.array_equal(x.image, y.image)
        for x, y in zip(a, world.world_batch(6, RES, seed=4), strict=True)
    )
    for scene in a:
        inside = scene.mask > 0
        assert 0.05 < inside.mean() < 0.6
        np.testing.assert_array_equal(scene.image[~inside], scene.background[~inside])
        body = np.array(world.COLOURS[scene.instance.colour], np.float32)
        black = np.array(world.PATTERN_COLOUR, np.float32)
        pixels = scene.image[inside].astype(np.float32)
        nearest = np.minimum(np.abs(pixels - body).max(-1), np.abs(pixels - black).max(-1))
        assert nearest.max() <= 5 * world.NOISE  # every object pixel is body or pattern
        band = round(world.MARGIN * RES) - 1  # objects never enter the border band
        assert not inside[:band].any() and not inside[-band:].any()
        assert not inside[:, :band].any() and not inside[:, -band:].any()
        assert scene.caption.endswith(world.PLACES[scene.place][0])
        assert world.place_of(scene.caption) == scene.place


def test_pretraining_never_shows_a_subject_instance():
    scenes = world.world_batch(300, 16, seed=0)
    assert not {s.instance for s in scenes} & world.SUBJECT_INSTANCES
    assert len({s.instance for s in scenes}) > 60 and len({s.place for s in scenes}) == 8


def test_captions_name_the_instance_and_place():
    ball = world.Instance("ball", "red", "striped")
    assert world.caption(ball, "sand") == "a red striped ball on sand"
    assert world.caption(world.Instance("cone", "orange", "plain"), "snow") == (
        "an orange cone in the snow"
    )
    assert world.caption(ball, "brick", token="sks") == "a sks ball in front of a brick wall"
    with pytest.raises(DataError, match="unknown colour 'teal'"):
        world.Instance("ball", "teal", "plain")


def test_subjects_differ_and_cover_the_world():
    instances = [s.instance for s in world.SUBJECTS]
    assert len(set(instances)) == len(instances) >= 8
    assert {i.shape for i in instances} == set(world.SHAPES)
    assert {i.pattern for i in instances} == set(world.PATTERNS)
    for s in world.SUBJECTS:
        assert len(set(s.places)) == len(s.places) == world.PHOTOS


def test_toybench_folder_reads_as_dreambench_with_exact_truth(tmp_path):
    root = world.write_toybench(tmp_path / "toybench", RES, subjects=world.SUBJECTS[:2])
    bench = dreambench.read_benchmark(root)
    assert bench.subjects == ("red_striped_ball", "yellow_checked_box")
    assert bench.classes["red_striped_ball"] == "ball"
    assert not bench.is_live("red_striped_ball")
    assert [world.place_of(p) for p in bench.object_prompts] == list(world.PLACES)
    assert bench.object_prompts[1] == "a {token} {class_name} in the snow"
    assert world.read_truth(root)["yellow_checked_box"] == world.SUBJECTS[1]
    subject = load_subject(
        root / "red_striped_ball", RES, prepared_dir=root / "truth" / "red_striped_ball"
    )
    photos = world.subject_photos(world.SUBJECTS[0], RES)
    np.testing.assert_array_equal(subject.images, np.stack([p.image for p in photos]))
    np.testing.assert_array_equal(subject.masks, np.stack([p.mask for p in photos]))
    np.testing.assert_array_equal(subject.backgrounds, np.stack([p.background for p in photos]))
    with pytest.raises(DataError, match="not a ToyBench folder"):
        world.read_truth(tmp_path)


def test_world_config_trains_a_toybench_subject_from_nothing(tmp_path):
    from idfuse_jax import config_lib
    from idfuse_jax.subject import subject_images

    module = config_lib.sibling_module(
        str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"), "world"
    )
    config = module.get_config("yellow_checked_box")
    config_lib.validate(config)
    assert (config.data.instance_dir, config.data.class_name) == ("world:yellow_checked_box", "box")
    images, backgrounds, decouple = subject_images(config, tmp_path)
    photos = world.subject_photos(world.SUBJECTS[1], RES)
    np.testing.assert_array_equal(images, np.stack([p.image for p in photos]))
    np.testing.assert_array_equal(backgrounds, np.stack([p.background for p in photos]))
    assert decouple.tolist() == [1.0] * world.PHOTOS
    with pytest.raises(DataError, match="no ToyBench subject 'teal_ball'; one of red_striped_ball"):
        module.get_config("teal_ball")
