"""The error for a user's mistake: one class, shared by the apps, the tasks and the config checks."""

from __future__ import annotations


class UsageError(ValueError):
    """A mistake in the command line or the files it names: printed as one line, exit code 2."""
