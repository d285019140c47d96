"""Memory-parallel UltraMem: bytes communicated per token (counted) beside the paper's formulas,
step time at P = 1, 2, 4, and how much of the last exchange the overlap hides.

    python scripts/bench_memory_parallel.py [--tokens 1024] [--quick]

Runs itself under torchrun (gloo) once per P; each worker builds one sharded UltraMem layer
(TP = 1, memory-parallel size P), counts the bytes every collective sends from its rank, times
forward+backward, and times the forward with a stand-in for the blocks between a span's ends
computing while the last all-to-all is in flight.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 256
MEMORY = dict(num_keys=64, key_dim=64, topk=16, num_heads=2, value_dim=128, expansion=4,
              num_cores=2)   # N = 4096 rows, k = 32 items per token, E * D_v = 512


# ------------------------------------------------------------------------------------ counting

class ByteCounter:
    """Wraps torch.distributed collectives: bytes this rank sends, per phase, and the time the
    caller spends blocked on communication (blocking calls plus wait() on async ones)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist, self.phase, self.sent, self.exposed = dist, "forward", {}, 0.0
        for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single",
                     "all_reduce"):
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _add(self, nbytes: float) -> None:
        self.sent[self.phase] = self.sent.get(self.phase, 0.0) + nbytes

    def _wrap(self, name, original):
        counter = self

        def call(*args, **kwargs):
            group = kwargs.get("group")
            size = counter.dist.get_world_size(group)
            if name == "all_to_all_single":
                out, inp = args[0], args[1]
                in_splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
                rank = counter.dist.get_rank(group)
                row = inp[0].numel() * inp.element_size() if inp.shape[0] else 0
                rows = (sum(in_splits) - in_splits[rank] if in_splits is not None
                        else inp.shape[0] * (size - 1) // size)
                counter._add(rows * row)
            elif name == "all_gather_into_tensor":
                counter._add(args[1].numel() * args[1].element_size() * (size - 1))
            elif name == "reduce_scatter_tensor":
                counter._add(args[1].numel() * args[1].element_size() * (size - 1) / size)
            else:  # all_reduce: a ring sends 2 (P-1)/P of the tensor
                counter._add(args[0].numel() * args[0].element_size() * 2 * (size - 1) / size)
            start = time.perf_counter()
            work = original(*args, **kwargs)
            if kwargs.get("async_op"):
                return TimedWork(work, counter)
            counter.exposed += time.perf_counter() - start
            return work

        return call


class TimedWork:
    def __init__(self, work, counter: ByteCounter):
        self.work, self.counter = work, counter

    def wait(self):
        start = time.perf_counter()
        result = self.work.wait()
        self.counter.exposed += time.perf_counter() - start
        return result


# -------------------------------------------------------------------------------------- worker

def build_layer(mode: str, overlap: bool):
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ultramem_megatron.memory import UltraMemConfig, UltraMemLayer
    from ultramem_megatron.parallel.sharded_values import ShardedValueExpansion

    config = TransformerConfig(num_layers=4, hidden_size=HIDDEN, num_attention_heads=4)
    torch.manual_seed(0)
    return UltraMemLayer(config, UltraMemConfig(**MEMORY), ModuleSpec(
        module=ShardedValueExpansion, params={"mode": mode, "overlap": overlap}))


def stand_in_blocks(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """What runs between a span's first and last block: dense FFN-sized matmuls."""
    for up, down in weights:
        x = x + torch.relu(x @ up) @ down
    return x


def worker(args) -> dict:
    from megatron.core import parallel_state as ps

    from ultramem_megatron import megatron_compat

    megatron_compat.initialize_distributed(1, seed=0, memory_parallel_size=int(os.environ["WORLD_SIZE"]))
    counter = ByteCounter()
    size, rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    seq = args.tokens // 4
    hidden = torch.randn(seq, 4, HIDDEN, generator=torch.Generator().manual_seed(rank))
    weights = [(torch.randn(HIDDEN, 4 * HIDDEN) * 0.02, torch.randn(4 * HIDDEN, HIDDEN) * 0.02)
               for _ in range(args.blocks)]
    results = {}
    for mode in ("value_dim", "row"):
        layer = build_layer(mode, overlap=True)
        # Bytes per token, forward and backward.
        counter.sent = {}
        counter.phase = "forward"
        out, aux = layer(hidden)
        counter.phase = "backward"
        (out.square().mean() + aux).backward()
        tokens = hidden.shape[0] * hidden.shape[1]
        sent = {phase: nbytes / tokens for phase, nbytes in counter.sent.items()}
        # Step time: forward + backward.
        times = []
        for _ in range(args.repeats):
            torch.distributed.barrier()
            start = time.perf_counter()
            out, aux = layer(hidden)
            (out.square().mean() + aux).backward()
            times.append(time.perf_counter() - start)
        # Overlap: the last exchange blocking vs in flight while the stand-in blocks compute.
        overlap = {}
        for name, flag in (("blocking", False), ("overlapped", True)):
            layer.values.overlap = flag
            spans, exposed = [], []
            for _ in range(args.repeats):
                counter.exposed = 0.0
                torch.distributed.barrier()
                start = time.perf_counter()
                with torch.no_grad():
                    finish = layer.start(hidden)
                    stand_in_blocks(hidden.view(tokens, HIDDEN), weights)
                    finish()
                spans.append(time.perf_counter() - start)
                exposed.append(counter.exposed)
            overlap[name] = {"span_s": statistics.median(spans),
                             "comm_exposed_s": statistics.median(exposed)}
        results[mode] = {"bytes_per_token": sent, "step_s": statistics.median(times),
                         "overlap": overlap}
    return results


# ------------------------------------------------------------------------------------ formulas

def formulas(mode: str, size: int) -> dict:
    """Forward bytes per token. 'ours': this code's tensors (int64 addresses, fp32 scores per
    core, IVE's E*D_v-wide pooled output; row mode: expected value for uniform addresses);
    'paper': the v1 paper's formulas with int32 indices, bf16 scores and values, one score per
    item and a D_v-wide output (no IVE), one returned row per item in row mode."""
    m = MEMORY["topk"] * MEMORY["num_heads"]
    cores, dim, exp = MEMORY["num_cores"], MEMORY["value_dim"], MEMORY["expansion"]
    if mode == "value_dim":
        ours = m * (2 * 8 + cores * 4) * (size - 1) + exp * dim * 4 * (size - 1) / size
        paper = 4 * m * (size - 1) + 2 * m * (size - 1) + 2 * dim * (size - 1) / size
    else:
        # Out: each remote item's local row and bag (int64) and scores. Back: one weighted partial
        # sum per (token, group, owner) cell holding an item; with k items uniform over E*P cells
        # the expected number of remote occupied cells is E (P-1) (1 - (1 - 1/(E P))^k).
        cells = exp * (size - 1) * (1 - (1 - 1 / (exp * size)) ** m)
        ours = m * (size - 1) / size * (2 * 8 + cores * 4) + cells * dim * 4
        paper = 4 * m * (size - 1) / size + 2 * m * dim * (size - 1) / size
    return {"ours": ours, "paper": paper}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    parser.add_argument("--blocks", type=int, default=2, help="stand-in blocks inside the span")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="1,2,4", help="memory-parallel sizes P")
    parser.add_argument("--quick", action="store_true", help="256 tokens, 2 repeats")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats = 256, 2
    if args.worker:
        result = worker(args)
        if torch.distributed.get_rank() == 0:
            Path(args.worker).write_text(json.dumps(result))
        return

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in map(int, args.sizes.split(",")):
            out = Path(tmp, f"p{size}.json")
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node", str(size), __file__, "--worker", str(out),
                       "--tokens", str(args.tokens), "--blocks", str(args.blocks),
                       "--repeats", str(args.repeats)]
            env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // size))
            subprocess.run(command, cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            runs[size] = json.loads(out.read_text())

    print(f"UltraMem layer, TP = 1: D = {HIDDEN}, N = {MEMORY['num_keys'] ** 2}, "
          f"D_v = {MEMORY['value_dim']}, E = {MEMORY['expansion']}, "
          f"k = {MEMORY['topk'] * MEMORY['num_heads']} items/token, h = {MEMORY['num_cores']} "
          f"cores; {args.tokens} tokens per rank; fp32 on CPU, gloo")
    print()
    print("bytes sent per token by one rank (counted), beside the formulas (forward)")
    print(f"{'mode':<10}{'P':>3}{'fwd':>10}{'bwd':>10}{'ours fwd':>10}{'paper fwd':>11}"
          f"{'step/P=1':>10}")
    for mode in ("value_dim", "row"):
        base = runs[min(runs)][mode]["step_s"]
        for size, result in runs.items():
            r = result[mode]
            sent, formula = r["bytes_per_token"], formulas(mode, size)
            ours = f"{formula['ours']:.0f}"
            print(f"{mode:<10}{size:>3}{sent.get('forward', 0):>10.0f}"
                  f"{sent.get('backward', 0):>10.0f}{ours:>10}{formula['paper']:>11.0f}"
                  f"{r['step_s'] / base:>10.2f}")
    print()
    print(f"forward time blocked on communication, with {args.blocks} stand-in blocks between "
          "the span's ends (medians); overlapped = last exchange in flight across them")
    print(f"{'mode':<10}{'P':>3}{'exposed blocking':>18}{'exposed overlapped':>20}{'hidden':>8}"
          f"{'span overlapped/blocking':>26}")
    for mode in ("value_dim", "row"):
        for size, result in runs.items():
            if size == 1:
                continue
            o = result[mode]["overlap"]
            blocking = o["blocking"]["comm_exposed_s"]
            exposed = o["overlapped"]["comm_exposed_s"]
            hidden = 1 - exposed / blocking if blocking > 0 else float("nan")
            print(f"{mode:<10}{size:>3}{blocking * 1e3:>16.2f}ms{exposed * 1e3:>18.2f}ms"
                  f"{hidden:>8.0%}{o['overlapped']['span_s'] / o['blocking']['span_s']:>26.2f}")


if __name__ == "__main__":
    main()
