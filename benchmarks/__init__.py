"""Benchmarks of persona steering and monitoring (see benchmarks/README.md).

`python -m benchmarks.run` (or `personavec bench`) drives the real HTTP server;
`benchmarks/engine_overhead.py` measures inside one engine.
"""
