"""torchrun worker: a sharded memory layer (UltraMem, UltraMemV2, Memory+) at each (TP, P, mode,
SP) layout that fits the world equals the single-device layer run on the whole batch in the same
process (outputs, input and parameter gradients, init). Writes <out_dir>/rank<r>.json; exits
non-zero on a mismatch."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from ultramem_megatron import megatron_compat
from ultramem_megatron.memory import UltraMemConfig, UltraMemLayer
from ultramem_megatron.memory.config import MemoryPlusConfig, UltraMemV2Config
from ultramem_megatron.memory.layer import v2_tables
from ultramem_megatron.memory.memory_plus import MemoryPlusLayer, memory_plus_tables
from ultramem_megatron.parallel.layout import MemoryParallelLayout
from ultramem_megatron.parallel.sharded_values import ShardedValueExpansion

HIDDEN, SEQ, BATCH, TOL = 16, 8, 4, 1e-5
MEMORY = {
    # N = 16 rows; 3 cores, so shards cross core chunks; a Tucker aux loss that matters
    "ultramem": UltraMemConfig(num_keys=4, key_dim=8, topk=3, phase1_topk=4, value_dim=24,
                               num_heads=2, num_cores=3, expansion=4, aux_loss_weight=1.0,
                               aux_loss_margin=0.0),
    # the 2nd of 2 layers reads a ring window of 25 of the shared table's 32 rows (from row 16),
    # with pre-values through a GELU
    "ultramem_v2": UltraMemV2Config(num_keys=4, key_dim=8, topk=3, phase1_topk=4, value_dim=24,
                                    pre_value_dim=8, pre_value_activation="gelu", num_cores=3,
                                    expansion=4, memory_layers=2, share_ratio=0.8),
    "memory_plus": MemoryPlusConfig(num_keys=4, key_dim=8, topk=3, num_heads=2, value_dim=8),
}
VALUE_DIM = {"ultramem": 24, "ultramem_v2": 24, "memory_plus": 8}
LAYOUTS = {  # world size -> (family, TP, P, mode, sequence parallel, overlap)
    2: [("ultramem", 1, 1, "value_dim", False, True), ("ultramem", 2, 1, "value_dim", False, True),
        ("ultramem", 2, 1, "value_dim", True, True), ("ultramem", 1, 2, "value_dim", False, True),
        ("ultramem", 1, 2, "value_dim", False, False), ("ultramem", 1, 2, "row", False, True),
        ("ultramem_v2", 2, 1, "value_dim", True, True), ("ultramem_v2", 1, 2, "value_dim", False, True),
        ("ultramem_v2", 1, 2, "row", False, True), ("memory_plus", 2, 1, "value_dim", True, True),
        ("memory_plus", 1, 2, "value_dim", False, True), ("memory_plus", 1, 2, "row", False, True)],
    4: [("ultramem", 2, 2, "value_dim", False, True), ("ultramem", 2, 2, "row", False, True),
        ("ultramem", 2, 2, "value_dim", True, True), ("ultramem", 2, 2, "row", True, False),
        ("ultramem", 1, 4, "value_dim", False, True), ("ultramem", 1, 4, "row", False, True),
        ("ultramem_v2", 2, 2, "value_dim", False, True), ("ultramem_v2", 2, 2, "row", True, True),
        ("memory_plus", 2, 2, "value_dim", True, True), ("memory_plus", 2, 2, "row", False, True)],
}


def build(family: str, tp: int, sp: bool, values: ModuleSpec | None, mode: str):
    config = TransformerConfig(num_layers=4, hidden_size=HIDDEN, num_attention_heads=4,
                               tensor_model_parallel_size=tp, sequence_parallel=sp)
    memory, tables = MEMORY[family], None
    if family != "ultramem":   # the shared table, this rank's slice (whole for the reference)
        layout = MemoryParallelLayout.from_parallel_state(mode, sp and tp > 1) if values \
            else MemoryParallelLayout()
        if family == "ultramem_v2":
            tables = v2_tables(memory, config, 17, **layout.table_slices(
                memory.table_rows, memory.value_dim, memory.pre_value_dim))
        else:
            tables = memory_plus_tables(memory, config, 17, **layout.table_slices(
                memory.num_values, memory.value_dim))
    torch.manual_seed(7)  # the same draws for every layout: init must not depend on it
    if family == "memory_plus":
        return MemoryPlusLayer(config, memory, values, tables)
    if family == "ultramem_v2":
        return UltraMemLayer(config, memory, values, tables=tables, layer_index=1)
    return UltraMemLayer(config, memory, values)


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return (got - want).abs().max().item()


def sliced(name: str, layer, reference) -> tuple[torch.Tensor, tuple]:
    """The part of the reference's parameter `name` this rank's layer holds."""
    values = layer.values
    part, pre = values.table_slice, values.pre_slice
    tables = {"values.values": part, "values.pre_values": pre}
    if name in tables:
        cut = tables[name]
        return (slice(cut.row_start, cut.row_start + cut.rows),
                slice(cut.col_start, cut.col_start + cut.cols))
    if name == "values.out_proj.weight":
        return (..., slice(part.proj_col_start, part.proj_col_start + part.proj_cols))
    if name == "values.gate_proj.weight":
        return (slice(part.proj_col_start, part.proj_col_start + part.proj_cols),)
    if name == "values.pre_proj.weight":
        return (slice(pre.proj_col_start, pre.proj_col_start + pre.proj_cols),)
    return (...,)


def parameters(layer) -> dict[str, torch.Tensor]:
    """The layer's parameters and the shared tables it reads (which a model registers)."""
    params = dict(layer.named_parameters())
    if layer.values.shares_tables:
        params["values.values"] = layer.values.values
        if layer.values.pre_values is not None:
            params["values.pre_values"] = layer.values.pre_values
    return params


