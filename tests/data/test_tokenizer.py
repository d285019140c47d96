"""The rebuilt GPT-NeoX tokenizer against llama.cpp's references; the megatron-facing wrapper."""

import json

import pytest

from ultramem_megatron.data.tokenizer import NO_PAD, HFTokenizer, TokenizerError, load_tokenizer

from .conftest import FIXTURE_DIR, NEOX_DIR, tiny_hf_tokenizer

# From llama.cpp's ggml-vocab-mpt.gguf.inp/.out (MPT uses the GPT-NeoX-20B tokenizer; the build
# script checks the two gguf vocabs are identical and matches all 46 cases before writing).
LLAMA_CPP_REFERENCE = [
    ("Hello world", [12092, 1533]),
    (" Hello World!", [24387, 3645, 2]),
    ("Hello, world!", [12092, 13, 1533, 2]),
    ("    Hello\n    Hello", [50274, 12092, 187, 50274, 12092]),
    ("\t\n", [186, 187]),
    ("ied 4 ½ months", [728, 577, 24142, 2607]),
    ("Äpfel", [37515, 18569, 293]),
    ("333333333", [26409, 1610, 20084]),
    ("нещо на Български",
     [32520, 11514, 1068, 8713, 38177, 13396, 3415, 9925, 12559, 10453, 1389]),
    ("", []),
]


@pytest.mark.parametrize("text,ids", LLAMA_CPP_REFERENCE)
def test_neox_matches_llama_cpp_reference(neox, text, ids):
    assert neox.tokenize(text) == ids
    assert neox.tokenize_batch([text, text]) == [ids, ids]


def test_neox_round_trips_fixture_text(neox):
    texts = ["Hello  world\n\n    def f(x):\n\treturn x  # héllo ünïcode 🚀 ½"]
    for name in ("shakespeare.jsonl", "kjv.jsonl"):
        with open(FIXTURE_DIR / name, encoding="utf-8") as handle:
            texts += [json.loads(line)["text"] for line, _ in zip(handle, range(3))]
    for text, ids in zip(texts, neox.tokenize_batch(texts)):
        assert neox.detokenize(ids) == text


def test_neox_has_what_megatron_reads(neox):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    assert (neox.vocab_size, neox.eod, neox.pad) == (50277, 0, 1)
    assert neox.detokenize([neox.eod, neox.pad]) == "<|endoftext|><|padding|>"
    json.dumps(neox.unique_identifiers)   # part of megatron's cache key: must serialize
    config = GPTDatasetConfig(random_seed=1, sequence_length=8, tokenizer=neox,
                              reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False)
    assert config.token_dtype_code == 8   # uint16


def test_committed_tokenizer_files():
    assert (NEOX_DIR / "tokenizer.json").stat().st_size < 4 * 2**20
    config = json.loads((NEOX_DIR / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"   # transformers 4 and 5 load it
    notice = (NEOX_DIR / "NOTICE").read_text()
    assert "Apache License 2.0" in notice and "MIT License" in notice


def test_pad_falls_back_when_missing_or_equal_to_eod():
    assert HFTokenizer(tiny_hf_tokenizer(pad=None), "tiny").pad == NO_PAD
    assert HFTokenizer(tiny_hf_tokenizer(pad="<eod>"), "tiny").pad == NO_PAD
    assert HFTokenizer(tiny_hf_tokenizer(), "tiny").pad == 1


def test_no_eos_is_a_clear_error():
    with pytest.raises(TokenizerError, match="'tiny' has no eos token"):
        HFTokenizer(tiny_hf_tokenizer(eos=None), "tiny")


def test_fingerprint_tells_vocabularies_apart(neox, tiny):
    assert neox.fingerprint != tiny.fingerprint
    assert load_tokenizer(tiny.name_or_path).fingerprint == tiny.fingerprint


def test_load_errors_name_the_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="'./no/such/dir': no such directory"):
        load_tokenizer("./no/such/dir")
    with pytest.raises(TokenizerError, match=f"{tmp_path}.*could not be loaded from the local"):
        load_tokenizer(str(tmp_path))   # exists, holds no tokenizer
