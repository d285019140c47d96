"""Typed, validated configuration of the memory layers (UltraMem and the PKM baseline)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional


class MemoryConfigError(ValueError):
    """A memory-layer configuration that cannot work; the message names the field."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise MemoryConfigError(message)


@dataclass(frozen=True)
class UltraMemConfig:
    """One UltraMem layer (spec section 1). Defaults are the paper's common configuration."""

    num_keys: int                      # n: physical keys per axis, N = n^2 physical values
    key_dim: int                       # D_k: row / column query and key width
    topk: int = 16                     # m: values kept per head
    phase1_topk: Optional[int] = None  # row / column candidates in phase 1 (default: topk)
    value_dim: Optional[int] = None    # D_v (default: hidden_size // 2)
    num_heads: int = 2                 # H: key sets sharing one query
    expansion: int = 4                 # E: virtual expansion rate, a perfect square
    tucker_rank: int = 2               # r
    num_cores: int = 2                 # h: multi-core scoring
    qk_norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    query_batchnorm: bool = False      # standardise query channels over tokens before qk_norm
    query_conv_kernel: int = 0         # causal depthwise conv before the query; 0 = off
    aux_loss_weight: float = 0.001     # alpha of the Tucker aux loss
    aux_loss_margin: float = 0.15      # tau of the Tucker aux loss
    key_balance_weight: float = 0.0    # beta of UltraMemV2's key-balance loss; 0 = off
    init: Literal["paper", "official"] = "paper"
    value_lr_start_mult: float = 10.0  # value LR multiplier at step 0, decays linearly to 1
    value_lr_decay_fraction: float = 1.0  # fraction of training over which it decays
    shuffle_seed: int = 0              # seed of the virtual-address permutation
    kernel: Literal["auto", "torch", "triton"] = "auto"  # auto: Triton on CUDA, torch elsewhere

    def __post_init__(self) -> None:
        _require(self.num_keys >= 1, f"memory.num_keys must be >= 1, got {self.num_keys}")
        _require(self.key_dim >= 1, f"memory.key_dim must be >= 1, got {self.key_dim}")
        _require(self.num_heads >= 1, f"memory.num_heads must be >= 1, got {self.num_heads}")
        _require(self.tucker_rank >= 1, f"memory.tucker_rank must be >= 1, got {self.tucker_rank}")
        _require(self.num_cores >= 1, f"memory.num_cores must be >= 1, got {self.num_cores}")
        root = math.isqrt(self.expansion)
        _require(self.expansion >= 1 and root * root == self.expansion,
                 f"memory.expansion must be a perfect square (1, 4, 9, 16, ...), got {self.expansion}")
        _require(self.topk >= 1, f"memory.topk must be >= 1, got {self.topk}")
        self._check_selection()
        _require(self.qk_norm in ("rmsnorm", "layernorm"),
                 f"memory.qk_norm must be 'rmsnorm' or 'layernorm', got {self.qk_norm!r}")
        _require(self.query_conv_kernel >= 0,
                 f"memory.query_conv_kernel must be >= 0, got {self.query_conv_kernel}")
        _require(self.kernel in ("auto", "torch", "triton"),
                 f"memory.kernel must be 'auto', 'torch' or 'triton', got {self.kernel!r}")
        _require(self.init in ("paper", "official"),
                 f"memory.init must be 'paper' or 'official', got {self.init!r}")
        _require(self.aux_loss_weight >= 0, "memory.aux_loss_weight must be >= 0")
        _require(self.key_balance_weight >= 0, "memory.key_balance_weight must be >= 0")
        _require(self.value_lr_start_mult >= 1.0,
                 f"memory.value_lr_start_mult must be >= 1, got {self.value_lr_start_mult}")
        _require(0.0 < self.value_lr_decay_fraction <= 1.0,
                 "memory.value_lr_decay_fraction must be in (0, 1]")
        if self.value_dim is not None:
            self.check_value_dim(self.value_dim)

    def _check_selection(self) -> None:
        width = self.candidates_per_axis
        _require(1 <= width <= self.keys_per_axis,
                 f"memory.phase1_topk ({width}) must be in [1, keys per axis = "
                 f"{self.keys_per_axis}]")
        _require(self.topk <= width * width,
                 f"memory.topk ({self.topk}) must be <= phase1_topk^2 ({width * width}): "
                 "phase 2 chooses among phase1_topk x phase1_topk candidates")

    def check_value_dim(self, value_dim: int) -> None:
        _require(value_dim >= 1 and value_dim % self.num_cores == 0,
                 f"memory.value_dim ({value_dim}) must be a positive multiple of "
                 f"memory.num_cores ({self.num_cores}): core c scales chunk c of each value")

    @property
    def num_values(self) -> int:
        """N: physical value rows."""
        return self.num_keys * self.num_keys

    @property
    def keys_per_axis(self) -> int:
        """sqrt(E) * n: row (and column) keys actually instantiated."""
        return math.isqrt(self.expansion) * self.num_keys

    @property
    def candidates_per_axis(self) -> int:
        return self.phase1_topk if self.phase1_topk is not None else self.topk

    def resolved_value_dim(self, hidden_size: int) -> int:
        value_dim = self.value_dim if self.value_dim is not None else hidden_size // 2
        self.check_value_dim(value_dim)
        return value_dim


