"""Benchmark: measurement (measure), the CPU memory worker, plots and the analytic cost model."""
