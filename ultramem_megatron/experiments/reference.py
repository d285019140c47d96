"""What a memory keyed on n-gram identity would read: the utilisation floor set by the text itself."""

# Axis legend
#   b  sequences    s  positions    t = b*s tokens    k  lookups per token    n  value rows
#
# A memory whose query depends only on the last `order` tokens reads the same rows for every
# occurrence of that n-gram, so on Zipfian text its row usage is as skewed as the n-gram
# frequencies. Giving every distinct n-gram its own `lookups` random rows (a perfect hash: no two
# n-grams share rows by more than chance) is the most even use such a memory can make; its
# statistics (memory.usage.row_usage_stats) are the reference for the utilisation metrics.

import torch

from ..memory.usage import row_usage_stats


def ngram_keys(tokens: torch.Tensor, order: int, vocab_size: int) -> torch.Tensor:
    """tokens [b, s] -> [b, s] int64 ids of the n-gram ending at each position (order tokens;
    fewer at a sequence's start, where the missing ones count as one extra symbol)."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    if (vocab_size + 1) ** order >= 2 ** 63:
        raise ValueError(f"order {order} n-grams of a {vocab_size}-token vocabulary overflow int64")
    keys = torch.zeros_like(tokens, dtype=torch.int64)
    for back in range(order):
        shifted = torch.full_like(keys, vocab_size)          # the 'before the sequence' symbol
        shifted[:, back:] = tokens[:, :tokens.shape[1] - back]
        keys = keys * (vocab_size + 1) + shifted
    return keys


def keyed_row_counts(keys: torch.Tensor, num_rows: int, lookups: int,
                     generator: torch.Generator) -> torch.Tensor:
    """keys [...] int64 -> lookups per row [n] when each distinct key reads its own `lookups`
    uniformly random rows (drawn independently, so a key may repeat a row by chance)."""
    distinct, inverse = keys.reshape(-1).unique(return_inverse=True)
    rows = torch.randint(0, num_rows, (distinct.numel(), lookups), generator=generator)  # [u, k]
    read = rows[inverse].reshape(-1)                                                    # [t*k]
    return torch.zeros(num_rows, dtype=torch.int64).index_add_(0, read, torch.ones_like(read))


def ngram_usage_reference(tokens: torch.Tensor, num_rows: int, lookups: int, vocab_size: int,
                          orders=(1, 2, 3), seed: int = 0) -> dict[int, dict[str, float]]:
    """tokens [b, s] (one log interval of training batches) -> {order: row_usage_stats} of a
    memory with num_rows rows and `lookups` rows per token keyed on the last `order` tokens."""
    generator = torch.Generator().manual_seed(seed)
    return {order: row_usage_stats(keyed_row_counts(ngram_keys(tokens, order, vocab_size),
                                                    num_rows, lookups, generator))
            for order in orders}


def memory_shape(model) -> tuple[int, int] | None:
    """(value rows, rows read per token) of a model config's memory layer; None without one.
    The rows are those one layer addresses, which its usage metrics count: UltraMemV2's window
    of the shared table, Memory+'s whole shared table."""
    memory = model.memory   # the family's section; None for dense and MoE
    if memory is None:
        return None
    return memory.num_values, memory.num_heads * memory.topk


def run_reference(run, orders=(1, 2, 3)) -> dict[int, dict[str, float]] | None:
    """The n-gram-keyed references for a RunConfig's memory, on its last log interval of
    training batches (the window its final utilisation metrics count). One process;
    initialises torch.distributed. None for a model without memory."""
    from .. import megatron_compat
    from ..data.loader import build_datasets, dataset_sizes
    from ..data.tokenizer import load_tokenizer

    shape = memory_shape(run.model)
    if shape is None:
        return None
    megatron_compat.initialize_single_process(run.train.seed)
    tokenizer = load_tokenizer(run.data.tokenizer)
    train_samples, valid_samples = dataset_sizes(run.train)
    train, _ = build_datasets(run.data, tokenizer, seq_length=run.model.seq_length,
                              seed=run.train.seed, train_samples=train_samples,
                              valid_samples=valid_samples, valid_seed=run.data.valid_seed)
    batch, steps = run.train.global_batch_size, run.train.max_steps
    first = (steps - min(run.train.log_interval, steps)) * batch
    tokens = torch.stack([train[i]["tokens"] for i in range(first, steps * batch)])   # [b, s]
    return ngram_usage_reference(tokens, *shape, run.model.vocab_size, orders)
