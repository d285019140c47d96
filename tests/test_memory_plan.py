"""The memory planner (training/memory_plan.py, scripts/plan_memory.py) against hand-computed
numbers and model/stats.py's exact counts, the shared tables of UltraMemV2 and Memory+ (one
table, sharded over TP x P), its recompute / TP / P monotonicity, --layout errors, and
submit.py's warning."""

import importlib.util

import pytest

from tests.training.conftest import ROOT
from ultramem_megatron.config import ModelConfig
from ultramem_megatron.memory.config import MemoryPlusConfig, UltraMemConfig, UltraMemV2Config
from ultramem_megatron.model.stats import model_stats
from ultramem_megatron.training.memory_plan import (Layout, LayoutError, parse_layout,
                                                    plan_memory)

TINY = ModelConfig(family="dense", num_layers=2, hidden_size=64, num_attention_heads=4,
                   ffn_hidden_size=256, seq_length=32, vocab_size=128, normalization="RMSNorm")
MEMORY = ModelConfig(family="ultramem", num_layers=4, hidden_size=64, num_attention_heads=4,
                     ffn_hidden_size=256, seq_length=32, vocab_size=128, normalization="RMSNorm",
                     memory_spans="0:1/2:3",
                     ultramem=UltraMemConfig(num_keys=16, key_dim=16, topk=4, value_dim=32))
TRUNK = {name: getattr(MEMORY, name) for name in (
    "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
    "vocab_size", "normalization")}
# A memory in each of the 4 blocks, one shared table of N_all = 4 * 8^2 = 256 rows (D_v + D_p = 48)
V2 = ModelConfig(family="ultramem_v2", memory_spans="all", **TRUNK, ultramem_v2=UltraMemV2Config(
    num_keys=8, key_dim=16, topk=4, value_dim=32, pre_value_dim=16, share_ratio=0.5))
V2_OPTIONS = ModelConfig(family="ultramem_v2", memory_spans="0:1/2:3", **TRUNK,
                         ultramem_v2=UltraMemV2Config(
                             num_keys=6, key_dim=8, topk=4, pre_value_dim=0, expansion=4,
                             value_projection="per_group", query_per_rank=False,
                             qk_norm="layernorm", query_conv_kernel=3))
# Two layers reading one [16^2, 32] table
MEMORY_PLUS = ModelConfig(family="memory_plus", memory_spans="1:1/3:3", **TRUNK,
                          memory_plus=MemoryPlusConfig(num_keys=16, key_dim=16, topk=4,
                                                       num_heads=2, value_dim=32))
MEMORY_PLUS_OPTIONS = ModelConfig(family="memory_plus", memory_spans="all", **TRUNK,
                                  memory_plus=MemoryPlusConfig(num_keys=8, key_dim=12, topk=3,
                                                               qk_norm="query", query_bias=True))


def test_tiny_dense_plan_by_hand():
    plan = plan_memory(TINY, Layout(dp=2), micro_batch=1)
    # TP-split: 2 blocks x (4 h^2 attention + 2 h ffn) + input and output embedding (V h each)
    split = 2 * 4 * 64 * 64 + 2 * 2 * 64 * 256 + 2 * 128 * 64          # 114,688
    replicated = 2 * 2 * 64 + 64                                          # block norms, final norm
    assert plan.params == split + replicated == 115_008
    assert plan.param_bytes == 2 * 115_008 and plan.grad_bytes == 4 * 115_008
    assert plan.optimizer_bytes == 12 * 115_008 / 2                       # distributed over DP 2
    sbh, logits = 32 * 1 * 64, 6 * 32 * 128                               # PP 1: logits here
    assert plan.activation_bytes["none"] == 2 * sbh * (34 + 5 * 4 * 32 / 64) + logits == 204_800
    assert plan.activation_bytes["selective"] == 2 * sbh * 34 + logits == 163_840
    assert plan.activation_bytes["full"] == 2 * 2 * sbh + logits == 32_768
    assert plan.total_bytes == 6 * 115_008 + 690_048 + 204_800
    undistributed = plan_memory(TINY, Layout(dp=2), distributed_optimizer=False)
    assert undistributed.optimizer_bytes == 12 * 115_008


@pytest.mark.parametrize("model", [MEMORY, V2, V2_OPTIONS, MEMORY_PLUS, MEMORY_PLUS_OPTIONS],
                         ids=["ultramem", "v2", "v2_options", "memory_plus",
                              "memory_plus_options"])
def test_one_rank_holds_exactly_the_model(model):
    """TP = P = 1: every parameter once, a shared table included, as model/stats.py counts it
    (itself checked against the built model in tests/model/test_stats.py)."""
    plan = plan_memory(model, Layout(dp=2))
    assert plan.params == model_stats(model).total_params


