"""Which memory slots a token reads: TDQKR's two-phase top-m and PKM's product-key top-k.

Plain torch, no package imports: the exported Hugging Face model ships this file next to its
modeling code (as memory_selection.py), so inference selects exactly what training selected.
"""

# Axis legend
#   t  tokens (flattened)      h  retrieval heads, sharing one query
#   a, b  row / column key index                  n  keys per axis
#   r, s  Tucker rank          c  Tucker cores (multi-core scoring)
#   w  phase-1 candidates per axis                m  values kept per head (final top-m)
#   k  query / key width D_k

import torch


def tucker_key_scores(query: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """query [t, 2, k] (normed row / column query); keys [h, 2, n, r, k] (normed over k)
    -> row and column scores [t, h, n, r]."""
    tokens, heads, n, r, k = query.shape[0], keys.shape[0], keys.shape[2], keys.shape[3], keys.shape[4]
    s_row = query[:, 0] @ keys[:, 0].reshape(heads * n * r, k).t()
    s_col = query[:, 1] @ keys[:, 1].reshape(heads * n * r, k).t()
    return s_row.view(tokens, heads, n, r), s_col.view(tokens, heads, n, r)


def two_phase_topk(s_row: torch.Tensor, s_col: torch.Tensor, cores: torch.Tensor,
                   u: torch.Tensor, t: torch.Tensor, width: int, topk: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-1 filter, then exact multi-core re-scoring of the width x width candidates.

    s_row, s_col [t, h, n, r]; cores [c, h, r, s]; u, t [h, r] (the rank-1 filter of sum_c C_c).
    Returns virtual indices a * n + b [t, h, m] and per-core raw scores [t, h, m, c] (no softmax).
    Indices are chosen without gradient; gradients reach s_row, s_col and the cores only through
    the scores of the finally selected (a, b) pairs.
    """
    num_keys, rank = s_row.shape[2], s_row.shape[3]
    with torch.no_grad():  # phase 1: selection only
        row_idx = torch.einsum("thar,hr->tha", s_row, u.to(s_row.dtype)).topk(width, -1).indices
        col_idx = torch.einsum("thbr,hr->thb", s_col, t.to(s_col.dtype)).topk(width, -1).indices
    row_cand = s_row.gather(2, row_idx.unsqueeze(-1).expand(-1, -1, -1, rank))  # [t, h, w, r]
    col_cand = s_col.gather(2, col_idx.unsqueeze(-1).expand(-1, -1, -1, rank))  # [t, h, w, r]
    with torch.no_grad():  # phase 2 ranking: sum_c S_c = S_row^T (sum_c C_c) S_col
        grid = torch.einsum("thar,hrs,thbs->thab", row_cand, cores.sum(0), col_cand)
        best = grid.flatten(2).topk(topk, -1).indices  # [t, h, m]
        best_row, best_col = best // width, best % width
    sel_row = row_cand.gather(2, best_row.unsqueeze(-1).expand(-1, -1, -1, rank))  # [t, h, m, r]
    sel_col = col_cand.gather(2, best_col.unsqueeze(-1).expand(-1, -1, -1, rank))  # [t, h, m, s]
    core_scores = torch.einsum("thmr,chrs,thms->thmc", sel_row, cores, sel_col)
    virtual_idx = row_idx.gather(2, best_row) * num_keys + col_idx.gather(2, best_col)
    return virtual_idx, core_scores


def product_key_topk(s_first: torch.Tensor, s_second: torch.Tensor, topk: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of s_first[a] + s_second[b] over the n x n grid.

    s_first, s_second [t, h, n] -> (value rows a * n + b [t, h, k], scores [t, h, k]).
    Exact because the k best sums only use each half's k best entries.
    """
    num_keys = s_first.shape[-1]
    first, second = s_first.topk(topk, -1), s_second.topk(topk, -1)
    grid = first.values.unsqueeze(-1) + second.values.unsqueeze(-2)  # [t, h, k, k]
    scores, best = grid.flatten(2).topk(topk, -1)
    rows = (first.indices.gather(-1, best // topk) * num_keys
            + second.indices.gather(-1, best % topk))
    return rows, scores
