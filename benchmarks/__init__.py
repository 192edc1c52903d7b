"""The benchmarks a user runs (see benchmarks/README.md): run each from the repository root as
``python -m benchmarks.NAME``; benchmarks.common holds what they share."""
