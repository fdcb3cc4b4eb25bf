"""Experiments on the tcn_jax library: the paper's tables, benchmarks and
checks. A package: run its scripts from the repository root as
`python -m experiments.<name>` (see experiments/README.md)."""