@pytest.mark.parametrize("model, table", [(V2, 256 * (32 + 16)), (MEMORY_PLUS, 16 * 16 * 32)],
                         ids=["v2", "memory_plus"])
def test_shared_table_counted_once_and_sharded_over_tp_and_p(model, table):
    one = plan_memory(model, Layout(dp=4))
    assert one.value_params == table                      # not once per memory layer
    for layout in (Layout(mp=2, dp=4), Layout(tp=2, dp=4), Layout(tp=2, mp=2, dp=4)):
        plan = plan_memory(model, layout)
        assert plan.value_params == table // (layout.tp * layout.mp)
        # the shard's optimizer state is divided over DP / P ranks
        assert plan.value_bytes == 6 * plan.value_params + 12 * plan.value_params * layout.mp / 4
    # the memory layers' saved tensors are in the activations, beyond the dense trunk's
    dense = ModelConfig(family="dense", **TRUNK)
    assert (one.activation_bytes["selective"]
            > plan_memory(dense, Layout(dp=4)).activation_bytes["selective"])


@pytest.mark.parametrize("model", [TINY, MEMORY, V2, MEMORY_PLUS])
def test_recompute_orders_activations(model):
    plan = plan_memory(model, Layout(pp=2, dp=2), micro_batch=2)
    act = plan.activation_bytes
    assert act["full"] < act["selective"] < act["none"]
    assert plan.in_flight == 2


def test_doubling_tp_halves_the_split_parameters():
    replicated = 2 * 2 * 64 + 64
    one, two = (plan_memory(TINY, Layout(tp=t, dp=2)) for t in (1, 2))
    assert one.params - replicated == 2 * (two.params - replicated)


def test_memory_parallel_halves_the_value_shard():
    one, two = (plan_memory(MEMORY, Layout(mp=p, dp=2)) for p in (1, 2))
    assert one.value_params == 2 * 16 * 16 * 32                           # 2 layers, N x D_v
    assert two.value_params * 2 == one.value_params
    assert two.params < one.params
    # Value optimizer state is divided over DP / P = 1 rank instead of DP = 2.
    assert two.value_bytes == 6 * two.value_params + 12 * two.value_params


def test_layout_errors_name_the_bad_key():
    assert parse_layout("tp=2, pp=2,dp=4") == Layout(tp=2, pp=2, dp=4)
    for text, key in (("tp=2,zz=3", "zz"), ("tp=x", "tp"), ("pp=0", "pp"), ("dp", "dp"),
                      ("tp=1,tp=2", "tp")):
        with pytest.raises(LayoutError, match=key):
            parse_layout(text)
    with pytest.raises(LayoutError, match="mp"):
        plan_memory(MEMORY, Layout(mp=2, dp=3))
    with pytest.raises(LayoutError, match="mp > 1 shards"):
        plan_memory(TINY, Layout(mp=2, dp=2))
    with pytest.raises(LayoutError, match="pp"):
        plan_memory(TINY, Layout(pp=3))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_memory_cli(capsys):
    script = load_script("scripts/plan_memory.py")
    assert script.main([str(ROOT / "configs/tiny.yaml"), "--layout", "tp=1,dp=2"]) == 0
    assert "total (recompute none)" in capsys.readouterr().out
    assert script.main([str(ROOT / "configs/tiny.yaml"), "--layout", "tp=1,qq=2"]) == 2
    assert "'qq'" in capsys.readouterr().err
    assert script.main([str(ROOT / "configs/tiny.yaml"), "--layout", "dp=2",
                        "--gpu-memory-gib", "0.001"]) == 1
    for recipe, elements in (("ultramem_v2_151m", 12 * 778 ** 2 * 256 // 8),
                             ("memory_plus_151m", 1346 ** 2 * 1024 // 8)):
        assert script.main([str(ROOT / f"configs/{recipe}.yaml"), "--layout",
                            "tp=2,mp=4,dp=8", "--recompute", "selective"]) == 0
        out = capsys.readouterr().out
        assert "value shards" in out and f"({elements:,} elements)" in out and "fits" in out


def test_submit_warns_when_over_budget(capsys, tmp_path):
    submit = load_script("launch/submit.py")
    common = ["--config", str(ROOT / "configs/tiny.yaml"), "--gpus-per-node", "2", "--dry-run",
              f"train.run_dir={tmp_path / 'r'}"]
    submit.main(common + ["--gpu-memory-gib", "0.001"])   # data may be unprepared: rc irrelevant
    err = capsys.readouterr().err
    assert "WARNING: planned per-GPU memory" in err and "exceeds --gpu-memory-gib 0.001" in err
    submit.main(common)                                    # tiny fits 80 GiB
    assert "WARNING" not in capsys.readouterr().err
