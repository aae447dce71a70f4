"""DreamBench evaluation: metric parity with transformers, and the evaluate CLI end to end.

Metric models are tiny random transformers models saved with save_pretrained (plus the
preprocessor and tokenizer files the real repositories ship); the trained subjects are tiny runs
of the real training CLI on a DreamBooth-layout folder written here. Evaluation runs as users
run it: `python -m idfuse_jax.evaluate ...` in a subprocess (its own device count), sharing the
persistent compilation cache with the other CLI tests.
"""

import io
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from parity_utils import perturb_torch_
from PIL import Image
from safetensors.numpy import load_file
from test_tokenizer import write_tokenizer
from test_train import _command, _env, last_error_line, ok

from idfuse_jax.data import dreambench, synthetic
from idfuse_jax.data import images as images_lib
from idfuse_jax.errors import ConfigError, DataError, WeightsError
from idfuse_jax.evaluation import encoders, preprocess, run, scores, subjects

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# The real repositories' preprocessor_config.json (facebook/dino-vits16,
# openai/clip-vit-base-patch32), sizes scaled down to the tiny models' 16 px inputs.
DINO_PROCESSOR = {
    "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 2,
    "size": 16,
}  # fmt: skip
CLIP_PROCESSOR = {
    "crop_size": 16, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 20,
}  # fmt: skip
# The evaluation the CLI tests run: 2 prompts x 2 images per subject, a 2-step sampler.
PROMPTS, PER_PROMPT = 2, 2
SMALL = ("--max_prompts=2", "--num_images=2", "--num_steps=2", "--batch_size=1")


@pytest.fixture(scope="session")
def metric_dirs(tmp_path_factory):
    """(dino folder, clip folder, torch ViTModel, torch CLIPModel)."""
    root = tmp_path_factory.mktemp("metrics")
    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(**TINY, image_size=16, patch_size=4))
    vit = perturb_torch_(vit, 1)
    vit.save_pretrained(str(root / "dino"), safe_serialization=True)
    (root / "dino" / preprocess.PROCESSOR_FILE).write_text(json.dumps(DINO_PROCESSOR))
    write_tokenizer(root / "clip", pad_token="<|endoftext|>")
    vocab = len(json.loads((root / "clip" / "vocab.json").read_text()))
    config = transformers.CLIPConfig(
        text_config=dict(
            **TINY,
            vocab_size=vocab,
            max_position_embeddings=77,
            bos_token_id=0,
            pad_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(**TINY, image_size=16, patch_size=4),
        projection_dim=24,
    )  # fmt: skip  (eos_token_id 2: openai/clip-vit-base-patch32's legacy EOS pooling)
    clip = perturb_torch_(transformers.CLIPModel(config), 2)
    clip.save_pretrained(str(root / "clip"), safe_serialization=True)
    (root / "clip" / preprocess.PROCESSOR_FILE).write_text(json.dumps(CLIP_PROCESSOR))
    return root / "dino", root / "clip", vit, clip


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 picture with structure at several scales (resampling filters matter on it)."""
    small = rng.integers(0, 256, (max(2, height // 6), max(2, width // 6), 3), np.uint8)
    blurred = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.int16)
    noise = rng.integers(-20, 21, (height, width, 3))
    return np.clip(blurred + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    """(generated-like PNGs, real-like PNGs) of different sizes and aspect ratios."""
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(3)
    sizes = {"gen": [(32, 32), (40, 56), (61, 37)], "real": [(48, 64), (50, 50), (70, 45)]}
    files = {}
    for kind, shapes in sizes.items():
        files[kind] = []
        for i, (h, w) in enumerate(shapes):
            path = root / f"{kind}{i}.png"
            Image.fromarray(smooth_image(rng, h, w)).save(path)
            files[kind].append(path)
    return files["gen"], files["real"]


def reference_scores(metric_dirs, gen_files, real_files, texts):
    """DINO, CLIP-I, CLIP-T per generated image, and the real-image baselines, computed with
    transformers' models, processors and tokenizer (an independent implementation)."""
    dino_dir, clip_dir, vit, clip = metric_dirs
    vit_proc = transformers.ViTImageProcessor.from_pretrained(str(dino_dir))
    clip_proc = transformers.CLIPImageProcessor.from_pretrained(str(clip_dir))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(clip_dir))
    load = lambda files: [Image.open(p).convert("RGB") for p in files]
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)

    def dino(files):
        return vit(**vit_proc(load(files), return_tensors="pt")).last_hidden_state[:, 0]

    # transformers 5: get_*_features return the projected embeddings as `pooler_output`.
    def image(files):
        return clip.get_image_features(**clip_proc(load(files), return_tensors="pt")).pooler_output

    def among(features):  # mean cosine of each real image with every other
        sims = cos(features, features)
        return float(((sims.sum(1) - sims.diagonal()) / (len(sims) - 1)).mean())

    with torch.no_grad():
        tokens = tokenizer(list(texts), padding="max_length", max_length=77, return_tensors="pt")
        text = clip.get_text_features(**tokens).pooler_output
        gen_clip, real_dino, real_clip = image(gen_files), dino(real_files), image(real_files)
        return {
            "dino": cos(dino(gen_files), real_dino).mean(1).numpy(),
            "clip_i": cos(gen_clip, real_clip).mean(1).numpy(),
            "clip_t": torch.nn.functional.cosine_similarity(gen_clip, text, dim=-1).numpy(),
            "real_baseline": {"dino": among(real_dino), "clip_i": among(real_clip)},
        }


