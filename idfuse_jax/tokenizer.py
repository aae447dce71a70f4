"""Tokenizers for the text encoder, with no transformers at run time.

`CLIPTokenizer` reproduces transformers' CLIPTokenizer (the `tokenizers`-backed one of
transformers 5) from a pipeline's `tokenizer/` folder: added special tokens are split out of the
raw text first; each remaining piece is NFC-normalised, runs of whitespace become one space, and
it is lowercased; CLIP's regex cuts it into words (contractions, letter runs, single digits,
punctuation runs); each word's UTF-8 bytes become GPT-2's printable byte characters, the last
one marked with `</w>`, and merges.txt's byte-pair merges apply by rank. Rows are
[BOS] + ids[:max_length - 2] + [EOS], padded with the folder's pad token (SD 1.x pads with
<|endoftext|>, SD 2.x with "!") to `model_max_length` (77).

Not reproduced: ftfy / HTML-unescape cleaning (transformers 5 does neither), AddedToken
lstrip/rstrip options (CLIP folders leave them off).

`ByteTokenizer` is a dependency-free stand-in for tiny random models: ids are the UTF-8 bytes
(0-255) plus BOS 256, EOS 257, PAD 258, framed the same way.
"""

from __future__ import annotations

import abc
import functools
import itertools
import json
import pathlib
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import regex

from idfuse_jax.errors import WeightsError

# CLIP's context length, used when a folder does not set model_max_length.
CLIP_MAX_LENGTH = 77
# transformers writes int(1e30) for "no limit"; such a folder gets CLIP_MAX_LENGTH.
_UNSET_LENGTH = 10**6

# CLIP's pre-tokenisation: special tokens, contractions, letter runs, single digits, other runs.
_WORD_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""
)
_SPACES_RE = regex.compile(r"\s+")
_END_OF_WORD = "</w>"


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the rest (controls, space, ...) to chr(256 + n)
    in byte order, so no BPE symbol is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def frame_ids(content: Sequence[int], *, bos: int, eos: int, pad: int, length: int) -> list[int]:
    """[bos] + content truncated to length - 2 + [eos], padded with `pad` to `length`."""
    ids = [bos, *content[: length - 2], eos]
    return ids + [pad] * (length - len(ids))


class _FixedLengthTokenizer(abc.ABC):
    """Shared interface: __call__(texts) -> int32 [N, model_max_length]."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    model_max_length: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS / EOS, untruncated."""

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Token ids [N, model_max_length] (int32) of one string or a list of strings."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise WeightsError(f"text {i} is {type(text).__name__}, not str")
            rows.append(
                frame_ids(
                    self.encode(text),
                    bos=self.bos_token_id,
                    eos=self.eos_token_id,
                    pad=self.pad_token_id,
                    length=self.model_max_length,
                )
            )
        return np.asarray(rows, np.int32).reshape(len(rows), self.model_max_length)


