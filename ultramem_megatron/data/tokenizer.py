"""The one tokenizer interface: a Hugging Face (or sentencepiece) tokenizer shaped for
megatron-core's GPTDataset, encoding through the `tokenizers` backend, long documents in pieces."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

NO_PAD = -1   # megatron's own "no pad token" id: never in the data, so it masks nothing
REPO_ROOT = Path(__file__).resolve().parents[2]
PIECE_CHARS = 1 << 20    # long documents are encoded in pieces of about this many characters
BATCH_CHARS = 1 << 22    # characters per backend call: bounds the encoder's working memory


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message names it."""


def _token_id(backend, token) -> Optional[int]:
    """The id of a special token given as a string or as transformers' {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _splits_at_line_starts(backend) -> bool:
    """True when encoding a text in pieces cut at safe_cuts' positions gives the ids of the whole:
    GPT-2-style byte-level BPE (its pre-tokenizer regex never joins across such a cut, it has no
    prefix space to add per piece), an NFC or no normalizer (NFC never composes across a space or
    newline), and added tokens that cannot match across a cut: none strips whitespace around it,
    and each is whitespace-free or a run of two or more spaces (GPT-NeoX's)."""
    spec = json.loads(backend.to_str())
    pre, normalizer = spec.get("pre_tokenizer") or {}, spec.get("normalizer")

    def cut_proof(token: dict) -> bool:
        content = token["content"]
        return (not token.get("lstrip") and not token.get("rstrip")
                and (not any(c.isspace() for c in content)
                     or (len(content) >= 2 and set(content) == {" "})))

    return (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)
            and (normalizer is None or normalizer.get("type") == "NFC")
            and all(cut_proof(token) for token in spec.get("added_tokens", [])))


