"""User paths (idfuse_jax.paths): one type for local and gs:// paths, clear refusals, writes
that never leave a partial file. gs:// itself is exercised against a GCS emulator by
test_multihost.py, test_evaluate.py and test_launch.py."""

import sys

import numpy as np
import pytest
from etils import epath
from PIL import Image

from idfuse_jax import paths
from idfuse_jax.errors import ConfigError


def test_gs_without_gcsfs_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # import gcsfs now raises ImportError
    with pytest.raises(ConfigError) as info:
        paths.as_path("gs://bucket/runs/dog")
    assert str(info.value) == (
        "gs://bucket/runs/dog: gs:// paths need gcsfs; install it with "
        "pip install 'idfuse_jax[gcs]'"
    )


def test_other_schemes_are_refused():
    with pytest.raises(ConfigError, match=r"^s3://b/x: unsupported storage"):
        paths.as_path("s3://b/x")


def test_one_path_type_and_no_local_folder_named_after_a_url():
    cloud = paths.as_path("gs://bucket/runs") / "dog"
    assert isinstance(cloud, epath.Path) and str(cloud) == "gs://bucket/runs/dog"
    assert paths.is_cloud(cloud) and not paths.is_cloud("runs/gs:/x")
    assert str(paths.absolute(cloud)) == "gs://bucket/runs/dog"
    assert paths.display(cloud) == "gs://bucket/runs/dog"


def test_local_writes_leave_only_the_file(tmp_path):
    target = tmp_path / "a" / "b" / "image.png"
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    written = paths.save_png(target, image)
    assert isinstance(written, epath.Path) and written == epath.Path(target)
    np.testing.assert_array_equal(np.asarray(Image.open(target)), image)
    paths.write_text(target.parent / "x.json", "{}")
    assert sorted(p.name for p in target.parent.iterdir()) == ["image.png", "x.json"]
