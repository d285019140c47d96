"""Benchmark of one UltraMem layer against PKM, megatron-core MoE and a dense MLP at one hidden size."""

# Usage:  python scripts/bench_layer.py            (full run on the CPU, ~70 s on 2 idle cores)
#         python scripts/bench_layer.py --quick    (smoke run, ~10 s)
#         python scripts/bench_layer.py --compile-selection   (adds UltraMem with compiled retrieval)
#         python scripts/bench_layer.py --device cuda --dtype bf16 --tokens 1,256,4096,65536
#                                                  (on a GPU: Triton memory kernels, and the torch
#                                                  ops side by side; scripts/gpu_check.sh runs this)
#
# Sizing (defaults D=512):
#   UltraMem  n=128 keys per axis -> N=n^2 values of width D_v=D/2 (4.2M at D=512), H=2, m=32,
#             E=4, D_k=D/4, r=h=2 (the released 227M config's ratios: D_k=D/4, D_v=D/2).
#   PKM       heads=4, k=32, d_q=D; num_keys chosen so its total parameters are closest to
#             UltraMem's (values of width D).
#   MoE       top-2; expert width F_e = F/2 (so its activated FLOPs ~ UltraMem's as well) and the
#             number of experts chosen so its total parameters are closest to UltraMem's.
#   Dense     megatron MLP with ffn width F chosen so 4*D*F ~ UltraMem's activated FLOPs per token.
# Timing: forward = torch.no_grad() in eval mode (inference); forward+backward = train mode, the
# loss is sum(out * g) for a fixed random g (+ the layer's aux loss), grads reset to None each
# time. Layers are interleaved inside every repeat so that all of them see the same machine noise;
# the median over repeats is reported. PKM's query BatchNorm always uses running statistics
# (eval), because a training-mode BatchNorm cannot take a 1-token batch.
# Device and precision: all four layers are built on the CPU from one TransformerConfig (so both
# devices start from the same initialization) and moved to --device. --dtype bf16 sets that
# config's params_dtype (and bf16=True, and an fp32 MoE router, as ultramem_megatron.model.gpt
# does for training): parameters, inputs and activations are bf16 in every layer, no autocast.
# On cuda every timed call is bracketed by torch.cuda.synchronize(), so a sample is the call's
# full device time plus launch overhead.

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed")
warnings.filterwarnings("ignore", message="moe_ffn_hidden_size is not set")
warnings.filterwarnings("ignore", message="full scope is deprecated")

from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from ultramem_megatron.kernels.choice import uses_triton  # noqa: E402
from ultramem_megatron.megatron_compat import (  # noqa: E402
    build_dense_mlp, build_moe_layer, initialize_single_process)