def test_scores_match_transformers(metric_dirs, image_files):
    """`run.score_subject`, the function evaluations call, against transformers' models on the
    same images: per image, per prompt and the real-image baseline."""
    dino_dir, clip_dir, _, _ = metric_dirs
    gen_files, real_files = image_files
    texts = ("a dog in the snow", "a red dog", "a photo of the dog on the beach")
    ref = reference_scores(metric_dirs, gen_files, real_files, texts)
    models = encoders.load_metric_models(dino_dir, clip_dir)
    subject = subjects.Subject("dog", "dog", True, texts, texts, real_files[0].parent)
    generated = {(p, 0): (path.name, images_lib.read_image(path))
                 for p, path in enumerate(gen_files)}  # fmt: skip
    real = [images_lib.read_image(p) for p in real_files]
    scored = run.score_subject(subject, real, generated, models, real_baseline=True)
    for name in ("dino", "clip_i", "clip_t"):
        ours = np.array([prompt["images"][0][name] for prompt in scored["prompts"]])
        err = np.abs(ours - ref[name]).max()
        print(f"{name}: ours {ours} transformers {ref[name]} max err {err:.2e}")
        assert err <= 1e-4, name
        assert np.ptp(ref[name]) > 1e-3, name  # the images are told apart: not a constant
        assert scored[name] == pytest.approx(ref[name].mean(), abs=1e-4)
    assert scored["real_baseline"] == pytest.approx(ref["real_baseline"], abs=1e-4)


def test_preprocessing_equals_the_processors(metric_dirs, image_files, tmp_path):
    """Pixel for pixel, not just through the scores."""
    dino_dir, clip_dir, _, _ = metric_dirs
    for folder, cls, defaults in (
        (dino_dir, transformers.ViTImageProcessor, preprocess.VIT_DEFAULTS),
        (clip_dir, transformers.CLIPImageProcessor, preprocess.CLIP_DEFAULTS),
    ):
        processing = preprocess.processing_from_folder(folder, defaults)
        reference = cls.from_pretrained(str(folder))
        for path in image_files[1]:
            ref = reference(Image.open(path).convert("RGB"), return_tensors="np")
            ours = preprocess.preprocess(images_lib.read_image(path), processing)
            np.testing.assert_array_equal(ours, ref["pixel_values"][0].transpose(1, 2, 0))
    # transformers 5 saves a CLIPProcessor's image settings inside processor_config.json.
    combined = tmp_path / "combined"
    combined.mkdir()
    (combined / preprocess.COMBINED_FILE).write_text(
        json.dumps({"image_processor": CLIP_PROCESSOR})
    )
    assert preprocess.processing_from_folder(
        combined, preprocess.CLIP_DEFAULTS
    ) == preprocess.processing_from_folder(clip_dir, preprocess.CLIP_DEFAULTS)
    # Without a preprocessor_config.json: the classes' defaults (224 px).
    image = smooth_image(np.random.default_rng(0), 300, 260)
    for cls, defaults in (
        (transformers.ViTImageProcessor, preprocess.VIT_DEFAULTS),
        (transformers.CLIPImageProcessor, preprocess.CLIP_DEFAULTS),
    ):
        ref = cls()(Image.fromarray(image), return_tensors="np")["pixel_values"][0]
        ours = preprocess.preprocess(image, preprocess.processing_from_dict({}, defaults, where=""))
        np.testing.assert_array_equal(ours, ref.transpose(1, 2, 0))