class ByteTokenizer(_FixedLengthTokenizer):
    """UTF-8 bytes as ids (0-255), BOS 256, EOS 257, PAD 258: for tiny random text encoders."""

    vocab_size = 259
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258

    def __init__(self, model_max_length: int = CLIP_MAX_LENGTH):
        if model_max_length < 2:
            raise WeightsError(f"model_max_length={model_max_length} leaves no room for BOS/EOS")
        self.model_max_length = model_max_length

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json_file(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


def read_merges(path: pathlib.Path) -> list[tuple[str, str]]:
    """merges.txt pairs in rank order (a '#version' header line is skipped)."""
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise WeightsError(f"{path}:{number}: expected two symbols, got {line!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def special_tokens_map_wins(config: Mapping[str, Any]) -> bool:
    """Whether special_tokens_map.json overrides tokenizer_config.json, as in transformers 5.24
    (`PreTrainedTokenizerBase._from_pretrained`): only for a config without
    `added_tokens_decoder` (the legacy layout, e.g. SD 2's tokenizer/ with pad "!" in the map and
    `<|endoftext|>` in the config: transformers pads with the id of "!")."""
    return "added_tokens_decoder" not in config


def special_settings(folder: pathlib.Path) -> tuple[dict[str, Any], dict[str, int]]:
    """(settings, added tokens) of a tokenizer folder, resolved as transformers resolves them.

    settings: tokenizer_config.json, overridden key by key by special_tokens_map.json when
      `special_tokens_map_wins`. added tokens: content -> id, from the config's
      `added_tokens_decoder`, else from the legacy added_tokens.json.
    """
    config = (
        _read_json_file(folder / "tokenizer_config.json")
        if (folder / "tokenizer_config.json").is_file()
        else {}
    )
    settings = dict(config)
    added: dict[str, int] = {}
    if special_tokens_map_wins(config):
        if (folder / "special_tokens_map.json").is_file():
            settings.update(_read_json_file(folder / "special_tokens_map.json"))
        if (folder / "added_tokens.json").is_file():
            added = {
                str(k): int(v) for k, v in _read_json_file(folder / "added_tokens.json").items()
            }
    else:
        added = {
            _token_content(entry): int(index)
            for index, entry in (config["added_tokens_decoder"] or {}).items()
            if _token_content(entry) is not None
        }
    return settings, added


class CLIPTokenizer(_FixedLengthTokenizer):
    """CLIP's byte-level BPE tokenizer (see the module docstring for the exact steps).

    Args:
      vocab: token -> id (vocab.json).
      merges: merge pairs in rank order (merges.txt).
      bos_token, eos_token, unk_token, pad_token: special token strings; added tokens (ids
        outside vocab.json, from tokenizer_config.json's added_tokens_decoder) may be given in
        `added_tokens`.
      model_max_length: the fixed row length.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        unk_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        added_tokens: Mapping[str, int] | None = None,
        model_max_length: int = CLIP_MAX_LENGTH,
    ):
        self.vocab = {**vocab, **(added_tokens or {})}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        for a, b in merges:
            if a + b not in self.vocab:
                raise WeightsError(f"merge {a!r} {b!r} makes {a + b!r}, which is not in vocab")
        specials = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token}
        specials["pad_token"] = pad_token
        for name, token in specials.items():
            if token not in self.vocab:
                raise WeightsError(f"{name} {token!r} is not in the vocabulary")
        if model_max_length < 2:
            raise WeightsError(f"model_max_length={model_max_length} leaves no room for BOS/EOS")
        self.bos_token_id = self.vocab[bos_token]
        self.eos_token_id = self.vocab[eos_token]
        self.unk_token_id = self.vocab[unk_token]
        self.pad_token_id = self.vocab[pad_token]
        self.model_max_length = model_max_length
        self.vocab_size = max(self.vocab.values()) + 1
        # Special tokens are cut out of the raw text before normalisation, longest first.
        self._specials = sorted({*specials.values(), *(added_tokens or {})}, key=len, reverse=True)
        self._special_re = regex.compile("|".join(regex.escape(t) for t in self._specials))
        self._bytes = byte_to_unicode()
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_folder(cls, folder: str | pathlib.Path) -> CLIPTokenizer:
        """From a tokenizer folder: vocab.json, merges.txt, and optionally tokenizer_config.json,
        special_tokens_map.json and added_tokens.json (`special_settings` says which wins)."""
        folder = pathlib.Path(folder)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise WeightsError(f"{folder}: no {name} (a CLIP tokenizer folder needs it)")
        settings, added = special_settings(folder)
        kwargs: dict[str, Any] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = _token_content(settings.get(key))
            if token is not None:
                kwargs[key] = token
        length = settings.get("model_max_length", CLIP_MAX_LENGTH)
        if not isinstance(length, (int, float)) or length >= _UNSET_LENGTH:
            length = CLIP_MAX_LENGTH
        return cls(
            _read_json_file(folder / "vocab.json"),
            read_merges(folder / "merges.txt"),
            added_tokens=added,
            model_max_length=int(length),
            **kwargs,
        )

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-token: byte characters, </w> on the last, merges by rank."""
        if word in self._cache:
            return self._cache[word]
        symbols = [self._bytes[b] for b in word.encode("utf-8")]
        symbols[-1] += _END_OF_WORD
        while len(symbols) > 1:
            pairs = [(self.ranks.get(p, len(self.ranks)), p) for p in itertools.pairwise(symbols)]
            rank, best = min(pairs)
            if rank == len(self.ranks):
                break
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                # Merge every occurrence of the best pair, left to right, without overlaps.
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.vocab.get(s, self.unk_token_id) for s in symbols]
        self._cache[word] = ids
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        text = _SPACES_RE.sub(" ", unicodedata.normalize("NFC", text)).lower()
        return [i for word in _WORD_RE.findall(text) for i in self._bpe(word)]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        for match in self._special_re.finditer(text):
            ids += self._encode_plain(text[start : match.start()])
            ids.append(self.vocab[match.group()])
            start = match.end()
        return ids + self._encode_plain(text[start:])