from ultramem_megatron.memory import (  # noqa: E402
    PKMConfig, ProductKeyMemory, UltraMemConfig, UltraMemLayer)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hidden", type=int, default=512, help="D")
    p.add_argument("--num-keys", type=int, default=128, help="UltraMem n (N = n^2 values)")
    p.add_argument("--key-dim", type=int, default=None, help="UltraMem D_k (default D/4)")
    p.add_argument("--value-dim", type=int, default=None, help="UltraMem D_v (default D/2)")
    p.add_argument("--topk", type=int, default=32, help="UltraMem m")
    p.add_argument("--heads", type=int, default=2, help="UltraMem H")
    p.add_argument("--expansion", type=int, default=4, help="UltraMem E")
    p.add_argument("--pkm-heads", type=int, default=4)
    p.add_argument("--pkm-key-dim", type=int, default=None, help="PKM d_q (default D)")
    p.add_argument("--pkm-topk", type=int, default=32)
    p.add_argument("--pkm-num-keys", type=int, default=None, help="default: match UltraMem params")
    p.add_argument("--moe-topk", type=int, default=2)
    p.add_argument("--moe-ffn", type=int, default=None, help="expert width (default dense F/2)")
    p.add_argument("--moe-experts", type=int, default=None, help="default: match UltraMem params")
    p.add_argument("--dispatcher", choices=["alltoall", "allgather"], default="alltoall")
    p.add_argument("--dense-ffn", type=int, default=None, help="default: match UltraMem FLOPs")
    p.add_argument("--tokens", type=str, default="1,16,256,1024,4096", help="comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="parameter and activation dtype of all four layers")
    p.add_argument("--kernel", choices=["auto", "torch", "triton"], default="auto",
                   help="UltraMem's memory ops (model.ultramem.kernel): auto = Triton on cuda")
    p.add_argument("--compile-selection", action="store_true",
                   help="also time UltraMem with its retrieval under torch.compile")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the forward floor (UltraMem's own mm and top-k calls replayed alone)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: D=128, n=32, PKM k=16, tokens 1,16,256, 1 warmup, 3 repeats")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.device == "cpu" and args.kernel == "triton":
        p.error("--kernel triton needs --device cuda (on the CPU Triton only runs interpreted: "
                "scripts/bench_kernels.py checks it there)")
    if args.quick:
        args.hidden, args.num_keys, args.pkm_topk, args.tokens = 128, 32, 16, "1,16,256"
        args.warmup, args.repeats = 1, 3
    args.key_dim = args.key_dim or args.hidden // 4
    args.value_dim = args.value_dim or args.hidden // 2
    args.pkm_key_dim = args.pkm_key_dim or args.hidden
    args.tokens = [int(t) for t in args.tokens.split(",")]
    return args


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- analytic FLOPs per token (forward; 2 FLOPs per multiply-add) ---------------------------

def ultramem_flops(c: UltraMemConfig, d: int, d_v: int) -> dict[str, int]:
    n_axis, r, w = c.keys_per_axis, c.tucker_rank, c.candidates_per_axis
    return {
        "query W_q": 2 * d * 2 * c.key_dim,
        "key scoring": 2 * 2 * c.num_heads * n_axis * r * c.key_dim,
        "rank-1 filter": 2 * 2 * c.num_heads * n_axis * r,
        "phase-2 grid": 2 * c.num_heads * (w * r * r + w * w * r),
        "core scores": 2 * c.num_cores * c.num_heads * c.topk * r * r,
        "pooling": 2 * c.num_heads * c.topk * d_v,
        "W_out": 2 * c.expansion * d_v * d,
    }


def pkm_flops(c: PKMConfig, d: int) -> dict[str, int]:
    return {
        "query W_q": 2 * d * c.num_heads * c.key_dim,
        "key scoring": 2 * c.num_heads * c.num_keys * c.key_dim,
        "top-k grid": c.num_heads * c.topk * c.topk,
        "pooling": 2 * c.num_heads * c.topk * d,
    }


def moe_flops(d: int, experts: int, ffn: int, topk: int) -> dict[str, int]:
    return {"router": 2 * d * experts, f"{topk} experts": topk * 4 * d * ffn}


def dense_flops(d: int, ffn: int) -> dict[str, int]:
    return {"fc1+fc2": 4 * d * ffn}


# ---- analytic parameter bytes touched per token --------------------------------------------

def touched_bytes(kind: str, info: dict, tokens: int) -> float:
    """Parameter bytes the forward reads for a batch of `tokens` tokens, divided by tokens.

    memory layers: every non-value parameter (W_q, norms/BN, all keys, cores, W_out) once per
                   batch + min(tokens * items per token, N) value rows, i.e. as if the lookups hit
                   distinct rows until the table is exhausted (an upper bound).
    MoE:           router + min(topk * tokens, experts) whole experts.
    dense:         all weights.
    Buffers (the UltraMem virtual-address permutation, BN running stats) are not counted.
    """
    elem = info["elem"]
    if kind in ("ultramem", "pkm"):
        rows = min(tokens * info["items"], info["rows"])
        return (info["dense_params"] + rows * info["row_width"]) * elem / tokens
    if kind == "moe":
        experts = min(info["topk"] * tokens, info["experts"])
        return (info["router_params"] + experts * info["expert_params"]) * elem / tokens
    return info["params"] * elem / tokens


# ---- timing -----------------------------------------------------------------------------------

def run_forward(layer, x):
    with torch.no_grad():
        layer(x)


def run_train(layer, x, grad_out, aux_in_loss):
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    out, extra = layer(x)
    loss = (out * grad_out).sum()
    if aux_in_loss and extra is not None:
        loss = loss + extra
    loss.backward()


def set_mode(layer, training: bool) -> None:
    layer.train(training)
    if isinstance(layer, ProductKeyMemory):
        layer.query_bn.eval()


def time_cell(layers: dict, tokens: int, hidden: int, train: bool, warmup: int, repeats: int,
              generator: torch.Generator, device: torch.device,
              dtype: torch.dtype) -> dict[str, float]:
    """Median seconds per call of every layer at this token count; layers interleaved."""
    x = torch.randn(tokens, 1, hidden, generator=generator).to(device, dtype).requires_grad_(train)
    g = torch.randn(tokens, 1, hidden, generator=generator).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    calls = {}
    for name, (layer, aux) in layers.items():
        set_mode(layer, train)
        calls[name] = ((lambda l=layer, a=aux: run_train(l, x, g, a)) if train
                       else (lambda l=layer: run_forward(l, x)))
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples = {name: [] for name in layers}
    for _ in range(repeats):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


class ReplayedOps(torch.nn.Module):
    """A layer's forward cut down to some of its own aten calls, replayed on the tensors they got.

    The first call with an input runs the layer once under a dispatch mode that records the
    calls to `ops` (with their real arguments: the layer's query, keys and scores); every call
    then replays just those. For UltraMem with ops = mm + topk this is a floor for any torch
    implementation of the same selection: its GEMMs (W_q, the full-rank key scores, W_out: the
    dense MLP's FLOPs, by the sizing) and its three top-k calls, with no gather, no phase-2 grid,
    no lookup. Forward (no_grad) only."""

    def __init__(self, layer: torch.nn.Module, ops: tuple):
        super().__init__()
        self.layer, self.ops = layer, ops
        self._recorded: tuple | None = None  # (input key, [(op, args, kwargs)])

    def forward(self, x: torch.Tensor) -> tuple[None, None]:
        key = (x.data_ptr(), tuple(x.shape))
        if self._recorded is None or self._recorded[0] != key:
            self._recorded = (key, self._record(x))
        for op, args, kwargs in self._recorded[1]:
            op(*args, **kwargs)
        return None, None

    def _record(self, x: torch.Tensor) -> list:
        calls, ops = [], self.ops

        class Recorder(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in ops:
                    calls.append((func, args, kwargs or {}))
                return func(*args, **(kwargs or {}))

        with torch.no_grad(), Recorder():
            self.layer(x)
        if not calls:
            raise RuntimeError(f"the layer's forward made none of the calls {ops}")
        return calls


# ---- main -------------------------------------------------------------------------------------

def ultramem_variant(layer: UltraMemLayer, kernel: str | None = None,
                     compiled: bool = False) -> UltraMemLayer:
    """A copy of the layer (same weights) on other memory ops, or with torch.compile'd retrieval."""
    variant = copy.deepcopy(layer)
    if kernel is not None:
        variant.retrieval.cfg = dataclasses.replace(variant.retrieval.cfg, kernel=kernel)
        variant.values.kernel = kernel
    if compiled:
        variant.retrieval = torch.compile(variant.retrieval, dynamic=False)
    return variant


def ratios(cells: dict, other: str) -> list[tuple[int, float]]:
    """(T, UltraMem time / other's time) for every token count."""
    return [(t, med["ultramem"] / med[other]) for t, med in cells.items()]


def closest(target: float, candidates, size) -> int:
    return min(candidates, key=lambda c: abs(size(c) - target))


def load_now() -> str:
    """1-minute load average, the sign of other processes competing for the cores."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def fmt_int(v: float) -> str:
    return f"{v:,.0f}"


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def machine(args) -> str:
    """The header's device part: threads and CPU model, or the GPU and its CUDA version."""
    if args.device == "cuda":
        return (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), "
                f"{args.threads} host threads")
    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    return f"{args.threads} threads, {cpu}"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    initialize_single_process(args.seed)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    bf16 = dtype == torch.bfloat16
    d = args.hidden
    config = TransformerConfig(
        num_layers=1, hidden_size=d, num_attention_heads=max(1, d // 64), ffn_hidden_size=4 * d,
        add_bias_linear=False, moe_router_dtype="fp32" if bf16 else None,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        use_cpu_initialization=True, params_dtype=dtype, bf16=bf16,
        moe_token_dispatcher_type=args.dispatcher)

    um_cfg = UltraMemConfig(num_keys=args.num_keys, key_dim=args.key_dim, topk=args.topk,
                            value_dim=args.value_dim, num_heads=args.heads,
                            expansion=args.expansion, kernel=args.kernel)
    ultramem = UltraMemLayer(config, um_cfg)
    um_params = numel(ultramem)
    um_values = ultramem.values.values.numel()
    um_f = ultramem_flops(um_cfg, d, args.value_dim)
    um_total_flops = sum(um_f.values())

    def pkm_config(num_keys: int) -> PKMConfig:
        return PKMConfig(num_keys=num_keys, key_dim=args.pkm_key_dim, topk=args.pkm_topk,
                         num_heads=args.pkm_heads)

    def pkm_size(num_keys: int) -> int:  # W_q + BN affine + keys + values
        h, q = args.pkm_heads, args.pkm_key_dim
        return d * h * q + 2 * h * q + h * num_keys * q + num_keys ** 2 * d

    pkm_keys = args.pkm_num_keys or closest(um_params, range(args.pkm_topk, 4096), pkm_size)
    pkm_cfg = pkm_config(pkm_keys)
    pkm = ProductKeyMemory(config, pkm_cfg)
    pkm_params = numel(pkm)
    pkm_f = pkm_flops(pkm_cfg, d)

    dense_ffn = args.dense_ffn or max(1, round(um_total_flops / (4 * d)))
    moe_ffn = args.moe_ffn or max(1, round(dense_ffn / args.moe_topk))
    moe_experts = args.moe_experts or closest(
        um_params, range(max(args.moe_topk, 2), 4097), lambda e: e * d + e * 2 * d * moe_ffn)
    moe_config = dataclasses.replace(config, ffn_hidden_size=moe_ffn)  # experts inherit it
    moe = build_moe_layer(moe_config, moe_experts, args.moe_topk)
    moe_params = numel(moe)
    moe_router = numel(moe.router)
    moe_f = moe_flops(d, moe_experts, moe_ffn, args.moe_topk)

    dense_config = dataclasses.replace(config, ffn_hidden_size=dense_ffn)
    dense = build_dense_mlp(dense_config)
    dense_params = numel(dense)
    dense_f = dense_flops(d, dense_ffn)

    elem = torch.finfo(config.params_dtype).bits // 8
    info = {
        "ultramem": {"elem": elem, "dense_params": um_params - um_values,
                     "items": args.heads * args.topk, "rows": um_cfg.num_values,
                     "row_width": args.value_dim},
        "pkm": {"elem": elem, "dense_params": pkm_params - pkm.values.numel(),
                "items": args.pkm_heads * args.pkm_topk, "rows": pkm_cfg.num_values,
                "row_width": d},
        "moe": {"elem": elem, "router_params": moe_router, "topk": args.moe_topk,
                "experts": moe_experts, "expert_params": (moe_params - moe_router) // moe_experts},
        "dense": {"elem": elem, "params": dense_params},
    }
    names = {"ultramem": "UltraMem", "pkm": "PKM", "moe": "MoE", "dense": "Dense MLP"}
    flops = {"ultramem": um_f, "pkm": pkm_f, "moe": moe_f, "dense": dense_f}
    params = {"ultramem": um_params, "pkm": pkm_params, "moe": moe_params, "dense": dense_params}

    print(f"# Layer benchmark: D={d}, {args.dtype}, {machine(args)}, torch "
          f"{torch.__version__}, {'quick' if args.quick else 'full'} run, median of "
          f"{args.repeats} after {args.warmup} warmup, layers interleaved per repeat")
    print()
    print("## Layers")
    print(f"- UltraMem: n={args.num_keys} (N={um_cfg.num_values:,} values x D_v={args.value_dim}), "
          f"D_k={args.key_dim}, H={args.heads}, m={args.topk}, phase-1 width "
          f"{um_cfg.candidates_per_axis}, E={args.expansion}, r={um_cfg.tucker_rank}, "
          f"h={um_cfg.num_cores}, {um_cfg.keys_per_axis} keys per axis")
    print(f"- PKM: num_keys={pkm_keys} (N={pkm_cfg.num_values:,} values x D={d}), d_q="
          f"{args.pkm_key_dim}, heads={args.pkm_heads}, k={args.pkm_topk}, query BatchNorm")
    print(f"- MoE (megatron-core MoELayer, local spec, SequentialMLP, {args.dispatcher} "
          f"dispatcher): {moe_experts} experts x ffn {moe_ffn}, top-{args.moe_topk}, GeLU")
    print(f"- Dense MLP (megatron-core MLP, local spec): ffn {dense_ffn}, GeLU")
    print()
    print("## Parameters")
    print("| layer | total params | of which sparse (values / experts) | dense rest |")
    print("|---|---:|---:|---:|")
    sparse = {"ultramem": um_values, "pkm": pkm.values.numel(), "moe": moe_params - moe_router,
              "dense": 0}
    for k in names:
        print(f"| {names[k]} | {params[k]:,} ({params[k] / um_params:.2f}x) | {sparse[k]:,} | "
              f"{params[k] - sparse[k]:,} |")
    print()
    print("## Analytic forward FLOPs per token (2 per multiply-add)")
    print("Not counted: norms, BatchNorm, activations, softmax, top-k selections, MoE token "
          "permutation, UltraMem's per-batch key normalization and aux-loss SVD.")
    print("| layer | FLOPs / token | ratio to UltraMem | breakdown |")
    print("|---|---:|---:|---|")
    for k in names:
        total = sum(flops[k].values())
        parts = ", ".join(f"{part} {v:,}" for part, v in flops[k].items())
        print(f"| {names[k]} | {total:,} | {total / um_total_flops:.2f}x | {parts} |")
    print()
    print(f"## Parameter bytes touched per token by one forward ({args.dtype}), for a batch of T "
          "tokens")
    print("memory layers: (all non-value parameters + min(T * items/token, N) value rows) / T, "
          "i.e. assuming the lookups hit distinct rows until the table is exhausted (an upper "
          f"bound); items/token = H*m = {info['ultramem']['items']} for UltraMem "
          f"(rows of D_v={args.value_dim}), heads*k = {info['pkm']['items']} for PKM (rows of "
          f"D={d}). MoE: (router + min({args.moe_topk}*T, experts) whole experts) / T. "
          "Dense: all weights / T. Buffers not counted.")
    print("| T | " + " | ".join(names.values()) + " |")
    print("|---:|" + "---:|" * len(names))
    for t in args.tokens:
        vals = {k: touched_bytes(k, info[k], t) for k in names}
        print(f"| {t} | " + " | ".join(
            f"{fmt_int(vals[k])} ({vals[k] / vals['ultramem']:.2f}x)" for k in names) + " |")
    print()
    sys.stdout.flush()

    layers = {"ultramem": (ultramem.to(device), True), "pkm": (pkm.to(device), True),
              "moe": (moe.to(device), False), "dense": (dense.to(device), False)}
    if uses_triton(args.kernel, device.type):  # the same weights on the torch ops, side by side
        layers["ultramem_torch"] = (ultramem_variant(ultramem, kernel="torch"), True)
        names["ultramem_torch"] = "UltraMem (torch ops)"
    if args.compile_selection:
        layers["ultramem_compiled"] = (ultramem_variant(ultramem, compiled=True), True)
        names["ultramem_compiled"] = "UltraMem (compiled retrieval)"
    floor = (None if args.no_floor or uses_triton(args.kernel, device.type)
             else ReplayedOps(ultramem, (torch.ops.aten.mm.default, torch.ops.aten.topk.default)))
    print(f"UltraMem's memory ops: {'Triton kernels' if uses_triton(args.kernel, device.type) else 'torch'}"
          f" (--kernel {args.kernel})")
    print()
    generator = torch.Generator().manual_seed(args.seed)
    load_before = load_now()
    start = time.perf_counter()
    for train, title in ((False, "Forward (no_grad, eval)"),
                         (True, "Forward + backward (train)")):
        print(f"## {title}: median time per call, and ratio to UltraMem (lower = faster)")
        timed, shown = dict(layers), dict(names)
        if floor is not None and not train:
            timed["floor"], shown["floor"] = (floor, False), "UltraMem floor (its mm + top-k)"
        print("| T | " + " | ".join(shown.values()) + " |")
        print("|---:|" + "---:|" * len(shown))
        cells = {}
        for t in args.tokens:
            med = cells[t] = time_cell(timed, t, d, train, args.warmup, args.repeats, generator,
                                       device, dtype)
            print(f"| {t} | " + " | ".join(
                f"{fmt_time(med[k])} ({med[k] / med['ultramem']:.2f}x)" for k in shown) + " |")
            sys.stdout.flush()
        print(f"UltraMem / dense: {', '.join(f'{t}: {r:.2f}x' for t, r in ratios(cells, 'dense'))}"
              f"; UltraMem / MoE: {', '.join(f'{t}: {r:.2f}x' for t, r in ratios(cells, 'moe'))}")
        if "floor" in timed:
            print("Floor (UltraMem's own mm and top-k calls replayed alone, a lower bound for the "
                  "torch path) / dense: "
                  + ", ".join(f"{t}: {m['floor'] / m['dense']:.2f}x" for t, m in cells.items())
                  + "; / MoE: "
                  + ", ".join(f"{t}: {m['floor'] / m['moe']:.2f}x" for t, m in cells.items()))
        print()
    print(f"timed section: {time.perf_counter() - start:.1f} s; 1-min load average before "
          f"{load_before} (other processes: well under 1 on a quiet machine; near or above 1, "
          f"small-T timings are inflated), after {load_now()} (includes this run's "
          f"{args.threads} threads)")


if __name__ == "__main__":
    main()
