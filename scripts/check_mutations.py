"""Break the memory layer on purpose, in a scratch copy, and show which tests catch each break.

    python scripts/check_mutations.py [--only memory|parallel|export|kernels] [--match TEXT]

Single-device mutations run tests/memory (about 40 s each); parallel ones run the torchrun tests
that should catch them (about 1 minute each); export ones run tests/export/test_export.py; kernel
ones run their file in tests/kernels (the Triton interpreter without a GPU; under a minute each)."""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MEMORY_TESTS = ["tests/memory"]
LAYER_TESTS = ["tests/parallel/test_sharded_layer.py"]
TRAINING_TESTS = ["tests/parallel/test_parallel_training.py", "-k", "p2-value"]
EXPORT_TESTS = ["tests/export/test_export.py"]
SYNC_TESTS = ["tests/parallel/test_host_sync.py", "-m", "not slow"]
ROW_SYNC_TESTS = ["tests/parallel/test_host_sync.py", "-m", "slow"]
PIPELINE = "tests/parallel/test_pipeline_training.py"
PIPELINE_TESTS = [PIPELINE, "-k", "pp2-1f1b"]
INTERLEAVED_TESTS = [PIPELINE, "-k", "interleaved"]
EXPERT_TESTS = [PIPELINE, "-k", "moe-ep2 and not tp2"]
RECOMPUTE_TESTS = ["tests/training/test_recompute.py", "-k", "full_uniform"]
CONTEXT_TESTS = ["tests/parallel/test_context_parallel.py", "-m", "slow"]

