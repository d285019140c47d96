"""Which slice of a value table a rank holds, for each (TP, memory-parallel size, mode) layout."""

# Two groups shard a table:
#   TP  (size t): the tensor-parallel group; its ranks see the same tokens, so they split D_v.
#   MP  (size P): the memory-parallel group, P data-parallel ranks with the same TP rank (megatron's
#                 expert-parallel group); its ranks see different tokens.
# Modes over MP:
#   value_dim: rank (tp, mp) holds all N rows x columns of shard tp*P + mp of t*P;
#   row:       rank (tp, mp) holds rows [mp*N/P, (mp+1)*N/P) x columns of shard tp of t.
# Either way the TP rank's output projection holds the D_v/t columns of shard tp: in value_dim mode
# the P slices of the MP group, concatenated in mp order, are exactly those columns.

from dataclasses import dataclass
from typing import Literal, Optional

from ..memory.tables import TableSlice

Mode = Literal["value_dim", "row"]
MODES = ("value_dim", "row")


def layout_error(mode: str, num_values: int, value_dim: int, tp_size: int, mp_size: int,
                 width_name: str = "D_v") -> Optional[str]:
    """Why a table cannot be sharded this way (None when it can); width_name: what its
    value_dim columns are called (D_v, or UltraMemV2's pre-value D_p)."""
    if mode not in MODES:
        return f"memory-parallel mode must be one of {MODES}, got {mode!r}"
    if mode == "value_dim" and value_dim % (tp_size * mp_size):
        return (f"value_dim mode splits {width_name} = {value_dim} over TP x P = {tp_size} x "
                f"{mp_size} ranks: it must be divisible by {tp_size * mp_size}")
    if mode == "row" and value_dim % tp_size:
        return (f"{width_name} = {value_dim} must be divisible by the tensor-parallel size "
                f"{tp_size}")
    if mode == "row" and num_values % mp_size:
        return (f"row mode splits the N = {num_values} value rows over P = {mp_size} ranks: "
                f"N must be divisible by P")
    return None


@dataclass(frozen=True)
class MemoryParallelLayout:
    """This rank's place in the TP x MP grid, and the groups' sizes."""

    mode: Mode = "value_dim"
    tp_size: int = 1
    tp_rank: int = 0
    mp_size: int = 1
    mp_rank: int = 0
    dp_rank: int = 0          # dense data-parallel rank (replica index of TP-sharded weights)
    expert_dp_rank: int = 0   # rank among the copies of this value shard
    sequence_parallel: bool = False

    @classmethod
    def from_parallel_state(cls, mode: Mode, sequence_parallel: bool = False
                            ) -> "MemoryParallelLayout":
        """The layout megatron's parallel state describes (one device when it is not set up)."""
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return cls(mode=mode)
        return cls(mode=mode,
                   tp_size=ps.get_tensor_model_parallel_world_size(),
                   tp_rank=ps.get_tensor_model_parallel_rank(),
                   mp_size=ps.get_expert_model_parallel_world_size(),
                   mp_rank=ps.get_expert_model_parallel_rank(),
                   dp_rank=ps.get_data_parallel_rank(),
                   expert_dp_rank=ps.get_expert_data_parallel_rank(),
                   sequence_parallel=sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1)

    def table_slice(self, num_values: int, value_dim: int) -> TableSlice:
        error = layout_error(self.mode, num_values, value_dim, self.tp_size, self.mp_size)
        if error:
            raise ValueError(error)
        tp_cols = value_dim // self.tp_size
        if self.mode == "row":
            rows = num_values // self.mp_size
            return TableSlice(self.mp_rank * rows, rows, self.tp_rank * tp_cols, tp_cols,
                              self.tp_rank * tp_cols, tp_cols)
        cols = tp_cols // self.mp_size
        shard = self.tp_rank * self.mp_size + self.mp_rank
        return TableSlice(0, num_values, shard * cols, cols, self.tp_rank * tp_cols, tp_cols)

    def table_slices(self, rows: int, value_dim: int, pre_value_dim: int = 0) -> dict:
        """The value_slice / pre_slice keywords of MemoryTables.build for a shared table of
        `rows` rows: both tables are cut as one value table would be."""
        return {"value_slice": self.table_slice(rows, value_dim),
                "pre_slice": self.table_slice(rows, pre_value_dim) if pre_value_dim else None}