def test_scores_functions():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[3.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(scores.image_similarity(a, b), [(1 + 0.5**0.5) / 2, 0.5**0.5 / 2])
    np.testing.assert_allclose(scores.text_similarity(a, b), [1.0, 0.5**0.5])
    real = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    s = 0.5**0.5
    np.testing.assert_allclose(scores.real_similarity(real), [s / 2, s / 2, s])
    with pytest.raises(ValueError, match="at least 2"):
        scores.real_similarity(real[:1])
    assert (
        subjects.without_token("a {token} {class_name} in the snow", "dog") == "a dog in the snow"
    )


def test_wrong_metric_folders_are_refused(metric_dirs, tmp_path):
    dino_dir, clip_dir, _, _ = metric_dirs
    with pytest.raises(WeightsError, match=rf"--dino {clip_dir}: not a transformers ViTModel"):
        encoders.load_dino(clip_dir)
    with pytest.raises(WeightsError, match=rf"--clip {dino_dir}: not a transformers CLIPModel"):
        encoders.load_clip(dino_dir)
    message = rf"^--clip {tmp_path}: not a transformers CLIPModel folder \(no model\.safetensors"
    with pytest.raises(WeightsError, match=message):
        encoders.load_clip(tmp_path)


# --------------------------------------------------------------------------------------------
# The CLI end to end


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory, dreambooth_dir):
    """A DreamBooth-layout folder: the real prompts file, a live and an object subject of small
    synthetic photos with their masks (so training needs no GrabCut)."""
    root = tmp_path_factory.mktemp("bench")
    prompts = dreambooth_dir / dreambench.PROMPTS_FILE
    (root / dreambench.PROMPTS_FILE).write_text(prompts.read_text())
    for seed, subject in enumerate(("dog", "can")):
        photos, masks, _ = synthetic.synthetic_subject(3, 40, seed)
        (root / subject / "masks").mkdir(parents=True)
        for i, (photo, mask) in enumerate(zip(photos, masks)):
            Image.fromarray(photo).save(root / subject / f"{i:02d}.png")
            Image.fromarray(mask * 255).save(root / subject / "masks" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def runs(tmp_path_factory, bench_dir):
    """One training job of two subjects (dog: live, can: object) of the DreamBooth-layout
    folder, 2 steps each; each has its workdir in runs/subjects/NAME. Their sampler:
    configs/smoke.py's 8 steps."""
    return train_bench_job(tmp_path_factory.mktemp("runs"), bench_dir)


def train_bench_job(root: pathlib.Path, bench_dir: pathlib.Path, *overrides: str) -> pathlib.Path:
    """The training CLI on the dog and can of `bench_dir`, 2 steps, 8 devices."""
    ok(
        subprocess.run(
            _command(
                root,
                f"--config.data.instance_dir={bench_dir}",
                "--config.data.subjects=dog,can",
                "--config.train.steps=2",
                "--config.train.checkpoint_every=2",
                *overrides,
            ),
            env=_env(8),
            cwd=REPO,
            text=True,
            capture_output=True,
            timeout=600,
        )
    )
    return root


def evaluate(*args, devices: int = 8) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "idfuse_jax.evaluate", *args],
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