# name -> (file, exact text to replace, replacement[, tests]). Each mimics a bug seen in the wild
# or one easy to write; tests default to MEMORY_TESTS.
MUTATIONS = {
    "scatter overwrites instead of adding (lucidrains ultra-mem)": (
        "ultramem_megatron/memory/lookup.py",
        "    tokens, items, cores = scores.shape\n",
        "    tokens, items, cores = scores.shape\n"
        "    chunk = values.shape[1] // cores\n"
        "    weighted = values[rows.long()].view(tokens, items, cores, chunk) * scores.unsqueeze(-1)\n"
        "    index = groups.long()[:, :, None, None].expand(-1, -1, cores, chunk)\n"
        "    pooled = weighted.new_zeros(tokens, num_groups, cores, chunk)\n"
        "    return pooled.scatter(1, index, weighted).view(tokens, num_groups, -1)\n",
    ),
    "softmax on the selected scores (PKM habit)": (
        "ultramem_megatron/memory/selection.py",
        "    virtual_idx = row_idx.gather",
        "    core_scores = core_scores.softmax(dim=2)\n    virtual_idx = row_idx.gather",
    ),
    "gradient through the phase-1 filter (same forward)": (
        "ultramem_megatron/memory/selection.py",
        "    virtual_idx = row_idx.gather",
        '    filt = torch.einsum("thmr,hr->thm", sel_row, u.to(sel_row.dtype)).unsqueeze(-1)\n'
        "    core_scores = core_scores * filt / filt.detach()\n"
        "    virtual_idx = row_idx.gather",
    ),
    "ranking by the first core only": (
        "ultramem_megatron/memory/selection.py",
        "cores.sum(0), col_cand)",
        "cores[0], col_cand)",
    ),
    "every core scales the whole value (no multi-core chunks)": (
        "ultramem_megatron/memory/lookup.py",
        "    weight = scores[:, piece_core].flatten()",
        "    weight = scores.sum(-1, keepdim=True).expand(-1, pieces).flatten()",
    ),
    "physical row taken as slot // N (swapped with group)": (
        "ultramem_megatron/memory/values.py",
        "return slot % self.num_values, slot // self.num_values",
        "return slot // self.num_values % self.num_values, slot % self.expansion",
    ),
    "aux loss penalizes the leading singular value too": (
        "ultramem_megatron/memory/retrieval.py",
        '    excess = F.relu(singular[:, 1:] - margin)  # [h, r-1]\n'
        '    scale = weight / (rank - 1)\n'
        '    penalty = scale * excess.pow(2).sum(-1).mean()\n'
        '    grad = torch.einsum("hri,hi,his->hrs", left[:, :, 1:], 2 * scale / heads * excess,\n'
        '                        right_t[:, 1:, :])\n',
        '    excess = F.relu(singular - margin)\n'
        '    scale = weight / (rank - 1)\n'
        '    penalty = scale * excess.pow(2).sum(-1).mean()\n'
        '    grad = torch.einsum("hri,hi,his->hrs", left, 2 * scale / heads * excess, right_t)\n',
    ),
    "retrieval in the parameter dtype (bf16 scores and top-k)": (
        "ultramem_megatron/memory/selection.py",
        "    return x.to(selection_dtype(x.dtype))",
        "    return x",
    ),
    "aux-loss cache never written back (stale penalty and gradient)": (
        "ultramem_megatron/memory/retrieval.py",
        "            self._aux_cache = (self._cores_key(), penalty.to(device), grad.to(device))",
        "            self._aux_cache = self._aux_cache or (self._cores_key(), penalty.to(device),\n"
        "                                                  grad.to(device))",
    ),
    "host sync: Tucker aux loss by an SVD in every forward": (
        "ultramem_megatron/memory/retrieval.py",
        "        if self._aux_cache is None or self._aux_cache[0] != self._cores_key():",
        "        if True:",
        SYNC_TESTS,
    ),
    "host sync: bag offsets from bincount": (
        "ultramem_megatron/memory/lookup.py",
        "    offsets = torch.searchsorted(sorted_bag, torch.arange(num_bags * pieces, device=rows.device))",
        "    counts = torch.bincount(bag_piece, minlength=num_bags * pieces)\n"
        "    offsets = counts.cumsum(0) - counts",
        SYNC_TESTS,
    ),
    "host sync: row mode repeat_interleave without output_size": (
        "ultramem_megatron/parallel/sharded_values.py",
        "counts_from[:, 0], output_size=sum(items_in))",
        "counts_from[:, 0])",
        ROW_SYNC_TESTS,
    ),
    "TP ranks do not sum the scores' gradient (each sees its columns only)": (
        "ultramem_megatron/parallel/sharded_values.py",
        "scores = copy_to_tensor_model_parallel_region(scores)",
        "scores = scores",
        LAYER_TESTS,
    ),
    "value_dim: received column blocks reassembled in the wrong order": (
        "ultramem_megatron/parallel/sharded_values.py",
        ".permute(1, 2, 0, 3)",
        ".permute(1, 2, 3, 0)",
        LAYER_TESTS,
    ),
    "row mode: owners mix up bags of different senders": (
        "ultramem_megatron/parallel/sharded_values.py",
        "local_in[:, 1] + first_bag_of_sender[sender]",
        "local_in[:, 1]",
        LAYER_TESTS,
    ),
    "value shards reduced as dense parameters (over all of data parallel)": (
        "ultramem_megatron/parallel/sharded_values.py",
        "            self.values.allreduce = False\n",
        "            pass\n",
        TRAINING_TESTS,
    ),
    "UltraMemV2: pre-value dot products not summed over the memory-parallel ranks": (
        "ultramem_megatron/parallel/sharded_values.py",
        "if with_mp and self.layout.mp_size > 1:",
        "if False:",
        LAYER_TESTS,
    ),
    "UltraMemV2: every layer's window starts at row 0 (offset dropped)": (
        "ultramem_megatron/memory/values.py",
        "rows = (rows + self.readout.offset) % self.table_rows",
        "rows = rows % self.table_rows",
    ),
    "UltraMemV2: every rank scored with rank 0's query": (
        "ultramem_megatron/memory/selection.py",
        "query[:, axis, i] @ keys",
        "query[:, axis, 0] @ keys",
    ),
    "UltraMemV2: each layer a copy of the shared table": (
        "ultramem_megatron/memory/values.py",
        "            self._shared = (tables,)\n",
        "            self._shared = (__import__('copy').deepcopy(tables),)\n",
    ),
    "pipeline: the shared table's copies keep their own gradients (not summed over stages)": (
        "ultramem_megatron/megatron_compat/pipeline.py",
        "        sum_shared_table_grads(model_chunks)\n",
        "",
        ["tests/parallel/test_memory_families_training.py", "-k", "pipeline and ultramem_v2"],
    ),
    "pipeline: every stage's copy of the shared table in the gradient norm": (
        "ultramem_megatron/parallel/sharded_values.py",
        "table.shared = chunk > 0",
        "table.shared = False",
        ["tests/parallel/test_memory_families_training.py", "-k", "pipeline and ultramem_v2"],
    ),
    "Memory+: the SiLU gate dropped": (
        "ultramem_megatron/memory/values.py",
        "pooled = pooled * gate.unsqueeze(1)",
        "pooled = pooled",
    ),
    "export: UltraMemV2 windows start at index n^2 whatever the anchor": (
        "ultramem_megatron/export/hf/modeling_memories.py",
        'mem["window_offsets"][index]',
        'index * mem["num_keys"] ** 2',
        EXPORT_TESTS,
    ),
    "pipeline: spans and seeds placed by the stage's local block index": (
        "ultramem_megatron/model/specs.py",
        "enumerate(block.layer_specs, start=offset)",
        "enumerate(block.layer_specs)",
        PIPELINE_TESTS,
    ),
    "pipeline: aux losses of the other stages dropped": (
        "ultramem_megatron/model/chunks.py",
        "megatron_compat.sum_over_stages(total).item()",
        "total.item()",
        PIPELINE_TESTS,
    ),
    "interleaved pipeline: batched p2p (a stage's two directions to one peer share a tag)": (
        "ultramem_megatron/model/gpt.py",
        "virtual_pipeline_model_parallel_size=virtual, overlap_p2p_comm=True,\n"
        "                      batch_p2p_comm=False)",
        "virtual_pipeline_model_parallel_size=virtual)",
        INTERLEAVED_TESTS,
    ),
    "expert parallel: experts reduced as dense parameters (each rank's experts averaged)": (
        "ultramem_megatron/model/gpt.py",
        "        expert_model_parallel_size=parallel.expert_model_parallel_size if moe else 1,\n",
        "",
        EXPERT_TESTS,
    ),
    "recompute: the query BatchNorm's statistics also moved by the graph-free first run": (
        "ultramem_megatron/memory/selection.py",
        "    return norm.training and norm.track_running_stats and torch.is_grad_enabled()",
        "    return norm.training and norm.track_running_stats",
        RECOMPUTE_TESTS,
    ),
    "recompute: the aux loss logged from the graph-free first run too": (
        "ultramem_megatron/model/skip_memory.py",
        "            if self.training and torch.is_grad_enabled():",
        "            if self.training:",
        RECOMPUTE_TESTS,
    ),
    "context parallel: memory statistics over this rank's tokens only": (
        "ultramem_megatron/parallel/comm.py",
        "([sum_over_context_parallel_ranks] if context_parallel else [])",
        "[]",
        CONTEXT_TESTS,
    ),
    "export: q and k rows swapped when splitting megatron's qkv": (
        "ultramem_megatron/export/convert.py",
        "per_head[:, i]",
        "per_head[:, [1, 0, 2][i]]",
        EXPORT_TESTS,
    ),
    "export: SwiGLU gate and up halves swapped": (
        "ultramem_megatron/export/hf/modeling_ultramem.py",
        "F.silu(self.gate_proj(x)) * up",
        "F.silu(up) * self.gate_proj(x)",
        EXPORT_TESTS,
    ),
    "export: MoE softmax over all experts before top-k (k > 1)": (
        "ultramem_megatron/export/hf/modeling_ultramem.py",
        "        if self.pre_softmax:",
        "        if True:",
        EXPORT_TESTS,
    ),
    "export: query-conv history dropped when decoding with the cache": (
        "ultramem_megatron/export/hf/modeling_ultramem.py",
        "        return past\n",
        "        return None\n",
        EXPORT_TESTS,
    ),
    "export: query-conv history kept beside the cache (beam search cannot reorder it)": (
        "ultramem_megatron/export/hf/modeling_ultramem.py",
        "        while len(cache.layers) <= index:\n"
        "            cache.layers.append(DynamicLayer())\n"
        "        layer = cache.layers[index]\n",
        '        layer = cache.__dict__.setdefault("side", {}).setdefault(index, DynamicLayer())\n',
        EXPORT_TESTS,
    ),
    "export: RoPE positions restart at 0 for each cached step": (
        "ultramem_megatron/export/hf/modeling_ultramem.py",
        "torch.arange(past, past + seq, device=x.device).expand",
        "torch.arange(0, seq, device=x.device).expand",
        EXPORT_TESTS,
    ),
    "top-m kernel: phase 2 re-scores with the first core, not the summed cores": (
        "ultramem_megatron/kernels/topm.py",
        "    for c in range(num_cores):\n",
        "    for c in range(1):\n",
        ["tests/kernels/test_topm.py"],
    ),
    "inference keeps normed keys across optimizer steps (no drop at refresh)": (
        "ultramem_megatron/memory/retrieval.py",
        "        self._keys_cache = None\n        svd = core_sum_svd",
        "        svd = core_sum_svd",
    ),
    "normed-keys cache blind to the key norm's parameters": (
        "ultramem_megatron/memory/retrieval.py",
        "for p in (self.keys, *self.key_norm.parameters()))",
        "for p in (self.keys,))",
    ),
    "rank-1 filter scores the row axis with t too": (
        "ultramem_megatron/memory/selection.py",
        "        row_idx = rank1_scores(s_row, u)",
        "        row_idx = rank1_scores(s_row, t)",
    ),
    "lookup kernel: every column scaled by core 0's score": (
        "ultramem_megatron/kernels/lookup_pool.py",
        "    core = (col_start + cols) // chunk ",
        "    core = cols * 0 ",
        ["tests/kernels/test_lookup_pool.py"],
    ),
    "lookup kernel: score gradient ignores col_start (column-sliced shards)": (
        "ultramem_megatron/kernels/lookup_pool.py",
        "    lo = tl.maximum(core * chunk - col_start, 0)\n"
        "    hi = tl.minimum(core * chunk + chunk - col_start, width)\n",
        "    lo = tl.maximum(core * chunk, 0)\n"
        "    hi = tl.minimum(core * chunk + chunk, width)\n",
        ["tests/kernels/test_lookup_pool.py"],
    ),
}


