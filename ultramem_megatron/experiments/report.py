"""A suite's results from its runs' metrics.jsonl: the table, the plot, and docs/quality.md's section."""

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..model.stats import model_stats
from .suites import Run, Suite


@dataclass
class RunResult:
    run: Run
    records: list[dict]
    tokens_per_step: int
    max_steps: int

    @property
    def done(self) -> bool:
        return any(r["step"] == self.max_steps and r.get("val_loss") is not None
                   for r in self.records)

    def series(self, name: str) -> list[tuple[int, float]]:
        """(tokens, value) of every record holding `name`; the last record of a step wins."""
        by_step = {r["step"]: r[name] for r in self.records if r.get(name) is not None}
        return [(step * self.tokens_per_step, value) for step, value in sorted(by_step.items())]

    def final(self, name: str) -> Optional[float]:
        series = self.series(name)
        return series[-1][1] if series else None


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_results(suite: Suite, runs_dir: Path) -> list[RunResult]:
    results = []
    for run in suite.runs:
        cfg = run.run_config()
        results.append(RunResult(run, read_metrics(runs_dir / run.name / "metrics.jsonl"),
                                 cfg.train.global_batch_size * cfg.model.seq_length,
                                 cfg.train.max_steps))
    return results


def _memory_stat(result: RunResult, stat: str, reduce=max) -> Optional[float]:
    """The final value of `stat` over the memory layers (reduce: the worst layer by default)."""
    names = {k for r in result.records for k in r if re.fullmatch(rf"mem\d+/{stat}", k)}
    values = [result.final(name) for name in sorted(names)]
    values = [v for v in values if v is not None]
    return reduce(values) if values else None


