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

from typing import Callable

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
from ..memory.values import ImplicitValueExpansion
from .comm import all_gather_first_dim, all_to_all_first_dim
from .layout import MemoryParallelLayout, Mode


class ShardedValueExpansion(ImplicitValueExpansion):
    """ImplicitValueExpansion whose table and projection are this rank's slices (see layout.py).

    The value shard is an expert-style parameter (allreduce=False): megatron's DDP reduces its
    gradient over the expert-data-parallel group, i.e. over the ranks holding the same shard.
    """

    def __init__(self, num_values: int, value_dim: int, expansion: int, hidden_size: int,
                 shuffle_seed: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None, *, mode: Mode = "value_dim",
                 sequence_parallel: bool = False, overlap: bool = True, kernel: str = "auto"):
        layout = MemoryParallelLayout.from_parallel_state(mode, sequence_parallel)
        super().__init__(num_values, value_dim, expansion, hidden_size, shuffle_seed, dtype,
                         device, table_slice=layout.table_slice(num_values, value_dim),
                         kernel=kernel)
        self.layout, self.overlap = layout, overlap
        self.values.allreduce = False
        # Every TP rank's slice is distinct (so each counts in the gradient norm): the values and
        # the projection are split along their D_v axis over TP.
        set_tensor_model_parallel_attributes(self.values, True, 1, 1)
        set_tensor_model_parallel_attributes(self.out_proj.weight, True, 2, 1)

    # ------------------------------------------------------------------------------ forward

    def dispatch(self, virtual_idx: torch.Tensor, scores: torch.Tensor
                 ) -> Callable[[], torch.Tensor]:
        """virtual_idx [t, k]; per-core scores [t, k, c] -> a function returning [t, D]."""
        layout = self.layout
        rows, groups = self.locate(virtual_idx)
        address = torch.stack([rows, groups], dim=-1)  # [t, k, 2]
        if layout.sequence_parallel:
            # Every TP rank pools its columns for the whole sequence; the scores' gradient is a
            # sum over the TP ranks' columns, reduce-scattered back to the tokens' owners.
            address = gather_from_sequence_parallel_region(address)    # [T, k, 2]
            scores = gather_from_sequence_parallel_region(scores)      # [T, k, c]
        elif layout.tp_size > 1:
            scores = copy_to_tensor_model_parallel_region(scores)      # backward: sum over TP
        pending = [] if self.overlap else None
        dispatch_mp = self._dispatch_rows if layout.mode == "row" else self._dispatch_columns
        finish_pooling = dispatch_mp(address, scores, pending)

        def combine() -> torch.Tensor:
            for work in pending or ():
                work.wait()
            partial = self.out_proj(finish_pooling())  # [T, D], from this TP rank's columns
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

    def _dispatch_columns(self, address: torch.Tensor, scores: torch.Tensor, pending
                          ) -> Callable[[], torch.Tensor]:
        """value_dim mode: gather every MP rank's items, pool our columns, send each its tokens'."""
        size, group = self.layout.mp_size, parallel_state.get_expert_model_parallel_group()
        if size > 1:
            address = all_gather_first_dim(address, group)  # [P*T, k, 2]
            scores = all_gather_first_dim(scores, group)    # [P*T, k, c]
        part = self.table_slice
        pooled = lookup_pool(self.values, address[..., 0], address[..., 1], scores,
                             self.expansion, part.col_start, self.value_dim,
                             pool=self.pool_fn())  # [P*T, e, w]
        if size == 1:
            return lambda: pooled
        received = all_to_all_first_dim(pooled, group, pending=pending)  # block j: rank j's cols
        tokens, width = pooled.shape[0] // size, pooled.shape[-1]
        return lambda: (received.view(size, tokens, self.expansion, width)
                        .permute(1, 2, 0, 3).reshape(tokens, self.expansion, size * width))

    def _dispatch_rows(self, address: torch.Tensor, scores: torch.Tensor, pending
                       ) -> Callable[[], torch.Tensor]:
        """row mode: send items to their rows' owners, get back one partial sum per bag.

        all_to_all_single needs its split sizes on the host, so this mode makes exactly one
        device->host copy per forward: the item and bag counts, sent and received, in one tensor
        read once after the counts' exchange (megatron's MoE all-to-all token dispatcher does
        the same). Everything else stays on the device; the backward reuses the host splits.
        """
        size, group = self.layout.mp_size, parallel_state.get_expert_model_parallel_group()
        tokens, items, cores = scores.shape
        num_bags, width = tokens * self.expansion, self.values.shape[1]
        rows = address[..., 0].reshape(-1)                                       # [T*k]
        bags = (torch.arange(tokens, device=rows.device).unsqueeze(-1) * self.expansion
                + address[..., 1]).reshape(-1)                                   # [T*k]
        item_scores = scores.reshape(-1, cores)                                  # [T*k, c]
        if size == 1:
            pooled = self._pool_local(rows, bags, item_scores, num_bags)
            return lambda: pooled.view(tokens, self.expansion, width)

        rows_per_rank = self.values.shape[0]
        sorted_key, order = ((rows // rows_per_rank) * num_bags + bags).sort(stable=True)
        rows, bags, item_scores = rows[order], bags[order], item_scores[order]  # by (owner, bag)
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
        sender = torch.repeat_interleave(torch.arange(size, device=rows.device),
                                          counts_from[:, 0], output_size=sum(items_in))
        first_bag_of_sender = counts_from[:, 1].cumsum(0) - counts_from[:, 1]
        partial = self._pool_local(local_in[:, 0], local_in[:, 1] + first_bag_of_sender[sender],
                                   scores_in, sum(bags_in))                          # [u', w]
        returned = all_to_all_first_dim(partial, group, bags_out, bags_in, pending)  # [u, w]
        target = bags.new_zeros(sum(bags_out)).scatter_(0, item_bag, bags)  # bag of each u
        return lambda: (returned.new_zeros(num_bags, width).index_add(0, target, returned)
                        .view(tokens, self.expansion, width))

    # --------------------------------------------------------------------------- checkpoint

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """Global [N, D_v] values and [D, E, D_v] projection with this rank's offsets, so a
        checkpoint loads at any (TP, P, mode); the permutation is replicated."""
        layout, prepend = self.layout, len(sharded_offsets)
        if layout.mode == "row":
            value_axes = [(prepend, layout.mp_rank, layout.mp_size),
                          (prepend + 1, layout.tp_rank, layout.tp_size)]
        else:
            value_axes = [(prepend + 1, layout.tp_rank * layout.mp_size + layout.mp_rank,
                           layout.tp_size * layout.mp_size)]
        return {
            f"{prefix}values": ShardedTensor.from_rank_offsets(
                f"{prefix}values", self.values, *sharded_offsets, *value_axes,
                replica_id=(0, 0, layout.expert_dp_rank), prepend_axis_num=prepend),
            f"{prefix}out_proj.weight": ShardedTensor.from_rank_offsets(
                f"{prefix}out_proj.weight", self.out_proj.weight, *sharded_offsets,
                (prepend + 2, layout.tp_rank, layout.tp_size),
                replica_id=(0, 0, layout.dp_rank), prepend_axis_num=prepend),
            f"{prefix}virtual_to_slot": ShardedTensor.from_rank_offsets(
                f"{prefix}virtual_to_slot", self.virtual_to_slot, *sharded_offsets,
                replica_id=(0, layout.tp_rank, layout.dp_rank), prepend_axis_num=prepend),
        }
