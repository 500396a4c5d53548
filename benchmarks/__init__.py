"""Benchmark harness: ParallelComp against full attention, truncation, BM25 top-k and kvpress.

Run `python -m benchmarks --help` from the repository root. Nothing here is imported by the
`parallelcomp` package; modules import only the standard library at import time where they are
also used inside the kvpress virtual environment (`hf_loop`, `kvpress_worker`).
"""
