"""Parallel wrappers of the single-device memory math: value tables sharded over TP and a memory-parallel group."""
