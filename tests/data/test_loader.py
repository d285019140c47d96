"""GPTDataset loading through megatron's builder: resume, data parallel slices, splits, blending."""

import json
import random

import pytest
import torch

from ultramem_megatron.config import BlendEntry, DataConfig
from ultramem_megatron.data.loader import (build_datasets, dataset_sizes, iterate_batches,
                                           validation_batches)
from ultramem_megatron.data.prepare import DataPrepError, ensure_prepared, prepare_jsonl

from .conftest import FIXTURE_DIR, token_of_word, word, write_jsonl

SEQ = 16


def write_documents(path, words: range, seed: int):
    """One document per word i: d<i> repeated 3..30 times, so tokens name their document."""
    rng = random.Random(seed)
    return write_jsonl(path, [{"text": " ".join([word(i)] * rng.randint(3, 30))} for i in words])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny):
    """Two prepared prefixes: documents d0..d199 in 'a', d200..d399 in 'b'."""
    root = tmp_path_factory.mktemp("corpus")
    for name, words in (("a", range(0, 200)), ("b", range(200, 400))):
        prepare_jsonl(str(write_documents(root / f"{name}.jsonl", words, seed=len(name))),
                      str(root / name), tiny)
    return root


def data_config(corpus, *weights, split="90,10,0"):
    names = "ab"[:len(weights)]
    return DataConfig(tokenizer="tiny", split=split, cache_dir=str(corpus / "cache"),
                      blend=[BlendEntry(prefix=str(corpus / n), weight=w)
                             for n, w in zip(names, weights)])


def build(corpus, tiny, *weights, train=200, valid=40, seed=7, **kwargs):
    return build_datasets(data_config(corpus, *weights, **kwargs), tiny, seq_length=SEQ, seed=seed,
                          train_samples=train, valid_samples=valid)


def documents_in(batches) -> set[int]:
    tokens = torch.cat([b[key].flatten() for b in batches for key in ("tokens", "labels")])
    return {int(t) - token_of_word(0) for t in tokens.unique() if t >= token_of_word(0)}


def test_batches_are_shifted_sequences(process_group, corpus, tiny):
    train, _ = build(corpus, tiny, 1.0)
    batch = next(iterate_batches(train, 4))
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        "tokens": ((4, SEQ), torch.int64), "labels": ((4, SEQ), torch.int64),
        "loss_mask": ((4, SEQ), torch.float32), "position_ids": ((4, SEQ), torch.int64)}
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert torch.equal(batch["position_ids"], torch.arange(SEQ).expand(4, SEQ))
    assert torch.equal(batch["loss_mask"], torch.ones(4, SEQ))
    assert (batch["tokens"] == tiny.eod).any()   # documents are packed, separated by eod


