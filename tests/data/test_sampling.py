"""Samples and real layouts: --sample keeps a hash-chosen subset of documents that is the same
for any split and worker count, --max-tokens lands near its target in every subset's proportion,
OUT/plan.json refuses a rerun with other options, and a RedPajama-Data-1T folder tree becomes
one subset per folder."""

import gzip
import json
import random
import subprocess
import sys

import numpy
import pytest
import zstandard

from tests.conftest import subprocess_env
from ultramem_megatron.data import pipeline
from ultramem_megatron.data.indexed import read_index
from ultramem_megatron.data.pipeline import run_pipeline
from ultramem_megatron.data.sources import layout_subsets
from ultramem_megatron.data.writer import DataPrepError, WriteOptions

from .conftest import REPO, word, write_jsonl

DOCS = 1500   # per subset


def documents(prefix) -> list[tuple[int, ...]]:
    """The token sequences of a merged prefix, one per document (no max_document_tokens)."""
    dtype, lengths, _ = read_index(f"{prefix}.idx")
    tokens = numpy.fromfile(f"{prefix}.bin", dtype)
    bounds = numpy.concatenate([[0], numpy.cumsum(lengths)])
    return [tuple(tokens[a:b]) for a, b in zip(bounds, bounds[1:])]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, list[str]]:
    """Three subsets of distinct documents (a count prefix keeps them distinct) with lengths
    from 1 to 200 words, the last subset twice as large and in two files."""
    root, rng = tmp_path_factory.mktemp("sample_corpus"), random.Random(7)
    subsets = {}
    for s, name in enumerate(("a", "b", "c")):
        files = []
        for part in range(1 + (name == "c")):
            lines = [{"text": " ".join([word(s), word(i % 400)] + [
                word(rng.randrange(400)) for _ in range(rng.randrange(200))])}
                for i in range(DOCS)]
            files.append(str(write_jsonl(root / f"{name}{part}.jsonl", lines)))
        subsets[name] = files
    return subsets


