"""Memory utilisation: per-row and per-key lookup counts, output RMS, and the statistics from them."""

# Axis legend
#   n  value rows (N)            t  tokens            k  lookups per token
#   h  heads    2  row / column key axis    a  keys per axis

import functools
import math

import torch
from torch import nn


def counted_once(method):
    """Run a counting method in training forwards that build the autograd graph, without
    autograd. megatron's full recompute runs a block twice, first without the graph (skipped
    here) and again in the backward with it, so each forward is counted once; evaluation
    (eval mode) is never counted."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                method(self, *args, **kwargs)
    return wrapper


class UsageTracker(nn.Module):
    """Counts kept on the device between two log steps, never saved, updated without host syncs.

    row_counts [n]: lookups per value row; key_counts [h, 2, a]: selections per row / column key
    (UltraMem only); rms_sums [3]: sums over forwards of the mean squares of (memory output, the
    FFN output it joins, the residual stream after that block); top_score_sum: sum over forwards
    of the mean best score per token and head. Counting happens in training forwards only, once
    each (counted_once).
    """

    OUTPUTS = ("out_rms", "ffn_rms", "resid_rms")

    def __init__(self, num_rows: int, key_shape: tuple[int, ...] = (), device=None):
        super().__init__()
        self.register_buffer("row_counts", torch.zeros(num_rows, dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("key_counts", torch.zeros(key_shape, dtype=torch.int64, device=device)
                             if key_shape else None, persistent=False)
        self.register_buffer("rms_sums", torch.zeros(3, dtype=torch.float64, device=device),
                             persistent=False)
        self.register_buffer("top_score_sum", torch.zeros((), dtype=torch.float64, device=device),
                             persistent=False)
        self.rms_forwards = [0, 0, 0]   # host-side counts of the forwards each rms_sums entry holds
        self.score_forwards = 0

    @counted_once
    def count_rows(self, rows: torch.Tensor) -> None:
        """rows [...] (int): value rows read by one forward."""
        flat = rows.reshape(-1)
        self.row_counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int64))

    @counted_once
    def count_keys(self, virtual_idx: torch.Tensor, keys_per_axis: int) -> None:
        """virtual_idx [t, h, m] = row key * keys_per_axis + column key."""
        heads = virtual_idx.shape[1]
        head = torch.arange(heads, device=virtual_idx.device).view(1, heads, 1)
        axis_stride = keys_per_axis
        row_slot = (head * 2) * axis_stride + virtual_idx // keys_per_axis      # [t, h, m]
        col_slot = (head * 2 + 1) * axis_stride + virtual_idx % keys_per_axis
        flat = torch.cat([row_slot.reshape(-1), col_slot.reshape(-1)])
        self.key_counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int64))

    @counted_once
    def add_top_score(self, scores: torch.Tensor) -> None:
        """scores [t, h, m]: the selected items' summed scores; adds the mean per-token maximum."""
        self.top_score_sum += scores.detach().amax(-1).double().mean()
        self.score_forwards += 1

    @counted_once
    def add_rms(self, which: int, x: torch.Tensor) -> None:
        """Adds mean(x^2) to the running sum of output `which` (0 memory, 1 FFN, 2 residual)."""
        self.rms_sums[which] += x.detach().double().pow(2).mean()
        self.rms_forwards[which] += 1

    def reset(self) -> None:
        self.row_counts.zero_()
        if self.key_counts is not None:
            self.key_counts.zero_()
        self.rms_sums.zero_()
        self.top_score_sum.zero_()
        self.rms_forwards = [0, 0, 0]
        self.score_forwards = 0

    def packed(self) -> torch.Tensor:
        """Everything to sum over ranks, as one float64 vector (one all-reduce)."""
        parts = [self.row_counts.double(), self.rms_sums, self.top_score_sum.view(1)]
        if self.key_counts is not None:
            parts.append(self.key_counts.double().reshape(-1))
        return torch.cat(parts)

    def summary(self, packed: torch.Tensor, ranks: int) -> dict[str, float]:
        """The statistics of `packed` (this tracker's, or its sum over `ranks` ranks)."""
        num_rows = self.row_counts.numel()
        rows, rest = packed[:num_rows], packed[num_rows:]
        stats = row_usage_stats(rows)
        for which, name in enumerate(self.OUTPUTS):
            forwards = self.rms_forwards[which] * ranks
            stats[name] = math.sqrt(rest[which].item() / forwards) if forwards else None
        forwards = self.score_forwards * ranks
        stats["top_score"] = rest[3].item() / forwards if forwards else None
        if self.key_counts is not None:
            stats["keys_hit"] = (rest[4:] > 0).double().mean().item()
        return stats


def row_usage_stats(counts: torch.Tensor) -> dict[str, float]:
    """counts [n]: lookups per row -> rows_hit (fraction of rows read at least once),
    top1pct_share (share of lookups on the ceil(1 %) most-read rows), entropy_bits of the
    lookup distribution and kl_uniform_bits = log2(n) - entropy (0 for perfectly even use)."""
    counts = counts.double().cpu()
    total = counts.sum().item()
    num_rows = counts.numel()
    if total == 0:
        return {"rows_hit": 0.0, "top1pct_share": None, "entropy_bits": None,
                "kl_uniform_bits": None}
    top = max(1, math.ceil(num_rows / 100))
    p = counts[counts > 0] / total
    entropy = -(p * p.log2()).sum().item()
    return {"rows_hit": (counts > 0).double().mean().item(),
            "top1pct_share": counts.topk(top).values.sum().item() / total,
            "entropy_bits": entropy,
            "kl_uniform_bits": math.log2(num_rows) - entropy}