def test_resume_at_consumed_samples_gives_the_same_tail(process_group, corpus, tiny):
    train, _ = build(corpus, tiny, 1.0)
    full = list(iterate_batches(train, 2))
    assert len(full) == len(train) // 2 >= 100
    for consumed in (2, 10, 150):
        resumed = list(iterate_batches(train, 2, consumed))
        assert len(resumed) == len(full) - consumed // 2
        for a, b in zip(resumed, full[consumed // 2:]):
            assert all(torch.equal(a[k], b[k]) for k in a)
    again, _ = build(corpus, tiny, 1.0)   # rebuilt (from megatron's cache): the same order
    assert torch.equal(next(iterate_batches(again, 2, 150))["tokens"], full[75]["tokens"])
    with pytest.raises(ValueError, match="not a multiple"):
        next(iterate_batches(train, 2, 3))


def test_data_parallel_ranks_split_each_global_step(process_group, corpus, tiny):
    train, _ = build(corpus, tiny, 1.0)
    single = iterate_batches(train, 4, 8)
    ranks = [iterate_batches(train, 2, 8, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(5):
        expected, parts = next(single), [next(r) for r in ranks]
        assert torch.equal(torch.cat([p["tokens"] for p in parts]), expected["tokens"])


def test_train_and_valid_hold_disjoint_documents(process_group, corpus, tiny):
    train, valid = build(corpus, tiny, 1.0, valid=40)
    train_docs = documents_in(iterate_batches(train, 8))
    valid_docs = documents_in(validation_batches(valid, 4, 10))
    assert train_docs.isdisjoint(valid_docs)
    assert len(valid_docs) >= 10 and len(train_docs) >= 150   # ~10% / ~90% of the 200 documents
    first, second = validation_batches(valid, 4, 10), validation_batches(valid, 4, 10)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(first, second))
    with pytest.raises(DataPrepError, match="too few"):
        validation_batches(valid, 4, len(valid))


def _samples(dataset, count: int) -> torch.Tensor:
    return torch.stack([dataset[i]["tokens"] for i in range(count)])


def test_validation_set_is_fixed_by_valid_seed(process_group, corpus, tiny):
    """valid_seed orders the held-out samples whatever the training seed; the training order
    is the same as when one seed orders both (megatron's behaviour, valid_seed None)."""
    config = data_config(corpus, 0.5, 0.5)

    def datasets(seed, valid_seed):
        return build_datasets(config, tiny, seq_length=SEQ, seed=seed, train_samples=200,
                              valid_samples=40, valid_seed=valid_seed)

    train_a, valid_a = datasets(7, 99)
    train_b, valid_b = datasets(8, 99)
    assert torch.equal(_samples(valid_a, 40), _samples(valid_b, 40))     # one held-out set
    assert not torch.equal(_samples(train_a, 200), _samples(train_b, 200))
    train_one, valid_one = datasets(7, None)
    assert torch.equal(_samples(train_one, 200), _samples(train_a, 200))
    assert not torch.equal(_samples(valid_one, 40), _samples(valid_a, 40))
    same_seed = datasets(99, 99)[1]
    assert torch.equal(_samples(same_seed, 40), _samples(valid_a, 40))
    assert documents_in([{"tokens": _samples(valid_a, 40), "labels": _samples(valid_a, 40)}]) \
        .isdisjoint(documents_in([{"tokens": _samples(train_b, 200),
                                   "labels": _samples(train_b, 200)}]))


def test_blend_weights_are_respected(process_group, corpus, tiny):
    train, valid = build(corpus, tiny, 3.0, 1.0, train=400)
    from_a = [max(documents_in([train[i]])) < 200 for i in range(400)]   # sample i starts in 'a'?
    assert documents_in([train[i] for i in range(400)]) & set(range(200, 400))
    assert 0.68 < sum(from_a) / 400 < 0.82
    assert len(valid) >= 40


def test_reprepared_prefix_does_not_reuse_stale_indices(process_group, tmp_path, tiny):
    source = write_documents(tmp_path / "docs.jsonl", range(0, 100), seed=1)
    prepare_jsonl(str(source), str(tmp_path / "a"), tiny)
    before = documents_in(iterate_batches(build(tmp_path, tiny, 1.0)[0], 8))
    source = write_documents(tmp_path / "docs.jsonl", range(100, 200), seed=2)
    prepare_jsonl(str(source), str(tmp_path / "a"), tiny)
    after = documents_in(iterate_batches(build(tmp_path, tiny, 1.0)[0], 8))
    assert before <= set(range(100)) and after <= set(range(100, 200))


def test_errors_name_the_problem(process_group, corpus, tiny, tmp_path):
    with pytest.raises(DataPrepError, match=r"data.blend\[0\]: .*nothing.bin/.idx do not exist"):
        build_datasets(DataConfig(blend=[BlendEntry(prefix=str(tmp_path / "nothing"))]), tiny,
                       seq_length=SEQ, seed=1, train_samples=10, valid_samples=10)
    with pytest.raises(DataPrepError, match="'100,0,0' leaves the valid split too few"):
        build(corpus, tiny, 1.0, split="100,0,0")


def test_fixture_end_to_end_with_neox(process_group, tmp_path, neox):
    """The default data path: prepare data/fixture with GPT-NeoX, then train/valid batches."""
    from ultramem_megatron.config import TrainConfig

    data = DataConfig(tokenizer="neox", cache_dir=str(tmp_path / "cache"), blend=[
        BlendEntry(prefix=str(tmp_path / "fixture"), source=str(FIXTURE_DIR / "*.jsonl"))])
    [stats] = ensure_prepared(data, neox)
    assert stats.documents == 253 and stats.skipped == {}
    train_cfg = TrainConfig(max_steps=20, global_batch_size=8, micro_batch_size=4, eval_iters=2)
    train_samples, valid_samples = dataset_sizes(train_cfg)
    assert (train_samples, valid_samples) == (160, 16)
    train, valid = build_datasets(data, neox, seq_length=256, seed=1234,
                                  train_samples=train_samples, valid_samples=valid_samples)
    batch = next(iterate_batches(train, 4))
    assert batch["tokens"].shape == (4, 256) and int(batch["tokens"].max()) < neox.vocab_size
    corpus = "\n".join(json.loads(line)["text"] for path in sorted(FIXTURE_DIR.glob("*.jsonl"))
                       for line in path.read_text(encoding="utf-8").splitlines())
    for row in batch["tokens"]:   # each piece between eods is a stretch of one fixture document
        pieces = neox.detokenize(row.tolist()).split("<|endoftext|>")
        assert all(piece in corpus for piece in pieces if "\ufffd" not in piece)
    assert len(validation_batches(valid, 4, 4)) == 4