def metric_flags(metric_dirs) -> tuple[str, str]:
    return f"--dino={metric_dirs[0]}", f"--clip={metric_dirs[1]}"


def mtimes(folder: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*.png")}


@pytest.fixture(scope="session")
def first_eval(runs, metric_dirs):
    """The folder of runs evaluated on 8 devices, with the real-image baseline."""
    out = runs / "eval"
    result = ok(evaluate(f"--workdir={runs}", *metric_flags(metric_dirs), *SMALL,
                         "--real_baseline"))  # fmt: skip
    return out, result


def test_evaluation_writes_everything(first_eval, runs, metric_dirs, bench_dir):
    out, result = first_eval
    assert "DINO" in result.stdout and "8 generated this run" in result.stdout
    names = sorted(str(p.relative_to(out / "images")) for p in (out / "images").rglob("*.png"))
    expected = sorted(f"{s}/{p:02d}_{k}.png" for s in ("can", "dog")
                      for p in range(PROMPTS) for k in range(PER_PROMPT))  # fmt: skip
    assert names == expected
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"settings", "models", "inputs", "published", "overall", "subjects",
                            "real_baseline"}  # fmt: skip
    s = results["settings"]
    assert (s["num_prompts"], s["num_images"], s["num_steps"], s["max_prompts"]) == (2, 2, 2, 2)
    assert (s["devices"], s["seed"], s["guidance_scale"], s["mode"]) == (8, 0, None, "generate")
    assert results["models"] == {"dino": str(metric_dirs[0]), "clip": str(metric_dirs[1])}
    assert results["inputs"]["workdir"] == str(runs) and results["inputs"]["out"] == str(out)
    assert [r["method"] for r in results["published"]] == [
        "DreamBooth (Stable Diffusion)",
        "Textual Inversion (Stable Diffusion)",
        "Real images",
    ]
    bench = dreambench.parse_prompts_file(bench_dir / dreambench.PROMPTS_FILE)
    for name, live, templates in (("dog", True, bench[2]), ("can", False, bench[1])):
        sub = results["subjects"][name]
        assert (sub["live"], sub["class_name"], sub["num_real"], sub["num_images"]) == (
            live, name, 3, 4)  # fmt: skip
        assert sub["workdir"] == str(runs / "subjects" / name) and sub["real_dir"] == str(
            bench_dir / name
        )
        # --num_steps=2 overrides the run's 8 steps; guidance is the run's.
        assert sub["sampler"] == {"sampler": "dpm++", "num_steps": 2, "guidance_scale": 3.0,
                                  "resolution": 32}  # fmt: skip
        prompts = sub["prompts"]
        assert [p["prompt"] for p in prompts] == [
            t.format(token="sks", class_name=name) for t in templates[:PROMPTS]
        ]
        assert [p["clip_t_prompt"] for p in prompts] == [
            " ".join(t.format(token="", class_name=name).split()) for t in templates[:PROMPTS]
        ]
        assert "sks" not in prompts[0]["clip_t_prompt"]
        rows = [r for p in prompts for r in p["images"]]
        assert [r["file"] for r in rows] == [f"{name}/{p:02d}_{k}.png"
                                              for p in range(2) for k in range(2)]  # fmt: skip
        # Every written score against transformers' models on the written and real images.
        ref = reference_scores(
            metric_dirs,
            [out / "images" / r["file"] for r in rows],
            images_lib.list_images(bench_dir / name),
            [prompts[r["prompt_index"]]["clip_t_prompt"] for r in rows],
        )
        for metric in ("dino", "clip_i", "clip_t"):
            values = [r[metric] for r in rows]
            np.testing.assert_allclose(values, ref[metric], atol=1e-4, err_msg=metric)
            for p in prompts:
                assert p[metric] == pytest.approx(np.mean([r[metric] for r in p["images"]]))
            assert sub[metric] == pytest.approx(np.mean(values))
        assert sub["real_baseline"] == pytest.approx(ref["real_baseline"], abs=1e-4)
    for metric in ("dino", "clip_i", "clip_t"):
        subs = [results["subjects"][n][metric] for n in ("dog", "can")]
        assert results["overall"][metric] == pytest.approx(np.mean(subs))
    assert results["overall"]["num_images"] == 8 and results["overall"]["num_subjects"] == 2
    assert results["real_baseline"]["overall"]["dino"] == pytest.approx(
        np.mean([results["subjects"][n]["real_baseline"]["dino"] for n in ("dog", "can")])
    )
    md = (out / "results.md").read_text()
    o = results["overall"]
    assert f"| ours | {o['dino']:.3f} | {o['clip_i']:.3f} | {o['clip_t']:.3f} |" in md
    assert "| DreamBooth (Stable Diffusion) | 0.668 | 0.803 | 0.305 |" in md
    assert "| Textual Inversion (Stable Diffusion) | 0.569 | 0.780 | 0.255 |" in md
    assert "| Real images | 0.774 | 0.885 | - |" in md and "Ruiz et al." in md
    assert "| real images (ours) |" in md and "| dog | dog |" in md and "| can | can |" in md
    for name in ("dog", "can"):
        grid = images_lib.read_image(out / "grids" / f"{name}.png")
        # 5 columns (3 real images, padded), one row of real images, one of 2 prompts.
        assert grid.shape == (2 * 32, 5 * 32, 3)
        first = images_lib.read_image(out / "images" / name / "01_0.png")
        np.testing.assert_array_equal(grid[32:, 32:64], first)


