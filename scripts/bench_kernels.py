"""The memory layer's Triton kernels against their torch references: time, ratio and bandwidth."""

# Usage:  python scripts/bench_kernels.py --device cuda              (GPU: scripts/gpu_check.sh)
#         TRITON_INTERPRET=1 python scripts/bench_kernels.py          (CPU: correctness only)
#
# Shapes come from an UltraMem config (on cuda by default the paper's 151M recipe: n = 952 keys,
# N = 906,304 values of D_v = 512, H = 2 heads x m = 80, E = 4, r = 2, c = 2 cores, phase-1 width
# 80; on the CPU configs/tiny.yaml), one layer, at each token count. Two ops, each timed as the layer calls it:
#   lookup-pool  memory.lookup.pool_bags vs kernels.lookup_pool (forward, and backward with the
#                value-table and score gradients), the items in a token's groups as the layer
#                forms them (a random permutation of the virtual addresses, random rows);
#   top-m        memory.selection.two_phase_topk vs kernels.topm (selection + per-core scores).
# Bandwidth: bytes the op must move / time, against the device's DRAM peak (datasheet, by exact
# device name; else the measured device-to-device copy rate, said so). Bytes counted:
#   forward   each item's value row (w elements) + its row, bag and c scores + the pooled output;
#   backward  each item's value row and its bag's output-gradient row (the score gradient), the
#             table gradient written whole (it is dense: every row, touched or not) and the
#             touched rows read-modify-written once more.
# Errors: the largest difference of any output (pooled values, table and score gradients; per-core
# scores), relative to that output's largest magnitude. On the CPU the kernels run under the
# Triton interpreter (thousands of times slower than the reference, so no time is printed) and
# the table is the error alone; bf16 there mostly measures the reference, whose CPU table gradient
# sums in bf16.

import argparse
import os
import statistics
import sys
import time

import torch

from ultramem_megatron.config import load_config
from ultramem_megatron.memory.lookup import lookup_pool, pool_bags
from ultramem_megatron.memory.selection import two_phase_topk

# Dense DRAM bandwidth, GB/s (datasheets), by the exact name torch reports.
PEAK_GBPS = {
    "NVIDIA H100 80GB HBM3": 3350, "NVIDIA H100 PCIe": 2000, "NVIDIA H100 NVL": 3900,
    "NVIDIA H200": 4800, "NVIDIA H800": 3350, "NVIDIA H20": 4000, "NVIDIA B200": 8000,
    "NVIDIA GB200": 8000, "NVIDIA A100-SXM4-80GB": 2039, "NVIDIA A100-SXM4-40GB": 1555,
    "NVIDIA A100 80GB PCIe": 1935, "NVIDIA A100-PCIE-40GB": 1555, "NVIDIA L40S": 864,
    "NVIDIA L4": 300, "NVIDIA A10": 600,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=None,
                   help="default configs/ultramem_151m.yaml on cuda, configs/tiny.yaml on cpu")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="value table dtype")
    p.add_argument("--tokens", default=None,
                   help="comma-separated (default 1,16,256,4096,16384 on cuda, 4,32 on cpu)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("on the CPU the kernels run only under the interpreter: set TRITON_INTERPRET=1")
    args.config = args.config or ("configs/ultramem_151m.yaml" if args.device == "cuda"
                                  else "configs/tiny.yaml")
    args.tokens = [int(t) for t in (args.tokens or (
        "1,16,256,4096,16384" if args.device == "cuda" else "4,32")).split(",")]
    return args


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of fn() over repeats, after two warm-up calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn(), fn()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def peak_gbps(device: torch.device) -> tuple[float, str]:
    name = torch.cuda.get_device_name(device)
    if name in PEAK_GBPS:
        return PEAK_GBPS[name], f"{name} datasheet"
    src = torch.empty(2**28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), 10, device)
    return 2 * src.numel() / seconds / 1e9, f"{name}, measured copy (not in the datasheet table)"


