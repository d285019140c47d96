"""The one tokenizer interface: a transformers tokenizer shaped for megatron-core's GPTDataset."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

NO_PAD = -1   # megatron's own "no pad token" id: never in the data, so it masks nothing


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message names it."""


class HFTokenizer:
    """A transformers tokenizer with what megatron-core's datasets read from a tokenizer.

    megatron-core 0.16-0.19 duck-types it (GPTDatasetConfig.tokenizer): `vocab_size` (picks the
    token dtype), `eod` (end of document), `pad` (must differ from eod, or megatron warns and
    ignores it) and `unique_identifiers` (part of the dataset cache key). Documents are tokenized
    without special tokens; prepare.py appends `eod` after each one.
    """

    def __init__(self, hf_tokenizer, name_or_path: str) -> None:
        self._hf = hf_tokenizer
        self.name_or_path = name_or_path
        if hf_tokenizer.eos_token_id is None:
            raise TokenizerError(f"tokenizer {name_or_path!r} has no eos token to end documents "
                                 "with; set eos_token in its tokenizer_config.json")
        self.eod: int = hf_tokenizer.eos_token_id
        pad = hf_tokenizer.pad_token_id
        self.pad: int = pad if pad is not None and pad != self.eod else NO_PAD
        self.vocab_size: int = len(hf_tokenizer)   # base vocab + added tokens: ids are < this
        vocab = json.dumps(sorted(hf_tokenizer.get_vocab().items()), ensure_ascii=False)
        self.fingerprint: str = hashlib.sha256(vocab.encode("utf-8")).hexdigest()[:16]
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [name_or_path]),
             ("vocab_size", self.vocab_size), ("eod", self.eod), ("pad", self.pad),
             ("fingerprint", self.fingerprint)])

    @property
    def transformers_tokenizer(self):
        """The wrapped transformers tokenizer (what an HF export saves)."""
        return self._hf

    def tokenize(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False, verbose=False)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many documents at once (the fast tokenizers encode a batch in parallel)."""
        return self._hf(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._hf.decode(list(ids), clean_up_tokenization_spaces=False)

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


def load_tokenizer(name_or_path: str) -> HFTokenizer | SentencePieceTokenizer:
    """A sentencepiece .model file, a local tokenizer directory (offline) or a Hugging Face hub
    name (AutoTokenizer)."""
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if path.suffix == ".model" and path.is_file():
        return SentencePieceTokenizer(name_or_path)
    local = path.exists()
    if not local and _looks_like_path(name_or_path):
        raise TokenizerError(f"tokenizer {name_or_path!r}: no such directory (the GPT-NeoX one "
                             "is data/tokenizers/gpt-neox-20b, scripts/build_neox_tokenizer.py "
                             "rebuilds it)")
    try:
        hf = AutoTokenizer.from_pretrained(str(path) if local else name_or_path,
                                           local_files_only=local)
    except (OSError, ValueError, KeyError) as err:
        where = "the local directory" if local else "the Hugging Face hub (no such local path)"
        raise TokenizerError(f"tokenizer {name_or_path!r} could not be loaded from {where}: "
                             f"{err}") from err
    return HFTokenizer(hf, name_or_path)