def group(spec: tuple) -> str:
    tests = spec[3] if len(spec) > 3 else MEMORY_TESTS
    if tests[0].startswith("tests/kernels"):
        return "kernels"
    return {id(MEMORY_TESTS): "memory", id(EXPORT_TESTS): "export"}.get(id(tests), "parallel")


def run_mutation(name: str) -> tuple[int, str]:
    path, old, new, *tests = MUTATIONS[name]
    tests = tests[0] if tests else MEMORY_TESTS
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv*", ".git", "runs", "__pycache__"))
        source = (copy / path).read_text()
        if old not in source:
            raise SystemExit(f"mutation {name!r}: anchor text not found in {path}; update this script")
        (copy / path).write_text(source.replace(old, new, 1))
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p",
                                 "no:cacheprovider", *tests], cwd=copy, capture_output=True,
                                text=True, env={**os.environ, "PYTHONPATH": str(copy)})
    failed = [line.split(" - ")[0].removeprefix("FAILED ")
              for line in result.stdout.splitlines() if line.startswith("FAILED")]
    return result.returncode, "\n".join(f"      {t}" for t in failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["memory", "parallel", "export", "kernels"])
    parser.add_argument("--match", default="", help="only mutations whose name contains this")
    args = parser.parse_args()
    names = [name for name, spec in MUTATIONS.items()
             if args.only in (None, group(spec)) and args.match in name]
    survivors = 0
    for name in names:
        code, failed = run_mutation(name)
        caught = code != 0
        survivors += not caught
        print(f"{'CAUGHT  ' if caught else 'SURVIVED'} {name}\n{failed}")
    print(f"\n{len(names) - survivors}/{len(names)} mutations caught")
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
