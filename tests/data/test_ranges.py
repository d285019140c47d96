"""Tokenizing inside a file: byte ranges and row-group runs give the whole file's bytes for any
split and worker count, the .bin/.idx writer equals megatron-core's builder, long documents in
pieces equal whole ones, records that crash the tokenizer are counted, Ctrl-C stops at once."""

import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import numpy
import pytest

from tests.conftest import subprocess_env
from ultramem_megatron.data import indexed, pipeline, tokenizer as tokenizer_module
from ultramem_megatron.data.pipeline import run_pipeline
from ultramem_megatron.data.sources import Shard, ShardReader, expand_sources
from ultramem_megatron.data.writer import DataPrepError

from .conftest import NEOX_DIR, REPO, word, write_jsonl


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def merged(out_dir, subset="all") -> tuple[str, str]:
    return digest(out_dir / f"{subset}.bin"), digest(out_dir / f"{subset}.idx")


def awkward_lines(count: int, rng: random.Random) -> list:
    """Records of very different sizes, with blank, malformed and CRLF-ended lines among them."""
    lines = []
    for i in range(count):
        kind = rng.random()
        if kind < 0.05:
            lines.append("")
        elif kind < 0.08:
            lines.append('{"text": broken')
        elif kind < 0.1:
            lines.append('{"text": "crlf ' + word(i % 400) + '"}\r')
        else:
            lines.append({"text": " ".join(word(rng.randrange(400))
                                           for _ in range(rng.choice([1, 3, 40, 400])))})
    return lines


