"""megatron's MoE aux-loss tracker, read for metrics.jsonl (megatron-LM's training loop reads it)."""

import torch


def moe_aux_losses(forwards: int) -> dict[str, float]:
    """{'moe/<name>': mean over the MoE layers of the loss per forward} for every router loss
    recorded since the last call (load_balancing_loss, z_loss, ...), reduced over ranks as
    megatron-LM does; clears the tracker. `forwards`: training micro-batches since the last
    call. Empty when no MoE layer recorded anything."""
    try:   # megatron-core >= 0.17: MoEMetricsTracker (the 0.16 functions below are deprecated)
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        return _legacy_moe_aux_losses(forwards)
    tracker = get_moe_metrics_tracker()
    names = [name for name in tracker.metrics if name.endswith("loss")]
    if not names or forwards <= 0:
        tracker.clear()
        return {}
    num_layers = max(tracker.metrics[name].values.numel() for name in names)
    totals: dict = {}
    tracker.report(loss_scale=1.0 / forwards, iteration=0, track_names=names,
                   num_layers=num_layers, total_loss_dict=totals)   # syncs ranks, then clears
    return {f"moe/{name}": float(value) for name, value in totals.items()}


def _legacy_moe_aux_losses(forwards: int) -> dict[str, float]:
    """megatron-core 0.16: the module-level tracker dict."""
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if not tracker:
        return {}
    if torch.distributed.is_initialized():
        moe_utils.reduce_aux_losses_tracker_across_ranks()
    record = {}
    for name, entry in tracker.items():
        if name.endswith("loss") and forwards > 0:
            record[f"moe/{name}"] = (entry["values"].float().mean() / forwards).item()
    moe_utils.clear_aux_losses_tracker()
    return record
