"""Benchmarks. Each writes JSON (command, commit, config, numbers) + a PNG plot under bench/results/."""