def check_layout(family: str, tp: int, mp: int, mode: str, sp: bool, overlap: bool) -> dict:
    ps.destroy_model_parallel()
    megatron_compat.initialize_distributed(tp, seed=0, memory_parallel_size=mp)
    reference = build(family, 1, False, None, mode)
    layer = build(family, tp, sp, ModuleSpec(module=ShardedValueExpansion, params={
        "mode": mode, "sequence_parallel": sp, "overlap": overlap}), mode)

    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    probe = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    dp, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
    batch = slice(dp * BATCH // dp_size, (dp + 1) * BATCH // dp_size)
    seq = slice(tp_rank * SEQ // tp, (tp_rank + 1) * SEQ // tp) if sp else slice(None)

    ref_in = hidden.clone().requires_grad_(True)
    ref_out, ref_aux = reference(ref_in)
    ((ref_out * probe).sum() + ref_aux).backward()
    local_in = hidden[seq, batch].clone().requires_grad_(True)
    out, aux = layer(local_in)
    # Gradients are summed over data-parallel ranks below (as DDP does), each adding 1/DP of aux.
    ((out * probe[seq, batch]).sum() + aux / dp_size).backward()

    def summed(grad: torch.Tensor, *groups) -> torch.Tensor:
        grad = grad.clone()
        for group in groups:
            dist.all_reduce(grad, group=group)
        return grad

    # Value shards reduce over the ranks holding the same shard, TP-split projections over
    # data-parallel ranks, everything else (replicated over TP) also over TP under SP.
    groups = {"table": [ps.get_expert_data_parallel_group()],
              "tp_split": [ps.get_data_parallel_group()],
              "other": [ps.get_data_parallel_group()] + ([ps.get_tensor_model_parallel_group()]
                                                         if sp else [])}
    errors = {"output": max_error(out, ref_out[seq, batch]), "aux_loss": max_error(aux, ref_aux),
              "input_grad": max_error(local_in.grad, ref_in.grad[seq, batch])}
    ref_params = parameters(reference)
    for name, param in parameters(layer).items():
        cut = sliced(name, layer, reference)
        kind = ("table" if name in ("values.values", "values.pre_values") else
                "tp_split" if name.startswith("values.") else "other")
        errors[f"init_{name}"] = max_error(param, ref_params[name][cut])
        errors[f"{name}_grad"] = max_error(summed(param.grad, *groups[kind]),
                                           ref_params[name].grad[cut])
    table = reference.values.values.numel()
    return {"layout": [family, tp, mp, mode, sp, overlap], "errors": errors,
            "value_fraction": layer.values.values.numel() / table,
            "expected_fraction": 1 / (tp * mp)}


def main(out_dir: str) -> int:
    megatron_compat.initialize_distributed(1, seed=0)
    world, rank = dist.get_world_size(), dist.get_rank()
    results = [check_layout(*layout) for layout in LAYOUTS[world]]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    bad = [(r["layout"], k, v) for r in results for k, v in r["errors"].items() if not v <= TOL]
    bad += [(r["layout"], "value_fraction", r["value_fraction"]) for r in results
            if r["value_fraction"] != r["expected_fraction"]]
    for item in bad:
        print(f"rank {rank} MISMATCH {item}", file=sys.stderr)
    dist.barrier()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
