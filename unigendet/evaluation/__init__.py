"""Evaluation jobs: run a detector or generator over a benchmark and write scored reports."""
