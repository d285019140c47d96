"""End to end on a trained checkpoint: CLI export, HF -> megatron -> HF, continued training from an
import in a sharded layout, the export running without ultramem_megatron (pipeline), lm-eval; the
same round trips for the families whose memory layers share one table (UltraMemV2, Memory+)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import subprocess_env
from tests.parallel.test_parallel_training import parallel, torchrun
from tests.training.conftest import ROOT, train

pytestmark = pytest.mark.slow
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_script(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=subprocess_env(**OFFLINE),
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny UltraMem model trained 3 steps, exported with the CLI to root/hf."""
    root = tmp_path_factory.mktemp("export")
    train(root / "run", "train.max_steps=3")
    run_script("scripts/export_hf.py", "--checkpoint", str(root / "run"), "--out", str(root / "hf"))
    return root


BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def assert_same_export(first: Path, second: Path, moved: tuple[str, ...] = ()) -> None:
    """Same config, tokenizer and tensors; tensors whose name ends with one of `moved` may differ
    in value (not in name, dtype or shape)."""
    from ultramem_megatron.export.hf_dir import read_hf_dir

    config_a, state_a = read_hf_dir(first)
    config_b, state_b = read_hf_dir(second)
    for config in (config_a, config_b):
        config.pop("transformers_version", None)
    assert config_a == config_b
    assert sorted(state_a) == sorted(state_b)
    for key in state_a:
        assert state_a[key].dtype == state_b[key].dtype, key
        if key.endswith(moved):
            assert state_a[key].shape == state_b[key].shape, key
        else:
            assert torch.equal(state_a[key], state_b[key]), key
    for name in ("tokenizer.json", "generation_config.json"):
        assert json.loads((first / name).read_text()) == json.loads((second / name).read_text())


