"""Benchmarks and the TRL parity table: scripts, importable by the tests (`bench.grpo_vs_trl`, ...)."""
