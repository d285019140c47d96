"""Data-test fixtures: the committed GPT-NeoX tokenizer, a tiny word-level one, JSON-lines files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ultramem_megatron.data.tokenizer import HFTokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
NEOX_DIR = REPO / "data" / "tokenizers" / "gpt-neox-20b"
FIXTURE_DIR = REPO / "data" / "fixture"
TINY_WORDS = 400   # tiny vocab: <eod>=0, <pad>=1, <unk>=2, then d0..d399


def tiny_hf_tokenizer(eos: str | None = "<eod>", pad: str | None = "<pad>"):
    """A word-level transformers tokenizer over 'd0'..'d399', whitespace separated."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eod>": 0, "<pad>": 1, "<unk>": 2}
    vocab.update({f"d{i}": 3 + i for i in range(TINY_WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()   # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                   unk_token="<unk>")


def word(i: int) -> str:
    return f"d{i}"


def token_of_word(i: int) -> int:
    return 3 + i


def write_jsonl(path: Path, lines: list) -> Path:
    """Each item: a dict (written as JSON) or a str (written verbatim, e.g. a malformed line)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture(scope="session")
def neox() -> HFTokenizer:
    return load_tokenizer(str(NEOX_DIR))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> HFTokenizer:
    """The tiny tokenizer saved to a directory and loaded the way runs load theirs."""
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    tiny_hf_tokenizer().save_pretrained(path)
    return load_tokenizer(str(path))


@pytest.fixture(scope="session")
def process_group():
    from ultramem_megatron.megatron_compat import initialize_single_process

    initialize_single_process(1234)
