"""The end-to-end tier (`make e2e`): real GPU images, built from PyPI, several GB each.

Collected by a plain `pytest` too, but skipped unless QWEN_FT_E2E=1, so `make test` stays
fast; with QWEN_FT_E2E=1 a missing Docker daemon or base image fails (through
docker_support.require_engine, when QWEN_FT_REQUIRE_DOCKER=1) instead of skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

E2E = os.environ.get("QWEN_FT_E2E") == "1"
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if E2E:
        return
    skip = pytest.mark.skip(reason="end-to-end image build: run `make e2e` (QWEN_FT_E2E=1)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
