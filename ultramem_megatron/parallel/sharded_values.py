"""Implicit value expansion with the value table sharded over TP (columns) and the memory-parallel
group (columns or rows); the communication of one memory layer, and its checkpoint layout."""

# Axis legend
#   t  this rank's tokens            T  tokens of the TP group (t*TP under sequence parallelism)
#   k  items per token (H*m)         c  Tucker cores      e  expansion groups (E)
#   P  memory-parallel ranks         w  value columns held here          D  hidden size
#   i  items in transit (row mode)   u  (owner, token, group) bags in transit (row mode)
#
# One forward, value_dim mode:  address, scores [T, k, ...] --all-gather over MP--> [P*T, k, ...]
#   -> pool this rank's w columns for every MP token [P*T, e, w] --all-to-all--> [T, e, P*w]
#   -> out_proj (row-parallel over TP) [T, D] --all-reduce / reduce-scatter over TP--> output.
# Row mode: items go to the rank owning their row (all-to-all), which returns one weighted partial
#   sum per (token, group) it holds rows for (all-to-all); the sender adds them up. The split
#   sizes are read to the host once per forward; no other host synchronisation in either mode.
# The last all-to-all is left in flight until the span's last block asks for the output.

from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region,
                                           gather_from_sequence_parallel_region,
                                           reduce_from_tensor_model_parallel_region,
                                           reduce_scatter_to_sequence_parallel_region,
                                           set_tensor_model_parallel_attributes)

from ..memory.lookup import lookup_pool
from ..memory.tables import MemoryTables
from ..memory.values import ImplicitValueExpansion, Readout
from .comm import all_gather_first_dim, all_reduce_sum, all_to_all_first_dim
from .layout import MemoryParallelLayout, Mode


