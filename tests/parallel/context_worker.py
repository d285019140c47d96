"""torchrun worker (2 ranks, CP = 2): each context rank's part of a batch is megatron's causal
load balance, and an UltraMem layer whose query BatchNorm and key balance sum their statistics
over the context ranks equals the single-device layer on the whole sequence (outputs, aux loss,
input and parameter gradients). Writes <out_dir>/rank<r>.json; exits non-zero on a mismatch."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_config import TransformerConfig

from ultramem_megatron import megatron_compat
from ultramem_megatron.memory import UltraMemConfig, UltraMemLayer
from ultramem_megatron.parallel.comm import token_sum_over

HIDDEN, SEQ, BATCH, TOL = 16, 8, 2, 1e-5
MEMORY = UltraMemConfig(num_keys=4, key_dim=8, topk=3, phase1_topk=4, value_dim=24, num_heads=2,
                        num_cores=2, expansion=4, query_batchnorm=True, key_balance_weight=0.5)


def own_positions(rank: int, size: int) -> torch.Tensor:
    """Sequence positions of context rank `rank`: chunks rank and 2 * size - 1 - rank of 2 * size."""
    chunk = SEQ // (2 * size)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in (rank, 2 * size - 1 - rank)])


def build(cp: bool) -> UltraMemLayer:
    config = TransformerConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=4,
                               context_parallel_size=2 if cp else 1)
    torch.manual_seed(7)
    return UltraMemLayer(config, MEMORY, token_sum=token_sum_over(False, cp))


def main(out_dir: str) -> int:
    megatron_compat.initialize_distributed(1, seed=0, context_parallel_size=2)
    rank, size = ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()
    positions = own_positions(rank, size)
    errors = {}

    tokens = torch.arange(BATCH * SEQ).view(BATCH, SEQ)
    part = megatron_compat.context_parallel_part({"tokens": tokens, "labels": tokens + 1})
    errors["batch_part"] = float((part["tokens"] != tokens[:, positions]).sum()
                                 + (part["labels"] != tokens[:, positions] + 1).sum())

    reference, layer = build(False), build(True)
    layer.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    probe = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    ref_in = hidden.clone().requires_grad_(True)
    ref_out, ref_aux = reference(ref_in)
    ((ref_out * probe).sum() + ref_aux).backward()
    local_in = hidden[positions].clone().requires_grad_(True)
    out, aux = layer(local_in)
    # Each rank adds its share of the aux loss; DDP sums the ranks' gradients (over DP x CP).
    ((out * probe[positions]).sum() + aux / size).backward()

    errors["output"] = (out - ref_out[positions]).abs().max().item()
    errors["aux_loss"] = (aux - ref_aux).abs().item()
    errors["input_grad"] = (local_in.grad - ref_in.grad[positions]).abs().max().item()
    errors["bn_running_mean"] = (layer.retrieval.query_bn.running_mean
                                 - reference.retrieval.query_bn.running_mean).abs().max().item()
    ref_params = dict(reference.named_parameters())
    for name, param in layer.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad, group=ps.get_context_parallel_group())
        errors[f"{name}_grad"] = (grad - ref_params[name].grad).abs().max().item()

    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(errors, indent=1))
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    for item in bad.items():
        print(f"rank {dist.get_rank()} MISMATCH {item}", file=sys.stderr)
    dist.barrier()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
