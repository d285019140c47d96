"""Compile Triton kernels ahead of time for GPU targets, without a GPU: JSON launch specs on stdin
(module, kernel, argument types, constexprs) -> one line per (kernel, target), exit 1 on a failure.
Runs in its own process, without TRITON_INTERPRET, so the kernels are decorated for compilation."""

import importlib
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Ampere and Hopper: the cards our users train on (A100, H100 / H200).
TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]


def main() -> int:
    failures = 0
    for spec in json.load(sys.stdin):
        kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        signature = {**spec["signature"], **{name: "constexpr" for name in spec["constexprs"]}}
        for target in TARGETS:
            label = f"{spec['kernel']} {spec['signature']} {spec['constexprs']} sm_{target.arch}"
            try:
                compiled = triton.compile(ASTSource(kernel, signature, spec["constexprs"]),
                                          target=target)
                print(f"ok {label}: {len(compiled.asm['cubin'])} bytes of cubin, "
                      f"{compiled.metadata.shared} bytes of shared memory", flush=True)
            except Exception as err:  # noqa: BLE001 - report every kernel, then fail
                failures += 1
                print(f"FAILED {label}: {type(err).__name__}: {err}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
