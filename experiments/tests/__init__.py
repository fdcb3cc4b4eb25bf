"""The experiments' own tests (experiments/*.py). The README's test command
(`python -m pytest tests`) runs them through tests/test_experiments.py."""
