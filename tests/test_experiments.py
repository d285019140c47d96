"""scripts/experiment.py's suites and report: matched compute and parameters (checked against
model_stats independently), the table from synthetic metrics, the doc section kept in place."""

import json
import math
import subprocess
import sys

import pytest
import torch

from ultramem_megatron.experiments.report import (RunResult, load_results, table,
                                                  write_section)
from ultramem_megatron.experiments.suites import SUITES, Run, Suite
from ultramem_megatron.model.stats import model_stats

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cpu_small():
    return SUITES["cpu-small"]()


def test_cpu_small_families_are_matched(cpu_small):
    stats = {r.label: model_stats(r.run_config().model) for r in cpu_small.runs
             if r.seed == 1234 and r.label in ("dense", "moe", "pkm", "ultramem")}
    assert set(stats) == {"dense", "moe", "pkm", "ultramem"}
    reference = stats["ultramem"]
    for family, s in stats.items():
        assert s.paper_flops == pytest.approx(reference.paper_flops, rel=0.05), family
        if family in ("moe", "pkm"):
            assert s.non_embedding_params == pytest.approx(reference.non_embedding_params,
                                                           rel=0.05), family
    assert stats["dense"].non_embedding_params < reference.non_embedding_params / 3
    assert {r.seed for r in cpu_small.runs} == {1234, 42} and len(cpu_small.runs) == 10
    paper = next(r for r in cpu_small.runs if r.label == "ultramem-paper").run_config().model
    assert not paper.ultramem.query_batchnorm and paper.ultramem.key_balance_weight == 0
    span = next(r for r in cpu_small.runs if r.label == "ultramem-span-1:2").run_config().model
    assert span.memory_spans == "1:2" and paper.memory_spans == "0:3"
    assert model_stats(span).paper_flops == reference.paper_flops


def test_ablation_ladder_adds_one_component_per_step():
    runs = SUITES["ablation"]().runs
    assert {r.seed for r in runs} == {1234, 42} and len(runs) == 10
    configs = [r.run_config().model for r in runs if r.seed == 1234]
    assert [c.family for c in configs] == ["pkm"] + ["ultramem"] * 4
    mem = [c.ultramem for c in configs[1:]]
    assert [(m.num_cores, m.expansion, m.value_lr_start_mult) for m in mem] == [
        (1, 1, 1.0), (2, 1, 1.0), (2, 4, 1.0), (2, 4, 10.0)]


def _records(val_losses, top1):
    return [{"step": 10 * (i + 1), "loss": 7.0, "val_loss": v, "mem0/rows_hit": 0.5,
             "mem0/top1pct_share": top1, "mem0/out_rms": 2.0, "mem0/ffn_rms": 4.0}
            for i, v in enumerate(val_losses)]


def test_table_pools_seeds(cpu_small):
    runs = [r for r in cpu_small.runs if r.label == "ultramem"]
    results = [RunResult(runs[0], _records([7.0, 6.5, 6.6], 0.1), 2048, 30),
               RunResult(runs[1], _records([7.1, 6.4, 6.8], 0.3), 2048, 30)]
    row = next(line for line in table(results).splitlines() if line.startswith("| ultramem"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:6] == ["2/2", "6.7000", "0.2000", "6.4500", "0.06M"]
    assert cells[8:] == ["0.500", "0.200", "0.50"]


def test_write_section_replaces_only_its_block(tmp_path):
    doc = tmp_path / "quality.md"
    doc.write_text("# Model quality\n\nhand-written analysis\n")
    write_section(doc, "a", "first")
    write_section(doc, "b", "other")
    write_section(doc, "a", "second")
    text = doc.read_text()
    assert "hand-written analysis" in text and "other" in text
    assert "second" in text and "first" not in text
    assert text.index("second") < text.index("other")


def test_done_runs_are_skipped_and_the_rest_resume(tmp_path):
    suite = Suite("t", (Run("a", "x", 1, "configs/tiny.yaml", ("train.max_steps=20",)),
                        Run("b", "x", 1, "configs/tiny.yaml", ("train.max_steps=20",))), "t")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in _records([7.0, 6.0], 0.1)))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text(json.dumps(_records([7.0], 0.1)[0]))
    assert [r.done for r in load_results(suite, tmp_path)] == [True, False]


