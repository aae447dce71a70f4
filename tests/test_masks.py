"""Masks that never fail silently: saliency-seeded GrabCut, collapse detection, retries and the
per-photo record that takes a rejected photo out of L3 and L4."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from idfuse_jax import losses
from idfuse_jax.data import synthetic_subject, write_synthetic_subject
from idfuse_jax.data.images import read_mask
from idfuse_jax.errors import ConfigError, DataError
from idfuse_jax.prepare import (
    CENTRE_PRIOR,
    MANIFEST,
    PREVIEW,
    GrabCut,
    MaskCheck,
    choose_mask,
    explicit_decoupling,
    make_segmenter,
    prepare_subject,
)
from idfuse_jax.prepare.masks import iou, saliency_grabcut

RES = 96


def border_subject(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic photo whose object is cut in half by the left border, and its exact mask."""
    (image,), (mask,), (scene,) = synthetic_subject(1, RES, seed)
    xs = np.flatnonzero(mask.any(axis=0))
    shift = (xs[0] + xs[-1]) // 2
    moved_mask, moved = np.zeros_like(mask), np.zeros_like(image)
    moved_mask[:, : RES - shift], moved[:, : RES - shift] = mask[:, shift:], image[:, shift:]
    return np.where(moved_mask[..., None] > 0, moved, scene), moved_mask


def coarse_saliency(mask: np.ndarray, seed: int, grid: int = 6) -> np.ndarray:
    """What a DINO ViT's CLS attention looks like: the subject, blurred to a coarse patch grid,
    on a little noise."""
    import cv2

    blurred = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), RES / 16)
    coarse = cv2.resize(blurred, (grid, grid), interpolation=cv2.INTER_AREA)
    noise = np.random.default_rng(seed).uniform(0, 0.05 * coarse.max(), coarse.shape)
    return coarse + noise.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_saliency_seeding_recovers_a_subject_at_the_border(seed):
    image, truth = border_subject(seed)
    assert truth[:, 0].any()  # the subject touches the border
    border = GrabCut()(image)
    assert iou(border, truth) < 0.5  # border seeding takes the subject for background...
    assert MaskCheck()(border).startswith("coverage")  # ...and the collapse is caught
    recovered = saliency_grabcut(image, coarse_saliency(truth, seed))
    assert iou(recovered, truth) >= 0.8, iou(recovered, truth)
    assert MaskCheck()(recovered) is None


def test_mask_check_reasons():
    check = MaskCheck(floor=0.05, ceiling=0.95, min_thickness=0.05)
    yy, xx = np.mgrid[:200, :200]
    disk = lambda r: ((yy - 100) ** 2 + (xx - 100) ** 2 < r * r).astype(np.uint8)
    assert check(disk(60)) is None
    assert check(disk(15)) == "coverage 1.7% under the 5% floor"
    assert check(1 - disk(15)) == "coverage 98.3% over the 95% ceiling"
    stripes = ((xx % 20 < 3) & (yy > 20)).astype(np.uint8)  # 10 strips 3 px wide: 13 % cover
    assert check(stripes) == ("largest part is a sliver (1.5% of the shorter side thick, under 5%)")
    assert check(np.zeros((200, 200), np.uint8)) == "coverage 0.0% under the 5% floor"


def test_collapsed_mask_is_retried_then_excluded():
    image, truth = border_subject(0)
    collapsed = lambda _: np.zeros(truth.shape, np.uint8)
    calls = []

    def retry(img):
        calls.append(img)
        return truth.copy()

    mask, record = choose_mask(image, collapsed, MaskCheck(), retry)
    assert len(calls) == 1 and record["retries"] == 1 and record["accepted"]
    np.testing.assert_array_equal(mask, truth)
    assert record["retried_because"] == "coverage 0.0% under the 5% floor"

    mask, record = choose_mask(image, collapsed, MaskCheck(), lambda _: None)
    assert not record["accepted"] and record["retries"] == 1 and record["coverage"] == 0
    assert record["reason"].startswith("coverage 0.0% under the 5% floor; retried with ")
    assert record["reason"].endswith(": no confident mask")
    # The centre prior is no rescue for a half-cut subject: its two widths disagree.
    _, record = choose_mask(image, collapsed, MaskCheck(), CENTRE_PRIOR)
    assert not record["accepted"], record


def no_confident_mask(image):
    return None


@pytest.fixture(scope="module")
def prepared_with_a_collapse(tmp_path_factory):
    """A synthetic subject whose photo 01 gets a collapsed mask, and no mask from the retry."""
    root = tmp_path_factory.mktemp("collapse")
    _, masks, _ = write_synthetic_subject(root / "subj", 3, 48, seed=0)
    queue = [masks[0], np.eye(48, dtype=np.uint8), masks[2]]  # photos come in order

    def segment(image):
        return queue.pop(0)

    result = prepare_subject(
        root / "subj", root / "out", masks=segment, retry=no_confident_mask, progress=False
    )
    return root, result


