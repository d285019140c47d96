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


def _looks_like_path(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or name_or_path.endswith("/")


def load_tokenizer(name_or_path: str) -> HFTokenizer:
    """A local tokenizer directory (offline) or a Hugging Face hub name, via AutoTokenizer."""
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
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
