"""Configuration: YAML + dotted overrides, and a clear error for every kind of bad input."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import subprocess_env
from ultramem_megatron.config import ConfigError, ParallelConfig, load_config, parse_spans, parse_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_use_the_configs_dotted_names_and_yaml_types():
    run = load_config(ROOT / "configs/tiny.yaml",
                      ["train.max_steps=100", "train.lr=3e-4", "model.family=moe",
                       "model.memory_spans=", "model.moe={num_experts: 8}",
                       "train.run_dir=runs/x", "model.ultramem.topk=8"])
    assert run.train.max_steps == 100 and run.train.lr == 3e-4
    assert run.model.family == "moe" and run.model.moe.num_experts == 8
    assert run.model.ultramem.topk == 8 and run.train.run_dir == "runs/x"


@pytest.mark.parametrize("family", ["dense", "moe", "pkm", "ultramem"])
def test_one_override_switches_family(family):
    run = load_config(ROOT / "configs/tiny.yaml", [f"model.family={family}"])
    assert run.model.family == family
    assert bool(run.model.active_spans()) == (family in ("pkm", "ultramem"))


def test_yaml_keeps_spans_as_strings_and_reads_exponents_as_floats():
    assert parse_yaml("a: 1:2\nb: 3e-3\nc: 12\nd: 2:5/6:9") == {
        "a": "1:2", "b": 0.003, "c": 12, "d": "2:5/6:9"}


@pytest.mark.parametrize("overrides,message", [
    (["model.hidden_sise=64"], "unknown key.*hidden_sise"),
    (["train.max_steps=ten"], "train.max_steps: expected an integer"),
    (["train.resume=maybe"], "train.resume: expected true or false"),
    (["model.family=transformer"], "model.family"),
    (["model.memory_spans=2:1"], "memory_spans"),
    (["model.memory_spans=1:3/2:3"], "overlap"),
    (["model.memory_spans=1:9"], "num_layers"),
    (["model.memory_spans=a:b"], "integers"),
    (["model.family=pkm", "model.pkm=null"], "model.pkm section is missing"),
    (["model.family=pkm", "model.memory_spans="], "needs model.memory_spans"),
    (["model.ultramem.expansion=8"], "perfect square"),
    (["model.hidden_size=130"], "divisible by model.num_attention_heads"),
    (["train.global_batch_size=12"], "multiple of train.micro_batch_size"),
    (["data.corpus=null"], "data.blend is empty"),
    (["data.corpus=null", "data.blend=[{prefix: a, weight: 0}]"], "weight must be positive"),
    (["data.blend=[{prefix: a}]"], "data.corpus and data.blend are both set"),
    (["data.subset_weights={}"], "data.corpus needs data.subset_weights"),
    (["data.subset_weights={books: -1}"], "data.subset_weights.books must be positive"),
    (["data.subset_weights=[1]"], "data.subset_weights: expected a mapping"),
    (["data.split=90,10"], "data.split"),
    (["train"], "key.sub=value"),
    (["parallel.memory_parallel_size=3"], r"D_v = 64 .* must be divisible by 3"),
    (["parallel.memory_parallel_size=4", "parallel.tensor_model_parallel_size=32"],
     r"D_v = 64 over TP x P = 32 x 4"),
    (["parallel.memory_parallel_mode=row", "parallel.memory_parallel_size=3"],
     r"N = 1024 value rows over P = 3"),
    (["parallel.memory_parallel_mode=columns"], "parallel.memory_parallel_mode"),
    (["parallel.memory_parallel_size=0"], "parallel.memory_parallel_size must be >= 1"),
    (["model.family=dense", "parallel.memory_parallel_size=2"],
     "shards UltraMem, UltraMemV2 and Memory\\+ value tables"),
    (["model.family=pkm", "parallel.sequence_parallel=true"], "pkm family"),
    (["parallel.sequence_parallel=true", "model.ultramem.query_conv_kernel=4"],
     "query_conv_kernel"),
    (["model.family=ultramem_v2", "model.memory_spans=all", "model.ultramem_v2.share_ratio=0"],
     "share_ratio"),
    (["model.family=ultramem_v2", "model.memory_spans=all", "model.ultramem_v2.topk=1000"],
     r"model.ultramem_v2: .*topk"),
    (["model.family=ultramem_v2", "model.memory_spans=all", "parallel.memory_parallel_size=3"],
     r"splits D_v = 64 .* must be divisible by 3"),
    (["model.family=ultramem_v2", "model.memory_spans=all", "model.ultramem_v2.pre_value_dim=30",
      "parallel.memory_parallel_size=4"], r"splits D_p = 30 .* divisible by 4"),
    (["model.family=memory_plus", "parallel.memory_parallel_mode=row",
      "parallel.memory_parallel_size=3"], r"N = 1024 value rows over P = 3"),
    (["model.family=memory_plus", "model.memory_plus.qk_norm=keys"], "qk_norm"),
    (["model.family=memory_plus", "parallel.pipeline_model_parallel_size=2",
      "parallel.overlap_grad_reduce=true"], "summed over the stages"),
    (["model.family=memory_plus", "parallel.recompute_granularity=full",
      "parallel.overlap_grad_reduce=true"], "shared value table again"),
    (["model.memory_spans=2:1"], "0 <= i <= j"),
])
def test_bad_config_names_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/tiny.yaml", overrides)


def test_missing_config_file_is_refused():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ROOT / "configs/nope.yaml")


def test_spans_parse_sorted():
    assert parse_spans("6:9/2:5", 12) == [(2, 5), (6, 9)]


def test_train_py_refuses_bad_config_before_building_anything():
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml",
                             "model.memory_spans=3:1"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=subprocess_env())
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("config error: model.memory_spans")
    assert "Traceback" not in result.stderr


def test_world_size_must_hold_the_parallel_layout():
    run = load_config(ROOT / "configs/tiny.yaml", ["parallel.tensor_model_parallel_size=2",
                                                   "parallel.memory_parallel_size=2"])
    assert run.parallel.world_size_error(8) is None
    assert "memory_parallel_size (2) must divide the data-parallel size (3" in \
        run.parallel.world_size_error(6)
    layout = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert layout.world_size_error(4) is None
    assert "world size (6) must be a multiple of" in layout.world_size_error(6)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pipeline_model_parallel_size=2"],   # tiny: 4 blocks, span 1:2
     r"memory span 1:2 crosses a pipeline stage boundary \(with 2 x 1 model chunks each holds "
     r"2 blocks: 1 is in chunk 0, 2 in chunk 1\)"),
    (["parallel.pipeline_model_parallel_size=3"], r"model.num_layers \(4\) must be divisible"),
    (["parallel.virtual_pipeline_model_parallel_size=2"], "needs parallel.pipeline_model_parallel"),
    (["parallel.expert_model_parallel_size=2"], "splits the MoE family's experts"),
])
def test_pipeline_and_expert_layouts_are_checked_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/tiny.yaml", overrides)


@pytest.mark.parametrize("overrides", [
    ["parallel.pipeline_model_parallel_size=2", "model.memory_spans=0:1/2:3"],
    ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
     "model.num_layers=8", "model.memory_spans=0:1/6:7"],
    ["model.family=moe", "parallel.expert_model_parallel_size=2"],
    ["parallel.context_parallel_size=2"],   # Transformer Engine is checked when training starts
])
def test_pipeline_and_expert_layouts_that_fit_load(overrides):
    run = load_config(ROOT / "configs/tiny.yaml", overrides)
    assert run.parallel.model_parallel_size >= 1


@pytest.mark.parametrize("overrides,message", [
    (["parallel.memory_parallel_size=2"], r"error: parallel.memory_parallel_size \(2\) must divide"),
    (["data.corpus=null", "data.blend=[{prefix: data/built/none, source: data/none/*.jsonl}]"],
     r"error: data.blend\[0\]: data/built/none.bin/.idx do not exist, and no file matches"),
    (["data.corpus=null", "data.blend=[{prefix: data/built/none}]"],
     "no source to prepare them from"),
    (["data.corpus=data/built/nowhere"], "data.corpus data/built/nowhere: no manifest.json"),
    (["data.tokenizer=./no/such/tokenizer"], "no such directory"),
])
def test_train_py_names_missing_files(tmp_path, overrides, message):
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml",
                             f"train.run_dir={tmp_path}", *overrides], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert result.returncode == 2
    assert re.search(message, result.stderr.strip().splitlines()[-1]), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_architecture_differences_ignore_training_only_fields():
    from ultramem_megatron.config import architecture_differences

    base = load_config(ROOT / "configs/tiny.yaml").model
    same = load_config(ROOT / "configs/tiny.yaml", [
        "model.dropout=0.1", "model.init_std=0.01", "model.ultramem.aux_loss_weight=0.0",
        "model.ultramem.value_lr_start_mult=1.0", "model.seq_length=64",   # RoPE: no table
        "model.pkm.num_keys=64", "model.moe.num_experts=2"]).model        # other families
    assert architecture_differences(same, base) == []
    other = load_config(ROOT / "configs/tiny.yaml", ["model.hidden_size=256",
                                               "model.ultramem.topk=8"]).model
    assert architecture_differences(other, base) == [
        "model.hidden_size: 256 vs 128", "model.ultramem.topk: 8 vs 16"]
    learned = ["model.position_embedding=learned_absolute"]
    assert architecture_differences(
        load_config(ROOT / "configs/tiny.yaml", learned + ["model.seq_length=64"]).model,
        load_config(ROOT / "configs/tiny.yaml", learned).model) == ["model.seq_length: 64 vs 128"]