def test_rerun_reuses_and_regenerates_exactly_the_broken(first_eval, runs, metric_dirs):
    out, _ = first_eval
    before = json.loads((out / "results.json").read_text())
    stamps = mtimes(out / "images")
    result = ok(evaluate(f"--workdir={runs}", *metric_flags(metric_dirs), *SMALL))
    assert "0 generated this run" in result.stdout
    assert mtimes(out / "images") == stamps
    deleted, truncated = out / "images" / "dog" / "01_1.png", out / "images" / "can" / "00_0.png"
    original = images_lib.read_image(truncated)
    deleted.unlink()
    truncated.write_bytes(truncated.read_bytes()[:100])
    result = ok(evaluate(f"--workdir={runs}", *metric_flags(metric_dirs), *SMALL))
    assert "2 generated this run" in result.stdout
    after = mtimes(out / "images")
    changed = {k for k in after if after[k] != stamps.get(k)}
    assert changed == {"dog/01_1.png", "can/00_0.png"}
    np.testing.assert_array_equal(images_lib.read_image(truncated), original)  # same seed
    results = json.loads((out / "results.json").read_text())
    assert results["overall"] == pytest.approx(before["overall"])


def test_two_processes_of_one_device_give_the_same_scores_in_the_cloud(
    first_eval, runs, metric_dirs, gcs, tmp_path
):
    """`evaluate --multihost` in two processes of one CPU device each (a mesh over both, CPU
    collectives across them) against one process of 8 devices: the same pictures and scores;
    process 0 alone writes, here to a gs:// folder on the GCS emulator."""
    from gcs_emulator import free_port

    out8, _ = first_eval
    coordinator = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "idfuse_jax.evaluate", f"--workdir={runs}",
               *metric_flags(metric_dirs), *SMALL, "--out=gs://bucket/eval2",
               "--multihost"]  # fmt: skip
    processes = []
    for rank in range(2):
        env = {**gcs.env(_env(1)), "JAX_COORDINATOR_ADDRESS": coordinator,
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(rank)}  # fmt: skip
        with (tmp_path / f"{rank}.out").open("w") as out:
            processes.append(subprocess.Popen(
                command, env=env, cwd=REPO, text=True, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,  # an inherited stdin breaks gloo (test_multihost.py)
            ))  # fmt: skip
    codes = [p.wait(timeout=600) for p in processes]
    logs = [(tmp_path / f"{rank}.out").read_text() for rank in range(2)]
    assert codes == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert "report in gs://bucket/eval2/results.md" in logs[0] and "DINO" not in logs[1]
    two = json.loads(gcs.read("eval2/results.json"))
    eight = json.loads((out8 / "results.json").read_text())
    assert two["settings"]["devices"] == 2 and two["inputs"]["out"] == "gs://bucket/eval2"
    for path in sorted((out8 / "images").rglob("*.png")):
        name = path.relative_to(out8 / "images").as_posix()
        a = images_lib.read_image(path).astype(int)
        b = np.asarray(Image.open(io.BytesIO(gcs.read(f"eval2/images/{name}"))).convert("RGB"))
        assert np.abs(a - b).max() <= 1, path  # per-image seeds: the same picture
    for name in ("dog", "can"):
        for a, b in zip(two["subjects"][name]["prompts"], eight["subjects"][name]["prompts"]):
            for ra, rb in zip(a["images"], b["images"]):
                for metric in ("dino", "clip_i", "clip_t"):
                    assert ra[metric] == pytest.approx(rb[metric], abs=1e-5), (name, ra["file"])
    assert not (REPO / "gs:").exists()


