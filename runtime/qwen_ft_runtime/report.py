"""Named checks and the single JSON line each command prints on stdout."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def skipped(name: str, why: str) -> Check:
    """A check the plan does not ask for; it passes, and its detail says it was not run."""
    return Check(name, True, f"skipped: {why}")


def first_failure(checks: Sequence[Check]) -> str | None:
    return next((c.name for c in checks if not c.ok), None)


def _clean(value: Any) -> Any:
    # JSON has no NaN/Infinity; strict parsers (jq, browsers) reject Python's extension.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def emit(payload: dict[str, Any]) -> None:
    """Exactly one line on stdout, so `... | tail -n1 | jq` works whatever else was logged."""
    sys.stdout.write(json.dumps(_clean(payload), allow_nan=False, sort_keys=False) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout meanwhile to stderr, at the file-descriptor level.

    DeepSpeed logs to a handler bound to sys.stdout at import time and prints op build
    messages; swapping `sys.stdout` would not catch those, and stdout must carry only the
    JSON line.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
