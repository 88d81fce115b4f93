"""Benchmarks: each compares this project with its baselines side by side in one run."""