def test_images_folder_is_scored_without_generating(first_eval, metric_dirs, bench_dir, tmp_path):
    """Another method's images, in the same layout (unpadded names accepted), scored as ours."""
    out, _ = first_eval
    generated = json.loads((out / "results.json").read_text())
    images = tmp_path / "theirs" / "images"
    shutil.copytree(out / "images", images)
    (images / "dog" / "00_1.png").rename(images / "dog" / "0_1.png")
    result = ok(evaluate(f"--images={images}", f"--dreambench={bench_dir}",
                         *metric_flags(metric_dirs), "--max_prompts=2", devices=1))  # fmt: skip
    assert "0 generated this run" in result.stdout
    scored = json.loads((images.parent / "results.json").read_text())
    assert scored["settings"]["mode"] == "images" and scored["inputs"]["workdir"] is None
    files = [r["file"] for p in scored["subjects"]["dog"]["prompts"] for r in p["images"]]
    assert files == ["dog/00_0.png", "dog/0_1.png", "dog/01_0.png", "dog/01_1.png"]
    for metric in ("dino", "clip_i", "clip_t"):
        assert scored["overall"][metric] == pytest.approx(generated["overall"][metric], abs=1e-5)
    assert (images.parent / "results.md").is_file() and (
        images.parent / "grids" / "can.png"
    ).is_file()


def test_bad_inputs_are_one_line(runs, metric_dirs, bench_dir, tmp_path):
    """Each refused before any image is drawn; the command prints one line and exits 1."""
    dino, clip = metric_dirs[0], metric_dirs[1]
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.json").write_text((runs / "subjects" / "dog" / "config.json").read_text())
    result = evaluate(f"--workdir={untrained}", *metric_flags(metric_dirs), devices=1)
    assert result.returncode == 1
    assert last_error_line(result) == (
        f"error: {untrained}: no trained weights (idfuse_weights.safetensors); train it first"
    )
    no_real, empty = tmp_path / "no_real", tmp_path / "empty"
    no_real.mkdir()
    empty.mkdir()
    (no_real / "config.json").write_text(
        (runs / "subjects" / "dog" / "config.json")
        .read_text()
        .replace(str(bench_dir / "dog"), str(empty))
    )
    (no_real / "idfuse_weights.safetensors").write_bytes(
        (runs / "subjects" / "dog" / "idfuse_weights.safetensors").read_bytes()
    )
    (tmp_path / dreambench.PROMPTS_FILE).write_text(
        (bench_dir / dreambench.PROMPTS_FILE).read_text()
    )
    dog = runs / "subjects" / "dog"
    cases = [
        (dict(workdir=dog, dino=clip, clip=clip),
         WeightsError, f"--dino {clip}: not a transformers ViTModel (DINO) folder"),
        (dict(workdir=dog, dino=dino, clip=dino),
         WeightsError, f"--clip {dino}: not a transformers CLIPModel folder"),
        (dict(workdir=no_real, dino=dino, clip=clip),
         DataError, f"{empty}: no images (JPEG, PNG or WebP)"),
        (dict(workdir=tmp_path / "nowhere", dino=dino, clip=clip),
         ConfigError, f"--workdir {tmp_path / 'nowhere'}: folder not found"),
        (dict(images=tmp_path, dino=dino, clip=clip),
         ConfigError, "--images needs --dreambench DIR"),
        (dict(workdir=dog, dino=dino, clip=clip, max_prompts=0),
         ConfigError, "--max_prompts=0 must be at least 1"),
    ]  # fmt: skip
    for kwargs, error, message in cases:
        with pytest.raises(error) as info:
            run.evaluate(**{k: str(v) if isinstance(v, pathlib.Path) else v
                            for k, v in kwargs.items()})  # fmt: skip
        assert str(info.value).startswith(message) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Comparing methods: another preset trained on the same subjects, `python -m idfuse_jax.compare`


