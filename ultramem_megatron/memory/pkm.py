"""PKM baseline (Lample et al. 2019): product keys, additive scores, softmax over the top-k."""

# Axis legend
#   s  sequence    b  micro-batch    t = s*b tokens    D  hidden size (= value width)
#   h  heads       n  sub-keys per half    k  top-k    q  half query width (d_q / 2)

from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from .config import PKMConfig
from .selection import batch_normed, product_key_scores, product_key_topk, upcast
from .usage import UsageTracker
from .value_lr import mark_value_param


class ProductKeyMemory(MegatronModule):
    """x [s, b, D] -> (sum over heads of softmax-weighted values [s, b, D], zero aux loss)."""

    def __init__(self, config: TransformerConfig, pkm: PKMConfig):
        super().__init__(config)
        hidden, dtype = config.hidden_size, config.params_dtype
        self.pkm = pkm
        half = pkm.key_dim // 2
        self.query_proj = nn.Linear(hidden, pkm.num_heads * pkm.key_dim, bias=False, dtype=dtype)
        self.query_bn = (nn.BatchNorm1d(pkm.num_heads * pkm.key_dim, dtype=dtype)
                         if pkm.query_batchnorm else nn.Identity())
        self.keys = nn.Parameter(torch.empty(pkm.num_heads, 2, pkm.num_keys, half, dtype=dtype))
        self.values = mark_value_param(nn.Parameter(torch.empty(pkm.num_values, hidden, dtype=dtype)))
        self.usage = UsageTracker(pkm.num_values, (pkm.num_heads, 2, pkm.num_keys))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """XLM's init: keys U(-1/sqrt(q), 1/sqrt(q)), values N(0, 1/D)."""
        half = self.keys.shape[-1]
        nn.init.uniform_(self.keys, -half ** -0.5, half ** -0.5)
        nn.init.normal_(self.values, std=self.values.shape[1] ** -0.5)
        nn.init.normal_(self.query_proj.weight, std=self.query_proj.in_features ** -0.5)

    def refresh_rank1(self) -> None:
        """PKM has no rank-1 filter; present so every memory layer has one interface."""

    @torch.no_grad()
    def weight_norms(self) -> dict[str, torch.Tensor]:
        """Mean square of the value table and mean L2 norm of the sub-keys."""
        return {"value_ms": self.values.detach().float().pow(2).mean(),
                "key_norm": self.keys.detach().float().norm(dim=-1).mean()}

    def start(self, hidden: torch.Tensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """The skip-layer interface UltraMemLayer has: all work now, the result when called."""
        result = self(hidden)
        return lambda: result

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query, scores, top-k and softmax in fp32 whatever the parameter dtype; the lookup
        reads the table in its dtype (embedding_bag sums in fp32, see lookup.py)."""
        seq, batch, width = hidden.shape
        tokens, heads, half = seq * batch, self.pkm.num_heads, self.keys.shape[-1]
        x = upcast(hidden.reshape(tokens, width))
        query = batch_normed(self.query_bn, F.linear(x, self.query_proj.weight.to(x.dtype)))
        s_first, s_second = product_key_scores(query.view(tokens, heads, 2, half), self.keys)
        rows, scores = product_key_topk(s_first, s_second, self.pkm.topk)  # [t, h, k]
        self.usage.count_rows(rows)
        self.usage.count_keys(rows, self.pkm.num_keys)
        self.usage.add_top_score(scores)
        weights = F.softmax(scores, dim=-1).to(self.values.dtype)
        out = F.embedding_bag(rows.view(tokens, -1), self.values, mode="sum",
                              per_sample_weights=weights.view(tokens, -1))  # heads summed
        return out.view(seq, batch, width), hidden.new_zeros((), dtype=torch.float32)
