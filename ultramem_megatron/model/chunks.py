"""A rank's model chunks as one model: its memory layers, their aux losses and utilisation."""

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .. import megatron_compat


class ModelChunks:
    """The model chunks of one rank (one per virtual pipeline stage; the whole model without
    pipelining). Memory layers are named by their span's index in model.memory_spans, which is
    the same on every layout."""

    def __init__(self, chunks: list):   # MemoryGPT chunks (model/gpt.py)
        self.chunks = chunks

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    def memories(self) -> list[tuple[int, torch.nn.Module]]:
        """(span index, memory layer) for the spans this rank holds, in span order."""
        return sorted((pair for chunk in self.chunks for pair in chunk.memories()),
                      key=lambda pair: pair[0])

    def memory_layers(self) -> list[torch.nn.Module]:
        return [layer for _, layer in self.memories()]

    def refresh_rank1(self) -> None:
        for chunk in self.chunks:
            chunk.refresh_rank1()

    def set_aux_loss_scale(self, scale: float) -> None:
        for chunk in self.chunks:
            chunk.set_aux_loss_scale(scale)

    def take_aux_loss(self, forwards: int) -> float:
        """The memory aux losses summed over layers (all pipeline stages) and averaged over the
        `forwards` training forwards since the last call; 0 without memory. A collective over
        the pipeline group."""
        local = [chunk.memory_bus.take_aux_loss() for chunk in self.chunks]
        total = torch.zeros((), dtype=torch.float64, device=megatron_compat.device())
        for value in local:
            if value is not None:
                total += value.double()
        return megatron_compat.sum_over_stages(total).item() / max(forwards, 1)

    @torch.no_grad()
    def memory_usage(self, groups: Sequence = ()) -> dict[str, Optional[float]]:
        return memory_usage(self.memories(), groups)


def memory_usage(memories: list[tuple[int, torch.nn.Module]], groups: Sequence = ()
                 ) -> dict[str, Optional[float]]:
    """Utilisation since the last call, per memory layer ('mem{span}/{stat}', see
    memory/usage.py) and over all layers ('value_rows_hit'); counts are summed over the ranks of
    each of `groups` (the ranks of one pipeline stage whose lookups differ: data-parallel, and
    TP under sequence parallelism), then the stages' records are merged. Resets the counters.
    Empty without memory anywhere. Collectives on log steps only."""
    record, rows_hit = {}, []
    if memories:
        layers = [layer for _, layer in memories]
        packed = [layer.usage.packed() for layer in layers]
        flat = torch.cat(packed)
        ranks = 1
        for group in groups:
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(flat, group=group)
                ranks *= dist.get_world_size(group)
        norms = [layer.weight_norms() for layer in layers]
        value_ms = _mean_over_stage_ranks(torch.stack([n["value_ms"] for n in norms]).double())
        offset = 0
        for index, ((span, layer), part) in enumerate(zip(memories, packed)):
            stats = layer.usage.summary(flat[offset:offset + part.numel()], ranks)
            offset += part.numel()
            stats["value_rms"] = value_ms[index].sqrt().item()
            stats["key_norm"] = norms[index]["key_norm"].item()
            record.update({f"mem{span}/{name}": value for name, value in stats.items()})
            rows_hit.append((stats["rows_hit"], layer.usage.row_counts.numel()))
            layer.usage.reset()
    merged, all_rows_hit = {}, []
    for stage_record, stage_rows_hit in megatron_compat.gather_over_stages((record, rows_hit)):
        merged.update(stage_record)
        all_rows_hit += stage_rows_hit
    if all_rows_hit:
        merged["value_rows_hit"] = (sum(hit * rows for hit, rows in all_rows_hit)
                                    / sum(rows for _, rows in all_rows_hit))
    return merged


def _mean_over_stage_ranks(value_ms: torch.Tensor) -> torch.Tensor:
    """Each rank of a pipeline stage holds an equal slice of each of the stage's tables (a grid
    of TP x data-parallel replicas and shards): the mean over those ranks of the slices' mean
    squares is the whole table's."""
    from megatron.core import parallel_state

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value_ms
    for group in (parallel_state.get_data_parallel_group(),
                  parallel_state.get_tensor_model_parallel_group()):
        size = dist.get_world_size(group)
        if size > 1:
            dist.all_reduce(value_ms, group=group)
            value_ms /= size
    return value_ms
