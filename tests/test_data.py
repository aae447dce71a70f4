"""Subject folders (odd files, errors, geometry), the synthetic subject, the grain pipeline."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from idfuse_jax.data import (
    DataError,
    load_subject,
    make_iterator,
    read_image,
    synthetic_subject,
    write_synthetic_subject,
)
from idfuse_jax.data.images import read_mask, resize_crop


def _save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _halves(h, w, left=(220, 20, 20), right=(20, 20, 220)):
    """An image whose left half is one colour and right half another."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2], a[:, w // 2 :] = left, right
    return a


# ---------------------------------------------------------------------------------------------
# The DreamBooth dog


@pytest.mark.parametrize("resolution", [512, 64])
def test_dog_loads(dreambooth_dir, resolution):
    subject = load_subject(dreambooth_dir / "dog", resolution, min_size=256)
    assert subject.names == ("00", "01", "02", "03", "04")
    assert subject.images.shape == (5, resolution, resolution, 3)
    assert subject.images.dtype == np.uint8
    assert subject.masks is None and subject.backgrounds is None
    original = read_image(dreambooth_dir / "dog" / "00.jpg")
    if resolution == 512:  # the shared photos are 512 px squares: nothing to resample
        np.testing.assert_array_equal(subject.images[0], original)
    else:  # downscaled, the picture is the same: 8x8 block means agree
        blocks = original.reshape(64, 8, 64, 8, 3).mean(axis=(1, 3))
        assert np.abs(subject.images[0].astype(float) - blocks).mean() < 4


# ---------------------------------------------------------------------------------------------
# Odd inputs: modes and orientation


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 24 tall, red left / blue right; orientation 6 = display rotated 90° CW,
    # so the displayed photo is 24 wide x 40 tall with red on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(_halves(24, 40)).save(path, exif=exif, quality=95)
    image = read_image(path)
    assert image.shape == (40, 24, 3)
    assert image[:16, :, 0].mean() > 180 and image[:16, :, 2].mean() < 60
    assert image[-16:, :, 2].mean() > 180 and image[-16:, :, 0].mean() < 60


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 1] = 255  # junk green under full transparency
    rgba[:8, :, :] = (200, 10, 10, 255)
    image = read_image(_save(tmp_path / "a.png", rgba))
    np.testing.assert_array_equal(image[:8], np.broadcast_to([200, 10, 10], (8, 16, 3)))
    np.testing.assert_array_equal(image[8:], np.full((8, 16, 3), 255))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "I;16"])
def test_grey_and_palette_modes_become_rgb(tmp_path, mode):
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    pil = Image.fromarray(grey)
    if mode == "I;16":
        pil = Image.fromarray(grey.astype(np.uint16) * 257)  # full 16-bit range
    elif mode != "L":
        pil = pil.convert(mode)
    path = tmp_path / "grey.png"
    pil.save(path)
    image = read_image(path)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    assert np.abs(image[..., 0].astype(int) - grey).max() <= 1


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    rgb = _halves(16, 16, left=(230, 30, 30), right=(30, 30, 230))
    path = tmp_path / "c.jpg"
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    image = read_image(path)
    assert image.shape == (16, 16, 3)
    assert np.abs(image.astype(int) - rgb).mean() < 12


def test_webp_is_read(tmp_path):
    rgb = _halves(16, 16)
    path = tmp_path / "w.webp"
    Image.fromarray(rgb).save(path, lossless=True)
    np.testing.assert_array_equal(read_image(path), rgb)


# ---------------------------------------------------------------------------------------------
# Errors name the culprit


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}: subject folder not found"):
        load_subject(tmp_path / "nope", 16)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}: no images"):
        load_subject(tmp_path, 16)


def test_other_files_are_skipped_with_a_warning(tmp_path, caplog):
    _save(tmp_path / "00.png", _halves(16, 16))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    with caplog.at_level(logging.WARNING):
        subject = load_subject(tmp_path, 8)
    assert subject.names == ("00",)
    assert any(
        "notes.txt" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records
    )
    (tmp_path / "00.png").unlink()
    with pytest.raises(DataError, match="no images"):
        load_subject(tmp_path, 8)


