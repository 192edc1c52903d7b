"""Finished experiments whose conclusions are in the docs (index: benchmarks/experiments/README.md);
run from the repository root as ``python -m benchmarks.experiments.NAME``."""
