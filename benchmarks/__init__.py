"""Benchmarks (pytest-benchmark) and the DuckDB SQL peer of the kernel."""