@dataclass(frozen=True)
class PKMConfig:
    """Product-key memory baseline (Lample et al. 2019): additive scores, softmax, BatchNorm query."""

    num_keys: int              # sub-keys per half; num_keys^2 values of width hidden_size
    key_dim: int = 256         # d_q: full query width, split into two halves
    topk: int = 32             # k
    num_heads: int = 4
    query_batchnorm: bool = True

    def __post_init__(self) -> None:
        _require(self.num_keys >= 1, f"pkm.num_keys must be >= 1, got {self.num_keys}")
        _require(self.key_dim >= 2 and self.key_dim % 2 == 0,
                 f"pkm.key_dim must be even (two halves), got {self.key_dim}")
        _require(1 <= self.topk <= self.num_keys,
                 f"pkm.topk ({self.topk}) must be in [1, num_keys = {self.num_keys}]")
        _require(self.num_heads >= 1, f"pkm.num_heads must be >= 1, got {self.num_heads}")

    @property
    def num_values(self) -> int:
        return self.num_keys * self.num_keys


@dataclass(frozen=True)
class UltraMemV2Config(UltraMemConfig):
    """UltraMemV2 (arXiv 2508.18756; ultramem-v2-spec.md section 1): UltraMem's retrieval with
    one query per Tucker rank, PEER-style pre-values, the E groups summed before one value
    projection, and one value table shared by every memory layer through a ring window.
    Defaults are the paper's; `query_per_rank=False` and `init="official"` are the released
    code's readings (docs/architecture.md, "UltraMemV2")."""

    num_heads: int = 1
    expansion: int = 1                 # E = e^2 key expansion
    aux_loss_weight: float = 0.0       # the paper dropped the Tucker penalty
    value_lr_start_mult: float = 1.0   # the paper's best: a constant 1x value LR
    pre_value_dim: Optional[int] = None  # D_p (default value_dim); 0 = no pre-values
    pre_value_activation: Literal["none", "gelu"] = "none"
    query_per_rank: bool = True        # paper: rank k scores with q(row, k), q(col, k)
    value_projection: Literal["single", "per_group"] = "single"  # sum the E groups, one W_v
    share_ratio: float = 1.0           # rho: a layer's window is floor(sqrt(rho N_all))^2 rows
    # where layer l's ring window sits: centred on its own n^2 rows (paper, Table 7) or
    # starting at them (the released code)
    window_anchor: Literal["centre", "start"] = "centre"
    # L_mem, set from model.memory_spans (N_all = L_mem n^2); the checks that need it wait for it
    memory_layers: Optional[int] = None

    def __post_init__(self) -> None:
        _require(self.memory_layers is None or self.memory_layers >= 1,
                 "ultramem_v2.memory_layers must be >= 1")
        _require(0.0 < self.share_ratio <= 1.0,
                 f"ultramem_v2.share_ratio must be in (0, 1], got {self.share_ratio}")
        _require(self.pre_value_dim is None or self.pre_value_dim >= 0,
                 "ultramem_v2.pre_value_dim must be >= 0 (0 = no pre-values)")
        _require(self.pre_value_activation in ("none", "gelu"),
                 "ultramem_v2.pre_value_activation must be 'none' or 'gelu'")
        _require(self.value_projection in ("single", "per_group"),
                 "ultramem_v2.value_projection must be 'single' or 'per_group'")
        _require(self.window_anchor in ("centre", "start"),
                 "ultramem_v2.window_anchor must be 'centre' or 'start'")
        super().__post_init__()

    def _check_selection(self) -> None:
        if self.memory_layers is not None:
            _require(self.window_keys >= 1, "ultramem_v2.share_ratio leaves an empty window")
            super()._check_selection()

    @property
    def table_rows(self) -> int:
        """N_all: rows of the one table every memory layer reads (L_mem n^2)."""
        if self.memory_layers is None:
            raise MemoryConfigError("ultramem_v2.memory_layers is not set (model.memory sets it "
                                    "from model.memory_spans)")
        return self.memory_layers * self.num_keys * self.num_keys

    @property
    def window_keys(self) -> int:
        """n' = floor(sqrt(rho N_all)): a layer's window is n'^2 rows of the table."""
        return math.isqrt(int(self.share_ratio * self.table_rows + 1e-9))

    @property
    def num_values(self) -> int:
        """N' = n'^2: rows one layer addresses (its window of the shared table)."""
        return self.window_keys * self.window_keys

    @property
    def keys_per_axis(self) -> int:
        """K = e n': row (and column) keys of one layer."""
        return math.isqrt(self.expansion) * self.window_keys

    def window_offset(self, layer: int) -> int:
        """First table row of memory layer `layer`'s ring window (N' rows, mod N_all)."""
        block = self.num_keys * self.num_keys
        start = layer * block + ((block - self.num_values) // 2
                                 if self.window_anchor == "centre" else 0)
        return start % self.table_rows

    def resolved_pre_value_dim(self, hidden_size: int) -> int:
        dim = self.pre_value_dim
        return self.resolved_value_dim(hidden_size) if dim is None else dim