def lookup_case(mem, value_dim: int, tokens: int, dtype, device, generator):
    """The layer's lookup at `tokens` tokens: (table, rows, groups, scores) as it forms them."""
    items = mem.num_heads * mem.topk
    table = torch.randn(mem.num_values, value_dim, generator=generator).to(device, dtype)
    virtual = torch.randint(0, mem.expansion * mem.num_values, (tokens, items),
                            generator=generator)
    rows, groups = (virtual % mem.num_values).to(device), (virtual // mem.num_values).to(device)
    scores = torch.randn(tokens, items, mem.num_cores, generator=generator).to(device)
    return table, rows, groups, scores


def lookup_bytes(mem, value_dim: int, tokens: int, elem: int) -> tuple[int, int]:
    """Bytes the forward and the backward must move (see the header)."""
    items = tokens * mem.num_heads * mem.topk
    per_item = 8 + 8 + 4 * mem.num_cores                      # row, bag, scores
    forward = items * (value_dim * elem + per_item) + tokens * mem.expansion * value_dim * elem
    touched = min(items, mem.num_values) * value_dim * elem
    backward = (2 * items * value_dim * elem + items * per_item
                + mem.num_values * value_dim * elem + 2 * touched)
    return forward, backward


def run_lookup(kernel_pool, case, mem, train: bool):
    table, rows, groups, scores = case
    if not train:
        with torch.no_grad():
            return (lookup_pool(table, rows, groups, scores, mem.expansion, pool=kernel_pool),)
    table, scores = table.detach().requires_grad_(), scores.detach().requires_grad_()
    out = lookup_pool(table, rows, groups, scores, mem.expansion, pool=kernel_pool)
    out.backward(torch.ones_like(out))
    return out, table.grad, scores.grad


def topm_case(mem, tokens: int, device, generator):
    n, r = mem.keys_per_axis, mem.tucker_rank
    s_row, s_col = (torch.randn(tokens, mem.num_heads, n, r, generator=generator).to(device)
                    for _ in range(2))
    cores = torch.randn(mem.num_cores, mem.num_heads, r, r, generator=generator).to(device)
    u, t = (torch.randn(mem.num_heads, r, generator=generator).to(device) for _ in range(2))
    return s_row, s_col, cores, u, t


def max_error(got, want) -> float:
    """The largest error of any output, relative to that output's largest magnitude."""
    return max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30))
               .item() for g, w in zip(got, want))


def main(argv=None) -> None:
    args = parse_args(argv)
    from ultramem_megatron.kernels.lookup_pool import triton_pool_bags  # after the env check
    from ultramem_megatron.kernels.topm import triton_two_phase_topk

    mem = load_config(args.config).model.ultramem
    hidden = load_config(args.config).model.hidden_size
    value_dim = mem.resolved_value_dim(hidden)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype]
    elem = torch.finfo(dtype).bits // 8
    generator = torch.Generator().manual_seed(args.seed)
    cuda = device.type == "cuda"
    peak, peak_source = peak_gbps(device) if cuda else (None, "")
    print(f"# Kernel benchmark: {args.config} (N={mem.num_values:,} x D_v={value_dim}, "
          f"{mem.num_heads}x{mem.topk} items/token, E={mem.expansion}, c={mem.num_cores}, "
          f"n={mem.keys_per_axis} keys/axis, width {mem.candidates_per_axis}), table {args.dtype}, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU, Triton interpreter'}, torch "
          f"{torch.__version__}")
    if cuda:
        print(f"DRAM peak {peak:,.0f} GB/s ({peak_source}); median of {args.repeats}")
    print()
    print("| op | tokens | torch | Triton | torch / Triton | Triton GB/s | % of peak | rel. error |"
          if cuda else "| op | tokens | max error vs torch (relative) | selections equal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|" if cuda else "|---|---:|---:|---|")
    for tokens in args.tokens:
        case = lookup_case(mem, value_dim, tokens, dtype, device, generator)
        fwd_bytes, bwd_bytes = lookup_bytes(mem, value_dim, tokens, elem)
        for name, train, moved in (("lookup-pool fwd", False, fwd_bytes),
                                   ("lookup-pool fwd+bwd", True, fwd_bytes + bwd_bytes)):
            want = run_lookup(pool_bags, case, mem, train)
            got = run_lookup(triton_pool_bags, case, mem, train)
            error = max_error(got, want)
            if not cuda:
                print(f"| {name} | {tokens} | {error:.2e} | |")
                continue
            ref = timed(lambda: run_lookup(pool_bags, case, mem, train), args.repeats, device)
            ker = timed(lambda: run_lookup(triton_pool_bags, case, mem, train), args.repeats,
                        device)
            rate = moved / ker / 1e9
            print(f"| {name} | {tokens} | {ref * 1e3:.3f} ms | {ker * 1e3:.3f} ms | "
                  f"{ref / ker:.2f}x | {rate:,.0f} | {100 * rate / peak:.0f} % | {error:.1e} |")
        del case
        inputs = topm_case(mem, tokens, device, generator)
        args_topm = (*inputs, mem.candidates_per_axis, mem.topk)
        with torch.no_grad():
            want, got = two_phase_topk(*args_topm), triton_two_phase_topk(*args_topm)
        same = f"{(want[0] == got[0]).float().mean().item():.4f}"
        error = max_error(got[1:], want[1:]) if bool((want[0] == got[0]).all()) else float("nan")
        if not cuda:
            print(f"| top-m | {tokens} | {error:.2e} | {same} |")
            continue
        with torch.no_grad():
            ref = timed(lambda: two_phase_topk(*args_topm), args.repeats, device)
            ker = timed(lambda: triton_two_phase_topk(*args_topm), args.repeats, device)
        print(f"| top-m (equal: {same}) | {tokens} | {ref * 1e3:.3f} ms | {ker * 1e3:.3f} ms | "
              f"{ref / ker:.2f}x | | | {error:.1e} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
