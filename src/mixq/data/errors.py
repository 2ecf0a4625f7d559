"""Error type shared by the data layer."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A dataset is missing, incomplete, corrupt or malformed.

    Messages name the offending file or folder and say how to fix the problem.
    """
