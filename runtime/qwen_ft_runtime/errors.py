"""Errors the CLI turns into a one-line message and exit code 2 (no traceback)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad flags, a missing path or malformed input: the user can fix it, so no traceback."""


OOM_HINT = "lower --batch-size or --max-len, or enable --gradient-checkpointing"