@pytest.fixture(scope="module")
def full(corpus, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, run_pipeline(corpus, out, tiny, progress=False)


def is_subsequence(part: list, whole: list) -> bool:
    remaining = iter(whole)
    return all(item in remaining for item in part)


def test_a_sample_is_the_same_subset_for_any_split_and_worker_count(corpus, full, tiny,
                                                                   tmp_path):
    full_dir, full_manifest = full
    rate = 0.3
    runs = []
    for split, workers in ((1 << 40, 1), (20_000, 2)):
        out = tmp_path / f"s{split}-w{workers}"
        manifest = run_pipeline(corpus, out, tiny, progress=False, workers=workers,
                                split_bytes=split, options=WriteOptions(sample=rate))
        runs.append((out, manifest))
    (one, manifest), (other, _) = runs
    assert len(manifest["subsets"]["a"]["shards"]) == 1
    for name, entry in manifest["subsets"].items():
        assert (one / f"{name}.bin").read_bytes() == (other / f"{name}.bin").read_bytes()
        assert (one / f"{name}.idx").read_bytes() == (other / f"{name}.idx").read_bytes()
        usable = full_manifest["subsets"][name]["documents"]
        assert entry["documents"] + entry["unsampled"] == usable
        sigma = (usable * rate * (1 - rate)) ** 0.5   # a binomial draw of the usable documents
        assert abs(entry["documents"] - rate * usable) < 5 * sigma, (name, entry["documents"])
        kept, everything = documents(one / name), documents(full_dir / name)
        assert len(kept) == entry["documents"] and is_subsequence(kept, everything)
    smaller = run_pipeline(corpus, tmp_path / "smaller", tiny, progress=False,
                           options=WriteOptions(sample=0.1))
    assert set(documents(tmp_path / "smaller" / "c")) <= set(documents(one / "c"))
    assert smaller["subsets"]["c"]["documents"] < manifest["subsets"]["c"]["documents"]


def test_max_tokens_lands_near_the_target_in_every_subsets_proportion(corpus, full, tiny,
                                                                     tmp_path, monkeypatch):
    _, full_manifest = full
    total = sum(entry["tokens"] for entry in full_manifest["subsets"].values())
    target = int(0.25 * total)
    monkeypatch.setattr(pipeline, "PROBE_BYTES", 60_000)   # a probe of about 8 % of each subset
    manifest = run_pipeline(corpus, tmp_path / "out", tiny, progress=False, max_tokens=target)
    got = sum(entry["tokens"] for entry in manifest["subsets"].values())
    # measured 1.7 % over; the sample alone has a relative spread of about 3 % here
    assert abs(got - target) < 0.08 * target, (got, target)
    for name, entry in manifest["subsets"].items():   # about 5 % spread on a subset's share
        share, full_share = entry["tokens"] / got, full_manifest["subsets"][name]["tokens"] / total
        assert abs(share - full_share) < 0.15 * full_share, (name, share, full_share)
    assert manifest["max_tokens"] == target and 0.22 < manifest["options"]["sample"] < 0.28
    assert "sample: rate" in pipeline.describe(manifest)


def test_a_rerun_with_other_options_is_refused_and_a_same_one_reuses_the_plan(
        corpus, tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = run_pipeline(corpus, out, tiny, progress=False, max_tokens=50_000)
    monkeypatch.setattr(pipeline, "estimate_tokens", lambda *a: pytest.fail("probed again"))
    again = run_pipeline(corpus, out, tiny, progress=False, max_tokens=50_000)
    assert again["options"] == first["options"]
    for kwargs in ({"max_tokens": 60_000}, {}, {"options": WriteOptions(sample=0.5)},
                   {"max_tokens": 50_000, "options": WriteOptions(max_document_tokens=64)}):
        with pytest.raises(DataPrepError, match="was planned with options"):
            run_pipeline(corpus, out, tiny, progress=False, **kwargs)


def test_hugging_face_streams_take_a_rate_not_a_token_count(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(pipeline, "expand_sources", lambda spec: [
        pipeline.Shard("s", "hf:x", hf_shard=0, hf_shards=1)])
    with pytest.raises(DataPrepError, match="give --sample RATE instead"):
        run_pipeline({"a": ["hf:x"]}, tmp_path / "out", tiny, progress=False, max_tokens=100)


def write_redpajama_tree(root) -> dict[str, int]:
    """RedPajama-Data-1T's layout in miniature: folder per subset, common_crawl one level deeper
    with the same file name in two dumps, zstd and plain files, a checksum and the urls list."""
    counts = {}

    def records(subset, n):
        counts[subset] = counts.get(subset, 0) + n
        return "".join(json.dumps({"text": f"{subset} {word(i)} {word(n)}", "meta": {},
                                   "red_pajama_subset": subset}) + "\n" for i in range(n))

    (root / "arxiv").mkdir(parents=True)
    (root / "arxiv" / "arxiv_0a1b.jsonl").write_text(records("arxiv", 30))
    (root / "arxiv" / "arxiv_0a1b.jsonl.md5").write_text("0" * 32 + "\n")
    (root / "book").mkdir()
    (root / "book" / "book.jsonl").write_text(records("book", 20))
    for dump, n in (("2019-30", 11), ("2020-05", 12)):
        folder = root / "common_crawl" / dump
        folder.mkdir(parents=True)
        (folder / "en_head_0000.json.gz.dedup.classifier.jsonl.zst").write_bytes(
            zstandard.ZstdCompressor().compress(records("common_crawl", n).encode()))
    (root / "c4").mkdir()
    (root / "c4" / "c4-train.00000-of-01024.jsonl.gz").write_bytes(
        gzip.compress(records("c4", 9).encode()))
    (root / "urls.txt").write_text("https://example.invalid/x\n")
    return counts


def test_a_redpajama_download_is_one_subset_per_folder(tmp_path):
    counts = write_redpajama_tree(tmp_path / "rp")
    subsets, ignored = layout_subsets(str(tmp_path / "rp"))
    assert sorted(subsets) == ["arxiv", "book", "c4", "common_crawl"]
    assert [p.rsplit("/", 1)[-1] for p in ignored] == ["arxiv_0a1b.jsonl.md5", "urls.txt"]
    result = subprocess.run(
        [sys.executable, "scripts/prepare_data.py", "--redpajama", str(tmp_path / "rp"),
         "--output-dir", str(tmp_path / "out"), "--tokenizer", "data/tokenizers/gpt-neox-20b"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "2 file(s) of other formats left out" in result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {name: entry["documents"] for name, entry in manifest["subsets"].items()} == counts
    assert len(manifest["subsets"]["common_crawl"]["shards"]) == 2   # same name, two dumps
    (tmp_path / "empty" / "arxiv").mkdir(parents=True)
    with pytest.raises(DataPrepError, match="no subset folder holds"):
        layout_subsets(str(tmp_path / "empty"))
    with pytest.raises(DataPrepError, match="not a directory"):
        layout_subsets(str(tmp_path / "missing"))