def test_ranges_own_the_lines_that_start_in_them(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", awkward_lines(300, random.Random(1)))
    whole = list(ShardReader(Shard("a", str(path))))
    size = path.stat().st_size
    for split in (1, 7, 64, 1000, size - 1):
        parts = expand_sources(str(path), split)
        assert len(parts) == -(-size // split) and parts[-1].end == size
        assert [record for part in parts for record in ShardReader(part)] == whole, split


def test_workers_start_with_the_largest_shards_and_ranges_are_short():
    """What runs last, while the other workers idle, is short: the pool takes shards largest
    first (ties in plan order), and a default split gives each worker about 16 ranges."""
    sizes = [5, 90, 5, 30, 90, 0, 30]
    pending = [("all", Shard(f"s{i}", "x.jsonl", size=size), f"p{i}")
               for i, size in enumerate(sizes)]
    order = [prefix for _, _, prefix in pipeline.longest_first(pending)]
    assert order == ["p1", "p4", "p3", "p6", "p0", "p2", "p5"]
    mib = pipeline.MIB
    for plain, workers in ((45 * mib, 2), (3 * mib, 1), (10_000 * mib, 8), (10**7 * mib, 64)):
        split = pipeline.default_split(plain, workers)
        assert mib <= split <= 256 * mib and split % mib == 0
        ranges = -(-plain // split)
        assert ranges >= min(16 * workers, plain // mib), (plain, workers, ranges)
        assert split == 256 * mib or ranges <= 2 * 16 * workers, (plain, workers, ranges)


@pytest.mark.parametrize("workers", [1, 2])
def test_one_file_in_many_ranges_equals_one_range(tmp_path, tiny, workers):
    source = write_jsonl(tmp_path / "big.jsonl", awkward_lines(2000, random.Random(2)))
    source.write_bytes(b"\xef\xbb\xbf" + source.read_bytes())   # a byte-order mark first
    one = run_pipeline({"all": [str(source)]}, tmp_path / "one", tiny, progress=False,
                       split_bytes=1 << 40)
    many = run_pipeline({"all": [str(source)]}, tmp_path / "many", tiny, progress=False,
                        workers=workers, split_bytes=9_999)
    assert len(one["subsets"]["all"]["shards"]) == 1
    assert len(many["subsets"]["all"]["shards"]) == -(-source.stat().st_size // 9_999)
    assert merged(tmp_path / "many") == merged(tmp_path / "one")
    for key in ("documents", "tokens", "bytes", "skipped"):
        assert many["subsets"]["all"][key] == one["subsets"]["all"][key], key
    assert "malformed_json" in one["subsets"]["all"]["skipped"]   # the first record is kept
    assert one["subsets"]["all"]["skipped"]["malformed_json"] == sum(
        line == '{"text": broken' for line in awkward_lines(2000, random.Random(2)))


def test_parquet_row_group_runs_equal_the_whole_file(tmp_path, tiny):
    import pyarrow
    import pyarrow.parquet as pq

    rng = random.Random(3)
    texts = [" ".join(word(rng.randrange(400)) for _ in range(rng.randint(1, 50)))
             for _ in range(500)]
    texts[7] = None
    pq.write_table(pyarrow.table({"text": texts}), tmp_path / "t.parquet", row_group_size=37)
    one = run_pipeline({"all": [str(tmp_path / "t.parquet")]}, tmp_path / "one", tiny,
                       progress=False, split_bytes=1 << 40)
    runs = run_pipeline({"all": [str(tmp_path / "t.parquet")]}, tmp_path / "runs", tiny,
                        progress=False, workers=2, split_bytes=2_000)
    assert len(runs["subsets"]["all"]["shards"]) > 3
    assert merged(tmp_path / "runs") == merged(tmp_path / "one")
    assert runs["subsets"]["all"]["skipped"] == {"missing_text": 1}


def test_writer_and_merge_equal_megatron_core(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = numpy.random.default_rng(0)
    prefixes = []
    for part, dtype in enumerate([numpy.uint16] * 3):
        docs = [rng.integers(0, 50_000, rng.integers(1, 300)) for _ in range(20 + part)]
        ours = tmp_path / f"ours{part}"
        writer = indexed.IndexedWriter(f"{ours}.bin", numpy.dtype(dtype))
        writer.add(numpy.concatenate(docs[:5]), [d.size for d in docs[:5]])
        writer.add(numpy.concatenate(docs[5:]), [d.size for d in docs[5:]])
        writer.finalize(f"{ours}.idx")
        theirs = tmp_path / f"theirs{part}"
        builder = IndexedDatasetBuilder(f"{theirs}.bin", dtype=dtype)
        for doc in docs:
            builder.add_document(doc, [doc.size])
        builder.finalize(f"{theirs}.idx")
        for suffix in (".bin", ".idx"):
            assert digest(ours.with_suffix(suffix)) == digest(theirs.with_suffix(suffix))
        prefixes.append(str(theirs))
    indexed.merge(prefixes, tmp_path / "m.bin", tmp_path / "m.idx")
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=numpy.uint16)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(str(tmp_path / "ref.idx"))
    assert digest(tmp_path / "m.bin") == digest(tmp_path / "ref.bin")
    assert digest(tmp_path / "m.idx") == digest(tmp_path / "ref.idx")


def test_long_documents_in_pieces_give_the_whole_documents_ids(neox, monkeypatch):
    """Adversarial text around every kind of cut, encoded in 40-character pieces."""
    assert neox._piecewise
    alphabet = list("ab xyZ\n\n\t  'sdtll1234.,;!?-_") + [
        "\u0301", "\u00e9", "e\u0301", "\u65e5\u672c", "\U0001f600", "  ", "\r\n", "'s", "'ll",
        "\u00a0", "\u3000", "<|endoftext|>", "\u00c4", "    x"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400)))
             for _ in range(1500)]
    whole = [neox._backend.encode(t, add_special_tokens=False).ids for t in texts]
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 40)
    monkeypatch.setattr(tokenizer_module, "BATCH_CHARS", 300)
    assert sum(len(tokenizer_module.safe_cuts(t, 40)) for t in texts) > 3000
    assert neox.tokenize_batch(texts) == whole


def test_fast_loader_equals_transformers(neox):
    from transformers import AutoTokenizer

    from ultramem_megatron.data.tokenizer import HFTokenizer

    reference = HFTokenizer(AutoTokenizer.from_pretrained(str(NEOX_DIR)), "ref")
    assert neox._hf is None   # loaded from tokenizer.json alone
    for attribute in ("fingerprint", "vocab_size", "eod", "pad"):
        assert getattr(neox, attribute) == getattr(reference, attribute), attribute
    texts = [(REPO / "README.md").read_text(), "  Hello\n\n\tworld ½ 🚀"]
    assert neox.tokenize_batch(texts) == reference.tokenize_batch(texts)


def test_lone_surrogates_are_counted_and_the_run_goes_on(tmp_path, neox):
    write_jsonl(tmp_path / "web.jsonl", ['{"text": "bad \\ud800 escape"}',
                                         {"text": "good one"}, '{"text": "\\udfff"}'])
    manifest = run_pipeline({"web": [str(tmp_path / "web.jsonl")]}, tmp_path / "out", neox,
                            progress=False)
    assert manifest["subsets"]["web"]["documents"] == 1
    assert manifest["subsets"]["web"]["skipped"] == {"lone_surrogate": 2}


def test_unwritable_output_and_unreadable_input_are_named(tmp_path, tiny, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "d1"}])
    (tmp_path / "file").write_text("")
    with pytest.raises(DataPrepError, match="output directory .*file/out: cannot be written"):
        run_pipeline({"a": [str(tmp_path / "a.jsonl")]}, tmp_path / "file" / "out", tiny,
                     progress=False)
    real_open = open

    def denied(path, *args, **kwargs):
        if str(path).endswith("a.jsonl"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(DataPrepError, match=r"a.jsonl: cannot be read \(Permission denied\)"):
        run_pipeline({"a": [str(tmp_path / "a.jsonl")]}, tmp_path / "out", tiny, progress=False)


def test_slurm_array_tasks_then_merge_equal_one_run(tmp_path, tiny):
    source = write_jsonl(tmp_path / "big.jsonl", awkward_lines(1500, random.Random(4)))
    subsets = {"all": [str(source)]}
    run_pipeline(subsets, tmp_path / "one", tiny, progress=False, split_bytes=1 << 40)
    for index in (2, 0, 1):
        assert run_pipeline(subsets, tmp_path / "array", tiny, progress=False,
                            split_bytes=5_000, task=(index, 3)) is None
    manifest = run_pipeline(subsets, tmp_path / "array", tiny, progress=False, merge_only=True)
    assert merged(tmp_path / "array") == merged(tmp_path / "one")
    assert len(manifest["subsets"]["all"]["shards"]) > 3   # the recorded split size was reused
    for index in (0, 2):   # task 1 failed
        run_pipeline(subsets, tmp_path / "partial", tiny, progress=False, split_bytes=5_000,
                     task=(index, 3))
    with pytest.raises(DataPrepError, match=r"task\(s\) 1 of 3 are not written yet"):
        run_pipeline(subsets, tmp_path / "partial", tiny, progress=False, merge_only=True,
                     task=(0, 3))
    run_pipeline(subsets, tmp_path / "partial", tiny, progress=False, task=(1, 3))
    run_pipeline(subsets, tmp_path / "partial", tiny, progress=False, merge_only=True, task=(0, 3))
    assert merged(tmp_path / "partial") == merged(tmp_path / "one")


def test_tokenizer_default_path_loads_from_any_directory(tmp_path):
    result = subprocess.run([sys.executable, "-c", "from ultramem_megatron.data.tokenizer import "
                             "load_tokenizer; print(load_tokenizer('data/tokenizers/gpt-neox-20b')"
                             ".eod)"], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "0"


def default_signals() -> None:
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_DFL)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])   # Ctrl-C; scancel, preemption
def test_ctrl_c_stops_two_workers_within_seconds(tmp_path, stop):
    source = REPO / "data" / "fixture"
    lines = [line for f in sorted(source.glob("*.jsonl")) for line in f.read_text().splitlines()]
    pieces = tmp_path / "src"
    pieces.mkdir()
    for i in range(12):   # each about 2 s of work: a loaded machine cannot finish before the signal
        (pieces / f"part{i:02d}.jsonl").write_text("\n".join(4 * (lines[i:] + lines[:i])) + "\n")
    command = [sys.executable, "scripts/prepare_data.py", "--subset", f"all={pieces}/*.jsonl",
               "--workers", "2", "--split-size", "1024", "--output-dir", str(tmp_path / "out")]
    # a shell's background job (`cmd &`) starts with SIGINT ignored, and its children inherit
    # that: this test must not depend on how the suite was launched
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    shards = tmp_path / "out" / "shards" / "all"
    deadline = time.time() + 120
    while not list(shards.glob("*.idx")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(stop)
    start = time.time()
    _, stderr = process.communicate(timeout=60)
    assert time.time() - start < 10, stderr   # measured about 1 s; a busy CI machine gets slack
    assert process.returncode == 130 and "interrupted" in stderr, stderr
    done = len(list(shards.glob("*.idx")))
    assert 1 <= done < 12
    assert not (tmp_path / "out" / "all.idx").exists()
    if stop == signal.SIGTERM:
        return   # the rerun below is the same for both
    subprocess.run(command, cwd=REPO, env=subprocess_env(), check=True, capture_output=True)
    assert len(list(shards.glob("*.idx"))) == 12 and not list(shards.glob("*.tmp*"))
