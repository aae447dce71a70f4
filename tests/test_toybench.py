"""ToyBench's ground-truth scores on rendered images with known answers."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from idfuse_jax.data import world
from idfuse_jax.errors import DataError
from idfuse_jax.evaluation import toybench

RES = 32
SUBJECT = world.SUBJECTS[0]  # red striped ball, photographed on sand grass brick wood road


def scene(instance, place, seed=0):
    return world.render(instance, place, RES, np.random.default_rng(seed)).image


def test_every_instance_on_every_place_is_read_exactly():
    for i, instance in enumerate(world.ALL_INSTANCES):
        place = tuple(world.PLACES)[i % len(world.PLACES)]
        reading = toybench.read_image(scene(instance, place, i))
        assert (reading.shape, reading.colour, reading.pattern) == (
            instance.shape,
            instance.colour,
            instance.pattern,
        ), (instance, place)
        assert reading.places[place] > 0.99, (instance, place)


def test_correct_image_scores_high_and_each_wrong_attribute_low():
    right = toybench.score_image(scene(SUBJECT.instance, "snow"), SUBJECT, "snow")
    assert right == {"identity": 1.0, "shape": 1.0, "colour": 1.0, "pattern": 1.0,
                     "fidelity": pytest.approx(1.0, abs=0.01), "leakage": 0.0}  # fmt: skip
    for field, wrong in (("shape", "box"), ("colour", "yellow"), ("pattern", "plain")):
        other = dataclasses.replace(SUBJECT.instance, **{field: wrong})
        scores = toybench.score_image(scene(other, "snow"), SUBJECT, "snow")
        assert scores[field] == 0 and scores["identity"] == pytest.approx(2 / 3), field
    # The subject on one of its photos' places when asked for snow: no fidelity, all leakage.
    leaked = toybench.score_image(scene(SUBJECT.instance, "brick"), SUBJECT, "snow")
    assert leaked["identity"] == 1 and leaked["fidelity"] < 0.01 and leaked["leakage"] > 0.99
    # Leakage is only measured for places new to the subject.
    assert toybench.score_image(scene(SUBJECT.instance, "sand"), SUBJECT, "sand")["leakage"] is None
    # No object at all: no identity.
    empty = world.draw_place("snow", RES, np.random.default_rng(0))
    assert toybench.score_image(empty, SUBJECT, "snow")["identity"] == 0


def test_half_and_half_background_is_measured_in_proportion():
    rng = np.random.default_rng(1)
    image = scene(SUBJECT.instance, "snow")
    image[:, : RES // 2] = world.draw_place("grass", RES, rng)[
        :, : RES // 2
    ]  # grass: a photo place
    scores = toybench.score_image(image, SUBJECT, "snow")
    assert 0.3 < scores["fidelity"] < 0.7 and 0.3 < scores["leakage"] < 0.7
    assert scores["fidelity"] + scores["leakage"] == pytest.approx(1, abs=0.02)


def test_a_sample_grid_is_scored_image_by_image_against_its_prompts():
    """A run's samples/step_N.png: the subject on snow, then a magenta ball on water (wrong
    colour and pattern), then the subject on its training place sand where wood was asked."""
    other = dataclasses.replace(SUBJECT.instance, colour="magenta", pattern="plain")
    grid = np.concatenate(
        [scene(SUBJECT.instance, "snow"), scene(other, "water"), scene(SUBJECT.instance, "sand")],
        axis=1,
    )
    prompts = ["a sks ball in the snow", "a sks ball on water", "a sks ball on a wooden floor"]
    scores = toybench.score_samples(grid, SUBJECT, prompts, RES)
    assert scores["identity"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert scores["shape"] == 1
    assert scores["colour"] == scores["pattern"] == pytest.approx(2 / 3)
    assert scores["fidelity"] == pytest.approx(2 / 3, abs=0.01)  # sand is not the wood asked for
    assert scores["leakage"] == pytest.approx(0, abs=0.01)  # snow and water are new places
    with pytest.raises(DataError, match="a sample grid of 2 prompts at 32 px is 32x64, not 32x96"):
        toybench.score_samples(grid, SUBJECT, prompts[:2], RES)


def test_score_folder_writes_the_table(tmp_path):
    bench = world.write_toybench(tmp_path / "bench", RES, subjects=world.SUBJECTS[:2])
    images = tmp_path / "images"
    places = list(world.PLACES)
    for s in world.SUBJECTS[:2]:
        (images / s.name).mkdir(parents=True)
        for p in range(len(places)):  # the subject itself, always on its first photo place
            Image.fromarray(scene(s.instance, s.places[0], p)).save(
                images / s.name / f"{p:02d}_0.png"
            )
    results = toybench.score_folder(images, bench)
    first = results["subjects"][SUBJECT.name]
    assert first["identity"] == 1.0
    assert first["fidelity"] == pytest.approx(1 / len(places), abs=0.01)  # only sand is right
    assert first["leakage"] == pytest.approx(1.0, abs=0.01)  # all sand, a photo place
    toybench.write_scores(tmp_path / "out", results)
    table = (tmp_path / "out" / "toybench.md").read_text()
    assert "| red_striped_ball | 1.000 | 1.000 | 1.000 | 1.000 | 0.125 | 1.000 |" in table
    (images / "teal_ball").mkdir()
    with pytest.raises(DataError, match="teal_ball: not a subject of the ToyBench"):
        toybench.score_folder(images, bench)


def test_evaluate_scores_a_toybench_folder_without_dino_and_clip(tmp_path):
    from idfuse_jax.errors import ConfigError
    from idfuse_jax.evaluation.run import evaluate

    bench = world.write_toybench(tmp_path / "bench", RES, subjects=world.SUBJECTS[:1])
    folder = tmp_path / "eval" / "images" / SUBJECT.name
    folder.mkdir(parents=True)
    for p, place in enumerate(world.PLACES):  # the subject, right, on every prompt's place
        Image.fromarray(scene(SUBJECT.instance, place, p)).save(folder / f"{p:02d}_0.png")
    results = evaluate(dino=None, clip=None, images=str(folder.parent), toybench_dir=str(bench))
    assert results["toybench"] == {"identity": 1.0, "shape": 1.0, "colour": 1.0,
                                   "pattern": 1.0, "fidelity": pytest.approx(1, abs=0.01),
                                   "leakage": 0.0}  # fmt: skip
    assert results["overall"]["dino"] is None
    assert (tmp_path / "eval" / "toybench.md").is_file()
    assert (tmp_path / "eval" / "grids" / f"{SUBJECT.name}.png").is_file()
    assert "| ours | - | - | - |" in (tmp_path / "eval" / "results.md").read_text()
    with pytest.raises(ConfigError, match="give both --dino and --clip"):
        evaluate(dino=None, clip=None, images=str(folder.parent), dreambench=str(bench))
    with pytest.raises(DataError, match="not a ToyBench folder"):
        evaluate(dino=None, clip=None, images=str(folder.parent), toybench_dir=str(tmp_path))
