"""Shared fixtures for the runtime tests: the package path, a tiny checkpoint, chat JSONL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

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


@pytest.fixture(autouse=True)
def _no_image_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests state their plan explicitly; a QWEN_FT_* left in the host ENV must not leak in."""
    for key in list(os.environ):
        if key.startswith("QWEN_FT_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved random tiny Qwen2 with a tokenizer built in code: `--model PATH` input."""
    from qwen_ft_runtime.data import build_tokenizer
    from qwen_ft_runtime.model import build_tiny

    path = tmp_path_factory.mktemp("tiny-qwen2")
    build_tiny("qwen2-tiny", "sdpa", "fp32", seed=0).save_pretrained(str(path))
    build_tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture
def chat_jsonl(tmp_path: Path) -> Path:
    from qwen_ft_runtime.data import synthetic_conversations

    path = tmp_path / "chat.jsonl"
    lines = [json.dumps({"messages": c}) for c in synthetic_conversations(6, seed=3)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
