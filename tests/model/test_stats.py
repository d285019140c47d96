"""ultramem_megatron/model/stats.py against the models build_model really builds.

* total params: exactly sum(p.numel()) of the built model, for every family and option (the
  table UltraMemV2's and Memory+'s layers share counted once, as named_parameters() does);
* activated params: total minus what one token provably does not read, computed from the built
  modules' shapes (value and pre-value rows beyond H*m per layer, experts beyond top-k,
  embedding rows beyond one);
* forward FLOPs: exactly what torch's FlopCounterMode counts on one real CPU forward pass,
  with embedding_bag (the value pooling, which FlopCounterMode does not know) counted by a
  formula registered here. Nothing is left over: attention is counted over the full seq x seq
  square on both sides (megatron's unfused DotProductAttention: baddbmm + bmm, mask applied
  after), einsums are contracted in torch's order (opt_einsum is switched off for the pass, as
  opt_einsum may choose another contraction order for the 3-operand retrieval einsums), and
  what neither side counts is the same (norms, softmax, top-k, activations, the loss);
* the paper-shaped recipes configs/{dense,moe,ultramem}_151m.yaml build on the meta device in
  seconds and are within 5% of the paper's Table 1 counts (embeddings excluded, see below).
"""

import importlib.util
import time
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ultramem_megatron import megatron_compat
from ultramem_megatron.config import load_config
from ultramem_megatron.memory import ProductKeyMemory, UltraMemLayer
from ultramem_megatron.memory.memory_plus import MemoryPlusLayer
from ultramem_megatron.model import build_model
from ultramem_megatron.model.stats import built_param_counts, model_stats

ROOT = Path(__file__).resolve().parents[2]

SMALL = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.ffn_hidden_size=96", "model.seq_length=16", "model.vocab_size=512"]
EXOTIC = ["model.normalization=LayerNorm", "model.position_embedding=learned_absolute",
          "model.swiglu=true"]
ULTRAMEM = ["model.family=ultramem", "model.memory_spans=0:1/2:3",
            "model.ultramem={num_keys: 6, key_dim: 8, topk: 5}"]

CASES = {
    "dense": ["model.family=dense"],
    "dense_layernorm_learned_swiglu": ["model.family=dense", *EXOTIC],
    "moe": ["model.family=moe", "model.moe={num_experts: 4, topk: 2, expert_ffn_hidden_size: 48}"],
    "moe_layernorm_swiglu_default_width": ["model.family=moe", *EXOTIC,
                                           "model.moe={num_experts: 3, topk: 2}"],
    "pkm": ["model.family=pkm", "model.memory_spans=1:2",
            "model.pkm={num_keys: 8, key_dim: 16, topk: 4, num_heads: 2}"],
    "pkm_no_batchnorm": ["model.family=pkm", "model.memory_spans=0:3", *EXOTIC,
                         "model.pkm={num_keys: 6, key_dim: 12, topk: 3, num_heads: 3, "
                         "query_batchnorm: false}"],
    "ultramem": ULTRAMEM,
    "ultramem_all_options": [  # LayerNorm q/k norms, query conv, E=9, r=3, h=4, H=1, wide phase 1
        "model.family=ultramem", "model.memory_spans=1:3", *EXOTIC,
        "model.ultramem={num_keys: 5, key_dim: 12, topk: 6, phase1_topk: 9, value_dim: 20, "
        "num_heads: 1, expansion: 9, tucker_rank: 3, num_cores: 4, qk_norm: layernorm, "
        "query_conv_kernel: 3}"],
    # UltraMemV2 defaults: a memory in every block, pre-values D_p = D_v, one query per rank,
    # the groups summed before one projection, no sharing restriction (rho = 1)
    "ultramem_v2": ["model.family=ultramem_v2", "model.memory_spans=all",
                    "model.ultramem_v2={num_keys: 4, key_dim: 8, topk: 5}"],
    "ultramem_v2_no_pre_per_group_one_query": [  # E = 4, rho = 1/2 of 2 layers' rows
        "model.family=ultramem_v2", "model.memory_spans=0:1/2:3",
        "model.ultramem_v2={num_keys: 5, key_dim: 8, topk: 6, pre_value_dim: 0, expansion: 4, "
        "value_projection: per_group, query_per_rank: false, share_ratio: 0.5}"],
    "ultramem_v2_all_options": [  # rho < 1, r = 3, h = 4, H = 2, D_p != D_v, conv, BatchNorm
        "model.family=ultramem_v2", "model.memory_spans=0:0/1:2/3:3", *EXOTIC,
        "model.ultramem_v2={num_keys: 4, key_dim: 12, topk: 6, phase1_topk: 7, value_dim: 20, "
        "pre_value_dim: 12, pre_value_activation: gelu, num_heads: 2, expansion: 4, "
        "tucker_rank: 3, num_cores: 4, share_ratio: 0.5, qk_norm: layernorm, "
        "query_batchnorm: true, query_conv_kernel: 3}"],
    "memory_plus": ["model.family=memory_plus", "model.memory_spans=1:1/3:3",
                    "model.memory_plus={num_keys: 8, key_dim: 16, topk: 4, num_heads: 2}"],
    "memory_plus_query_norm_bias": [  # BD's query-only norm, Meta's query bias, D_v != D
        "model.family=memory_plus", "model.memory_spans=0:2", *EXOTIC,
        "model.memory_plus={num_keys: 6, key_dim: 12, topk: 3, num_heads: 3, value_dim: 48, "
        "qk_norm: query, query_bias: true}"],
    "memory_plus_no_norm_every_block": [
        "model.family=memory_plus", "model.memory_spans=all",
        "model.memory_plus={num_keys: 5, key_dim: 8, topk: 5, num_heads: 1, qk_norm: none}"],
}

