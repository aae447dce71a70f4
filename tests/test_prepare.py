"""Explicit decoupling preparation: masks, backgrounds, preview, caching, the CLI, ONNX masks."""

import hashlib
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from idfuse_jax.data import DataError, load_subject, read_image, write_synthetic_subject
from idfuse_jax.data.dreambench import PROMPTS_FILE
from idfuse_jax.data.images import read_mask
from idfuse_jax.prepare import (
    MANIFEST,
    PREVIEW,
    GrabCut,
    OnnxSegmenter,
    Telea,
    dilate,
    dilation_pixels,
    prepare_subject,
)

RES = 64  # synthetic photos


def _snapshot(folder: pathlib.Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder` with its mtime and content hash."""
    return {
        str(p.relative_to(folder)): (
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(bool), b.astype(bool)
    return (a & b).sum(axis=(-2, -1)) / (a | b).sum(axis=(-2, -1))


@pytest.fixture(scope="module")
def dog_prepared(dreambooth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dog")
    before = _snapshot(dreambooth_dir / "dog")
    # GrabCut as users get it (at a working size of 160 px it loses the dogs' white chests).
    segment = GrabCut()
    first = prepare_subject(dreambooth_dir / "dog", out, masks=segment, progress=False)
    outputs = _snapshot(out)
    second = prepare_subject(dreambooth_dir / "dog", out, masks=segment, progress=False)
    return dict(
        out=out, first=first, second=second, before=before, outputs=outputs, segment=segment
    )


# Where the dog is in each DreamBooth dog photo, read off the photos by eye: (x0, y0, x1, y1) as
# fractions of the width and height.
DOG_BOXES = {
    "00": (0.08, 0.20, 0.92, 1.00),
    "01": (0.21, 0.12, 0.86, 0.95),
    "02": (0.22, 0.18, 1.00, 0.93),
    "03": (0.12, 0.17, 0.93, 0.92),
    "04": (0.25, 0.00, 1.00, 1.00),
}


def _box_mask(shape: tuple[int, int], box: tuple[float, ...], margin: float = 0.0) -> np.ndarray:
    h, w = shape
    x0, y0, x1, y1 = box
    inside = np.zeros(shape, bool)
    inside[
        int(max(y0 - margin, 0) * h) : int(min(y1 + margin, 1) * h),
        int(max(x0 - margin, 0) * w) : int(min(x1 + margin, 1) * w),
    ] = True
    return inside


def test_dog_writes_masks_backgrounds_preview(dog_prepared, dreambooth_dir):
    out, first = dog_prepared["out"], dog_prepared["first"]
    stems = ["00", "01", "02", "03", "04"]
    assert list(first.processed) == stems and first.skipped == ()
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == stems
    assert sorted(p.stem for p in (out / "backgrounds").glob("*.png")) == stems
    for stem in stems:
        image = read_image(dreambooth_dir / "dog" / f"{stem}.jpg")
        mask = read_mask(out / "masks" / f"{stem}.png", image.shape[:2])
        background = read_image(out / "backgrounds" / f"{stem}.png")
        assert background.shape == image.shape
        # On the dog: nearly all of the mask inside the dog's box, and much of the box covered.
        near_dog = _box_mask(mask.shape, DOG_BOXES[stem], margin=0.05)
        assert mask[near_dog].sum() >= 0.9 * mask.sum(), stem
        assert mask[_box_mask(mask.shape, DOG_BOXES[stem])].mean() > 0.4, stem
        keep = dilate(mask, dilation_pixels(image.shape, Telea().dilate)) == 0
        np.testing.assert_array_equal(background[keep], image[keep])  # only the hole changes
        assert np.abs(background.astype(int) - image)[mask > 0].mean() > 10
    preview = np.asarray(Image.open(out / PREVIEW))
    assert preview.shape[0] == 5 * (160 + 4) and preview.shape[2] == 3
    loaded = load_subject(dreambooth_dir / "dog", 64, prepared_dir=out)
    assert loaded.masks.shape == (5, 64, 64) and loaded.backgrounds.shape == (5, 64, 64, 3)


def test_dog_input_untouched_and_rerun_does_nothing(dog_prepared, dreambooth_dir):
    assert _snapshot(dreambooth_dir / "dog") == dog_prepared["before"]
    second = dog_prepared["second"]
    assert second.processed == () and len(second.skipped) == 5
    assert _snapshot(dog_prepared["out"]) == dog_prepared["outputs"]  # not even rewritten


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    truth = write_synthetic_subject(root / "subj", 4, RES, seed=0)
    return root / "subj", truth


def test_synthetic_masks_and_backgrounds_match_truth(synthetic_dir, tmp_path):
    folder, (images, masks, backgrounds) = synthetic_dir
    result = prepare_subject(folder, tmp_path / "out", progress=False)  # the offline defaults
    assert len(result.processed) == 4
    got = load_subject(folder, RES, prepared_dir=tmp_path / "out")
    ious = _iou(got.masks, masks)
    assert np.all(ious >= 0.8), ious
    # Inpainting brings the hole far closer to the true background than the photo was.
    on = masks > 0
    err = np.abs(got.backgrounds.astype(int) - backgrounds)[on].mean()
    was = np.abs(images.astype(int) - backgrounds)[on].mean()
    assert err < 0.25 * was, (err, was)


def test_only_changed_photos_are_redone(synthetic_dir, tmp_path):
    folder, _ = synthetic_dir
    subject = tmp_path / "subj"
    write_synthetic_subject(subject, 4, RES, seed=0)
    out = tmp_path / "out"
    prepare_subject(subject, out, progress=False)
    # A new photo under an old name, and one photo removed.
    Image.fromarray(np.asarray(Image.open(folder / "00.png"))[::-1].copy()).save(subject / "01.png")
    (subject / "03.png").unlink()
    result = prepare_subject(subject, out, progress=False)
    assert result.processed == ("01",) and result.skipped == ("00", "02")
    assert not (out / "masks" / "03.png").exists() and not (out / "backgrounds" / "03.png").exists()
    assert sorted(json.loads((out / MANIFEST).read_text())["images"]) == ["00", "01", "02"]
    assert np.asarray(Image.open(out / PREVIEW)).shape[0] == 3 * (160 + 4)
    # Other settings are other work: everything is redone.
    redo = prepare_subject(subject, out, masks=GrabCut(iterations=3), progress=False)
    assert redo.processed == ("00", "01", "02")


def test_interrupted_run_keeps_finished_work(tmp_path):
    write_synthetic_subject(tmp_path / "subj", 3, RES, seed=0)
    good = (tmp_path / "subj" / "02.png").read_bytes()
    (tmp_path / "subj" / "02.png").write_bytes(good[:100])  # truncated
    with pytest.raises(DataError, match=r"02\.png: unreadable or truncated image"):
        prepare_subject(tmp_path / "subj", tmp_path / "out", progress=False)
    (tmp_path / "subj" / "02.png").write_bytes(good)
    result = prepare_subject(tmp_path / "subj", tmp_path / "out", progress=False)
    assert result.processed == ("02",) and result.skipped == ("00", "01")


def test_given_masks_are_used(tmp_path):
    _, masks, _ = write_synthetic_subject(tmp_path / "subj", 3, RES, seed=2, with_masks=True)
    masks_dir = tmp_path / "subj" / "masks"
    before = _snapshot(tmp_path / "subj")
    prepare_subject(tmp_path / "subj", tmp_path / "out", masks="given", progress=False)
    assert _snapshot(tmp_path / "subj") == before
    got = load_subject(tmp_path / "subj", RES, prepared_dir=tmp_path / "out")
    np.testing.assert_array_equal(got.masks, masks)
    entries = json.loads((tmp_path / "out" / MANIFEST).read_text())["images"]
    assert {e["mask"] for e in entries.values()} == {"given"}
    (masks_dir / "02.png").unlink()
    with pytest.raises(DataError, match=r"02\.png: no mask in .*masks \(masks='given'\)"):
        prepare_subject(tmp_path / "subj", tmp_path / "out2", masks="given", progress=False)
    # 'auto' fills the missing one with GrabCut and keeps the given ones.
    prepare_subject(tmp_path / "subj", tmp_path / "out3", progress=False)
    entries = json.loads((tmp_path / "out3" / MANIFEST).read_text())["images"]
    assert [entries[s]["mask"] for s in ("00", "01", "02")] == ["given", "given", "computed"]


def test_pluggable_inpainter(synthetic_dir, tmp_path):
    folder, _ = synthetic_dir

    def grey(image, mask):
        return np.where(mask[..., None] > 0, 128, image).astype(np.uint8)

    prepare_subject(folder, tmp_path / "out", inpaint=grey, progress=False)
    got = load_subject(folder, RES, prepared_dir=tmp_path / "out")
    assert np.all(got.backgrounds[got.masks > 0] == 128)


def test_output_inside_input_is_refused(synthetic_dir):
    folder, _ = synthetic_dir
    for out in (folder, folder / "prepared"):
        with pytest.raises(DataError, match="output folder is inside the input folder"):
            prepare_subject(folder, out, progress=False)
    assert not (folder / "prepared").exists()


def test_bad_choices(synthetic_dir, tmp_path):
    folder, _ = synthetic_dir
    with pytest.raises(DataError, match="masks must be one of auto, given, grabcut, dino, onnx"):
        prepare_subject(folder, tmp_path / "o", masks="magic")
    with pytest.raises(DataError, match=r"masks='dino' needs the folder of a DINO ViT"):
        prepare_subject(folder, tmp_path / "o", masks="dino")
    with pytest.raises(DataError, match="masks='onnx' needs"):
        prepare_subject(folder, tmp_path / "o", masks="onnx")
    with pytest.raises(DataError, match="inpaint='sd' needs"):
        prepare_subject(folder, tmp_path / "o", inpaint="sd")


# ---------------------------------------------------------------------------------------------
# ONNX segmenter


def _onnx_saturation_model(path: pathlib.Path, bad_output: bool = False) -> pathlib.Path:
    """A tiny 'segmentation model': undo ImageNet normalisation, then score saturation.

    The synthetic object is strongly saturated and its scenes are nearly grey, so
    logit = 20 * (max(rgb) - min(rgb) - 0.3) separates them.
    """
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value):
        return numpy_helper.from_array(np.asarray(value, np.float32), name)

    inits = [
        const("std", np.reshape((0.229, 0.224, 0.225), (1, 3, 1, 1))),
        const("mean", np.reshape((0.485, 0.456, 0.406), (1, 3, 1, 1))),
        const("offset", 0.3),
        const("gain", 20.0),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "std"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mean"], ["rgb"]),
        helper.make_node("ReduceMax", ["rgb"], ["hi"], axes=[1], keepdims=1),
        helper.make_node("ReduceMin", ["rgb"], ["lo"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["hi", "lo"], ["sat"]),
        helper.make_node("Sub", ["sat", "offset"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logit"]),
    ]
    out_name, out_channels = ("rgb", 3) if bad_output else ("logit", 1)
    graph = helper.make_graph(
        nodes,
        "saturation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, RES, RES])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [1, out_channels, RES, RES])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_onnx_masks(synthetic_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    folder, (_, masks, _) = synthetic_dir
    model = _onnx_saturation_model(tmp_path / "seg.onnx")
    prepare_subject(folder, tmp_path / "out", masks="onnx", onnx_model=model, progress=False)
    got = load_subject(folder, RES, prepared_dir=tmp_path / "out")
    ious = _iou(got.masks, masks)
    assert np.all(ious >= 0.8), ious


def test_onnx_errors(synthetic_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    folder, _ = synthetic_dir
    with pytest.raises(DataError, match=r"nope\.onnx: ONNX model file not found"):
        OnnxSegmenter(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"junk\.onnx: not a loadable ONNX model"):
        OnnxSegmenter(tmp_path / "junk.onnx")
    bad = OnnxSegmenter(_onnx_saturation_model(tmp_path / "bad.onnx", bad_output=True))
    with pytest.raises(
        DataError, match=r"bad\.onnx: output shape \(1, 3, 64, 64\) is not a single"
    ):
        bad(read_image(folder / "00.png"))


# ---------------------------------------------------------------------------------------------
# Command line


def main(args: list[str]) -> subprocess.CompletedProcess:
    """`python -m idfuse_jax.prepare ARGS`, as a user runs it."""
    command = [sys.executable, "-m", "idfuse_jax.prepare", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_cli_prepares_a_dreambench_folder(tmp_path):
    bench = tmp_path / "bench"
    lines = ["Classes", "", "subject_name,class", "toy_a,toy", "toy_b,toy", "", "Prompts", ""]
    lines += ["Object Prompts", "", "prompt_list = [", "'a {0} {1}'.format(u, c)", "]", ""]
    lines += ["Live Subject Prompts", "", "prompt_list = [", "'a {0} {1}'.format(u, c)", "]"]
    bench.mkdir()
    (bench / PROMPTS_FILE).write_text("\n".join(lines))
    write_synthetic_subject(bench / "toy_a", 2, 32, seed=0)
    write_synthetic_subject(bench / "toy_b", 3, 32, seed=1)
    out = tmp_path / "prepared"
    assert main([str(bench), "--out", str(out), "--subjects", "toy_b"]).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["toy_b"]
    second = main([str(bench), "--out", str(out)])
    assert second.returncode == 0, second.stderr
    assert "prepared 2 image(s), 3 already up to date" in second.stdout
    for subject, n in (("toy_a", 2), ("toy_b", 3)):
        assert len(list((out / subject / "masks").glob("*.png"))) == n
        assert len(list((out / subject / "backgrounds").glob("*.png"))) == n
        assert (out / subject / PREVIEW).is_file()


def test_cli_bad_input_is_one_line(tmp_path):
    missing, out = str(tmp_path / "missing"), str(tmp_path / "o")
    for args, message in (
        ([missing, "--out", out], f"{missing}: subject folder not found"),
        ([missing], "flag --out=None: Flag --out must have a value other than None."),
        ([missing, "--out", out, "--masks=magic"], "flag --masks=magic: value should be one of"),
    ):
        proc = main(args)
        assert proc.returncode == 1
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith(f"error: {message}"), proc.stderr


def test_cli_module_exit_status(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'empty'}: no images (JPEG, PNG or WebP)"
    ]


# ---------------------------------------------------------------------------------------------
# SD inpainting backend: parity with diffusers' StableDiffusionInpaintPipeline (tiny, random)

SD_SIDE = 16  # photo side given to the model (VAE x2, UNet x4 -> granularity 8)


@pytest.fixture(scope="module")
def sd_inpaint_folder(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from parity_utils import tiny_sd_inpainting

    return tiny_sd_inpainting(tmp_path_factory.mktemp("sdinpaint"), SD_SIDE)


@pytest.mark.slow
def test_sd_inpainting_matches_diffusers(sd_inpaint_folder, monkeypatch):
    import torch
    from diffusers.models.autoencoders import vae as torch_vae
    from parity_utils import nhwc_to_nchw, rel_err

    from idfuse_jax.prepare.sd_inpaint import SDInpainter

    folder, pipe = sd_inpaint_folder
    inpainter = SDInpainter(folder, steps=3, size=SD_SIDE, seed=5)
    image, mask, _ = (a[0] for a in write_synthetic_subject(folder.parent / "photo", 1, SD_SIDE, 0))
    ours = inpainter.generate(image / 127.5 - 1, mask.astype(np.float32))
    # The reference, fed the same starting noise; the masked photo's latent is the posterior
    # mean on our side, so make diffusers take the mean too.
    monkeypatch.setattr(
        torch_vae.DiagonalGaussianDistribution, "sample", lambda self, *_, **__: self.mean
    )
    shape = (1, SD_SIDE // 2, SD_SIDE // 2, 4)
    import jax

    noise = np.asarray(jax.random.normal(jax.random.key(5), shape))
    ref = pipe(
        prompt="background", negative_prompt="", image=Image.fromarray(image),
        mask_image=Image.fromarray(mask * 255), height=SD_SIDE, width=SD_SIDE,
        num_inference_steps=3, guidance_scale=7.5, output_type="np",
        latents=torch.from_numpy(nhwc_to_nchw(noise).copy()),
    ).images[0]  # fmt: skip
    err = rel_err(np.clip((ours + 1) / 2, 0, 1), ref)
    assert err < 1e-4, err  # measured 1.4e-6


@pytest.mark.slow
def test_sd_inpainting_in_prepare(sd_inpaint_folder, synthetic_dir, tmp_path, monkeypatch):
    """Backgrounds by the SD inpainter; its model is loaded only when a photo needs one."""
    from idfuse_jax import weights
    from idfuse_jax.prepare.sd_inpaint import SDInpainter

    folder, _ = sd_inpaint_folder
    subject, (images, masks, _) = synthetic_dir
    loads, load_unet = [], weights.load_unet
    monkeypatch.setattr(weights, "load_unet", lambda *a, **k: loads.append(a) or load_unet(*a, **k))
    inpainter = SDInpainter(folder, steps=2, size=SD_SIDE)
    assert loads == []
    result = prepare_subject(subject, tmp_path / "out", inpaint=inpainter, progress=False)
    assert len(result.processed) == 4 and len(loads) == 1
    got = load_subject(subject, RES, prepared_dir=tmp_path / "out")
    hole = np.stack([dilate(m, dilation_pixels(m.shape, inpainter.dilate)) for m in masks])
    np.testing.assert_array_equal(got.backgrounds[hole == 0], images[hole == 0])
    assert np.abs(got.backgrounds.astype(int) - images)[masks > 0].mean() > 10
    # A rerun (a new inpainter) with every background cached loads no model.
    rerun = SDInpainter(folder, steps=2, size=SD_SIDE)
    again = prepare_subject(subject, tmp_path / "out", inpaint=rerun, progress=False)
    assert again.processed == () and len(loads) == 1


def test_sd_inpainting_needs_nine_channels(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"in_channels": 4}))
    with pytest.raises(DataError, match="UNet has in_channels 4; SD inpainting needs"):
        prepare_subject(
            write_synthetic_subject(tmp_path / "s", 1, 16, 0) and tmp_path / "s",
            tmp_path / "o", inpaint="sd", inpaint_model=tmp_path,
        )  # fmt: skip
