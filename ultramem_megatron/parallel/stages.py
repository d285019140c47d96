"""Where each block runs: its pipeline model chunk and its activation-recompute group."""

# megatron-core splits the L blocks evenly over PP x VPP model chunks; chunk c = v * PP + p holds
# blocks [c * L / (PP * VPP), (c + 1) * L / (PP * VPP)) and runs on pipeline rank p as its
# virtual stage v. Full recompute checkpoints blocks of one chunk together: `uniform` in groups
# of recompute_num_layers from the chunk's first block, `block` each of the chunk's first
# recompute_num_layers blocks alone (the rest are not recomputed).
#
# A memory span hands its memory's output from block i to block j inside one forward of one
# model chunk (model/skip_memory.py), so both ends must sit in the same model chunk and be
# recomputed together, or both not at all.

from typing import Optional


def blocks_per_chunk(num_layers: int, pipeline: int, virtual: int) -> int:
    return num_layers // (pipeline * virtual)


def chunk_of(block: int, num_layers: int, pipeline: int, virtual: int) -> int:
    """The model chunk (0 .. PP*VPP-1, in layer order) holding 0-based block `block`."""
    return block // blocks_per_chunk(num_layers, pipeline, virtual)


def recompute_group(block: int, num_layers: int, pipeline: int, virtual: int,
                    granularity: str, method: str, num_recompute: int) -> Optional[int]:
    """Which checkpointed group of its chunk recomputes block `block` under full recompute
    (None: the block is not recomputed, or recompute is not full)."""
    if granularity != "full":
        return None
    local = block % blocks_per_chunk(num_layers, pipeline, virtual)
    if method == "uniform":
        return local // num_recompute
    return local if local < num_recompute else None


def span_problem(span: tuple[int, int], num_layers: int, pipeline: int, virtual: int,
                 granularity: str = "none", method: str = "uniform", num_recompute: int = 1
                 ) -> Optional[str]:
    """Why memory span (i, j) cannot run with this layout (None when it can)."""
    start, end = span
    if chunk_of(start, num_layers, pipeline, virtual) != chunk_of(end, num_layers, pipeline,
                                                                  virtual):
        per = blocks_per_chunk(num_layers, pipeline, virtual)
        return (f"memory span {start}:{end} crosses a pipeline stage boundary (with "
                f"{pipeline} x {virtual} model chunks each holds {per} blocks: "
                f"{start} is in chunk {start // per}, {end} in chunk {end // per}); place "
                f"spans inside stages")
    groups = [recompute_group(b, num_layers, pipeline, virtual, granularity, method,
                              num_recompute) for b in span]
    if groups[0] != groups[1]:
        return (f"memory span {start}:{end} crosses a full-recompute group (recompute_method="
                f"{method}, recompute_num_layers={num_recompute}): its first and last block "
                f"must be recomputed together, or both not at all")
    return None