def test_corrupt_file_is_named(tmp_path):
    _save(tmp_path / "00.png", _halves(16, 16))
    (tmp_path / "01.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"01\.jpg: unreadable or truncated image"):
        load_subject(tmp_path, 8)


def test_truncated_file_is_named(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, format="JPEG"
    )
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DataError, match=r"cut\.jpg: unreadable or truncated image"):
        load_subject(tmp_path, 8)


def test_tiny_image_is_named(tmp_path):
    _save(tmp_path / "big.png", _halves(64, 64))
    _save(tmp_path / "small.png", _halves(20, 40))
    with pytest.raises(DataError, match=r"small\.png: image is 40x20 px, under the minimum .* 32"):
        load_subject(tmp_path, 16, min_size=32)


def test_duplicate_stems_are_refused(tmp_path):
    _save(tmp_path / "00.png", _halves(16, 16))
    _save(tmp_path / "00.jpg", _halves(16, 16))
    with pytest.raises(DataError, match=r"00\.png: has the same stem as 00\.jpg"):
        load_subject(tmp_path, 8)


def test_mask_errors(tmp_path):
    _save(tmp_path / "00.png", _halves(16, 24))
    _save(tmp_path / "01.png", _halves(16, 24))
    _save(tmp_path / "masks" / "00.png", np.zeros((16, 20), np.uint8))
    with pytest.raises(DataError, match=r"masks/00\.png: mask is 20x16 px but its image is 24x16"):
        load_subject(tmp_path, 8)
    _save(tmp_path / "masks" / "00.png", np.zeros((16, 24), np.uint8))
    with pytest.raises(DataError, match=r"masks: no mask for image 01"):
        load_subject(tmp_path, 8)


# ---------------------------------------------------------------------------------------------
# Geometry: masks follow their images


def test_masks_get_the_image_geometry(tmp_path):
    # A wide photo with a red disc off-centre; the mask marks the disc. After centre crop and
    # resize, red pixels and mask pixels must still coincide.
    h, w = 60, 100
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (yy - 30) ** 2 + (xx - 62) ** 2 <= 15**2
    image = np.full((h, w, 3), 90, np.uint8)
    image[disc] = (230, 20, 20)
    _save(tmp_path / "00.png", image)
    _save(tmp_path / "masks" / "00.png", disc.astype(np.uint8) * 255)
    subject = load_subject(tmp_path, 24)
    assert subject.images.shape == (1, 24, 24, 3) and subject.masks.shape == (1, 24, 24)
    red = subject.images[0, ..., 0] > 160
    mask = subject.masks[0] > 0
    assert set(np.unique(subject.masks)) <= {0, 1}
    assert (red & mask).sum() / (red | mask).sum() > 0.85
    # The disc sits right of centre: the centre crop (columns 20..80) keeps it right of centre.
    assert mask[:, 12:].sum() > 3 * mask[:, :12].sum()


def test_alpha_cutout_mask(tmp_path):
    cutout = np.zeros((8, 8, 4), np.uint8)
    cutout[:, :3, 3] = 255  # opaque left part = subject
    mask = read_mask(_save(tmp_path / "m.png", cutout))
    np.testing.assert_array_equal(mask, np.repeat([[1, 1, 1, 0, 0, 0, 0, 0]], 8, axis=0))


def test_resize_crop_rejects_bad_resolution():
    with pytest.raises(DataError, match="resolution must be positive"):
        resize_crop(np.zeros((4, 4, 3), np.uint8), 0)


# ---------------------------------------------------------------------------------------------
# The synthetic subject


def test_synthetic_subject_ground_truth():
    images, masks, backgrounds = synthetic_subject(5, 48, seed=3)
    assert images.shape == backgrounds.shape == (5, 48, 48, 3) and masks.shape == (5, 48, 48)
    assert images.dtype == backgrounds.dtype == masks.dtype == np.uint8
    assert set(np.unique(masks)) == {0, 1}
    # Exact backgrounds: identical outside the object, different on it.
    outside = masks[..., None] == 0
    np.testing.assert_array_equal(np.where(outside, images, 0), np.where(outside, backgrounds, 0))
    on = masks > 0
    assert (np.abs(images.astype(int) - backgrounds)[on].max(axis=-1) > 60).mean() > 0.95
    fractions = masks.mean(axis=(1, 2))
    assert np.all((fractions > 0.05) & (fractions < 0.5))
    assert masks[:, :2].sum() == masks[:, -2:].sum() == 0  # kept off the border
    assert masks[:, :, :2].sum() == masks[:, :, -2:].sum() == 0
    # Deterministic, per image; a new seed gives new photos.
    again, _, _ = synthetic_subject(3, 48, seed=3)
    np.testing.assert_array_equal(again, images[:3])
    other, _, _ = synthetic_subject(3, 48, seed=4)
    assert not np.array_equal(other, images[:3])