def test_hf_megatron_hf_round_trip_and_continued_training(exported):
    hf = exported / "hf"
    assert sorted(p.name for p in hf.glob("*.safetensors")) == ["model.safetensors"]
    assert not [p for p in hf.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    run_script("scripts/export_hf.py", "--import-hf", str(hf), "--out", str(exported / "megatron"))
    run_script("scripts/export_hf.py", "--checkpoint", str(exported / "megatron"),
               "--out", str(exported / "hf_again"))
    assert_same_export(hf, exported / "hf_again")

    # Continue training from the import on 2 ranks whose value tables are split by rows: with
    # lr 0 one step leaves every weight as it was, so the checkpoint it writes in that sharded
    # layout must export to the same tensors (the query BatchNorm's running statistics move with
    # every training forward, whatever the LR: they must change, the rest must not).
    result = train(exported / "continued", f"train.init_from={exported / 'megatron'}",
                   "train.lr=0", "train.max_steps=1", *parallel(1, 2, "row"),
                   python=torchrun(2), env={"OMP_NUM_THREADS": "1"})
    assert f"initialized the model from {exported / 'megatron'}" in result.stdout
    run_script("scripts/export_hf.py", "--checkpoint", str(exported / "continued"),
               "--out", str(exported / "hf_continued"))
    assert_same_export(hf, exported / "hf_continued", moved=BATCHNORM_STATISTICS)
    from ultramem_megatron.export.hf_dir import read_hf_dir
    before, after = read_hf_dir(hf)[1], read_hf_dir(exported / "hf_continued")[1]
    statistics = [k for k in before if k.endswith(BATCHNORM_STATISTICS)]
    assert statistics and all(not torch.equal(before[k], after[k]) for k in statistics)

    refused = train(exported / "wrong", f"train.init_from={exported / 'megatron'}",
                    "model.hidden_size=128", check=False)
    assert refused.returncode == 2
    assert "model.hidden_size: 128 vs 64" in refused.stderr


# family -> (model overrides, memory_parallel_mode of the sharded continuation)
SHARED_TABLE_FAMILIES = {
    "ultramem_v2": (["model.family=ultramem_v2", "model.memory_spans=all"], "value_dim"),
    "memory_plus": (["model.family=memory_plus", "model.memory_spans=0:1/2:3"], "row"),
}


@pytest.mark.parametrize("family", sorted(SHARED_TABLE_FAMILIES))
def test_shared_table_families_round_trip_from_a_trained_checkpoint(tmp_path, family):
    """Trained 3 steps, exported by the CLI: logits equal the checkpoint's, the shared table is
    the trained one (stored once); import -> export is exact, and so is the export of one lr-0
    step on 2 ranks that shard the shared table (memory-parallel 2)."""
    from tests.export.test_export import load_hf
    from ultramem_megatron.export.checkpoints import single_process_model
    from ultramem_megatron.export.hf_dir import read_hf_dir
    from ultramem_megatron.training.checkpoint import (load_model_weights, read_run_config,
                                                       resolve_checkpoint)

    overrides, mode = SHARED_TABLE_FAMILIES[family]
    train(tmp_path / "run", "train.max_steps=3", *overrides)
    hf = tmp_path / "hf"
    run_script("scripts/export_hf.py", "--checkpoint", str(tmp_path / "run"), "--out", str(hf))
    checkpoint = resolve_checkpoint(tmp_path / "run")
    run = read_run_config(checkpoint)
    initial = single_process_model(run).state_dict()
    model = single_process_model(run)
    load_model_weights(checkpoint, model)
    torch.manual_seed(3)
    tokens = torch.randint(0, 50000, (2, 32))
    with torch.no_grad():
        reference = model.eval()(tokens, torch.arange(32).expand(2, -1), None)
        logits = load_hf(hf)(tokens).logits
    assert (logits - reference).abs().max().item() < 1e-4
    table = read_hf_dir(hf)[1]["model.memory_tables.values"]
    assert not torch.equal(table, initial["memory_tables.values"])

    run_script("scripts/export_hf.py", "--import-hf", str(hf), "--out", str(tmp_path / "megatron"))
    run_script("scripts/export_hf.py", "--checkpoint", str(tmp_path / "megatron"),
               "--out", str(tmp_path / "hf_again"))
    assert_same_export(hf, tmp_path / "hf_again")
    train(tmp_path / "continued", f"train.init_from={tmp_path / 'megatron'}", "train.lr=0",
          "train.max_steps=1", *overrides, *parallel(1, 2, mode), python=torchrun(2),
          env={"OMP_NUM_THREADS": "1"})
    run_script("scripts/export_hf.py", "--checkpoint", str(tmp_path / "continued"),
               "--out", str(tmp_path / "hf_continued"))
    assert_same_export(hf, tmp_path / "hf_continued")


def test_cli_refuses_a_missing_checkpoint(tmp_path):
    result = run_script("scripts/export_hf.py", "--checkpoint", str(tmp_path / "nothing"),
                        "--out", str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and "is not a checkpoint" in result.stderr


STANDALONE = textwrap.dedent("""
    import json, sys
    sys.modules["ultramem_megatron"] = None   # the export must not need this project
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    path, tokens_file, out_file = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                 local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokens = torch.tensor(json.load(open(tokens_file)))
    with torch.no_grad():
        logits = model(tokens).logits
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator("The king said", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    ids = tokenizer("The king said", return_tensors="pt").input_ids
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False)
    json.dump({"logits": logits.tolist(), "text": text,
               "greedy_text": tokenizer.decode(greedy[0])}, open(out_file, "w"))
""")


def test_export_runs_without_this_project_and_matches_the_checkpoint(exported, tmp_path):
    from ultramem_megatron.export.checkpoints import single_process_model
    from ultramem_megatron.training.checkpoint import (load_model_weights, read_run_config,
                                                       resolve_checkpoint)

    torch.manual_seed(3)
    tokens = torch.randint(0, 50000, (2, 32))
    (tmp_path / "tokens.json").write_text(json.dumps(tokens.tolist()))
    (tmp_path / "standalone.py").write_text(STANDALONE)
    run_script(str(tmp_path / "standalone.py"), str(exported / "hf"), str(tmp_path / "tokens.json"),
               str(tmp_path / "out.json"))
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["text"] == result["greedy_text"]
    assert result["text"].startswith("The king said") and len(result["text"]) > len("The king said")

    checkpoint = resolve_checkpoint(exported / "run")
    model = single_process_model(read_run_config(checkpoint))
    load_model_weights(checkpoint, model)
    with torch.no_grad():
        reference = model.eval()(tokens, torch.arange(32).expand(2, -1), None)
    assert (torch.tensor(result["logits"]) - reference).abs().max().item() < 1e-4


TASK = """
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def choice_docs(count: int = 6) -> list[dict]:
    """Six words of a fixture line, then its next word or two words from elsewhere."""
    lines = [json.loads(line)["text"].split() for line in
             (ROOT / "data" / "fixture" / "shakespeare.jsonl").read_text().splitlines()]
    words = [w for line in lines for w in line if w.isalpha()]
    docs = []
    for line in lines:
        if len(line) >= 7 and len(docs) < count:
            k = len(docs)
            docs.append({"question": " ".join(line[:6]),
                         "choices": [line[6], words[17 * k + 5], words[31 * k + 11]],
                         "answer": 0})
    return docs


def reference_logliks(hf_dir: Path, doc: dict) -> list[float]:
    """log p(" " + choice | question) with the exported model, encoded the way lm-eval encodes
    a (context, continuation) pair: the whole string, minus the context's tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                                 local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    context = tokenizer.encode(doc["question"], add_special_tokens=False)
    result = []
    for choice in doc["choices"]:
        whole = tokenizer.encode(doc["question"] + " " + choice, add_special_tokens=False)
        continuation = whole[len(context):]
        inputs = torch.tensor([context + continuation])
        with torch.no_grad():
            logprobs = model(inputs[:, :-1]).logits.float().log_softmax(-1)[0]
        picked = logprobs[-len(continuation):].gather(-1, torch.tensor(continuation)[:, None])
        result.append(picked.sum().item())
    return result


def test_lm_eval_runs_on_the_export_with_a_local_task(exported, tmp_path):
    docs = choice_docs()
    data = tmp_path / "tiny_choice.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_choice.yaml").write_text(TASK.format(data=data))
    run_script("-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={exported / 'hf'},trust_remote_code=True,dtype=float32",
               "--tasks", "tiny_choice", "--include_path", str(tmp_path / "tasks"),
               "--device", "cpu", "--batch_size", "1", "--output_path", str(tmp_path / "out"),
               "--log_samples")
    samples = [json.loads(line) for path in (tmp_path / "out").rglob("samples_tiny_choice*.jsonl")
               for line in path.read_text().splitlines()]
    assert len(samples) == len(docs)
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        ours = reference_logliks(exported / "hf", doc)
        theirs = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4, (doc, ours, theirs)
        correct += max(range(3), key=lambda i: ours[i]) == doc["answer"]
    results = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())
    assert results["results"]["tiny_choice"]["acc,none"] == pytest.approx(correct / len(docs))
    assert os.path.getsize(data) > 0