class ShardedValueExpansion(ImplicitValueExpansion):
    """ImplicitValueExpansion whose table and projection are this rank's slices (see layout.py).

    The value shard is an expert-style parameter (allreduce=False): megatron's DDP reduces its
    gradient over the expert-data-parallel group, i.e. over the ranks holding the same shard.
    """

    def __init__(self, num_values: int, value_dim: int, expansion: int, hidden_size: int,
                 shuffle_seed: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None, *, mode: Mode = "value_dim",
                 sequence_parallel: bool = False, overlap: bool = True, kernel: str = "auto",
                 tables: Optional[MemoryTables] = None, readout: Readout = Readout()):
        layout = MemoryParallelLayout.from_parallel_state(mode, sequence_parallel)
        if tables is not None and tables.value_slice != layout.table_slice(tables.rows, value_dim):
            raise ValueError("the shared tables are not sliced for this rank's layout "
                             "(build them with sharded_tables)")
        own_slice = layout.table_slice(num_values, value_dim) if tables is None else None
        super().__init__(num_values, value_dim, expansion, hidden_size, shuffle_seed, dtype,
                         device, table_slice=own_slice, kernel=kernel, tables=tables,
                         readout=readout)
        self.layout, self.overlap = layout, overlap
        # Every TP rank's slice is distinct (so each counts in the gradient norm): the table
        # and the projections are split along their D_v (D_p) axis over TP. The table is an
        # expert-style parameter: DDP reduces it over the ranks holding the same shard.
        if not self.shares_tables:   # ShardedMemoryTables marks shared ones
            self.values.allreduce = False
            set_tensor_model_parallel_attributes(self.values, True, 1, 1)
        set_tensor_model_parallel_attributes(self.out_proj.weight, True, 2, 1)
        for proj in (self.pre_proj, self.gate_proj):
            if proj is not None:
                set_tensor_model_parallel_attributes(proj.weight, True, 0, 1)

    # ------------------------------------------------------------------------------ forward

    def dispatch(self, virtual_idx: torch.Tensor, scores: torch.Tensor,
                 hidden: Optional[torch.Tensor] = None) -> Callable[[], torch.Tensor]:
        """virtual_idx [t, k]; per-core scores [t, k, c]; the layer input hidden [t, D] (read by
        pre-values and the gate) -> a function returning [t, D]."""
        layout = self.layout
        rows, groups = self.locate(virtual_idx)
        address = torch.stack([rows, groups], dim=-1)  # [t, k, 2]
        needs_hidden = self.pre_proj is not None or self.gate_proj is not None
        if layout.sequence_parallel:
            # Every TP rank pools its columns for the whole sequence; the scores' gradient is a
            # sum over the TP ranks' columns, reduce-scattered back to the tokens' owners.
            address = gather_from_sequence_parallel_region(address)    # [T, k, 2]
            scores = gather_from_sequence_parallel_region(scores)      # [T, k, c]
            hidden = gather_from_sequence_parallel_region(hidden) if needs_hidden else None
        elif layout.tp_size > 1:
            scores = copy_to_tensor_model_parallel_region(scores)      # backward: sum over TP
            hidden = copy_to_tensor_model_parallel_region(hidden) if needs_hidden else None
        pre = self.pre_query(hidden)  # [T, p]: this TP rank's columns of W_pre x (or None)
        pending = [] if self.overlap else None
        dispatch_mp = self._dispatch_rows if layout.mode == "row" else self._dispatch_columns
        finish_pooling = dispatch_mp(address, scores, pre, pending)

        def combine() -> torch.Tensor:
            for work in pending or ():
                work.wait()
            partial = self.project(finish_pooling(), hidden)  # [T, D], this TP rank's columns
            if layout.sequence_parallel:
                return reduce_scatter_to_sequence_parallel_region(partial)  # [t, D]
            if layout.tp_size > 1:
                return reduce_from_tensor_model_parallel_region(partial)
            return partial

        if self.overlap:
            return combine
        out = combine()
        return lambda: out

    def _pool_local(self, rows: torch.Tensor, bags: torch.Tensor, scores: torch.Tensor,
                    num_bags: int) -> torch.Tensor:
        """Pool this rank's slice of the table: rows are local row indices -> [num_bags, w]."""
        part = self.table_slice
        return self.pool_fn()(self.values, rows, bags, scores, num_bags, part.col_start,
                              self.value_dim)

    def _pre_dot_sum(self, with_mp: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """The sum of the pre-value dot products' partial sums over the ranks holding the other
        D_p columns (TP, and MP in value_dim mode); its backward sums too (each rank's result
        weights its own columns)."""
        groups = ([parallel_state.get_tensor_model_parallel_group()]
                  if self.layout.tp_size > 1 else [])
        if with_mp and self.layout.mp_size > 1:
            groups.append(parallel_state.get_expert_model_parallel_group())

        def total(x: torch.Tensor) -> torch.Tensor:
            for group in groups:
                x = all_reduce_sum(x, group)
            return x

        return total

    def _dispatch_columns(self, address: torch.Tensor, scores: torch.Tensor,
                          pre: Optional[torch.Tensor], pending) -> Callable[[], torch.Tensor]:
        """value_dim mode: gather every MP rank's items, pool our columns, send each its tokens'.
        Pre-values: each rank dots its D_p columns; the partial sums are added over TP x MP."""
        size, group = self.layout.mp_size, parallel_state.get_expert_model_parallel_group()
        if size > 1:
            address = all_gather_first_dim(address, group)  # [P*T, k, 2]
            scores = all_gather_first_dim(scores, group)    # [P*T, k, c]
            pre = all_gather_first_dim(pre, group) if pre is not None else None  # [P*T, p]
        if pre is not None:
            cols = self.pre_slice
            start = cols.col_start - cols.proj_col_start
            scores = self.pre_weighted(scores, address[..., 0],
                                       pre[:, start:start + cols.cols].unsqueeze(1),
                                       self._pre_dot_sum(with_mp=True))
        part = self.table_slice
        pooled = lookup_pool(self.values, address[..., 0], address[..., 1], scores,
                             self.pooled_groups, part.col_start, self.value_dim,
                             pool=self.pool_fn())  # [P*T, e, w]
        if size == 1:
            return lambda: pooled
        received = all_to_all_first_dim(pooled, group, pending=pending)  # block j: rank j's cols
        tokens, width, groups = pooled.shape[0] // size, pooled.shape[-1], self.pooled_groups
        return lambda: (received.view(size, tokens, groups, width)
                        .permute(1, 2, 0, 3).reshape(tokens, groups, size * width))

    def _dispatch_rows(self, address: torch.Tensor, scores: torch.Tensor,
                       pre: Optional[torch.Tensor], pending) -> Callable[[], torch.Tensor]:
        """row mode: send items to their rows' owners, get back one partial sum per bag.
        Pre-values: each item travels with its token's W_pre x columns; the owner dots them with
        its rows (partial sums added over TP).

        all_to_all_single needs its split sizes on the host, so this mode makes exactly one
        device->host copy per forward: the item and bag counts, sent and received, in one tensor
        read once after the counts' exchange (megatron's MoE all-to-all token dispatcher does
        the same). Everything else stays on the device; the backward reuses the host splits.
        """
        size, group = self.layout.mp_size, parallel_state.get_expert_model_parallel_group()
        tokens, items, cores = scores.shape
        width = self.values.shape[1]
        rows = address[..., 0].reshape(-1)                                       # [T*k]
        item_scores = scores.reshape(-1, cores)                                  # [T*k, c]
        item_pre = pre.repeat_interleave(items, dim=0) if pre is not None else None  # [T*k, p]
        num_bags = tokens * self.pooled_groups
        bags = (torch.arange(tokens, device=rows.device).unsqueeze(-1) * self.pooled_groups
                + address[..., 1]).reshape(-1)                                   # [T*k]
        if size == 1:
            if item_pre is not None:
                item_scores = self.pre_weighted(item_scores, rows, item_pre,
                                                self._pre_dot_sum(with_mp=False))
            pooled = self._pool_local(rows, bags, item_scores, num_bags)
            return lambda: pooled.view(tokens, self.pooled_groups, width)

        rows_per_rank = self.values.shape[0]
        sorted_key, order = ((rows // rows_per_rank) * num_bags + bags).sort(stable=True)
        rows, bags, item_scores = rows[order], bags[order], item_scores[order]  # by (owner, bag)
        item_pre = item_pre[order] if item_pre is not None else None
        owner = rows // rows_per_rank
        new_bag = torch.ones_like(sorted_key, dtype=torch.bool)
        new_bag[1:] = sorted_key[1:] != sorted_key[:-1]
        item_bag = new_bag.long().cumsum(0) - 1             # [i] its (owner, bag), in sent order
        items_to = owner.new_zeros(size).scatter_add_(0, owner, torch.ones_like(owner))    # [P]
        bags_to = owner.new_zeros(size).scatter_add_(0, owner, new_bag.long())           # [P]
        first_bag_of_owner = bags_to.cumsum(0) - bags_to
        local = torch.stack([rows - owner * rows_per_rank,
                             item_bag - first_bag_of_owner[owner]], dim=-1)     # [i, 2]
        counts = torch.stack([items_to, bags_to], dim=-1)                       # [P, 2]
        counts_from = torch.empty_like(counts)
        dist.all_to_all_single(counts_from, counts, group=group)
        # The one host sync: [sent, received] x [items, bags] x [P].
        (items_out, bags_out), (items_in, bags_in) = (torch.stack([counts, counts_from])
                                                      .transpose(1, 2).tolist())

        local_in = all_to_all_first_dim(local, group, items_in, items_out)          # [i', 2]
        scores_in = all_to_all_first_dim(item_scores, group, items_in, items_out)   # [i', c]
        if item_pre is not None:
            pre_in = all_to_all_first_dim(item_pre, group, items_in, items_out)     # [i', p]
            scores_in = self.pre_weighted(scores_in, local_in[:, 0], pre_in,
                                          self._pre_dot_sum(with_mp=False))
        sender = torch.repeat_interleave(torch.arange(size, device=rows.device),
                                          counts_from[:, 0], output_size=sum(items_in))
        first_bag_of_sender = counts_from[:, 1].cumsum(0) - counts_from[:, 1]
        partial = self._pool_local(local_in[:, 0], local_in[:, 1] + first_bag_of_sender[sender],
                                   scores_in, sum(bags_in))                          # [u', w]
        returned = all_to_all_first_dim(partial, group, bags_out, bags_in, pending)  # [u, w]
        target = bags.new_zeros(sum(bags_out)).scatter_(0, item_bag, bags)  # bag of each u
        return lambda: (returned.new_zeros(num_bags, width).index_add(0, target, returned)
                        .view(tokens, self.pooled_groups, width))

    # --------------------------------------------------------------------------- checkpoint

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """Global [N, D_v] values, [D, E, D_v] projection (and the [D_p, D] / [D_v, D]
        pre-value and gate projections) with this rank's offsets, so a checkpoint loads at any
        (TP, P, mode); the permutation is replicated. Shared tables are saved by their owner
        (ShardedMemoryTables)."""
        layout, prepend = self.layout, len(sharded_offsets)

        def sharded(name: str, tensor: torch.Tensor, axes: list, replica_id: tuple):
            return ShardedTensor.from_rank_offsets(f"{prefix}{name}", tensor, *sharded_offsets,
                                                   *axes, replica_id=replica_id,
                                                   prepend_axis_num=prepend)

        dense_tp = (0, 0, layout.dp_rank)
        state = {"out_proj.weight": sharded("out_proj.weight", self.out_proj.weight,
                                            [(prepend + 2, layout.tp_rank, layout.tp_size)],
                                            dense_tp)}
        if not self.shares_tables:
            state["values"] = sharded("values", self.values, table_axes(layout, prepend),
                                      (0, 0, layout.expert_dp_rank))
        for name, proj in (("pre_proj", self.pre_proj), ("gate_proj", self.gate_proj)):
            if proj is not None:
                state[f"{name}.weight"] = sharded(f"{name}.weight", proj.weight,
                                                  [(prepend, layout.tp_rank, layout.tp_size)],
                                                  dense_tp)
        if self.virtual_to_slot is not None:
            state["virtual_to_slot"] = sharded("virtual_to_slot", self.virtual_to_slot, [],
                                               (0, layout.tp_rank, layout.dp_rank))
        return {f"{prefix}{name}": value for name, value in state.items()}


def table_axes(layout: MemoryParallelLayout, prepend: int) -> list[tuple[int, int, int]]:
    """How a [N, D] table is cut over TP x MP: (axis, shard, shards) for from_rank_offsets."""
    if layout.mode == "row":
        return [(prepend, layout.mp_rank, layout.mp_size),
                (prepend + 1, layout.tp_rank, layout.tp_size)]
    return [(prepend + 1, layout.tp_rank * layout.mp_size + layout.mp_rank,
             layout.tp_size * layout.mp_size)]


class ShardedMemoryTables(MemoryTables):
    """The shared value / pre-value tables of a model chunk, this rank's slices, with the
    checkpoint layout of UltraMem's table. Every pipeline chunk holds a copy (its layers read it):
    the copies' gradients are summed (megatron_compat.sum_shared_table_grads), only the first
    chunk's counts in the gradient norm, and only its copy is saved; every copy loads."""

    def __init__(self, layout: MemoryParallelLayout, chunk: int, rows: int, value_dim: int,
                 pre_value_dim: int, dtype: torch.dtype = torch.float32, device=None):
        slices = layout.table_slices(rows, value_dim, pre_value_dim)
        super().__init__(rows, value_dim, pre_value_dim, slices["value_slice"],
                         slices["pre_slice"], dtype, device)
        self.layout, self.chunk = layout, chunk
        for table in self.parameters():
            table.allreduce = False   # expert-style: reduced over the ranks holding this shard
            set_tensor_model_parallel_attributes(table, True, 1, 1)
            table.shared = chunk > 0  # megatron leaves `shared` copies out of the grad norm
            table.shared_memory_table = True

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        axes = table_axes(self.layout, len(sharded_offsets))
        return {f"{prefix}{name}": ShardedTensor.from_rank_offsets(
                    f"{prefix}{name}", table, *sharded_offsets, *axes,
                    replica_id=(self.chunk, 0, self.layout.expert_dp_rank),
                    prepend_axis_num=len(sharded_offsets))
                for name, table in self.named_parameters()}