def safe_cuts(text: str, piece_chars: int = PIECE_CHARS) -> list[int]:
    """Cut positions about piece_chars apart where a byte-level BPE pre-tokenizer starts a new
    pre-token whatever surrounds the cut: after a newline with a non-space on both sides, or else
    before a space between a non-space and a letter. A window without either is not cut."""
    cuts, start = [], 0
    while len(text) - start > piece_chars:
        window_end = start + piece_chars
        cut = _last_cut(text, start + piece_chars // 2, window_end)
        if cut is None:   # no safe place in this window: look further on
            cut = _first_cut(text, window_end, len(text))
            if cut is None:
                break
        cuts.append(cut)
        start = cut
    return cuts


def _is_cut(text: str, i: int) -> bool:
    before, after = text[i - 1], text[i]
    if before == "\n":
        return i >= 2 and not text[i - 2].isspace() and not after.isspace()
    return after == " " and not before.isspace() and i + 1 < len(text) and text[i + 1].isalpha()


def _last_cut(text: str, low: int, high: int) -> Optional[int]:
    for i in range(high, low, -1):
        if _is_cut(text, i):
            return i
    return None


def _first_cut(text: str, low: int, high: int) -> Optional[int]:
    position = low
    while (position := text.find("\n", position, high - 1)) != -1:
        if _is_cut(text, position + 1):
            return position + 1
        position += 1
    return None


class HFTokenizer:
    """A Hugging Face tokenizer with what megatron-core's datasets read from a tokenizer.

    megatron-core 0.16-0.19 duck-types it (GPTDatasetConfig.tokenizer): `vocab_size` (picks the
    token dtype), `eod` (end of document), `pad` (must differ from eod, or megatron warns and
    ignores it) and `unique_identifiers` (part of the dataset cache key). Documents are tokenized
    without special tokens through the fast `tokenizers` backend; writers append `eod`. Built from
    a transformers tokenizer, or from a local directory's files alone (`from_directory`: no
    transformers import, which is most of a tokenizing run's start-up).
    """

    def __init__(self, hf_tokenizer, name_or_path: str) -> None:
        self._hf = hf_tokenizer
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self._setup(backend, name_or_path, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id,
                    len(hf_tokenizer), hf_tokenizer.get_vocab())

    @classmethod
    def from_directory(cls, path: Path, name_or_path: str) -> "HFTokenizer":
        """A directory with tokenizer.json, its special tokens from tokenizer_config.json (else
        special_tokens_map.json), as transformers' PreTrainedTokenizerFast reads them."""
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        special: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):   # the config wins
            if (path / name).is_file():
                special.update(json.loads((path / name).read_text()))
        self = cls.__new__(cls)
        self._hf = None
        vocab = backend.get_vocab(with_added_tokens=True)
        self._setup(backend, name_or_path, _token_id(backend, special.get("eos_token")),
                    _token_id(backend, special.get("pad_token")), len(vocab), vocab)
        return self

    def _setup(self, backend, name_or_path: str, eos: Optional[int], pad: Optional[int],
               vocab_size: int, vocab: dict) -> None:
        self._backend = backend
        self._piecewise = backend is not None and _splits_at_line_starts(backend)
        self.name_or_path = name_or_path
        if eos is None:
            raise TokenizerError(f"tokenizer {name_or_path!r} has no eos token to end documents "
                                 "with; set eos_token in its tokenizer_config.json")
        self.eod: int = eos
        self.pad: int = pad if pad is not None and pad != self.eod else NO_PAD
        self.vocab_size: int = vocab_size   # base vocab + added tokens: ids are < this
        text = json.dumps(sorted(vocab.items()), ensure_ascii=False)
        self.fingerprint: str = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [name_or_path]),
             ("vocab_size", self.vocab_size), ("eod", self.eod), ("pad", self.pad),
             ("fingerprint", self.fingerprint)])

    @property
    def transformers_tokenizer(self):
        """The transformers tokenizer (what an HF export saves), loaded on first use."""
        if self._hf is None:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(_resolve(self.name_or_path)),
                                                     local_files_only=True)
        return self._hf

    def tokenize(self, text: str) -> list[int]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many documents at once; long ones in pieces that give the same ids (see safe_cuts)."""
        if self._backend is None:   # a slow (Python) transformers tokenizer
            return self._hf(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        pieces, owners = [], []
        for number, text in enumerate(texts):
            cuts = safe_cuts(text) if self._piecewise and len(text) > PIECE_CHARS else []
            bounds = [0, *cuts, len(text)]
            pieces += [text[a:b] for a, b in zip(bounds, bounds[1:])] or [text]
            owners += [number] * max(1, len(bounds) - 1)
        ids: list[list[int]] = [[] for _ in texts]
        start = 0
        while start < len(pieces):   # backend calls of at most BATCH_CHARS (or one piece)
            end, chars = start + 1, len(pieces[start])
            while end < len(pieces) and chars + len(pieces[end]) <= BATCH_CHARS:
                chars += len(pieces[end])
                end += 1
            for owner, encoding in zip(owners[start:end], self._backend.encode_batch_fast(
                    pieces[start:end], add_special_tokens=False)):
                ids[owner] += encoding.ids
            start = end
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        if self._backend is None:
            return self._hf.decode(list(ids), clean_up_tokenization_spaces=False)
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, eod={self.eod}, "
                f"pad={self.pad})")


class SentencePieceTokenizer:
    """A sentencepiece model file (.model) with the interface HFTokenizer has."""

    def __init__(self, path: str) -> None:
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(Path(path).expanduser()))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"sentencepiece model {path!r} could not be loaded: {err}") from err
        self.name_or_path = path
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"sentencepiece model {path!r} has no eos piece to end documents "
                                 "with (train it with eos_id >= 0)")
        self.eod: int = self._sp.eos_id()
        pad = self._sp.pad_id()
        self.pad: int = pad if pad >= 0 and pad != self.eod else NO_PAD
        self.vocab_size: int = self._sp.get_piece_size()
        self.fingerprint: str = hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()[:16]
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [path]),
             ("vocab_size", self.vocab_size), ("eod", self.eod), ("pad", self.pad),
             ("fingerprint", self.fingerprint)])

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


def _looks_like_path(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or name_or_path.endswith("/")


def _resolve(name_or_path: str) -> Path:
    """A local path as given, else relative to the repository (the default tokenizer is
    data/tokenizers/gpt-neox-20b, which must load from any working directory)."""
    path = Path(name_or_path).expanduser()
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path


def load_tokenizer(name_or_path: str) -> HFTokenizer | SentencePieceTokenizer:
    """A sentencepiece .model file, a local tokenizer directory (offline; read without
    transformers when it has tokenizer.json) or a Hugging Face hub name (AutoTokenizer)."""
    path = _resolve(name_or_path)
    if path.suffix == ".model" and path.is_file():
        return SentencePieceTokenizer(str(path))
    local = path.exists()
    if not local and _looks_like_path(name_or_path):
        raise TokenizerError(f"tokenizer {name_or_path!r}: no such directory (the GPT-NeoX one "
                             "is data/tokenizers/gpt-neox-20b, scripts/build_neox_tokenizer.py "
                             "rebuilds it)")
    try:
        if local and (path / "tokenizer.json").is_file():
            return HFTokenizer.from_directory(path, name_or_path)
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path) if local else name_or_path,
                                           local_files_only=local)
    except TokenizerError:
        raise
    except Exception as err:   # tokenizers raises a plain Exception on a bad tokenizer.json
        where = "the local directory" if local else "the Hugging Face hub (no such local path)"
        raise TokenizerError(f"tokenizer {name_or_path!r} could not be loaded from {where}: "
                             f"{err}") from err
    return HFTokenizer(hf, name_or_path)