def test_bad_override_is_refused_before_training(tmp_path):
    result = subprocess.run([sys.executable, "scripts/experiment.py", "cpu-small",
                             "model.hidden_size=banana", "--runs-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "model.hidden_size" in result.stderr
    assert not any(tmp_path.iterdir())


def test_continuation_items_hold_the_true_continuation_once():
    from ultramem_megatron.experiments.downstream import continuation_docs
    sequences = [[1000 * i + j for j in range(100)] for i in range(10)]
    detok = lambda ids: " ".join(map(str, ids))   # noqa: E731
    docs = continuation_docs(sequences, detok, examples=6, context_tokens=5, answer_tokens=3)
    assert len(docs) == 6 and len({d["context"] for d in docs}) == 6
    for doc in docs:
        window = int(doc["context"].split()[0]) // 1000
        truth = detok(sequences[window][5:8])
        assert doc["choices"][doc["answer"]] == truth
        assert len(doc["choices"]) == 4 and doc["choices"].count(truth) == 1
    with pytest.raises(ValueError, match="held-out windows"):
        continuation_docs(sequences[:3], detok, examples=6)


def test_a_run_held_by_a_live_launch_is_not_claimed(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("experiment", ROOT / "scripts" / "experiment.py")
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    held = tmp_path / "held"
    held.mkdir()
    (held / ".lock").write_text(str(__import__("os").getppid()))      # a live process
    assert not experiment.claim(held)
    stale = tmp_path / "stale"
    stale.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (stale / ".lock").write_text(dead)
    assert experiment.claim(stale) and experiment.claim(tmp_path / "new")


def test_ngram_keys_name_each_ngram_once():
    from ultramem_megatron.experiments.reference import ngram_keys
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 5, (3, 40), generator=gen)
    for order in (1, 2, 3):
        keys = ngram_keys(tokens, order, vocab_size=5)
        grams = [tuple(row[max(0, p - order + 1):p + 1].tolist()) for row in tokens
                 for p in range(tokens.shape[1])]   # brute force: the last `order` tokens
        ids = keys.reshape(-1).tolist()
        assert len(set(zip(grams, ids))) == len(set(grams)) == len(set(ids))   # a bijection
    with pytest.raises(ValueError, match="overflow"):
        ngram_keys(tokens, 5, vocab_size=50432)


def test_keyed_memory_reads_each_ngram_rows_as_often_as_the_ngram_occurs():
    from ultramem_megatron.experiments.reference import keyed_row_counts, ngram_usage_reference
    gen = torch.Generator().manual_seed(1)
    # key 7 occurs 30 times, keys 0..9 (but 7) once each: 39 tokens x 4 lookups
    keys = torch.tensor([7] * 30 + [k for k in range(10) if k != 7])
    counts = keyed_row_counts(keys, num_rows=10_000, lookups=4, generator=gen)
    assert counts.sum() == 39 * 4
    assert counts.topk(4).values.sum() >= 30 * 4   # key 7's rows (more only by chance overlap)
    # one token repeated: its 4 rows take every lookup (top 1 % = 100 rows hold them all)
    same = ngram_usage_reference(torch.full((2, 64), 3), 10_000, 4, vocab_size=10, orders=(1,))
    assert same[1]["top1pct_share"] == 1.0 and same[1]["rows_hit"] <= 4 / 10_000
    # all tokens distinct, one lookup each, rows >> tokens: almost every lookup its own row
    distinct = ngram_usage_reference(torch.arange(500).view(5, 100), 1_000_000, 1,
                                     vocab_size=500, orders=(1,))[1]
    assert 499 / 1e6 <= distinct["rows_hit"] <= 500 / 1e6
    assert distinct["entropy_bits"] == pytest.approx(math.log2(500), abs=0.01)


def test_comparison_against_dense_uses_paired_seeds_and_both_spreads(cpu_small):
    from ultramem_megatron.experiments.report import comparison
    by_name = {r.name: r for r in cpu_small.runs}
    finals = {"dense-s1234": 6.70, "dense-s42": 6.74, "ultramem-s1234": 6.60,
              "ultramem-s42": 6.66, "moe-s1234": 6.69, "moe-s42": 6.75}
    results = [RunResult(by_name[name], _records([7.0, value], 0.1), 2048, 20)
               for name, value in finals.items()]
    lines = {line.split(" - ")[0].lstrip("- "): line for line in comparison(results).splitlines()}
    assert set(lines) == {"ultramem", "moe"}
    assert "-0.0900 (per seed: -0.1000, -0.0800; spreads 0.0600 / 0.0400)" in lines["ultramem"]
    assert lines["ultramem"].endswith("below dense by more than the larger seed spread")
    assert "(per seed: -0.0100, +0.0100; spreads 0.0600 / 0.0400)" in lines["moe"]
    assert lines["moe"].endswith("by less than the larger seed spread")


def test_ladder_steps_are_paired_by_seed():
    from ultramem_megatron.experiments.report import ladder_steps, section
    suite = SUITES["ablation"]()
    finals = {"pkm": 7.0, "tdqkr": 6.9, "mcs": 6.95, "ive": 6.8, "value-lr": 6.6}
    results = [RunResult(r, _records([7.5, finals[r.name.rsplit("-s", 1)[0]]
                                      + (0.02 if r.seed == 42 else 0.0)], 0.1), 2048, 20)
               for r in suite.runs if not r.name.startswith("ive-s42")]
    lines = ladder_steps(results).splitlines()
    assert lines[0] == "- +tdqkr (after pkm): -0.1000 (per seed: -0.1000, -0.1000)"
    assert lines[1] == "- +mcs (after +tdqkr): +0.0500 (per seed: +0.0500, +0.0500)"
    assert lines[2] == "- +ive (after +mcs): -0.1500 (per seed: -0.1500)"          # s42 missing
    assert lines[3] == "- +value-lr (after +ive): -0.2000 (per seed: -0.2000)"
    assert "Each step of the ladder" in section(suite, results, "x.png", "cmd")


def test_eval_valsets_refuses_a_directory_without_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "scripts/eval_valsets.py", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "is not a checkpoint" in result.stderr
