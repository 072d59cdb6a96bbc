"""Shared fixtures. Docker-tier fixtures live in tests/docker_support.py."""

from __future__ import annotations

from pathlib import Path

import pytest

# Docker-tier fixtures (tests/ is on sys.path: it has no __init__.py).
from docker_support import build_client, built_cpu, built_via, copy_project, docker_engine  # noqa: F401

from builder import config, knowledge
from builder.knowledge import Knowledge

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def kb() -> Knowledge:
    return knowledge.load()


@pytest.fixture(scope="session")
def matrix() -> config.MatrixConfig:
    return config.load(ROOT / "matrix.yaml")


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """A throwaway copy of the project (matrix, templates, images, runtime) to mutate."""
    return copy_project(tmp_path)
