"""Errors that end a run with a message for the user rather than a bug's traceback."""

from __future__ import annotations


class RunError(RuntimeError):
    """A run could not produce a valid result, for a reason its message states (bad data, no scorable
    image, a diverging loss). The command line prints it as one line and exits 1."""
