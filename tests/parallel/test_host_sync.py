"""No host synchronisation on the memory path: a counter of the ops that stall a GPU, over one
layer forward and backward on one device (here) and sharded under torchrun (gloo, 2 processes:
TP = 2, memory-parallel 2 value_dim, memory-parallel 2 row). Row mode makes exactly one sync per
forward (its all-to-all split sizes); everything else makes none. Run as a script, this file is
the torchrun worker: tests/parallel/test_host_sync.py <out_dir> writes <out_dir>/rank<r>.json."""

# What is flagged (CPU runs cannot stall, so the ops that would on CUDA are named):
#   aten ops (TorchDispatchMode): _local_scalar_dense, nonzero, argwhere, masked_select, unique*,
#     bincount, SVD / eigh, is_nonzero, equal, masked_scatter, repeat_interleave without
#     output_size, index / index_put with bool masks, copies to the CPU;
#   Python-level host reads (TorchFunctionMode): tolist, item, cpu, numpy, .to(cpu), bool / int /
#     float / index conversion, torch.tensor / as_tensor (an H2D copy of Python data).
# Attribution to the memory path: in the forward, a Python frame under ultramem_megatron/memory
# or /parallel; in the backward, the running autograd node's forward traceback (anomaly mode,
# without its NaN check, stores it in node.metadata["traceback_"]) or a Python frame there.
# Syncs inside a CUDA kernel's own host code are invisible at the aten level: on a GPU,
# test_cuda_layer_never_synchronises runs CUDA's sync detector over the same step.

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]
MEMORY_DIRS = tuple(os.path.join("ultramem_megatron", part) + os.sep for part in ("memory", "parallel"))
SYNC_ATEN = {"_local_scalar_dense", "nonzero", "argwhere", "masked_select", "_unique", "_unique2",
             "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount",
             "_linalg_svd", "linalg_svd", "linalg_svdvals", "_linalg_eigh", "linalg_eigh",
             "linalg_eigvalsh", "is_nonzero", "equal", "masked_scatter", "masked_scatter_"}
INDEXING_ATEN = {"index", "index_put", "index_put_", "_index_put_impl_"}
HOST_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.numpy,
              torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
              torch.Tensor.__index__, torch.tensor, torch.as_tensor}


