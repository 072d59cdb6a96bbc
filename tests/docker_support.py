"""Fixtures for the Docker tier.

These tests skip on a laptop without a Docker daemon, but FAIL when
QWEN_FT_REQUIRE_DOCKER=1 (set by .ci/run): a green CI run must mean they ran.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = os.environ.get("QWEN_FT_REQUIRE_DOCKER") == "1"
DOCKER = os.environ.get("QWEN_FT_DOCKER") or shutil.which("docker") or "docker"
BASE_IMAGE = os.environ.get("QWEN_FT_BASE_IMAGE", "qwen-ft-local/debian:bookworm")
REGISTRY = os.environ.get("QWEN_FT_TEST_REGISTRY", "127.0.0.1:5000")
CA_BUNDLE = Path(os.environ.get("QWEN_FT_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"))
TORCH_WHEEL_GLOB = "torch-2.13.0+cpu-cp311-*.whl"


def unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"QWEN_FT_REQUIRE_DOCKER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def cli(project: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QWEN_FT_DOCKER": DOCKER}
    return subprocess.run(
        [sys.executable, "-m", "builder", "--matrix", str(project / "matrix.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def find_wheelhouse(tmp: Path) -> Path:
    """A folder holding the CPU torch wheel (this machine keeps one in /opt/wheels)."""
    candidates = [Path(p) for p in os.environ.get("QWEN_FT_WHEEL_DIRS", "/opt/wheels").split(":")]
    for folder in candidates:
        hits = sorted(folder.glob(TORCH_WHEEL_GLOB)) if folder.is_dir() else []
        if hits:
            house = tmp / "wheelhouse"
            house.mkdir(exist_ok=True)
            dst = house / hits[0].name
            if not dst.exists():
                try:
                    os.link(hits[0], dst)
                except OSError:
                    shutil.copy2(hits[0], dst)
            return house
    unavailable(f"no {TORCH_WHEEL_GLOB} in {candidates}; set QWEN_FT_WHEEL_DIRS")
    raise AssertionError("unreachable")


def copy_project(dest: Path, image: str = "qwen-ft") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("matrix.yaml", "templates", "images", "runtime"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    matrix = dest / "matrix.yaml"
    matrix.write_text(matrix.read_text().replace("image: qwen-ft\n", f"image: {image}\n"))
    return dest


@dataclass(frozen=True)
class Built:
    project: Path
    wheelhouse: Path
    report: dict[str, object]
    base_args: tuple[str, ...]

    def result(self, name: str) -> dict[str, object]:
        images = self.report["images"]
        assert isinstance(images, list)
        return next(r for r in images if r["image"] == name)


def require_engine() -> None:
    if shutil.which(DOCKER) is None:
        unavailable(f"docker executable {DOCKER!r} not found")
    proc = subprocess.run(
        [DOCKER, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        unavailable(f"no Docker daemon answers: {proc.stderr.strip()[:200]}")
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        unavailable(f"base image {BASE_IMAGE} missing; run ci/make-base-image.sh")


@pytest.fixture(scope="session")
def docker_engine() -> str:
    require_engine()
    return DOCKER


@pytest.fixture(scope="session")
def built_cpu(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """The cpu image built once through the CLI, as CI builds it: local base, CA bundle, wheelhouse."""
    tmp = tmp_path_factory.mktemp("cpu-build")
    project = copy_project(tmp / "project")
    wheelhouse = find_wheelhouse(tmp)
    base_args = (
        "--base-map",
        f"debian:bookworm-slim={BASE_IMAGE}",
        "--ca-bundle",
        str(CA_BUNDLE),
        "--wheelhouse",
        str(wheelhouse),
    )
    proc = cli(project, "build", "cpu", *base_args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((project / "build" / "report.json").read_text())
    yield Built(project, wheelhouse, report, base_args)
