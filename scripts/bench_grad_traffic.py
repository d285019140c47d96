"""Bytes each rank sends per optimizer step for gradient reduction, the distributed optimizer's
parameter gather and the memory-parallel exchange: analytic for a config over layouts, and
counted on gloo ranks beside the same formula.

    python scripts/bench_grad_traffic.py [configs/ultramem_151m.yaml] [--gpus 8,32,128]
    python scripts/bench_grad_traffic.py --count      # tiny model on 2 gloo ranks, counted

Costs are megatron's ring collectives, per rank, in bytes *sent* (a ring rank receives as many):
a reduce-scatter or an all-gather of a B-byte buffer over n ranks sends (n-1)/n B, an all-reduce
2 (n-1)/n B. megatron's DDP reduces gradients in fp32 (grad_reduce_in_fp32) in contiguous
buffers: the dense one over the data-parallel group (DP = world / TP ranks), the value tables
(expert-style parameters, allreduce=False) over the expert-data-parallel group (DP / P ranks
holding the same shard); with the distributed optimizer that is a reduce-scatter, and after the
step an all-gather of the params-dtype parameter buffer; without it, an all-reduce. The buffers
are padded as megatron pads them (64-element parameter starts, bucket ends to lcm(n, 128)).
Parameter counts come from the model built on the meta device; the memory-parallel exchange from
the per-token formulas of docs/parallelism.md (int64 addresses, fp32 per-core scores, pooled
values in the table's dtype), times the tokens a rank sees per step (global batch x seq / DP) and
the memory layers. Row mode's exchange is an expectation (uniform addresses), not exact.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FP32 = 4   # grad_reduce_in_fp32: every gradient buffer is fp32
DEFAULT_BUCKET = 40_000_000   # megatron's bucket size with overlap_grad_reduce: max(4e7, 1e6 DP)


# ------------------------------------------------------------------------------------ layouts

@dataclass(frozen=True)
class Layout:
    world: int
    tp: int = 1
    mp: int = 1                       # memory-parallel size P
    mode: str = "value_dim"
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False

    @property
    def gather_passes(self) -> int:
        """How often the distributed optimizer gathers the parameter buffers per step. Measured
        (--count) on megatron-core 0.16.1 and 0.19.2: the optimizer is a chain of two distributed
        optimizers (dense, and the expert-style value tables), and without overlap_param_gather
        each one's step_with_ready_grads calls start_param_sync() on the whole model chunk, dense
        and expert buffers alike: every buffer is gathered twice. With overlap_param_gather the
        forward pre-hooks gather each bucket once."""
        if not self.distributed_optimizer:
            return 0
        return 1 if self.overlap_param_gather else 2

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def expert_dp(self) -> int:
        """Ranks holding the same value shard: the group its gradient is reduced over."""
        return self.dp // self.mp

    def name(self) -> str:
        mode = f" {self.mode}" if self.mp > 1 else ""
        return f"TP {self.tp}, P {self.mp}{mode}" + (", SP" if self.sequence_parallel else "")


@dataclass(frozen=True)
class Param:
    name: str
    numel: int                 # whole (TP = P = 1)
    tp_sharded: bool           # megatron's tensor_model_parallel: 1/t of it per rank
    value: bool                # a value table: 1/(t P) per rank, the expert-style buffer
    memory_replicated: bool    # replicated memory parameter (retrieval): gradients synced over TP


def param_inventory(run) -> list[Param]:
    """The model's parameters in module order (megatron's buffer order), built on the meta
    device in a world of one."""
    import torch

    from ultramem_megatron import megatron_compat
    from ultramem_megatron.model import build_model

    megatron_compat.initialize_single_process(run.train.seed)
    with torch.device("meta"):
        model = build_model(run.model, run.parallel)
    memory = {id(p) for layer in model.memory_layers() for p in layer.parameters()}
    return [Param(name, p.numel(), bool(getattr(p, "tensor_model_parallel", False)),
                  not getattr(p, "allreduce", True),
                  id(p) in memory and not getattr(p, "tensor_model_parallel", False))
            for name, p in model.named_parameters()]


def per_rank_numel(param: Param, layout: Layout) -> int:
    if param.value:
        return param.numel // (layout.tp * layout.mp)
    return param.numel // layout.tp if param.tp_sharded else param.numel


def buffer_numel(numels: list[int], group: int, distributed_optimizer: bool,
                 bucket_size) -> list[int]:
    """megatron's _ParamAndGradBuffer layout (0.16 and 0.19 alike): parameters in reverse order,
    each starting at a multiple of 64 (distributed optimizer), a new bucket once a bucket holds
    bucket_size elements, bucket ends padded to lcm(group, 128) -> the buckets' sizes."""
    def pad(n: int, divisor: int) -> int:
        return -(-n // divisor) * divisor

    buckets, start, index, end = [], 0, 0, 0
    for numel in reversed(numels):
        if distributed_optimizer:
            index = pad(index, 64)
        end = index + numel
        if bucket_size is not None and end - start >= bucket_size:
            bucket_end = pad(end, math.lcm(group, 128)) if distributed_optimizer else end
            buckets.append(bucket_end - start)
            start = index = bucket_end
        else:
            index = end
    if end > start:
        bucket_end = pad(end, math.lcm(group, 128)) if distributed_optimizer else end
        buckets.append(bucket_end - start)
    return buckets


def ring(numel_bytes: float, n: int, collective: str) -> float:
    """Bytes one rank sends in a ring collective over n ranks on a buffer of numel_bytes."""
    share = numel_bytes * (n - 1) / n
    return 2 * share if collective == "all_reduce" else share


def grad_traffic(params: list[Param], layout: Layout, param_bytes: int) -> dict:
    """Bytes one rank sends per optimizer step: {value, other} x {grad, gather}, plus the TP
    sum / average of replicated gradients (megatron's finalize_model_grads) under other."""
    bucket = max(DEFAULT_BUCKET, 1_000_000 * layout.dp) if layout.overlap_grad_reduce else None
    result = {}
    for part, group, chosen in (("value", layout.expert_dp, [p for p in params if p.value]),
                                ("other", layout.dp, [p for p in params if not p.value])):
        buckets = buffer_numel([per_rank_numel(p, layout) for p in chosen], group,
                               layout.distributed_optimizer, bucket)
        numel = sum(buckets)
        if layout.distributed_optimizer:
            grad = sum(ring(FP32 * b, group, "reduce_scatter") for b in buckets)
            gather = layout.gather_passes * sum(ring(param_bytes * b, group, "all_gather")
                                                for b in buckets)
        else:
            grad, gather = sum(ring(FP32 * b, group, "all_reduce") for b in buckets), 0.0
        result[part] = {"grad": grad, "gather": gather, "buffer_numel": numel,
                        "unpadded_numel": sum(per_rank_numel(p, layout) for p in chosen)}
    tp_sync = 0.0
    if layout.tp > 1:
        # memory retrieval parameters (averaged over TP; summed under SP), and under SP every
        # other replicated parameter (the norms, marked sequence_parallel): one all-reduce each.
        synced = [p for p in params if not p.value and not p.tp_sharded
                  and (p.memory_replicated or layout.sequence_parallel)]
        tp_sync = ring(FP32 * sum(p.numel for p in synced), layout.tp, "all_reduce")
    result["other"]["tp_sync"] = tp_sync
    result["value"]["tp_sync"] = 0.0
    return result


def exchange_per_token(memory, hidden: int, layout: Layout, table_bytes: int) -> tuple[float, float]:
    """(forward, backward) bytes one rank sends per token and memory layer for the memory-parallel
    exchange (docs/parallelism.md; D_v read as D_v / t)."""
    size = layout.mp
    if size == 1:
        return 0.0, 0.0
    items, cores, groups = memory.num_heads * memory.topk, memory.num_cores, memory.expansion
    width = memory.resolved_value_dim(hidden) // layout.tp
    if layout.mode == "value_dim":
        pooled = table_bytes * groups * width * (size - 1) / size       # all-to-all, both ways
        forward = items * (16 + 4 * cores) * (size - 1) + pooled       # gather addresses, scores
        backward = items * 4 * cores * (size - 1) + pooled             # scores' reduce-scatter
        return forward, backward
    cells = groups * (size - 1) * (1 - (1 - 1 / (groups * size)) ** items)   # expected
    sums = table_bytes * width * cells                                 # partial sums, both ways
    forward = items * (16 + 4 * cores) * (size - 1) / size + sums
    backward = items * 4 * cores * (size - 1) / size + sums
    return forward, backward


def exchange_per_step(run, layout: Layout, table_bytes: int, micro_batches: int | None = None
                      ) -> tuple[float, float]:
    """(forward, backward) exchange bytes per rank per optimizer step: tokens per rank (the TP
    group's tokens: global batch x seq / DP) x memory layers x the per-token bytes; row mode adds
    the per-forward count exchange (P x 2 int64)."""
    model, train = run.model, run.train
    if model.family != "ultramem" or layout.mp == 1:
        return 0.0, 0.0
    tokens = train.global_batch_size * model.seq_length // layout.dp
    layers = len(model.active_spans())
    forward, backward = exchange_per_token(model.ultramem, model.hidden_size, layout, table_bytes)
    counts = 0.0
    if layout.mode == "row":
        forwards = micro_batches or train.global_batch_size // (train.micro_batch_size * layout.dp)
        counts = forwards * layers * 16 * (layout.mp - 1)
    return tokens * layers * forward + counts, tokens * layers * backward


# ------------------------------------------------------------------------------------ analytic

def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def analytic_table(config: str, gpus: list[int], param_bytes: int = 2) -> str:
    """The markdown table: bytes per rank per optimizer step over layouts, GB."""
    from ultramem_megatron.config import load_config
    from ultramem_megatron.parallel.layout import layout_error

    run = load_config(config)
    params = param_inventory(run)
    memory = run.model.ultramem
    dim = memory.resolved_value_dim(run.model.hidden_size)
    values = sum(p.numel for p in params if p.value)
    step_tokens = run.train.global_batch_size * run.model.seq_length
    lines = [f"`{config}`: {values / 1e9:.3f} B value parameters in "
             f"{len(run.model.active_spans())} tables, "
             f"{sum(p.numel for p in params if not p.value) / 1e6:.1f} M others; "
             f"{step_tokens / 2**20:.0f} Mi tokens per step; bf16 parameters, fp32 gradient "
             f"buffers, distributed optimizer. GB sent per rank per optimizer step (a ring rank "
             f"receives as much). AG columns: today's default (overlap_param_gather off: megatron "
             f"gathers twice, see below); the last column with overlap_param_gather on (once).", "",
             "| GPUs | layout | DP / expert-DP | tokens/rank | value grad RS | value param AG | "
             "other grad | other param AG | exchange fwd+bwd | total | total, overlap AG |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for world in gpus:
        done = set()
        for tp in (1, 2):
            dp = world // tp
            for mp, mode in [(1, "value_dim"), (2, "value_dim"), (4, "value_dim"),
                             (8, "value_dim"), (8, "row"), (dp, "value_dim"), (dp, "row")]:
                if mp > dp or dp % mp or layout_error(mode, memory.num_values, dim, tp, mp):
                    continue
                key = (tp, mp, mode if mp > 1 else "")
                if key in done:
                    continue
                done.add(key)
                layout = Layout(world, tp, mp, mode)
                traffic = grad_traffic(params, layout, param_bytes)
                fwd, bwd = exchange_per_step(run, layout, param_bytes)
                v, o = traffic["value"], traffic["other"]
                total = v["grad"] + v["gather"] + o["grad"] + o["gather"] + o["tp_sync"] + fwd + bwd
                overlapped = total - (v["gather"] + o["gather"]) / 2
                lines.append(f"| {world} | {layout.name()} | {dp} / {layout.expert_dp} | "
                             f"{step_tokens // dp:,} | {gb(v['grad'])} | {gb(v['gather'])} | "
                             f"{gb(o['grad'] + o['tp_sync'])} | {gb(o['gather'])} | "
                             f"{gb(fwd + bwd)} | {gb(total)} | {gb(overlapped)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ counting

# The small model of tests/training/conftest.py (SMALL), one sequence per micro-batch
SMALL = ["model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
         "model.seq_length=32", "train.micro_batch_size=1", "train.global_batch_size=4",
         "train.log_interval=1000", "train.eval_interval=1000", "train.save_interval=1000",
         "train.max_steps=100", "train.threads=1", "train.async_save=false",
         "data.corpus=null", "data.subset_weights={}",
         'data.blend=[{prefix: data/built/fixture, source: "data/fixture/*.jsonl"}]']
COUNT_STEPS = 3   # counted: the last (steady state: the gather of the previous step's update)

COUNTED_LAYOUTS = [  # (ranks, overrides)
    (2, ["parallel.memory_parallel_size=1"]),
    (2, ["parallel.memory_parallel_size=2", "parallel.memory_parallel_mode=value_dim"]),
    (2, ["parallel.memory_parallel_size=2", "parallel.memory_parallel_mode=row"]),
    (2, ["parallel.tensor_model_parallel_size=2"]),
]


def _phase(tensor, buffers: dict) -> str | None:
    """Which DDP buffer a collective's tensor lives in: 'grad:value', 'gather:other', ..."""
    ptr = tensor.untyped_storage().data_ptr()
    return buffers.get(ptr)


class Counter:
    """Wraps torch.distributed's collectives (and megatron's module-level aliases of them):
    bytes this rank sends, by phase: 'grad:<part>' / 'gather:<part>' when the tensor is one of
    DDP's grad / param buffers (part value = the expert-style buffer), 'exchange:forward' /
    'exchange:backward' from ultramem_megatron/parallel, 'grad:other:tp_sync' from megatron's
    finalize_model_grads, 'other' for everything else (TP activations, loss and norm scalars)."""

    NAMES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_to_all_single",
             "_reduce_scatter_base", "_all_gather_base")

    def __init__(self, ddp) -> None:
        import torch.distributed as dist
        from megatron.core.distributed import param_and_grad_buffer as pgb

        from megatron.core import parallel_state

        self.dist, self.sent, self.active = dist, {}, False
        self.mp_group = parallel_state.get_expert_model_parallel_group()
        self.buffers = {}
        for part, buffers in (("other", ddp.buffers), ("value", ddp.expert_parallel_buffers)):
            for buffer in buffers:
                self.buffers[buffer.grad_data.untyped_storage().data_ptr()] = f"grad:{part}"
                if buffer.param_data is not None:
                    self.buffers[buffer.param_data.untyped_storage().data_ptr()] = f"gather:{part}"
        self.originals = {}
        for name in self.NAMES:
            if hasattr(dist, name):
                self.originals[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self.originals[name]))
        for alias in ("dist_all_gather_func", "dist_reduce_scatter_func"):
            original = getattr(pgb, alias, None)   # megatron's import-time alias of a collective
            for known, func in self.originals.items():
                if func is original:
                    setattr(pgb, alias, getattr(dist, known))

    def _wrap(self, name, original):
        counter = self

        def call(*args, **kwargs):
            if counter.active:
                counter._count(name, args, kwargs)
            return original(*args, **kwargs)

        return call

    def _count(self, name, args, kwargs) -> None:
        dist = self.dist
        group = kwargs.get("group")
        size = dist.get_world_size(group)
        if name == "all_reduce":
            tensor = args[0]
            nbytes = ring(tensor.numel() * tensor.element_size(), size, "all_reduce")
        elif name in ("reduce_scatter_tensor", "_reduce_scatter_base"):
            tensor = args[1]
            nbytes = ring(tensor.numel() * tensor.element_size(), size, "reduce_scatter")
        elif name in ("all_gather_into_tensor", "_all_gather_base"):
            tensor = args[0]
            nbytes = ring(tensor.numel() * tensor.element_size(), size, "all_gather")
        else:  # all_to_all_single(out, in, out_splits, in_splits): all but our own block
            tensor = args[1]
            splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
            row = tensor[0].numel() * tensor.element_size() if tensor.shape[0] else 0
            rank = dist.get_rank(group)
            rows = (sum(splits) - splits[rank] if splits is not None
                    else tensor.shape[0] * (size - 1) // size)
            nbytes = rows * row
        phase = _phase(tensor, self.buffers)
        if phase is None:
            frame, phase = sys._getframe(2), "other"
            while frame is not None:
                path = frame.f_code.co_filename.replace(os.sep, "/")
                if "ultramem_megatron/parallel/" in path and group is self.mp_group:
                    phase = ("exchange:backward" if frame.f_code.co_name == "backward"
                             else "exchange:forward")
                    break
                if path.endswith("megatron/core/distributed/finalize_model_grads.py"):
                    phase = "grad:other:tp_sync"
                    break
                frame = frame.f_back
        self.sent[phase] = self.sent.get(phase, 0.0) + nbytes


def worker(args) -> None:
    """Under torchrun: build the trainer, count the collectives of the last of COUNT_STEPS
    optimizer steps, and the losses of all of them."""
    import torch

    from ultramem_megatron.config import load_config
    from ultramem_megatron.training.loop import Trainer

    overrides = json.loads(args.overrides)
    run = load_config(ROOT / "configs/tiny.yaml", SMALL + [f"train.run_dir={args.run_dir}"]
                      + overrides)
    trainer = Trainer(run)
    ddp = trainer.ddp_chunks[0]   # one model chunk: no pipelining here
    counter = Counter(ddp)
    from ultramem_megatron.data.loader import iterate_batches

    data = iterate_batches(trainer.train_data, run.train.micro_batch_size, 0,
                           dp_rank=trainer.dp_rank, dp_size=trainer.dp_size)
    losses = []
    for step in range(COUNT_STEPS):
        counter.active = step == COUNT_STEPS - 1
        losses.append(trainer.train_step([data])["loss"])
    counter.active = False
    trainer.sync_params()
    result = {"sent": counter.sent, "losses": losses,
              "micro_batches": trainer.num_microbatches,
              "dtype": str(trainer.dtype).removeprefix("torch."),
              "buffers": {part: sum(b.grad_data.numel() for b in buffers)
                          for part, buffers in (("other", ddp.buffers),
                                                ("value", ddp.expert_parallel_buffers))}}
    if torch.distributed.get_rank() == 0:
        Path(args.worker).write_text(json.dumps(result))
    from ultramem_megatron import megatron_compat
    megatron_compat.destroy_distributed()


def launch(ranks: int, overrides: list[str], python: str = sys.executable) -> dict:
    """Run the counting worker on `ranks` gloo processes; its rank-0 result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "result.json")
        command = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(ranks), str(Path(__file__).resolve()), "--worker", str(out), "--run-dir",
                   str(Path(tmp, "run")), "--overrides", json.dumps(overrides)]
        env = {k: v for k, v in os.environ.items()
               if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["OMP_NUM_THREADS"] = "1"
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"counting worker failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())


def expected(overrides: list[str], ranks: int, micro_batches: int, dtype_bytes: int) -> dict:
    """The analytic bytes per phase for the small config under `overrides` on `ranks` ranks."""
    from ultramem_megatron.config import load_config

    run = load_config(ROOT / "configs/tiny.yaml", SMALL + overrides)
    p = run.parallel
    layout = Layout(ranks, p.tensor_model_parallel_size, p.memory_parallel_size,
                    p.memory_parallel_mode, p.sequence_parallel, p.use_distributed_optimizer,
                    p.overlap_grad_reduce, p.overlap_param_gather)
    params = param_inventory(run)
    traffic = grad_traffic(params, layout, dtype_bytes)
    fwd, bwd = exchange_per_step(run, layout, dtype_bytes, micro_batches)
    return {"grad:value": traffic["value"]["grad"], "gather:value": traffic["value"]["gather"],
            "grad:other": traffic["other"]["grad"], "gather:other": traffic["other"]["gather"],
            "grad:other:tp_sync": traffic["other"]["tp_sync"],
            "exchange:forward": fwd, "exchange:backward": bwd,
            "buffers": {"other": traffic["other"]["buffer_numel"],
                        "value": traffic["value"]["buffer_numel"]}}


PHASES = ["grad:value", "gather:value", "grad:other", "gather:other", "grad:other:tp_sync",
          "exchange:forward", "exchange:backward"]


def counted_check(layouts=COUNTED_LAYOUTS, extra: list[str] = (), python: str = sys.executable
                  ) -> list[dict]:
    rows = []
    for ranks, overrides in layouts:
        overrides = list(overrides) + list(extra)
        got = launch(ranks, overrides, python)
        dtype_bytes = 2 if got["dtype"] == "bfloat16" else 4
        want = expected(overrides, ranks, got["micro_batches"], dtype_bytes)
        rows.append({"ranks": ranks, "overrides": overrides, "counted": got, "analytic": want})
    return rows


def print_counted(rows: list[dict]) -> None:
    print("| ranks | layout | phase | counted bytes | analytic bytes |")
    print("|---:|---|---|---:|---:|")
    for row in rows:
        name = " ".join(o.split(".", 1)[1] for o in row["overrides"])
        sent = row["counted"]["sent"]
        for phase in PHASES:
            want = row["analytic"][phase]
            got = sent.get(phase, 0.0)
            if got == 0 and want == 0:
                continue
            note = " (expected value)" if phase.startswith("exchange") and "row" in name else ""
            print(f"| {row['ranks']} | {name} | {phase} | {got:,.0f} | {want:,.0f}{note} |")
        print(f"| {row['ranks']} | {name} | other (TP activations, loss, norms) | "
              f"{sent.get('other', 0.0):,.0f} | - |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/ultramem_151m.yaml")
    parser.add_argument("--gpus", default="8,32,128")
    parser.add_argument("--param-bytes", type=int, default=2, help="params dtype size (bf16: 2)")
    parser.add_argument("--count", action="store_true", help="count on 2 gloo ranks instead")
    parser.add_argument("--overlap", action="store_true",
                        help="with --count: overlap_grad_reduce and overlap_param_gather on")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.count:
        extra = (["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]
                 if args.overlap else [])
        rows = counted_check(extra=extra)
        print("tiny.yaml with tests/training/conftest.py's SMALL model, 1 sequence per micro-batch, "
              f"global batch 4; step {COUNT_STEPS} counted; bytes sent by rank 0"
              + (" (overlap on)" if args.overlap else ""))
        print_counted(rows)
        return
    print(analytic_table(args.config, [int(g) for g in args.gpus.split(",")], args.param_bytes))


if __name__ == "__main__":
    main()
