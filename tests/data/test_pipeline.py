"""The corpus pipeline: every kind of bad record counted or refused, byte-identical output for any
worker count, resume after a kill, blending by subset weights."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import zstandard

from tests.conftest import subprocess_env
from ultramem_megatron.config import DataConfig
from ultramem_megatron.data.loader import build_datasets
from ultramem_megatron.data.pipeline import run_pipeline
from ultramem_megatron.data.writer import DataPrepError, WriteOptions

from .conftest import REPO, token_of_word, word, write_jsonl

GOOD = [{"text": f"{word(i)} {word(i + 1)}", "meta": {"n": i}, "red_pajama_subset": "book"}
        for i in range(6)]


def digest(out_dir) -> dict:
    return {p.relative_to(out_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out_dir.rglob("*")) if p.suffix in (".bin", ".idx")}


def test_every_bad_record_is_counted_under_its_reason(tmp_path, tiny):
    mixed = [GOOD[0], "{not json", "[1]", {"meta": {"a": 1}}, {"text": 7}, {"text": "  "}, "",
             {"text": GOOD[1]["text"], "meta": {"url": "x", "nested": {"deep": [1, 2]}}},  # schema 2
             {"text": GOOD[2]["text"], "meta": "a string meta"}]                             # schema 3
    write_jsonl(tmp_path / "mixed.jsonl", mixed)
    with open(tmp_path / "mixed.jsonl", "ab") as handle:
        handle.write(b'{"text": "caf\xe9 latin-1"}\n')                # not UTF-8
    (tmp_path / "empty.jsonl").write_text("")
    huge = " ".join(word(i % 50) for i in range(5000))
    write_jsonl(tmp_path / "huge.jsonl", [{"text": huge}, GOOD[3]])
    options = WriteOptions(max_document_tokens=1000, long_documents="drop")
    manifest = run_pipeline({"web": [str(tmp_path / "mixed.jsonl"), str(tmp_path / "empty.jsonl")],
                             "long": [str(tmp_path / "huge.jsonl")]}, tmp_path / "out", tiny,
                            options=options, progress=False)
    web, long = manifest["subsets"]["web"], manifest["subsets"]["long"]
    assert web["skipped"] == {"blank_line": 1, "empty_text": 1, "malformed_json": 1,
                              "missing_text": 1, "non_string_text": 1, "not_an_object": 1,
                              "undecodable_bytes": 1}
    assert web["documents"] == 3 and [s["documents"] for s in web["shards"]] == [3, 0]
    assert long["skipped"] == {"too_long": 1} and long["documents"] == 1

    split = run_pipeline({"long": [str(tmp_path / "huge.jsonl")]}, tmp_path / "split", tiny,
                         options=WriteOptions(max_document_tokens=1000), progress=False)
    entry = split["subsets"]["long"]
    assert entry["split_documents"] == 1 and entry["documents"] == 2
    assert entry["tokens"] == 5000 + 1 + 2 + 1   # every token kept, one EOD per document


def test_truncated_or_unknown_files_are_refused_with_the_file_named(tmp_path, tiny):
    data = gzip.compress("".join(json.dumps(g) + "\n" for g in GOOD * 200).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    write_jsonl(tmp_path / "fine.jsonl", GOOD)
    with pytest.raises(DataPrepError, match=r"(?s)1 of 2 shards failed.*cut.jsonl.gz: truncated "
                                            r"or corrupt after \d+ lines"):
        run_pipeline({"a": [str(tmp_path / "*.json*")]}, tmp_path / "out", tiny, progress=False)
    assert len(list((tmp_path / "out" / "shards" / "a").glob("fine.jsonl-*.idx"))) == 1  # kept
    lines = "".join(json.dumps(g) + "\n" for g in GOOD * 200).encode()
    whole = zstandard.ZstdCompressor().compress(lines)
    (tmp_path / "cut.jsonl.zst").write_bytes(whole[: len(whole) // 2])   # zstd would stop silently
    with pytest.raises(DataPrepError, match=r"cut.jsonl.zst: truncated or corrupt after \d+ lines"):
        run_pipeline({"a": [str(tmp_path / "cut.jsonl.zst")]}, tmp_path / "out3", tiny,
                     progress=False)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataPrepError, match="notes.txt: unknown format"):
        run_pipeline({"a": [str(tmp_path / "notes.txt")]}, tmp_path / "out2", tiny, progress=False)


def write_sources(root) -> dict:
    """Two subsets in every file format."""
    root.mkdir()
    write_jsonl(root / "b1.jsonl", GOOD[:3])
    (root / "b2.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps(g) + "\n" for g in GOOD[3:]).encode()))
    (root / "d1.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": f"{word(i)} x"}) + "\n" for i in range(9)).encode()))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": [f"{word(i)} {word(i)}" for i in range(7)] + [None]}),
                   root / "d2.parquet")
    return {"books": [str(root / "b*")], "docs": [str(root / "d*")]}


def test_output_is_byte_identical_for_one_and_two_workers(tmp_path, tiny):
    subsets = write_sources(tmp_path / "src")
    one = run_pipeline(subsets, tmp_path / "one", tiny, workers=1, progress=False)
    two = run_pipeline(subsets, tmp_path / "two", tiny, workers=2, progress=False)
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    assert len(digest(tmp_path / "one")) == 2 * 2 + 4 * 2   # merged subsets + one per shard
    assert one["subsets"]["docs"]["skipped"] == {"missing_text": 1}
    assert one["subsets"]["docs"]["documents"] == 16 and one["subsets"]["books"]["documents"] == 6
    assert [s["documents"] for s in two["subsets"]["docs"]["shards"]] == [9, 7]


def test_a_killed_run_resumes_to_the_same_output(tmp_path, neox):
    source = REPO / "data" / "fixture"
    pieces = tmp_path / "src"
    pieces.mkdir()
    lines = [line for f in sorted(source.glob("*.jsonl")) for line in f.read_text().splitlines()]
    for i in range(8):   # 8 files, each the whole fixture rotated (about a second of work each)
        (pieces / f"part{i}.jsonl").write_text("\n".join(lines[i:] + lines[:i]) + "\n")
    command = [sys.executable, "scripts/prepare_data.py", "--subset", f"all={pieces}/*.jsonl",
               "--tokenizer", "data/tokenizers/gpt-neox-20b", "--workers", "1",
               "--split-size", "0.3"]   # MiB: each file in 4 byte ranges, 32 shards
    run_pipeline({"all": [str(pieces / "*.jsonl")]}, tmp_path / "whole", neox, progress=False)
    process = subprocess.Popen(command + ["--output-dir", str(tmp_path / "killed")], cwd=REPO,
                               env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    shards = tmp_path / "killed" / "shards" / "all"
    deadline = time.time() + 120
    while len(list(shards.glob("*.idx"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list(shards.glob("*.idx")))
    assert 2 <= done < 32, done                # killed part-way through
    assert not (tmp_path / "killed" / "all.idx").exists()
    subprocess.run(command + ["--output-dir", str(tmp_path / "killed")], cwd=REPO, check=True,
                   env=subprocess_env(), capture_output=True)
    merged = {name: h for name, h in digest(tmp_path / "killed").items() if "/" not in name}
    assert merged == {n: h for n, h in digest(tmp_path / "whole").items() if "/" not in n}
    assert len(list(shards.glob("*.idx"))) == 32 and not list(shards.glob("*.tmp*"))


def test_subset_weights_are_followed_within_one_percent(process_group, tmp_path, tiny):
    subsets = {}
    for n, name in enumerate(("arxiv", "book", "c4")):
        write_jsonl(tmp_path / f"{name}.jsonl",
                    [{"text": " ".join([word(100 * n + i)] * 20)} for i in range(60)])
        subsets[name] = [str(tmp_path / f"{name}.jsonl")]
    run_pipeline(subsets, tmp_path / "corpus", tiny, progress=False)
    weights = {"arxiv": 0.2, "book": 0.3, "c4": 0.5}
    config = DataConfig(tokenizer="tiny", blend=[], corpus=str(tmp_path / "corpus"),
                        subset_weights=weights, split="100,0,0", cache_dir=str(tmp_path / "cache"))
    train, _ = build_datasets(config, tiny, seq_length=8, seed=3, train_samples=10_000,
                              valid_samples=0)
    counts = [0, 0, 0]
    for i in range(10_000):   # which subset a sample came from, read off its words
        words = train[i]["tokens"][train[i]["tokens"] >= token_of_word(0)] - token_of_word(0)
        counts[int(words.min()) // 100] += 1
    for count, weight in zip(counts, weights.values()):
        assert abs(count / 10_000 - weight) < 0.01, counts


def test_hugging_face_streams_one_schema_and_refuse_mixed_ones(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    same, mixed = tmp_path / "same", tmp_path / "mixed"
    same.mkdir(), mixed.mkdir()
    write_jsonl(same / "a.jsonl", GOOD[:4])
    write_jsonl(same / "b.jsonl", GOOD[4:])
    manifest = run_pipeline({"book": [f"hf:{same}"]}, tmp_path / "out", tiny, progress=False)
    assert manifest["subsets"]["book"]["documents"] == 6
    assert len(manifest["subsets"]["book"]["shards"]) == 2      # one per stream shard (file)
    write_jsonl(mixed / "a.jsonl", [{"text": "x y", "meta": {"a": 1}}])
    write_jsonl(mixed / "b.jsonl", [{"text": "x y", "meta": {"b": "s", "c": [1]}}])
    with pytest.raises(DataPrepError, match="meta. schemas differ"):
        run_pipeline({"web": [f"hf:{mixed}"]}, tmp_path / "out2", tiny, progress=False)


def test_a_sentencepiece_model_tokenizes_in_workers(tmp_path):
    import sentencepiece

    from ultramem_megatron.data.tokenizer import load_tokenizer

    texts = [json.loads(line)["text"] for line in
             (REPO / "data" / "fixture" / "kjv.jsonl").read_text().splitlines()[:40]]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(tmp_path / "sp"), vocab_size=400,
        model_type="bpe", eos_id=1, pad_id=3, bos_id=-1, unk_id=0, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False)   # lossless
    tokenizer = load_tokenizer(str(tmp_path / "sp.model"))
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:20]])
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[20:]])
    manifest = run_pipeline({"kjv": [str(tmp_path / "*.jsonl")]}, tmp_path / "out", tokenizer,
                            workers=2, progress=False)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(str(tmp_path / "out" / "kjv"))
    assert len(data) == manifest["subsets"]["kjv"]["documents"] == 40
    assert tokenizer.detokenize(data[5][:-1].tolist()) == texts[5] and data[5][-1] == tokenizer.eod
