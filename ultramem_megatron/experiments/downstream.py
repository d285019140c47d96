"""Downstream check of a suite's models: export each to Hugging Face, run lm-eval on a local
multiple-choice continuation task built from held-out validation text."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from ..config import RunConfig

TASK_NAME = "heldout_continuation"
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def heldout_sequences(run: RunConfig, count: int) -> tuple[list[list[int]], object]:
    """Up to `count` token windows of the run's validation split (never trained on) that hold
    no end-of-document token, and the tokenizer. One process; initialises torch.distributed."""
    from .. import megatron_compat
    from ..data.loader import build_datasets, dataset_sizes
    from ..data.tokenizer import load_tokenizer

    megatron_compat.initialize_single_process(run.train.seed)
    tokenizer = load_tokenizer(run.data.tokenizer)
    train_samples, valid_samples = dataset_sizes(run.train)
    _, valid = build_datasets(run.data, tokenizer, seq_length=run.model.seq_length,
                              seed=run.train.seed, train_samples=train_samples,
                              valid_samples=max(valid_samples, 4 * count),
                              valid_seed=run.data.valid_seed)
    sequences = []
    for index in range(len(valid)):
        tokens = valid[index]["tokens"].tolist()
        if tokenizer.eod not in tokens:
            sequences.append(tokens)
        if len(sequences) == count:
            break
    return sequences, tokenizer


def continuation_docs(sequences: list[list[int]], detokenize, examples: int,
                      context_tokens: int = 64, answer_tokens: int = 16, choices: int = 4,
                      seed: int = 0) -> list[dict]:
    """HellaSwag-shaped items from held-out token windows: the context is a window's first
    context_tokens tokens, the right answer its next answer_tokens, the distractors the same
    span of other windows."""
    rng = random.Random(seed)
    spans = [(detokenize(ids[:context_tokens]),
              detokenize(ids[context_tokens:context_tokens + answer_tokens]))
             for ids in sequences if len(ids) >= context_tokens + answer_tokens]
    if len(spans) < max(examples, choices):
        raise ValueError(f"only {len(spans)} held-out windows for {examples} examples")
    docs = []
    for index in rng.sample(range(len(spans)), examples):
        context, answer = spans[index]
        others = rng.sample([i for i in range(len(spans)) if i != index], choices - 1)
        options = [answer] + [spans[i][1] for i in others]
        rng.shuffle(options)
        docs.append({"context": context, "choices": options, "answer": options.index(answer)})
    return docs


def write_task(docs: list[dict], directory: Path) -> Path:
    """The task's jsonl and lm-eval YAML under directory; returns the include path."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{TASK_NAME}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (directory / f"{TASK_NAME}.yaml").write_text(TASK_YAML.format(name=TASK_NAME, data=data))
    return directory


def export(run_dir: Path, out: Path, root: Path) -> None:
    subprocess.run([sys.executable, "scripts/export_hf.py", "--checkpoint", str(run_dir),
                    "--out", str(out)], cwd=root, check=True, capture_output=True, text=True)


def lm_eval(model_dir: Path, tasks_dir: Path, out: Path, root: Path) -> dict[str, float]:
    """lm-eval's hf model on the local task, offline, fp32 on the CPU -> {acc, acc_norm}."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                    f"pretrained={model_dir},trust_remote_code=True,dtype=float32",
                    "--tasks", TASK_NAME, "--include_path", str(tasks_dir), "--device", "cpu",
                    "--batch_size", "8", "--output_path", str(out)],
                   cwd=root, check=True, capture_output=True, text=True, env=env)
    results = sorted(out.rglob("results_*.json"))[-1]
    metrics = json.loads(results.read_text())["results"][TASK_NAME]
    return {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"],
            "acc_stderr": metrics.get("acc_stderr,none")}
