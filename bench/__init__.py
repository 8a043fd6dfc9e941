"""Benchmarks. Each appends its run (command, commit, config, numbers) to a JSON under bench/results/, beside a
PNG plot; bench.report builds README's Measurements table from those runs."""