# The paper's Table 1 parameter counts and FLOPs (arXiv v1), and their recipes here.
RECIPES = {"dense_151m": (0.15e9, 0.30e9), "moe_151m": (2.04e9, 0.35e9),
           "ultramem_151m": (2.03e9, 0.35e9)}


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    megatron_compat.initialize_single_process(0)
    megatron_compat.enter_cpu_device_mode()


def config(name: str):
    return load_config(None, SMALL + CASES[name])


@lru_cache(maxsize=None)
def built(name: str):
    run = config(name)
    torch.manual_seed(0)
    return build_model(run.model, run.parallel)


def _embedding_bag_flops(weight_shape, indices_shape, *args, out_shape=None, **kwargs) -> int:
    """One multiply-add per (index, table column): sum mode with per-sample weights."""
    return 2 * indices_shape.numel() * weight_shape[1]


POOLING = {torch.ops.aten._embedding_bag: _embedding_bag_flops,  # keyed by overload packet
           torch.ops.aten._embedding_bag_forward_only: _embedding_bag_flops}


@pytest.mark.parametrize("name", CASES)
def test_total_params_exact(name):
    stats = model_stats(config(name).model)
    total, embedding = built_param_counts(built(name))
    assert (stats.total_params, stats.embedding_params) == (total, embedding)


