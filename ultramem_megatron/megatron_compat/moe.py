"""megatron's MoE aux-loss tracker, read for metrics.jsonl (megatron-LM's training loop reads it)."""

import torch


def moe_aux_losses(forwards: int) -> dict[str, float]:
    """{'moe/<name>': mean over the MoE layers of the loss per forward} for every aux loss the
    routers recorded since the last call (load_balancing_loss, z_loss, ...), reduced over ranks
    as megatron-LM does; clears the tracker. `forwards`: training micro-batches since the last
    call. Empty when no MoE layer recorded anything."""
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if not tracker:
        return {}
    if torch.distributed.is_initialized():
        moe_utils.reduce_aux_losses_tracker_across_ranks()
    record = {}
    for name, entry in tracker.items():
        values = entry["values"].float()
        recorded = values != 0        # layers without a router of this loss record nothing
        if recorded.any() and forwards > 0:
            record[f"moe/{name}"] = (values[recorded].mean() / forwards).item()
    moe_utils.clear_aux_losses_tracker()
    return record