@dataclass(frozen=True)
class MemoryPlusConfig:
    """Memory+ (arXiv 2412.09764; ultramem-v2-spec.md section 2): product keys, softmax over the
    top-k, one value table shared by every memory layer, output W_o (pooled * SiLU(W_s x))."""

    num_keys: int              # n sub-keys per half; n^2 rows in the shared table
    key_dim: int = 256         # full query width per head (two halves of key_dim / 2)
    topk: int = 32
    num_heads: int = 4
    value_dim: Optional[int] = None   # D_v (default hidden_size)
    qk_norm: Literal["both", "query", "none"] = "both"   # paper; "query": BD code, "none": Meta
    query_bias: bool = False   # Meta's query MLP has a bias
    value_lr_start_mult: float = 1.0
    value_lr_decay_fraction: float = 1.0
    kernel: Literal["auto", "torch", "triton"] = "auto"

    def __post_init__(self) -> None:
        _require(self.num_keys >= 1, f"memory_plus.num_keys must be >= 1, got {self.num_keys}")
        _require(self.key_dim >= 2 and self.key_dim % 2 == 0,
                 f"memory_plus.key_dim must be even (two halves), got {self.key_dim}")
        _require(1 <= self.topk <= self.num_keys,
                 f"memory_plus.topk ({self.topk}) must be in [1, num_keys = {self.num_keys}]")
        _require(self.num_heads >= 1, "memory_plus.num_heads must be >= 1")
        _require(self.qk_norm in ("both", "query", "none"),
                 f"memory_plus.qk_norm must be 'both', 'query' or 'none', got {self.qk_norm!r}")
        _require(self.value_dim is None or self.value_dim >= 1, "memory_plus.value_dim must be >= 1")
        _require(self.value_lr_start_mult >= 1.0, "memory_plus.value_lr_start_mult must be >= 1")
        _require(0.0 < self.value_lr_decay_fraction <= 1.0,
                 "memory_plus.value_lr_decay_fraction must be in (0, 1]")
        _require(self.kernel in ("auto", "torch", "triton"),
                 f"memory_plus.kernel must be 'auto', 'torch' or 'triton', got {self.kernel!r}")

    @property
    def num_values(self) -> int:
        return self.num_keys * self.num_keys

    def resolved_value_dim(self, hidden_size: int) -> int:
        return self.value_dim if self.value_dim is not None else hidden_size
