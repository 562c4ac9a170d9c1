"""Benchmarks of persona steering and monitoring (install the `bench` extra; results and method in
the repository's benchmarks/README.md).

`personavec bench` (or `python -m personavec_vllm.bench`) drives the real HTTP server;
`python -m personavec_vllm.bench.engine_overhead` measures inside one engine.
"""
