"""torchrun worker: a sharded UltraMem layer at each (TP, P, mode, SP) layout that fits the world
equals the single-device layer run on the whole batch in the same process (outputs, input and
parameter gradients, init). Writes <out_dir>/rank<r>.json; exits non-zero on a mismatch."""

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
from ultramem_megatron.parallel.sharded_values import ShardedValueExpansion

HIDDEN, SEQ, BATCH, TOL = 16, 8, 4, 1e-5
MEMORY = UltraMemConfig(num_keys=4, key_dim=8, topk=3, phase1_topk=4, value_dim=24, num_heads=2,
                        num_cores=3, expansion=4, aux_loss_weight=1.0, aux_loss_margin=0.0)
# N = 16 rows; 3 cores, so shards cross core chunks; a Tucker aux loss that matters
LAYOUTS = {  # world size -> (TP, P, mode, sequence parallel, overlap)
    2: [(1, 1, "value_dim", False, True), (2, 1, "value_dim", False, True),
        (2, 1, "value_dim", True, True), (1, 2, "value_dim", False, True),
        (1, 2, "value_dim", False, False), (1, 2, "row", False, True)],
    4: [(2, 2, "value_dim", False, True), (2, 2, "row", False, True),
        (2, 2, "value_dim", True, True), (2, 2, "row", True, False),
        (1, 4, "value_dim", False, True), (1, 4, "row", False, True)],
}


def build(tp: int, sp: bool, values: ModuleSpec | None) -> UltraMemLayer:
    config = TransformerConfig(num_layers=4, hidden_size=HIDDEN, num_attention_heads=4,
                               tensor_model_parallel_size=tp, sequence_parallel=sp)
    torch.manual_seed(7)  # the same draws for every layout: init must not depend on it
    return UltraMemLayer(config, MEMORY, values)


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return (got - want).abs().max().item()


def check_layout(tp: int, mp: int, mode: str, sp: bool, overlap: bool) -> dict:
    ps.destroy_model_parallel()
    megatron_compat.initialize_distributed(tp, seed=0, memory_parallel_size=mp)
    reference = build(1, False, None)
    layer = build(tp, sp, ModuleSpec(module=ShardedValueExpansion, params={
        "mode": mode, "sequence_parallel": sp, "overlap": overlap}))
    part = layer.values.table_slice

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

    rows = slice(part.row_start, part.row_start + part.rows)
    cols = slice(part.col_start, part.col_start + part.cols)
    proj = slice(part.proj_col_start, part.proj_col_start + part.proj_cols)
    dense_groups = [ps.get_data_parallel_group()] + ([ps.get_tensor_model_parallel_group()]
                                                     if sp else [])
    errors = {
        "init_values": max_error(layer.values.values, reference.values.values[rows, cols]),
        "init_out_proj": max_error(layer.values.out_proj.weight,
                                   reference.values.out_proj.weight[..., proj]),
        "output": max_error(out, ref_out[seq, batch]),
        "aux_loss": max_error(aux, ref_aux),
        "input_grad": max_error(local_in.grad, ref_in.grad[seq, batch]),
        "values_grad": max_error(summed(layer.values.values.grad,
                                        ps.get_expert_data_parallel_group()),
                                 reference.values.values.grad[rows, cols]),
        "out_proj_grad": max_error(summed(layer.values.out_proj.weight.grad,
                                          ps.get_data_parallel_group()),
                                   reference.values.out_proj.weight.grad[..., proj]),
    }
    ref_params = dict(reference.named_parameters())
    for name, param in layer.named_parameters():
        if not name.startswith("values."):
            errors[f"{name}_grad"] = max_error(summed(param.grad, *dense_groups),
                                               ref_params[name].grad)
    table = MEMORY.num_values * 24
    return {"layout": [tp, mp, mode, sp, overlap], "errors": errors,
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