def is_cpu(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu"


def aten_syncs(func, args, kwargs) -> bool:
    """Whether this aten call synchronises with the host on CUDA."""
    name = func._overloadpacket.__name__
    if name in SYNC_ATEN:
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None
    if name in INDEXING_ATEN:
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if name in ("_to_copy", "copy_"):  # device -> host (never seen on a CPU-only run)
        source = args[1] if name == "copy_" else args[0]
        target = args[0].device if name == "copy_" else kwargs.get("device")
        return source.device.type != "cpu" and is_cpu(target)
    return False


def host_read(func, args, kwargs) -> bool:
    if func in HOST_READS:
        return True
    return func is torch.Tensor.to and any(is_cpu(a) for a in (*args[1:], *kwargs.values()))


def traced_to_memory(lines) -> bool:
    return any(d in line for line in lines for d in MEMORY_DIRS)


def frames_in_memory() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if any(d in frame.f_code.co_filename for d in MEMORY_DIRS):
            return True
        frame = frame.f_back
    return False


class HostSyncCounter:
    """with HostSyncCounter() as counter: ... -> counter.events, [(phase, op)] of the memory
    path's synchronising calls; phase is "forward" or "backward" (an autograd node is running).
    A host read's own aten ops (item -> _local_scalar_dense) count once, as the read."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []
        self.reading = False
        counter = self

        class Aten(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if not counter.reading and aten_syncs(func, args, kwargs):
                    counter.record(func._overloadpacket.__name__)
                return func(*args, **kwargs)

        class Python(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if counter.reading or not host_read(func, args, kwargs):
                    return func(*args, **kwargs)
                counter.record(func.__name__)
                counter.reading = True
                try:
                    return func(*args, **kwargs)
                finally:
                    counter.reading = False

        self.modes = [torch.autograd.detect_anomaly(check_nan=False), Aten(), Python()]

    def record(self, op: str) -> None:
        node = torch._C._current_autograd_node()
        traced = node is not None and traced_to_memory(node.metadata.get("traceback_", ()))
        if traced or frames_in_memory():
            self.events.append(("forward" if node is None else "backward", op))

    def __enter__(self) -> "HostSyncCounter":
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self.modes):
            mode.__exit__(*exc)


def forward_backward(layer, hidden: torch.Tensor, probe: torch.Tensor) -> None:
    out, aux = layer(hidden.clone().requires_grad_(True))
    ((out * probe).sum() + aux).backward()


def train_step_then_count(layer, hidden: torch.Tensor, probe: torch.Tensor) -> list:
    """One training step (forward, backward, SGD, refresh_rank1), then a counted forward and
    backward: the syncs a training step's memory forward and backward make."""
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    forward_backward(layer, hidden, probe)
    optimizer.step()
    layer.refresh_rank1()
    optimizer.zero_grad()
    with HostSyncCounter() as counter:
        forward_backward(layer, hidden, probe)
    return counter.events


# ------------------------------------------------------------------------- single process


def tiny_layer(**extra):
    from tests.conftest import transformer_config
    from ultramem_megatron.memory import UltraMemConfig, UltraMemLayer

    torch.manual_seed(0)
    memory = UltraMemConfig(num_keys=4, key_dim=8, topk=3, phase1_topk=4, value_dim=12,
                            num_heads=2, num_cores=3, query_conv_kernel=2, aux_loss_margin=0.0,
                            **extra)
    return UltraMemLayer(transformer_config(hidden_size=16), memory)


def run_tiny(layer) -> list:
    generator = torch.Generator().manual_seed(1)
    return train_step_then_count(layer, torch.randn(6, 2, 16, generator=generator),
                                 torch.randn(6, 2, 16, generator=generator))


@pytest.mark.parametrize("extra", [{}, {"query_batchnorm": True, "key_balance_weight": 0.1}])
def test_single_device_layer_makes_no_host_sync(extra):
    """Usage counting included (training mode); with the query BatchNorm and key balance too."""
    assert run_tiny(tiny_layer(**extra)) == []


@pytest.mark.parametrize("family", ["ultramem_v2", "memory_plus"])
def test_new_families_make_no_host_sync(family):
    """UltraMemV2 (pre-values, ring window of a shared table) and Memory+ (product keys,
    softmax, gate), each layer with tables of its own."""
    from tests.conftest import transformer_config
    from ultramem_megatron.memory import (MemoryPlusConfig, MemoryPlusLayer, UltraMemLayer,
                                          UltraMemV2Config)

    torch.manual_seed(0)
    config = transformer_config(hidden_size=16)
    if family == "memory_plus":
        layer = MemoryPlusLayer(config, MemoryPlusConfig(num_keys=4, key_dim=8, topk=3))
    else:
        layer = UltraMemLayer(config, UltraMemV2Config(
            num_keys=4, key_dim=8, topk=3, value_dim=12, pre_value_dim=6, expansion=4,
            memory_layers=3, share_ratio=0.5, key_balance_weight=0.1), layer_index=2)
    assert run_tiny(layer) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_layer_never_synchronises():
    """CUDA's sync detector (which also sees syncs inside kernels' host code) over the
    single-device layer's forward and backward after a training step."""
    layer = tiny_layer().cuda()
    generator = torch.Generator().manual_seed(1)
    hidden, probe = (torch.randn(6, 2, 16, generator=generator).cuda() for _ in range(2))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    forward_backward(layer, hidden, probe)
    optimizer.step()
    layer.refresh_rank1()
    optimizer.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward(layer, hidden, probe)
    finally:
        torch.cuda.set_sync_debug_mode("default")


class SyncInBackward(torch.autograd.Function):
    """Identity whose backward reads a value to the host."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad.abs().sum().item()
        return grad


INJECTED = {  # what the wrapped lookup does to the scores -> expected (forward, backward) counts
    "item in the forward": (lambda s: s * (s.sum().item() * 0 + 1), (1, 0)),
    "bool-mask index (built-in backward index_put)":
        (lambda s: s[torch.ones_like(s, dtype=torch.bool)].view_as(s), (1, 1)),
    "item in a custom backward": (SyncInBackward.apply, (0, 1)),
}


@pytest.mark.parametrize("name", list(INJECTED))
def test_counter_catches_injected_sync(name, monkeypatch):
    """The counter can fail: a sync injected into the memory forward, into a built-in backward
    node created there and into a Python backward created there is each found, in its phase."""
    from ultramem_megatron.memory import values as values_module

    inject, (forward, backward) = INJECTED[name]
    original = values_module.lookup_pool
    monkeypatch.setattr(values_module, "lookup_pool",
                        lambda values, rows, groups, scores, *rest, **options:
                        original(values, rows, groups, inject(scores), *rest, **options))
    phases = [phase for phase, _ in run_tiny(tiny_layer())]
    assert (phases.count("forward"), phases.count("backward")) == (forward, backward), phases


def test_stale_aux_cache_is_a_counted_sync():
    """A forward after the cores changed without refresh_rank1() recomputes the aux loss's SVD
    on the host: correct, and the counter sees it (the training loop never takes this path)."""
    layer = tiny_layer()
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 2, 16, generator=generator)
    with torch.no_grad():
        layer.retrieval.cores.mul_(1.01)
    with HostSyncCounter() as counter, torch.no_grad():
        layer(hidden)
    assert ("forward", "to") in counter.events


# -------------------------------------------------------------------------- under torchrun

LAYOUTS = [  # (family, TP, P, mode, sequence parallel) -> syncs per forward
    (("ultramem", 1, 1, "value_dim", False), 0), (("ultramem", 2, 1, "value_dim", False), 0),
    (("ultramem", 2, 1, "value_dim", True), 0), (("ultramem", 1, 2, "value_dim", False), 0),
    (("ultramem", 1, 2, "row", False), 1),
    (("ultramem_v2", 2, 1, "value_dim", True), 0), (("ultramem_v2", 1, 2, "value_dim", False), 0),
    (("ultramem_v2", 1, 2, "row", False), 1), (("memory_plus", 1, 2, "value_dim", False), 0),
    (("memory_plus", 1, 2, "row", False), 1),
]


@pytest.mark.slow
def test_sharded_layers_make_only_the_documented_host_syncs(tmp_path):
    from tests.conftest import subprocess_env

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", "tests/parallel/test_host_sync.py", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [tuple(r["layout"]) for r in report] == [layout for layout, _ in LAYOUTS]
        for record, (_, syncs) in zip(report, LAYOUTS):
            assert [tuple(e) for e in record["events"]] == [("forward", "tolist")] * syncs, record


def count_layout(family: str, tp: int, mp: int, mode: str, sp: bool) -> list:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.spec_utils import ModuleSpec

    from tests.parallel.layer_worker import BATCH, HIDDEN, SEQ, build
    from ultramem_megatron import megatron_compat
    from ultramem_megatron.parallel.sharded_values import ShardedValueExpansion

    ps.destroy_model_parallel()
    megatron_compat.initialize_distributed(tp, seed=0, memory_parallel_size=mp)
    layer = build(family, tp, sp, ModuleSpec(module=ShardedValueExpansion, params={
        "mode": mode, "sequence_parallel": sp, "overlap": True}), mode)
    generator = torch.Generator().manual_seed(11 + torch.distributed.get_rank())
    seq = SEQ // tp if sp else SEQ
    hidden = torch.randn(seq, BATCH, HIDDEN, generator=generator)
    return train_step_then_count(layer, hidden, torch.randn(hidden.shape, generator=generator))


def main(out_dir: str) -> int:
    import torch.distributed as dist

    from ultramem_megatron import megatron_compat

    megatron_compat.initialize_distributed(1, seed=0)
    report = [{"layout": list(layout), "events": count_layout(*layout)} for layout, _ in LAYOUTS]
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