def _fmt(value: Optional[float], spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(results: list[RunResult]) -> str:
    """One row per label (seeds pooled): final and best val loss (mean, and the seeds' spread),
    tokens, parameters, activated FLOPs, utilisation at the end."""
    labels = list(dict.fromkeys(r.run.label for r in results))
    lines = ["| model | seeds | final val loss | spread | best val loss | tokens | params "
             "(non-emb.) | activated MFLOPs/token | rows hit | top-1% share | out RMS / FFN RMS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        group = [r for r in results if r.run.label == label and r.records]
        if not group:
            continue
        finals = [r.final("val_loss") for r in group if r.final("val_loss") is not None]
        bests = [min(v for _, v in r.series("val_loss")) for r in group if r.series("val_loss")]
        stats = model_stats(group[0].run.run_config().model)
        tokens = max((r.records[-1]["step"] * r.tokens_per_step for r in group), default=0)
        done = sum(r.done for r in group)
        rows_hit = [v for v in (_memory_stat(r, "rows_hit", min) for r in group) if v is not None]
        top1 = [v for v in (_memory_stat(r, "top1pct_share") for r in group) if v is not None]
        ratio = [_memory_stat(r, "out_rms") / _memory_stat(r, "ffn_rms") for r in group
                 if _memory_stat(r, "out_rms") and _memory_stat(r, "ffn_rms")]
        mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
        spread = max(finals) - min(finals) if len(finals) > 1 else None
        lines.append(
            f"| {label} | {done}/{len(group)} | {_fmt(mean(finals), '.4f')} | "
            f"{_fmt(spread, '.4f')} | {_fmt(mean(bests), '.4f')} | {tokens / 1e6:.2f}M | "
            f"{stats.non_embedding_params / 1e6:.2f}M | {stats.paper_flops / 1e6:.3f} | "
            f"{_fmt(mean(rows_hit), '.3f')} | {_fmt(mean(top1), '.3f')} | "
            f"{_fmt(mean(ratio), '.2f')} |")
    return "\n".join(lines)


def _finals(results: list[RunResult], label: str) -> dict[int, float]:
    """seed -> final val loss of the finished runs of `label`."""
    return {r.run.seed: r.final("val_loss") for r in results
            if r.run.label == label and r.done}


def comparison(results: list[RunResult], baseline: str = "dense") -> str:
    """One line per label against `baseline`: the mean gap in final val loss, the gap per seed,
    both labels' seed spreads, and whether the gap is larger than either spread."""
    base = _finals(results, baseline)
    if not base:
        return ""
    lines = []
    for label in dict.fromkeys(r.run.label for r in results):
        finals = _finals(results, label)
        if label == baseline or not finals:
            continue
        gap = statistics.fmean(finals.values()) - statistics.fmean(base.values())
        paired = [finals[seed] - base[seed] for seed in finals if seed in base]
        spreads = [max(v.values()) - min(v.values()) for v in (finals, base) if len(v) > 1]
        verdict = ""
        if len(spreads) == 2:
            beyond = abs(gap) > max(spreads)
            verdict = (f"; {'below' if gap < 0 else 'above'} {baseline} by "
                       f"{'more' if beyond else 'less'} than the larger seed spread")
        lines.append(f"- {label} - {baseline}: {gap:+.4f} (per seed: "
                     f"{', '.join(f'{d:+.4f}' for d in paired) or '-'}; spreads "
                     f"{' / '.join(f'{v:.4f}' for v in spreads) or '-'}){verdict}")
    return "\n".join(lines)


def ladder_steps(results: list[RunResult]) -> str:
    """One line per step of a ladder suite: the change in final val loss from the previous label,
    mean over the seeds both finished, and per seed."""
    labels = list(dict.fromkeys(r.run.label for r in results))
    lines = []
    for before, after in zip(labels, labels[1:]):
        old, new = _finals(results, before), _finals(results, after)
        paired = [new[seed] - old[seed] for seed in new if seed in old]
        if paired:
            lines.append(f"- {after} (after {before}): {statistics.fmean(paired):+.4f} (per seed: "
                         f"{', '.join(f'{d:+.4f}' for d in paired)})")
    return "\n".join(lines)


ORDER_NAMES = {1: "the current token", 2: "the last 2 tokens", 3: "the last 3 tokens"}


def reference_table(references: dict[str, dict]) -> str:
    """label -> {order: row_usage_stats} (experiments.reference) as a table; '' if none."""
    if not references:
        return ""
    lines = ["| memory | rows, per token | a perfectly hashed memory keyed on | rows hit | "
             "top-1% share | entropy (bits) |", "|---|---|---|---|---|---|"]
    for label, (shape, by_order) in references.items():
        for order, stats in by_order.items():
            lines.append(f"| {label} | {shape[0]:,}, {shape[1]} | "
                         f"{ORDER_NAMES.get(int(order), f'the last {order} tokens')} | "
                         f"{stats['rows_hit']:.3f} | {stats['top1pct_share']:.3f} | "
                         f"{stats['entropy_bits']:.2f} |")
    return "\n".join(lines)


def per_run_table(results: list[RunResult]) -> str:
    lines = ["| run | steps | final val loss | best val loss | rows hit | top-1% share | "
             "entropy (bits) | keys hit | out RMS | FFN RMS | resid RMS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.records:
            continue
        best = min((v for _, v in r.series("val_loss")), default=None)
        lines.append(
            f"| {r.run.name} | {r.records[-1]['step']} | {_fmt(r.final('val_loss'), '.4f')} | "
            f"{_fmt(best, '.4f')} | {_fmt(_memory_stat(r, 'rows_hit', min), '.3f')} | "
            f"{_fmt(_memory_stat(r, 'top1pct_share'), '.3f')} | "
            f"{_fmt(_memory_stat(r, 'entropy_bits', min), '.2f')} | "
            f"{_fmt(_memory_stat(r, 'keys_hit', min), '.3f')} | "
            f"{_fmt(_memory_stat(r, 'out_rms'), '.2f')} | {_fmt(_memory_stat(r, 'ffn_rms'), '.2f')} | "
            f"{_fmt(_memory_stat(r, 'resid_rms'), '.2f')} |")
    return "\n".join(lines)


def plot(results: list[RunResult], path: Path, title: str) -> None:
    """Val loss vs tokens (left) and the top-1 % rows' share of lookups (right), one colour per
    label, one line per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = list(dict.fromkeys(r.run.label for r in results))
    palette = plt.get_cmap("tab20").colors if len(labels) > 10 else [f"C{i}" for i in range(10)]
    colours = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    for r in results:
        style = dict(color=colours[r.run.label], alpha=0.85, linewidth=1.4)
        first = r is next(x for x in results if x.run.label == r.run.label)
        val = r.series("val_loss")
        if val:
            left.plot(*zip(*val), marker="o", markersize=3, label=r.run.label if first else None,
                      **style)
        share = r.series("mem0/top1pct_share")
        if share:
            right.plot(*zip(*share), label=r.run.label if first else None, **style)
    left.set(xlabel="training tokens", ylabel="validation loss (nats)", title=title)
    right.set(xlabel="training tokens", ylabel="share of lookups on the top 1% of rows",
              title="memory utilisation (first memory layer)", ylim=(0, 1.02))
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def downstream_table(results: list[RunResult], runs_dir: Path) -> str:
    """lm-eval accuracy per label (mean over seeds) from each run's downstream.json; '' if none."""
    scores: dict[str, list[dict]] = {}
    for r in results:
        path = runs_dir / r.run.name / "downstream.json"
        if path.is_file():
            scores.setdefault(r.run.label, []).append(json.loads(path.read_text()))
    if not scores:
        return ""
    lines = ["| model | runs | items | acc | acc_norm | stderr (one run) |", "|---|---|---|---|---|---|"]
    for label, group in scores.items():
        acc = statistics.fmean(g["acc"] for g in group)
        norm = statistics.fmean(g["acc_norm"] for g in group)
        stderr = group[0].get("acc_stderr")
        lines.append(f"| {label} | {len(group)} | {group[0]['examples']} | {acc:.3f} | "
                     f"{norm:.3f} | {_fmt(stderr, '.3f')} |")
    return "\n".join(lines)


def section(suite: Suite, results: list[RunResult], image: str, command: str,
            runs_dir: Optional[Path] = None, references: Optional[dict] = None) -> str:
    notes = "\n".join(f"- {note}" for note in suite.notes)
    versus = comparison(results)
    versus = f"Against dense (final val loss):\n{versus}\n\n" if versus else ""
    steps = ladder_steps(results) if suite.ladder else ""
    if steps:
        versus += f"Each step of the ladder (final val loss):\n{steps}\n\n"
    floor = reference_table(references or {})
    if floor:
        floor = ("Utilisation references: the same window of training tokens read by a memory "
                 "of the same rows and lookups per token that gives every distinct n-gram its own "
                 "random rows (`experiments/reference.py`); a memory keyed on the current token "
                 f"cannot be more even than its row:\n\n{floor}\n\n")
    downstream = downstream_table(results, runs_dir) if runs_dir is not None else ""
    if downstream:
        downstream = ("Downstream (lm-eval on the exported models; 4-way choice of a held-out "
                      "window's true 16-token continuation after 64 tokens, chance 0.25):\n\n"
                      f"{downstream}\n\n")
    return (f"### Suite `{suite.name}`\n\n{suite.description}\n\n"
            f"Command: `{command}`\n\n" + (f"Matching:\n{notes}\n\n" if notes else "") +
            f"{table(results)}\n\n{versus}Per run:\n\n{per_run_table(results)}\n\n{floor}"
            f"{downstream}"
            f"![{suite.name}]({image})\n")


def write_section(doc: Path, suite_name: str, text: str) -> None:
    """Replace (or append) the block between this suite's markers in doc; the rest is kept."""
    begin, end = f"<!-- BEGIN suite {suite_name} -->", f"<!-- END suite {suite_name} -->"
    block = f"{begin}\n{text}\n{end}"
    current = doc.read_text() if doc.is_file() else "# Model quality\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(current)
