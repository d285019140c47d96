"""Experiment suites and their reports (scripts/experiment.py)."""
