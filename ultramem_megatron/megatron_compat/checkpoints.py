"""dist_checkpointing: model and optimizer sharded state, the torch-Adam load fixes, async saves."""

from __future__ import annotations

import inspect

import torch
from megatron.core.tensor_parallel import random as mcore_random

def drop_extra_state(sharded_state_dict: dict) -> dict:
    """Without the `_extra_state` entries TE modules add (FP8 scaling metadata, unused in bf16
    training), so TE and local checkpoints hold the same keys; in place, returned."""
    for key in [k for k in sharded_state_dict if k.endswith("_extra_state")]:
        del sharded_state_dict[key]
    return sharded_state_dict


def _chunks(model) -> list:
    """The model chunks of a model (a ModelChunks) or of a single module."""
    return list(model) if hasattr(model, "chunks") else [model]


def load_model_state(model, state_dict: dict) -> None:
    """model.load_state_dict (each chunk's from its entry of model_sharded_state_dict), strict
    except for the TE `_extra_state` entries checkpoints leave out (drop_extra_state): any
    other missing or unexpected key is an error."""
    chunks = _chunks(model)
    states = [state_dict] if len(chunks) == 1 else [state_dict[f"chunk{i}"]
                                                     for i in range(len(chunks))]
    for chunk, state in zip(chunks, states):
        result = chunk.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"checkpoint does not fit the model: missing {missing}, "
                               f"unexpected {result.unexpected_keys}")


def model_sharded_state_dict(model) -> dict:
    """Per-layer checkpoint keys ('decoder.layers.3.mlp...', the global block index whichever
    pipeline stage holds it): memory spans make the layers differ, so megatron's stacked layout
    (one tensor over all layers) does not apply. Several model chunks (interleaved pipeline)
    go under 'chunk{i}'; the checkpoint keys do not depend on the chunks, so a checkpoint
    loads on any pipeline layout. TE's FP8 metadata is left out (drop_extra_state)."""
    states = [drop_extra_state(chunk.sharded_state_dict(metadata={"non_homogeneous_layers": True}))
              for chunk in _chunks(model)]
    return states[0] if len(states) == 1 else {f"chunk{i}": s for i, s in enumerate(states)}


def rename_sharded_keys(sharded_state_dict: dict, old_prefix: str, new_prefix: str) -> None:
    """Change the checkpoint keys (not the local names) of a sharded state dict, in place."""
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

    replace_prefix_for_sharding(sharded_state_dict, old_prefix, new_prefix)


_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _torch_adam_path() -> bool:
    """True when megatron's optimizers wrap torch.optim.Adam (no apex / TE fused Adam), whose
    per-parameter 'step' tensors megatron's distributed optimizer mishandles on load."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _inner_optimizers(optimizer) -> list:
    return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def _patch_set_main_param_states() -> None:
    """Loading copies every key of a parameter's Adam state from the checkpoint's tensors, which
    never carry 'step' (it travels in the param groups): KeyError without this."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_skips_step", False):
        return

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        if "step" in self.optimizer.state.get(main_param, {}) and "step" not in tensors:
            tensors = {**tensors, "step": self.optimizer.state[main_param]["step"]}
        return original(self, model_param, tensors)

    set_states._skips_step = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _patch_empty_optimizer_state_dict() -> None:
    """A pipeline stage without memory still builds the value tables' (expert-parallel)
    distributed optimizer, with no parameters: megatron's torch-Adam path asserts that it finds
    exactly one 'step' among no states. Its state dict is then its param groups alone."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.state_dict
    if getattr(original, "_allows_empty", False):
        return

    def state_dict(self):
        if any(group["params"] for group in self.optimizer.param_groups):
            return original(self)
        inner = self.optimizer.state_dict()
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "step": 0}
                  for group in inner["param_groups"]]
        state = {"optimizer": {**{k: v for k, v in inner.items() if k != "state"},
                               "param_groups": groups}}
        if self.grad_scaler:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    state_dict._allows_empty = True
    DistributedOptimizer.state_dict = state_dict


def _ensure_adam_state(optimizer) -> None:
    """Create empty Adam state (step 0, zero moments: what Adam's first step would create) so the
    distributed optimizer's state_dict() finds one 'step' before any step was taken."""
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def optimizer_sharded_state_dict(optimizer, model_sharded_state_dict: dict,
                                 is_loading: bool = False) -> dict:
    """fully_reshardable optimizer state, so a checkpoint loads at another parallel layout."""
    if _torch_adam_path():
        _ensure_adam_state(optimizer)
        _patch_empty_optimizer_state_dict()
    return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading,
                                        metadata=_OPTIMIZER_METADATA)


def optimizer_load_state_dict(optimizer, state_dict: dict) -> None:
    if _torch_adam_path():
        _patch_set_main_param_states()
    optimizer.load_state_dict(state_dict)
    if not _torch_adam_path():
        return
    # load_state_dict gives every parameter the same 'step' tensor; Adam increments it in place
    # once per parameter, so the resumed run would silently diverge. One tensor each.
    for inner in _inner_optimizers(optimizer):
        for state in inner.state.values():
            if "step" in state:
                state["step"] = state["step"].detach().clone()


def rng_tracker_states() -> dict:
    return {name: state.clone() for name, state in mcore_random.get_cuda_rng_tracker().get_states().items()}


def set_rng_tracker_states(states: dict) -> None:
    mcore_random.get_cuda_rng_tracker().set_states(states)


def async_save_queue():
    """megatron's queue of checkpoint writes in flight, with one forked writer per save. Explicitly
    persistent=False (the default of 0.16.1 and 0.19.2; later code defaults to a spawned persistent
    worker, which calls torch.cuda.set_device(rank % device_count()) and fails without CUDA). The
    forked writer inherits the signal mask of the saving thread (preemption.signals_deferred)."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    return AsyncCallsQueue(persistent=False)


def start_async_save(sharded_state_dict: dict, directory: str):
    """dist_checkpointing.save's async form with megatron's own writer, whose request goes on
    async_save_queue(). 0.19.x defaults to async_strategy="nvrx", which needs the
    nvidia-resiliency-ext package and its own queue (and logs once that "mcore" is deprecated);
    0.16.1 has no such argument."""
    from megatron.core import dist_checkpointing

    kwargs = {"async_sharded_save": True}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        kwargs["async_strategy"] = "mcore"
    return dist_checkpointing.save(sharded_state_dict, directory, **kwargs)
