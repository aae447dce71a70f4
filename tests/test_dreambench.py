"""The DreamBench tfds builder: parsing, building offline, reading back as numpy, errors."""

import pathlib
import sys

import numpy as np
import pytest

from idfuse_jax.data import DataError, make_iterator, read_image, write_synthetic_subject
from idfuse_jax.data.dreambench import (
    PROMPTS_FILE,
    Dreambench,
    dreambench_builder,
    dreambench_source,
    parse_prompts_file,
    read_benchmark,
    subject_indices,
)

SUBJECTS = ("can", "dog")  # one object, one live subject: 6 + 5 photos


def test_prompts_file(dreambooth_dir):
    classes, objects, live = parse_prompts_file(dreambooth_dir / PROMPTS_FILE)
    assert (
        len(classes) == 30
        and classes["dog"] == "dog"
        and classes["bear_plushie"] == ("stuffed animal")
    )
    assert len(objects) == len(live) == 25
    assert objects[0] == "a {token} {class_name} in the jungle"
    assert live[10] == "a {token} {class_name} wearing a red hat"
    assert objects[-1] == live[-1] == "a cube shaped {token} {class_name}"
    bench = read_benchmark(dreambooth_dir)
    assert sum(bench.is_live(s) for s in bench.subjects) == 9  # the dogs and cats
    assert bench.prompts("dog") is bench.live_prompts
    assert bench.prompts("can") is bench.object_prompts


@pytest.fixture(scope="module")
def built(dreambooth_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    return data_dir, dreambench_builder(data_dir, dreambooth_dir, subjects=SUBJECTS)


def test_builds_and_reads_back_every_image(built, dreambooth_dir):
    _, builder = built
    source = builder.as_data_source(split="train")
    assert len(source) == 11
    seen = []
    for i in range(len(source)):
        ex = source[i]
        subject, name = ex["subject"].decode(), ex["name"].decode()
        seen.append((subject, name))
        assert ex["class_name"].decode() == subject  # "can" and "dog" are their own classes
        assert bool(ex["live"]) == (subject == "dog")
        np.testing.assert_array_equal(
            ex["image"], read_image(dreambooth_dir / subject / f"{name}.jpg")
        )
        assert set(ex) == {"subject", "name", "class_name", "live", "image"}
    assert seen == [("can", f"{i:02d}") for i in range(6)] + [("dog", f"{i:02d}") for i in range(5)]
    # Built without TensorFlow: it was never imported.
    assert "tensorflow" not in sys.modules


def test_metadata_and_reuse(built, dreambooth_dir):
    data_dir, builder = built
    files = sorted(pathlib.Path(builder.data_path).glob("*array_record*"))
    assert files
    stamps = [f.stat().st_mtime_ns for f in files]
    source = dreambench_source(data_dir, dreambooth_dir, subjects=SUBJECTS)  # reuses the build
    assert [f.stat().st_mtime_ns for f in files] == stamps
    meta = source.dataset_info.metadata
    assert len(meta["object_prompts"]) == len(meta["live_prompts"]) == 25
    assert meta["live_prompts"][11] == "a {token} {class_name} wearing a santa hat"
    assert meta["subjects"]["dog"] == {"class_name": "dog", "live": True, "start": 6, "count": 5}
    assert subject_indices(source, "dog") == [6, 7, 8, 9, 10]
    with pytest.raises(DataError, match="'cat' is not in this DreamBench build"):
        subject_indices(source, "cat")
    # Another subset is another build, not the stale one.
    other = Dreambench(source_dir=dreambooth_dir, subjects=["dog"], data_dir=data_dir)
    assert other.builder_config.name != builder.builder_config.name


def test_iterator_over_one_subject(built, dreambooth_dir):
    _, builder = built
    source = builder.as_data_source(split="train")
    it = make_iterator(
        source,
        resolution=32,
        batch_size=5,
        seed=0,
        indices=subject_indices(source, "dog"),
        num_epochs=1,
        random_flip=False,
    )
    batch = next(it)
    assert batch["image"].shape == (5, 32, 32, 3)
    assert sorted(batch["index"].tolist()) == [6, 7, 8, 9, 10]


def _fake_bench(root, subjects):
    """A DreamBench-layout folder of synthetic subjects, with exact 'prepared' outputs."""
    lines = ["Classes", "", "subject_name,class"] + [f"{s},toy" for s in subjects]
    lines += ["", "Prompts", "", "Object Prompts", "", "prompt_list = ["]
    lines += ["'a {0} {1} in the snow'.format(unique_token, class_token),", "]"]
    lines += ["", "Live Subject Prompts", "", "prompt_list = ["]
    lines += ["'a {0} {1} wearing a hat'.format(unique_token, class_token)", "]"]
    root.mkdir(parents=True)
    (root / PROMPTS_FILE).write_text("\n".join(lines))
    truth = {}
    for seed, s in enumerate(subjects):
        truth[s] = write_synthetic_subject(
            root / s, 3, 24, seed=seed, truth_dir=root.parent / "prepared" / s
        )
    return truth


def test_prepared_build_has_masks_and_backgrounds(tmp_path):
    truth = _fake_bench(tmp_path / "bench", ["toy_a", "toy_b"])
    source = dreambench_source(
        tmp_path / "tfds", tmp_path / "bench", prepared_dir=tmp_path / "prepared"
    )
    assert len(source) == 6
    assert source.dataset_info.metadata["object_prompts"] == ["a {token} {class_name} in the snow"]
    for i in range(6):
        ex = source[i]
        images, masks, backgrounds = truth[ex["subject"].decode()]
        j = int(ex["name"])
        np.testing.assert_array_equal(ex["image"], images[j])
        np.testing.assert_array_equal(ex["mask"][..., 0], masks[j])
        np.testing.assert_array_equal(ex["background"], backgrounds[j])
    batch = next(
        make_iterator(source, resolution=24, batch_size=6, seed=0, num_epochs=1, random_flip=False)
    )
    order = batch["index"].tolist()
    want = np.stack([truth["toy_a"][1], truth["toy_b"][1]]).reshape(6, 24, 24)[order]
    np.testing.assert_array_equal(batch["mask"], want.astype(np.float32))


def test_errors(tmp_path, dreambooth_dir):
    with pytest.raises(DataError, match=f"{tmp_path / 'none'}: DreamBench folder not found"):
        read_benchmark(tmp_path / "none")
    with pytest.raises(DataError, match=f"{PROMPTS_FILE} not found"):
        read_benchmark(tmp_path)
    with pytest.raises(DataError, match="lists no subject 'unicorn'"):
        read_benchmark(dreambooth_dir, ["dog", "unicorn"])
    _fake_bench(tmp_path / "bench", ["toy_a"])
    (tmp_path / "prepared" / "toy_a" / "masks" / "01.png").unlink()
    with pytest.raises(DataError, match=r"toy_a/masks: no mask for image 01"):
        Dreambench(
            source_dir=tmp_path / "bench", prepared_dir=tmp_path / "prepared", data_dir=tmp_path
        )
    prompts = tmp_path / "bench" / PROMPTS_FILE
    prompts.write_text(prompts.read_text().replace("toy_a,toy", "toy_a,toy\nghost,toy"))
    with pytest.raises(DataError, match=r"bench/ghost: subject folder listed in .* is missing"):
        read_benchmark(tmp_path / "bench")
    prompts.write_text("Classes\n\nsubject_name,class\nghost,toy\n")
    with pytest.raises(DataError, match="no 'Object Prompts' section"):
        read_benchmark(tmp_path / "bench")
