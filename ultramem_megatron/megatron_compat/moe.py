"""megatron's MoE layers: experts seeded by their global index, and the aux-loss tracker."""

import functools
import itertools

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


@functools.cache
def _seeded_sequential_mlp(experts_class: type) -> type:
    from megatron.core.transformer.moe import experts as experts_module

    class SeededExperts(experts_class):
        """megatron's SequentialMLP whose expert e (global index, whichever expert-parallel rank
        builds it) draws its weights from its own seed."""

        def __init__(self, num_local_experts, config, submodules, pg_collection=None, *,
                     init_seed: int, **kwargs):   # kwargs: `name` on megatron-core >= 0.18
            group = getattr(pg_collection, "ep", None)
            ep_rank = torch.distributed.get_rank(group) if group is not None else 0
            index = itertools.count(ep_rank * num_local_experts)
            build_expert = experts_module.MLP

            def seed(expert: int) -> None:
                torch.default_generator.manual_seed(
                    (init_seed * 1_000_003 + expert) & 0xFFFF_FFFF_FFFF_FFFF)

            def seeded_expert(*args, **kwargs):
                seed(next(index))
                return build_expert(*args, **kwargs)

            experts_module.MLP = seeded_expert   # what SequentialMLP calls per local expert
            try:
                super().__init__(num_local_experts, config, submodules, pg_collection, **kwargs)
            finally:
                experts_module.MLP = build_expert
            # What is drawn next (the output layer, after the last block) must not depend on
            # which experts this rank built.
            seed(config.num_moe_experts)

    SeededExperts.__name__ = SeededExperts.__qualname__ = f"Seeded{experts_class.__name__}"
    return SeededExperts


def seed_experts(layer_spec, init_seed: int) -> None:
    """Give an MoE layer spec's SequentialMLP experts per-expert seeds (in place), so expert e
    starts from the same weights at every expert-parallel size. Grouped-GEMM experts (one
    weight over a rank's local experts) are left as megatron draws them. The MoE spec is a
    ModuleSpec, or (megatron-core >= 0.18) a functools.partial of MoELayer."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    mlp = layer_spec.submodules.mlp
    moe = mlp.keywords.get("submodules") if isinstance(mlp, functools.partial) else \
        getattr(mlp, "submodules", None)
    experts = getattr(moe, "experts", None)
    seed = init_seed & 0xFFFF_FFFF_FFFF_FFFF
    if isinstance(experts, functools.partial):
        if isinstance(experts.func, type) and issubclass(experts.func, SequentialMLP):
            moe.experts = functools.partial(_seeded_sequential_mlp(experts.func), *experts.args,
                                            **experts.keywords, init_seed=seed)
    elif experts is not None and issubclass(experts.module, SequentialMLP):
        experts.module = _seeded_sequential_mlp(experts.module)
        experts.params = {**experts.params, "init_seed": seed}
