"""Helpers for the runtime tests: where the package lives and how to run its CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

RUNTIME_DIR = Path(__file__).resolve().parents[2] / "runtime"
# The runtime ships inside images as its own distribution; tests import it from the tree.
if str(RUNTIME_DIR) not in sys.path:
    sys.path.insert(0, str(RUNTIME_DIR))


def run_cli(
    args: Sequence[str], extra_pythonpath: Sequence[Path] = (), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m qwen_ft_runtime ...` in a fresh interpreter, as an image would run it."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_FT_")}
    child_env.update(env or {})
    paths = [*map(str, extra_pythonpath), str(RUNTIME_DIR)]
    child_env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run(
        [sys.executable, "-m", "qwen_ft_runtime", *args],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=300,
        check=False,
    )


def one_json_line(stdout: str) -> dict[str, object]:
    lines = stdout.splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got {len(lines)}: {stdout!r}"
    payload = json.loads(lines[0])
    assert isinstance(payload, dict)
    return payload
