"""The lookup-and-pool op: gather value rows, scale each core's chunk by its score, sum into E groups."""

# Axis legend
#   t  tokens (flattened sequence x batch)     k  retrieved items per token (H*m)
#   n  physical value rows (N)                 e  virtual-expansion groups (E)
#   c  Tucker cores (h); value chunk c is scaled by core c's score
#   d  value width D_v = c * chunk

import torch
import torch.nn.functional as F


def lookup_pool(values: torch.Tensor, rows: torch.Tensor, groups: torch.Tensor,
                scores: torch.Tensor, num_groups: int) -> torch.Tensor:
    """pooled[t, g, chunk c] = sum over items k of token t with groups[t, k] == g of
    scores[t, k, c] * values[rows[t, k], chunk c].

    values [n, d]; rows, groups [t, k] (integer); scores [t, k, c] -> pooled [t, e, d].

    Reference path: one ``embedding_bag`` over the value table seen as [n*c, d/c], one bag per
    (token, group, core). It never materializes the [t, k, d] gathered rows; autograd gives the
    dense value gradient and the score gradient.
    """
    tokens, items, cores = scores.shape
    num_rows, width = values.shape
    if width % cores:
        raise ValueError(f"value width {width} is not divisible by the number of cores {cores}")
    chunk = width // cores
    core = torch.arange(cores, device=rows.device)
    # Every (item, core) pair becomes one weighted row of the [n*c, chunk] table.
    table_row = (rows.long().unsqueeze(-1) * cores + core).reshape(tokens, items * cores)
    bag_in_token = (groups.long().unsqueeze(-1) * cores + core).reshape(tokens, items * cores)
    weight = scores.reshape(tokens, items * cores)
    # Bags must be contiguous in the input: sort each token's pairs by (group, core).
    order = bag_in_token.argsort(dim=1, stable=True)
    table_row = table_row.gather(1, order)
    weight = weight.gather(1, order)
    bags_per_token = num_groups * cores
    counts = torch.zeros(tokens, bags_per_token, dtype=torch.long, device=rows.device)
    counts.scatter_add_(1, bag_in_token, torch.ones_like(bag_in_token))
    offsets = counts.flatten().cumsum(0) - counts.flatten()
    pooled = F.embedding_bag(table_row.flatten(), values.reshape(num_rows * cores, chunk),
                             offsets, mode="sum", per_sample_weights=weight.flatten())
    return pooled.view(tokens, num_groups, width)  # [t, e, d]
