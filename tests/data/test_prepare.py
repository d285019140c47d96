"""JSON-lines -> .bin/.idx: skip counts, token totals, read-back, atomic writes, ensure_prepared."""

import json

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from ultramem_megatron.config import BlendEntry, DataConfig
from ultramem_megatron.data import writer
from ultramem_megatron.data.prepare import (DataPrepError, ensure_prepared, is_prepared,
                                            prepare_jsonl)

from .conftest import FIXTURE_DIR, write_jsonl

GOOD = [{"text": "d1 d2 d3", "meta": {"n": 1}}, {"text": "d4", "red_pajama_subset": "book"},
        {"text": " d5  d6 "}]
BAD = ["{not json", "[1, 2]", '"just a string"', {"meta": {}}, {"txt": "d7"}, {"text": 5},
       {"text": None}, {"text": ["d1"]}, {"text": ""}, {"text": " \n\t"}, ""]
EXPECTED_SKIPS = {"malformed_json": 1, "not_an_object": 2, "missing_text": 2,
                  "non_string_text": 3, "empty_text": 2, "blank_line": 1}


class CharTokenizer:
    """Stand-in tokenizer: one id per character (ord), any vocab size; can fail on a given call."""

    def __init__(self, vocab_size=70_000, fail_on_call=None):
        self.vocab_size, self.eod, self.fail_on_call, self.calls = vocab_size, 0, fail_on_call, 0
        self.name_or_path, self.fingerprint = "chars", f"chars{vocab_size}"

    def tokenize_batch(self, texts):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("tokenizer died")
        return [[ord(c) for c in text] for text in texts]


def test_skips_are_counted_by_reason_and_tokens_add_up(tmp_path, tiny):
    source = write_jsonl(tmp_path / "mixed.jsonl", [GOOD[0], *BAD[:6], GOOD[1], *BAD[6:], GOOD[2]])
    stats = prepare_jsonl(str(source), str(tmp_path / "out"), tiny)

    assert stats.skipped == EXPECTED_SKIPS
    assert sum(stats.skipped.values()) == len(BAD)
    expected = [tiny.tokenize(doc["text"]) + [tiny.eod] for doc in GOOD]
    assert stats.documents == 3
    assert stats.tokens == sum(map(len, expected)) == 4 + 2 + 3
    assert (tmp_path / "out.bin").stat().st_size == stats.tokens * 2   # uint16 tokens
    read = IndexedDataset(str(tmp_path / "out"))
    assert [read[i].tolist() for i in range(len(read))] == expected
    assert "skipped: 1 blank_line, 2 empty_text" in stats.summary()
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert (meta["tokens"], meta["tokenizer_fingerprint"]) == (stats.tokens, tiny.fingerprint)


def test_neox_fixture_reads_back_as_its_tokenization(tmp_path, neox):
    source = FIXTURE_DIR / "kjv.jsonl"
    stats = prepare_jsonl(str(source), str(tmp_path / "kjv"), neox)
    texts = [json.loads(line)["text"] for line in source.read_text(encoding="utf-8").splitlines()]
    read = IndexedDataset(str(tmp_path / "kjv"))
    assert read.index.dtype == numpy.uint16
    assert stats.skipped == {} and len(read) == stats.documents == len(texts)
    for i, ids in enumerate(neox.tokenize_batch(texts)):
        assert read[i].tolist() == ids + [neox.eod]
    assert stats.tokens == int(read.sequence_lengths.sum())


def test_globs_lists_and_a_large_vocab_in_int32(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "ab"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "\U0001F680"}])   # ord > 65535
    write_jsonl(tmp_path / "c.jsonl", [{"text": "c"}])
    stats = prepare_jsonl([str(tmp_path / "[ab].jsonl"), str(tmp_path / "c.jsonl")],
                          str(tmp_path / "out"), CharTokenizer(vocab_size=200_000))
    read = IndexedDataset(str(tmp_path / "out"))
    assert read.index.dtype == numpy.int32
    assert [read[i].tolist() for i in range(3)] == [[97, 98, 0], [0x1F680, 0], [99, 0]]
    assert stats.files == [str(tmp_path / f"{x}.jsonl") for x in "abc"]


def test_a_failed_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "BATCH_DOCUMENTS", 1)
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": "abc"}] * 3)
    prefix = str(tmp_path / "out" / "docs")
    with pytest.raises(RuntimeError, match="tokenizer died"):
        prepare_jsonl(str(source), prefix, CharTokenizer(fail_on_call=2))
    assert not is_prepared(prefix) and list((tmp_path / "out").iterdir()) == []

    prepare_jsonl(str(source), prefix, CharTokenizer())        # a good build, then a failed rebuild
    with pytest.raises(RuntimeError):
        prepare_jsonl(str(source), prefix, CharTokenizer(fail_on_call=2))
    assert is_prepared(prefix) and len(IndexedDataset(prefix)) == 3   # the good one is untouched
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "docs.bin", "docs.idx", "docs.meta.json"]


def test_no_usable_document_or_no_file_is_an_error(tmp_path, tiny):
    source = write_jsonl(tmp_path / "bad.jsonl", BAD)
    with pytest.raises(DataPrepError, match="no usable document"):
        prepare_jsonl(str(source), str(tmp_path / "out"), tiny)
    assert not is_prepared(str(tmp_path / "out"))
    with pytest.raises(DataPrepError, match="no file matches"):
        prepare_jsonl(str(tmp_path / "none*.jsonl"), str(tmp_path / "out"), tiny)


def test_ensure_prepared_builds_only_what_is_missing(tmp_path, tiny):
    write_jsonl(tmp_path / "a.jsonl", GOOD)
    ready = str(tmp_path / "ready")
    prepare_jsonl(str(tmp_path / "a.jsonl"), ready, tiny)
    data = DataConfig(blend=[BlendEntry(prefix=ready),
                             BlendEntry(prefix=str(tmp_path / "built" / "new"),
                                        source=str(tmp_path / "*.jsonl"))])
    [stats] = ensure_prepared(data, tiny)
    assert stats.prefix == str(tmp_path / "built" / "new") and stats.documents == 3
    assert ensure_prepared(data, tiny) == []


def test_ensure_prepared_errors_name_the_entry(tmp_path, tiny, neox):
    write_jsonl(tmp_path / "a.jsonl", GOOD)
    ok = BlendEntry(prefix=str(tmp_path / "ok"), source=str(tmp_path / "a.jsonl"))
    no_source = DataConfig(blend=[ok, BlendEntry(prefix=str(tmp_path / "gone"))])
    with pytest.raises(DataPrepError, match=r"data.blend\[1\]: .*gone.bin/.idx do not exist and "
                                            "the entry has no source"):
        ensure_prepared(no_source, tiny)
    bad_glob = DataConfig(blend=[BlendEntry(prefix=str(tmp_path / "x"),
                                            source=str(tmp_path / "missing*.jsonl"))])
    with pytest.raises(DataPrepError, match=r"data.blend\[0\]: .*x.bin/.idx do not exist, and no "
                                            "file matches"):
        ensure_prepared(bad_glob, tiny)
    assert not is_prepared(str(tmp_path / "ok"))   # errors are raised before anything is built

    ensure_prepared(DataConfig(blend=[ok]), tiny)
    with pytest.raises(DataPrepError, match=r"data.blend\[0\]: .*ok was tokenized with .*differ"):
        ensure_prepared(DataConfig(blend=[ok]), neox)