def test_manifest_and_preview_record_the_rejection(prepared_with_a_collapse):
    root, result = prepared_with_a_collapse
    assert result.rejected == {
        "01": "coverage 2.1% under the 5% floor; retried with "
        "test_masks.no_confident_mask: no confident mask"
    }
    entries = json.loads((root / "out" / MANIFEST).read_text())["images"]
    assert [entries[s]["accepted"] for s in ("00", "01", "02")] == [True, False, True]
    assert [entries[s]["retries"] for s in ("00", "01", "02")] == [0, 1, 0]
    assert entries["01"]["coverage"] == pytest.approx(48 / 48**2, abs=1e-4)
    assert entries["01"]["reason"] == result.rejected["01"] and entries["00"]["reason"] is None
    assert all(".segment" in e["mask_source"] for e in entries.values())
    np.testing.assert_array_equal(explicit_decoupling(root / "out", ["00", "01", "02"]), [1, 0, 1])
    np.testing.assert_array_equal(explicit_decoupling(root / "out", ["01", "00"]), [0, 1])
    with pytest.raises(DataError, match=r"manifest\.json: no current entry for image\(s\) 07"):
        explicit_decoupling(root / "out", ["00", "07"])
    # The rejected row of the preview is framed in red; the others are not.
    preview = np.asarray(Image.open(root / "out" / PREVIEW))
    row, red = 160 + 4, np.array([220, 0, 0])
    assert (preview[row + 1, 1] == red).all() and (preview[row + 80, 1] == red).all()
    assert not (preview[1, 1] == red).all() and not (preview[2 * row + 1, 1] == red).all()
    # The rejected photo keeps its (bad) mask and a background, so the subject loads whole.
    assert read_mask(root / "out" / "masks" / "01.png").sum() == 48


def test_dino_masks_from_a_vit_folder(tmp_path):
    """masks='dino' (and 'auto' with a DINO folder) runs our ViT's attention into GrabCut."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=16, patch_size=4,
    )  # fmt: skip
    transformers.ViTModel(config).save_pretrained(str(tmp_path / "dino"), safe_serialization=True)
    segment = make_segmenter("auto", dino_model=tmp_path / "dino")
    assert segment.key.startswith("saliency_grabcut(dino(model=")
    write_synthetic_subject(tmp_path / "subj", 2, 48, seed=0)
    prepare_subject(tmp_path / "subj", tmp_path / "out", masks=segment, progress=False)
    entries = json.loads((tmp_path / "out" / MANIFEST).read_text())["images"]
    assert {e["mask_source"] for e in entries.values()} <= {segment.key, CENTRE_PRIOR.key}
    assert all(isinstance(e["accepted"], bool) for e in entries.values())


def test_excluded_photo_leaves_l3_and_l4(prepared_with_a_collapse):
    """The manifest's verdict, as training reads it, takes photo 01 out of L3 and L4: their
    values over a batch holding it are the means over the other photos only."""
    root, _ = prepared_with_a_collapse
    decouple = explicit_decoupling(root / "out", ["00", "01", "02"])
    indices = np.array([1, 0, 2, 1])  # photo 01 twice (as with flips), 00 and 02 once
    rng = np.random.default_rng(0)
    f_i, f_bg, text = (rng.standard_normal((4, 16)).astype(np.float32) for _ in range(3))
    l3 = losses.image_background_loss(f_i, f_bg, jnp.asarray(decouple[indices]))
    l4 = losses.text_background_loss(text, f_bg, jnp.asarray(decouple[indices]))

    def cos(a, b):
        return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

    kept = [1, 2]  # the batch rows of photos 00 and 02
    np.testing.assert_allclose(l3, -np.mean(cos(f_i, f_bg)[kept]), rtol=1e-6)
    np.testing.assert_allclose(l4, np.mean(cos(text, f_bg)[kept]), rtol=1e-6)
    # Not the same as a zero background, nor as the plain mean.
    assert abs(float(l3) + np.mean(cos(f_i, f_bg))) > 1e-3
    none = jnp.zeros(4)
    assert float(losses.image_background_loss(f_i, f_bg, none)) == 0
    assert float(losses.text_background_loss(text, f_bg, none)) == 0
    with pytest.raises(ConfigError, match=r"per-example weights \(3,\) must be \[B\]"):
        losses.image_background_loss(f_i, f_bg, jnp.ones(3))
