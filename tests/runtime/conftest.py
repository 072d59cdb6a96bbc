"""Fixtures for the runtime tests: no leaked image ENV, a tiny checkpoint, chat JSONL."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import runtime_helpers  # noqa: F401  (puts runtime/ on sys.path before the tests import it)


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
