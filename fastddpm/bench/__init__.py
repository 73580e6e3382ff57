"""The benchmark suite of `fastddpm bench` (and `python -m benchmarks.run`), inside the package so that it
runs from an installed fastddpm: timing helpers (timing), the GPU cost proxy (countops), per-op providers
(ops), the networks (models), sampling and training workloads (workloads), the cases and tables (suite).
The per-op scripts in the repository's benchmarks/ folder take their providers from here too.
"""
