"""Benchmarks: `python -m bench.kernels` (ops) and `python -m bench.model` (train/sample steps).

Shared pieces: `bench.timing` (timers, measured ceilings, environment record),
`bench.report` (JSON + markdown + PNG), `bench.costs` (FLOPs and minimum bytes per op).
Numbers from interpreters (Pallas `interpret=True`, Triton's interpreter) are never
reported as speeds.
"""