def test_synthetic_subject_rejects_bad_sizes():
    with pytest.raises(DataError, match="num_images"):
        synthetic_subject(0, 32, 0)
    with pytest.raises(DataError, match="resolution"):
        synthetic_subject(2, 4, 0)


def test_write_synthetic_subject_round_trips(tmp_path):
    images, masks, backgrounds = write_synthetic_subject(
        tmp_path / "subj", 3, 32, seed=1, with_masks=True, truth_dir=tmp_path / "truth"
    )
    assert sorted(p.name for p in (tmp_path / "subj").glob("*.png")) == [
        "00.png",
        "01.png",
        "02.png",
    ]
    truth = load_subject(tmp_path / "subj", 32, prepared_dir=tmp_path / "truth")
    np.testing.assert_array_equal(truth.images, images)
    np.testing.assert_array_equal(truth.masks, masks)
    np.testing.assert_array_equal(truth.backgrounds, backgrounds)
    given = load_subject(tmp_path / "subj", 32)  # the folder's own masks/
    np.testing.assert_array_equal(given.masks, masks)


# ---------------------------------------------------------------------------------------------
# The grain pipeline


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    write_synthetic_subject(root / "subj", 5, 32, seed=0, truth_dir=root / "truth")
    return load_subject(root / "subj", 16, prepared_dir=root / "truth")


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_pipeline_batches(synthetic):
    it = make_iterator(synthetic.examples(), resolution=16, batch_size=2, seed=0)
    batch = next(it)
    assert batch["image"].shape == batch["background"].shape == (2, 16, 16, 3)
    assert batch["mask"].shape == (2, 16, 16)
    assert batch["image"].dtype == batch["mask"].dtype == np.float32
    assert batch["index"].dtype == np.int32 and batch["flipped"].dtype == np.bool_
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    for b in range(2):
        i = int(batch["index"][b])
        image = synthetic.images[i] / 127.5 - 1
        mask = synthetic.masks[i].astype(np.float32)
        if batch["flipped"][b]:
            image, mask = image[:, ::-1], mask[:, ::-1]
        np.testing.assert_allclose(batch["image"][b], image, atol=1e-6)
        np.testing.assert_array_equal(batch["mask"][b], mask)


def test_pipeline_epoch_and_flips(synthetic):
    it = make_iterator(synthetic.examples(), resolution=8, batch_size=1, seed=1, num_epochs=40)
    batches = list(it)
    indices = np.array([int(b["index"][0]) for b in batches])
    flips = np.array([bool(b["flipped"][0]) for b in batches])
    assert len(indices) == 200
    for epoch in indices.reshape(40, 5):  # each epoch visits every photo once...
        assert sorted(epoch) == [0, 1, 2, 3, 4]
    assert len({tuple(e) for e in indices.reshape(40, 5)}) > 20  # ...in a fresh order
    assert 0.35 < flips.mean() < 0.65
    no_flip = make_iterator(
        synthetic.examples(), resolution=8, batch_size=5, seed=1, random_flip=False, num_epochs=1
    )
    assert not next(no_flip)["flipped"].any()


def test_pipeline_state_restores_exactly(synthetic):
    kwargs = dict(resolution=16, batch_size=2, seed=7)
    it = make_iterator(synthetic.examples(), **kwargs)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 4)
    fresh = make_iterator(synthetic.examples(), **kwargs)
    fresh.set_state(state)
    for want, got in zip(expected, _take(fresh, 4)):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_pipeline_errors(synthetic):
    with pytest.raises(DataError, match="index 9 is out of range for 5"):
        make_iterator(synthetic.examples(), resolution=8, batch_size=1, seed=0, indices=[0, 9])
    with pytest.raises(DataError, match="batch_size"):
        make_iterator(synthetic.examples(), resolution=8, batch_size=0, seed=0)
