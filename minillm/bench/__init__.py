"""Benchmarks, one module per target: ``python -m minillm bench TARGET``.

Shared helpers for honest timings live in ``minillm/bench/_util.py``.
"""
