"""Our CLIP BPE tokenizer against transformers' CLIPTokenizer on folders the test writes."""

import collections
import itertools
import json
import pathlib
import shutil

import numpy as np
import pytest
import transformers

from idfuse_jax import weights
from idfuse_jax.tokenizer import ByteTokenizer, CLIPTokenizer, WeightsError, byte_to_unicode

CORPUS = (
    "a photo of a sks dog on the beach in the snow with a red ball. "
    "the cat is sitting on a wooden table; a backpack, a teapot and a candle. "
    "it's the dog's toy! 1234567890 photos of dogs and cats"
)
PROMPTS = [
    "a photo of sks dog",
    "A  Photo\tof  THE dog!!",
    "it's 2024, isn't it? 3.14 + 42 = 45.14",
    "naïve café — über straße",
    "emoji 🐶 dog\n\nnew line",
    "",
    "   ",
    "qwertyuiop zxcvb kjhgf",  # words far from the corpus: byte-level pieces
    "hello<|endoftext|>world <|startoftext|>",
    "DOG'S Ball, what's up!",
    " ".join(["a sks dog in the snow"] * 20),  # > 75 tokens: truncated
]


def learn_merges(text: str, count: int) -> list[tuple[str, str]]:
    """A few byte-level BPE merges from `text`, as CLIP's training would rank them."""
    table = byte_to_unicode()
    words = collections.Counter(text.lower().split())
    splits = {}
    for w in words:
        symbols = [table[b] for b in w.encode()]
        symbols[-1] += "</w>"
        splits[w] = symbols
    merges = []
    for _ in range(count):
        pairs = collections.Counter()
        for w, symbols in splits.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        for w, symbols in splits.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            splits[w] = out
    return merges


def write_tokenizer(folder, *, pad_token: str, drop_chars: str = "", dict_tokens: bool = True):
    """A CLIP tokenizer folder in the layout real pipelines ship (vocab.json, merges.txt, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = [c for c in byte_to_unicode().values() if c not in drop_chars]
    merges = [m for m in learn_merges(CORPUS, 80) if not set(drop_chars) & set(m[0] + m[1])]
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")

    def token(content):
        if not dict_tokens:
            return content
        return {"__type": "AddedToken", "content": content, "lstrip": False, "rstrip": False,
                "normalized": True, "single_word": False}  # fmt: skip

    config = {
        "bos_token": token("<|startoftext|>"),
        "eos_token": token("<|endoftext|>"),
        "unk_token": token("<|endoftext|>"),
        "pad_token": pad_token,
        "do_lower_case": True,
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    return folder


def reference_ids(folder, prompts) -> np.ndarray:
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
    out = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    return out["input_ids"]


@pytest.mark.parametrize(
    "pad_token,dict_tokens", [("<|endoftext|>", True), ("!", False)], ids=["sd1_pad", "sd2_pad"]
)
def test_clip_tokenizer_matches_transformers(tmp_path, pad_token, dict_tokens):
    folder = write_tokenizer(tmp_path / "tokenizer", pad_token=pad_token, dict_tokens=dict_tokens)
    ours = CLIPTokenizer.from_folder(folder)(PROMPTS)
    ref = reference_ids(folder, PROMPTS)
    assert ours.dtype == np.int32 and ours.shape == (len(PROMPTS), 77)
    for prompt, a, b in zip(PROMPTS, ours, ref):
        assert a.tolist() == b.tolist(), prompt
    # The long prompt is truncated: EOS in the last slot, no padding.
    assert ours[-1, 76] == CLIPTokenizer.from_folder(folder).eos_token_id


def test_pipeline_folder_and_unknown_chars(tmp_path):
    """load_tokenizer finds tokenizer/ in a pipeline; chars outside vocab become unk like HF."""
    (tmp_path / "model_index.json").write_text("{}")
    folder = write_tokenizer(tmp_path / "tokenizer", pad_token="!", drop_chars="zq")
    tok = weights.load_tokenizer(tmp_path)
    prompts = ["a lazy quiz", "zzz", "q"]
    np.testing.assert_array_equal(tok(prompts), reference_ids(folder, prompts))
    assert tok.pad_token_id == json.loads((folder / "vocab.json").read_text())["!"]


def test_clip_tokenizer_errors(tmp_path):
    folder = write_tokenizer(tmp_path / "tok", pad_token="<|endoftext|>")
    (folder / "merges.txt").unlink()
    with pytest.raises(WeightsError, match=r"no merges\.txt"):
        CLIPTokenizer.from_folder(folder)
    with pytest.raises(WeightsError, match=r"pad_token '<pad>' is not in the vocabulary"):
        CLIPTokenizer({"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}, [], pad_token="<pad>")
    with pytest.raises(WeightsError, match=r"merge 'a' 'b' makes 'ab'"):
        CLIPTokenizer({"a": 0, "b": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}, [("a", "b")])
    with pytest.raises(WeightsError, match=r"text 1 is int"):
        ByteTokenizer()(["ok", 3])


def test_byte_tokenizer():
    tok = ByteTokenizer(model_max_length=8)
    ids = tok(["hé", "x" * 20, ""])
    assert ids.dtype == np.int32 and ids.shape == (3, 8)
    assert ids[0].tolist() == [256, 104, 0xC3, 0xA9, 257, 258, 258, 258]
    assert ids[1].tolist() == [256] + [ord("x")] * 6 + [257]
    assert ids[2].tolist() == [256, 257] + [258] * 6
    assert tok.vocab_size == 259 and tok.model_max_length == 8
    assert tok("hé").tolist() == ids[:1].tolist()


CONFIGS = pathlib.Path(__file__).parent / "data" / "configs"


@pytest.mark.parametrize(
    "repo",
    [
        "runwayml/stable-diffusion-v1-5",
        "stabilityai/stable-diffusion-2-1-base",
        "stabilityai/stable-diffusion-2-1",
        "added_tokens_decoder",
    ],
)
def test_special_tokens_resolve_as_in_transformers(tmp_path, repo):
    """The hub's tokenizer/ JSON files as published: SD 2 pads with "!" (the map's) although its
    tokenizer_config.json says <|endoftext|>; a config with added_tokens_decoder wins instead."""
    folder = write_tokenizer(tmp_path / "tokenizer", pad_token="<|endoftext|>")
    vocab = json.loads((folder / "vocab.json").read_text())
    if repo == "added_tokens_decoder":  # the layout transformers >= 4.34 saves
        (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["added_tokens_decoder"] = {
            str(vocab[t]): {"content": t, "lstrip": False, "normalized": True, "rstrip": False,
                            "single_word": False, "special": True}
            for t in ("<|startoftext|>", "<|endoftext|>")
        }  # fmt: skip
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        expected_pad = "<|endoftext|>"
    else:
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            shutil.copy(CONFIGS / repo / "tokenizer" / name, folder / name)
        expected_pad = "!" if "stable-diffusion-2" in repo else "<|endoftext|>"
    ours = CLIPTokenizer.from_folder(folder)
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder))
    assert ours.pad_token_id == reference.pad_token_id == vocab[expected_pad]
    assert ours.eos_token_id == reference.eos_token_id == vocab["<|endoftext|>"]
    np.testing.assert_array_equal(ours(PROMPTS[:4]), reference_ids(folder, PROMPTS[:4]))