@pytest.fixture(scope="session")
def dreambooth_runs(tmp_path_factory, bench_dir):
    """The same two subjects trained as DreamBooth-LoRA with prior preservation (2 class
    images each, drawn by the frozen model), 2 steps."""
    return train_bench_job(
        tmp_path_factory.mktemp("dreambooth_runs"),
        bench_dir,
        "--config.method.preset=dreambooth_lora",
        "--config.prior.class_images=2",
    )


def test_dreambooth_lora_trains_what_its_preset_names(dreambooth_runs):
    for name in ("dog", "can"):
        workdir = dreambooth_runs / "subjects" / name
        class_images = sorted(p.name for p in (workdir / "class_images").iterdir())
        assert class_images == ["0000.png", "0001.png"]
        names = load_file(str(workdir / "idfuse_weights.safetensors"))
        assert names and all(k.startswith("unet.") for k in names)  # no text LoRA, adapter, FFM
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r]
        assert len(steps) == 2
        for r in steps:  # L = L1 + prior.weight (1) x prior, and no other term
            assert r["loss"] == pytest.approx(r["denoise"] + r["prior"], rel=1e-5)
            assert not {"text_image", "text_background", "router_entropy"} & set(r)


def test_compare_evaluates_what_is_missing_and_tables_the_methods(
    first_eval, runs, dreambooth_runs, metric_dirs, tmp_path
):
    out = tmp_path / "comparison"
    result = ok(subprocess.run(
        [sys.executable, "-m", "idfuse_jax.compare", f"idfuse={runs}",
         f"dreambooth_lora={dreambooth_runs}", *metric_flags(metric_dirs), *SMALL,
         f"--out={out}", "--resamples=300"],
        env=_env(8), capture_output=True, text=True, timeout=600, cwd=REPO,
    ))  # fmt: skip
    assert f"idfuse: reusing {runs / 'eval' / 'results.json'}" in result.stdout
    assert f"dreambooth_lora: evaluating {dreambooth_runs}" in result.stdout
    first = json.loads((runs / "eval" / "results.json").read_text())
    second = json.loads((dreambooth_runs / "eval" / "results.json").read_text())
    assert second["settings"]["num_images"] == 2 and len(second["subjects"]) == 2
    table = json.loads((out / "comparison.json").read_text())
    md = (out / "results.md").read_text()
    for metric in ("dino", "clip_i", "clip_t"):
        a = [first["subjects"][s][metric] for s in ("dog", "can")]
        b = [second["subjects"][s][metric] for s in ("dog", "can")]
        assert table["methods"]["idfuse"][metric]["mean"] == pytest.approx(np.mean(a))
        assert table["methods"]["dreambooth_lora"][metric]["mean"] == pytest.approx(np.mean(b))
        diff = table["differences"]["dreambooth_lora"][metric]
        assert diff["mean"] == pytest.approx(np.mean(b) - np.mean(a))
        assert diff["low"] <= diff["mean"] <= diff["high"]
    row = table["methods"]["dreambooth_lora"]["dino"]
    assert f"| dreambooth_lora | 2 | {row['mean']:.3f} [{row['low']:.3f}, {row['high']:.3f}]" in md
    assert "python -m idfuse_jax.compare idfuse=" in md
    for plot in ("tradeoff.png", "subjects.png"):
        assert images_lib.read_image(out / plot).shape[0] > 300