@pytest.mark.parametrize("name", CASES)
def test_activated_params_from_built_shapes(name):
    """activated = total - rows of tables a token does not read - experts it is not routed to."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    cfg = config(name).model
    model = built(name)
    unread, tables = 0, {}   # id -> numel: a table shared by several layers is there once
    for module in model.modules():
        if isinstance(module, (UltraMemLayer, MemoryPlusLayer)):
            keys = module.retrieval.keys if isinstance(module, UltraMemLayer) else module.keys
            for table in (module.values.values, module.values.pre_values):
                if table is not None:
                    tables[id(table)] = table.numel()
                    unread -= keys.shape[0] * module.memory.topk * table.shape[1]
        elif isinstance(module, ProductKeyMemory):
            rows, width = module.values.shape
            heads = module.keys.shape[0]
            unread += (rows - heads * module.pkm.topk) * width
        elif isinstance(module, MoELayer):
            experts = module.experts.local_experts
            per_expert = sum(p.numel() for p in experts[0].parameters())
            unread += (len(experts) - module.router.topk) * per_expert
    unread += sum(tables.values())
    for table in (model.embedding.word_embeddings, getattr(model.embedding, "position_embeddings", None)):
        if table is not None:
            unread += (table.weight.shape[0] - 1) * table.weight.shape[1]
    total, embedding = built_param_counts(model)
    stats = model_stats(cfg)
    assert stats.activated_params == total - unread
    # the embedding part of activated: one row (+ one position row) and the whole output layer
    assert stats.activated_embedding_params == (
        model.output_layer.weight.numel() + cfg.hidden_size
        * (2 if cfg.position_embedding == "learned_absolute" else 1))


@pytest.mark.parametrize("labels", [False, True], ids=["logits", "loss"])
@pytest.mark.parametrize("name", CASES)
def test_forward_flops_match_flop_counter(name, labels):
    cfg = config(name).model
    model = built(name)
    batch, seq = 2, cfg.seq_length  # the analytic attention term assumes seq_length tokens
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=generator)
    positions = torch.arange(seq).expand(batch, seq)
    matmul, everything = FlopCounterMode(display=False), FlopCounterMode(display=False,
                                                                         custom_mapping=POOLING)
    opt_einsum = torch.backends.opt_einsum.enabled
    torch.backends.opt_einsum.enabled = False
    try:
        with matmul:  # not under no_grad: FlopCounterMode's module tracker fails there
            model(tokens, positions, None, labels=tokens if labels else None)
        with everything:
            model(tokens, positions, None, labels=tokens if labels else None)
    finally:
        torch.backends.opt_einsum.enabled = opt_einsum
    stats = model_stats(cfg)
    assert matmul.get_total_flops() == batch * seq * stats.matmul_flops
    # Uncounted by either counter, elementwise: UltraMem's rank-1 filter over the Tucker rank,
    # UltraMemV2's pre-value scores <P[row], W_pre x> over D_p.
    mem, spans, elementwise = cfg.memory, len(cfg.active_spans()), 0
    if cfg.family in ("ultramem", "ultramem_v2"):
        pre = mem.resolved_pre_value_dim(cfg.hidden_size) if cfg.family == "ultramem_v2" else 0
        elementwise = 2 * spans * mem.num_heads * (2 * mem.keys_per_axis * mem.tucker_rank
                                                   + mem.topk * pre)
    assert everything.get_total_flops() == batch * seq * (stats.forward_flops - elementwise)
    assert stats.flops_per_token == 3 * stats.forward_flops


def test_attention_is_the_full_square():
    """4 * seq * D per layer per token: doubling seq_length adds exactly that much."""
    short = model_stats(config("dense").model)
    long = model_stats(load_config(None, SMALL + CASES["dense"] + ["model.seq_length=32"]).model)
    assert long.matmul_flops - short.matmul_flops == 4 * 16 * 64 * 4
    assert long.attention_flops == 2 * short.attention_flops == 4 * 32 * 64 * 4


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_builds_on_meta_and_matches_paper(recipe):
    """The paper's counts exclude the embeddings: Dense-151M is 12 D^2 L = 0.151B, while with
    its 2 x 51.6M embedding parameters it would be 0.254B (+69%). So the built model's
    non-embedding count is compared with Table 1's parameters, and 2 x non-embedding activated
    params (the convention of its FLOPs column) with its FLOPs."""
    paper_params, paper_flops = RECIPES[recipe]
    run = load_config(ROOT / "configs" / f"{recipe}.yaml")
    assert run.train.global_batch_size % run.train.micro_batch_size == 0
    stats = model_stats(run.model)
    start = time.perf_counter()
    with torch.device("meta"):
        model = build_model(run.model, run.parallel)
    seconds = time.perf_counter() - start
    assert all(p.is_meta for p in model.parameters())
    assert seconds < 20, f"building {recipe} on meta took {seconds:.1f} s"
    total, embedding = built_param_counts(model)
    assert (total, embedding) == (stats.total_params, stats.embedding_params)
    assert abs(total - embedding - paper_params) <= 0.05 * paper_params
    assert abs(stats.paper_flops - paper_flops) <= 0.05 * paper_flops
    if recipe == "dense_151m":
        assert total > 1.05 * paper_params  # counting the embeddings would not match


def test_script_check_on_meta(capsys):
    spec = importlib.util.spec_from_file_location("model_stats_script",
                                                  ROOT / "scripts" / "model_stats.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(ROOT / "configs" / "ultramem_151m.yaml"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "built on the meta device" in out and "2,028,792,384" in out and "OK" in out


def megatron_lm_flops(args, batch_size: int) -> float:
    """megatron-LM's num_floating_point_operations (megatron/training/training.py,
    transformer_flops()) transcribed for a dense GPT: no MoE, MTP, GQA, MLA, attention output gate
    or linear attention. Training FLOPs of one global batch, causal attention counted half."""
    forward_backward_expansion_factor = 3
    fma_expansion_factor = 2
    ffn_expansion_factor = 3 if args.swiglu else 2
    query_projection_size = args.kv_channels * args.num_attention_heads
    key_projection_size = args.kv_channels * args.num_query_groups
    value_projection_size = args.kv_channels * args.num_query_groups
    standard_self_attn_term = (
        forward_backward_expansion_factor * fma_expansion_factor * (
            args.hidden_size * (query_projection_size + key_projection_size + value_projection_size)
            + query_projection_size * args.seq_length / 2 * 2   # causal mask; QK^T and (QK^T)V
            + query_projection_size * args.hidden_size))
    return batch_size * args.seq_length * (
        forward_backward_expansion_factor * fma_expansion_factor * args.hidden_size
        * (args.ffn_hidden_size * ffn_expansion_factor) * args.num_layers
        + standard_self_attn_term * args.num_layers
        + forward_backward_expansion_factor * fma_expansion_factor * args.hidden_size
        * args.padded_vocab_size)


def _megatron_args(model):
    from types import SimpleNamespace

    return SimpleNamespace(
        hidden_size=model.hidden_size, num_layers=model.num_layers, seq_length=model.seq_length,
        ffn_hidden_size=model.ffn_size, swiglu=model.swiglu, padded_vocab_size=model.vocab_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_attention_heads,
        kv_channels=model.hidden_size // model.num_attention_heads)


@pytest.mark.parametrize("model", [
    config("dense").model, config("dense_layernorm_learned_swiglu").model,
    load_config(None, SMALL + CASES["dense"] + ["model.seq_length=37"]).model,
    load_config(ROOT / "configs" / "dense_151m.yaml").model,
], ids=["dense", "swiglu", "odd_seq", "dense_151m"])
def test_mfu_flops_match_megatron_lm(model):
    stats = model_stats(model)
    assert stats.mfu_flops_per_token * model.seq_length == megatron_lm_flops(_megatron_args(model), 1)
    # the FlopCounterMode-matching count keeps the full square: 3 x half of it more
    assert stats.flops_per_token - stats.mfu_flops_per_token == 3 * stats.attention_flops // 2
