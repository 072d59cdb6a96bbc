"""Fixtures for the Docker tier.

These tests skip on a laptop without a Docker daemon, but FAIL when
QWEN_FT_REQUIRE_DOCKER=1 (set by .ci/run): a green CI run must mean they ran.
The buildx path likewise FAILS instead of skipping when QWEN_FT_REQUIRE_BUILDX=1.

`build_client` runs a test once per BuildKit path the engine can take:

* buildx: a client with the buildx plugin (`docker buildx build --load`), the usual
  install today (in CI: the 28.x client plus Debian's docker-buildx);
* builtin: a pre-23 client with DOCKER_BUILDKIT=1 (in CI: Debian's /usr/bin/docker 20.10),
  run with DOCKER_CONFIG pointing at an empty folder so a plugin in ~/.docker/cli-plugins
  cannot turn it into the buildx path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = os.environ.get("QWEN_FT_REQUIRE_DOCKER") == "1"
REQUIRED_BUILDX = os.environ.get("QWEN_FT_REQUIRE_BUILDX") == "1"
# The registry and the daemon outlive a session and are shared: names carrying this are ours.
SESSION_ID = uuid.uuid4().hex[:8]
DOCKER = os.environ.get("QWEN_FT_DOCKER") or shutil.which("docker") or "docker"
BASE_IMAGE = os.environ.get("QWEN_FT_BASE_IMAGE", "qwen-ft-local/debian:bookworm")
REGISTRY = os.environ.get("QWEN_FT_TEST_REGISTRY", "127.0.0.1:5000")
CA_BUNDLE = Path(os.environ.get("QWEN_FT_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"))
TORCH_WHEEL_GLOB = "torch-2.13.0+cpu-cp311-*.whl"


def unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"QWEN_FT_REQUIRE_DOCKER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def buildx_unavailable(reason: str) -> None:
    if REQUIRED_BUILDX:
        pytest.fail(f"QWEN_FT_REQUIRE_BUILDX=1 but {reason}", pytrace=False)
    unavailable(reason)


@dataclass(frozen=True)
class Client:
    """One BuildKit path: the docker executable and the environment it builds in."""

    path: str  # "buildx" | "builtin", as builder.engine.BuildClient.path
    exe: str
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def build_command(self) -> str:
        """How the build log's first line starts when this path built."""
        return f"$ {self.exe} buildx build --load " if self.path == "buildx" else f"$ {self.exe} build "

    def run(
        self, *args: str, timeout: float = 600, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.exe, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env={**os.environ, **self.env},
            check=False,
        )


def _clients_on_path() -> list[str]:
    from builder.engine import docker_clients_on_path

    return docker_clients_on_path()


def find_client(path: str, empty_config: Path | None = None) -> Client:
    """The client for one BuildKit path, or a skip (a failure when CI requires it)."""
    if path == "buildx":
        preferred = os.environ.get("QWEN_FT_BUILDX_DOCKER")
        for exe in [preferred] if preferred else [DOCKER, *_clients_on_path()]:
            client = Client("buildx", shutil.which(exe) or exe)
            if client.run("buildx", "version", timeout=60).returncode == 0:
                return client
        buildx_unavailable("no docker client with the buildx plugin (ci/setup-host.sh installs it)")
    assert empty_config is not None, "the builtin path hides ~/.docker/cli-plugins behind an empty config"
    empty_config.mkdir(parents=True, exist_ok=True)
    preferred = os.environ.get("QWEN_FT_BUILTIN_DOCKER")
    for exe in [preferred] if preferred else _clients_on_path():
        client = Client("builtin", shutil.which(exe) or exe, {"DOCKER_CONFIG": str(empty_config)})
        version = client.run("version", "--format", "{{.Client.Version}}", timeout=60).stdout.strip()
        major = version.split(".", 1)[0]
        if major.isdigit() and int(major) < 23 and client.run("buildx", "version").returncode != 0:
            return client
    unavailable("no pre-23 docker client without buildx for the DOCKER_BUILDKIT=1 path (Debian's docker.io)")
    raise AssertionError("unreachable")


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def cli(
    project: Path, *args: str, timeout: float = 1800, client: Client | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QWEN_FT_DOCKER": DOCKER}
    if client is not None:
        env.update({"QWEN_FT_DOCKER": client.exe, **client.env})
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
    image: str = "qwen-ft"
    client: Client | None = None

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


def build_options(wheelhouse: Path) -> tuple[str, ...]:
    return (
        "--base-map",
        f"debian:bookworm-slim={BASE_IMAGE}",
        "--ca-bundle",
        str(CA_BUNDLE),
        "--wheelhouse",
        str(wheelhouse),
    )


@pytest.fixture(scope="session")
def built_cpu(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """The cpu image built once through the CLI, as CI builds it: local base, CA bundle, wheelhouse."""
    tmp = tmp_path_factory.mktemp("cpu-build")
    project = copy_project(tmp / "project")
    wheelhouse = find_wheelhouse(tmp)
    base_args = build_options(wheelhouse)
    proc = cli(project, "build", "cpu", *base_args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((project / "build" / "report.json").read_text())
    yield Built(project, wheelhouse, report, base_args)


@pytest.fixture(scope="session", params=["buildx", "builtin"])
def build_client(
    request: pytest.FixtureRequest, docker_engine: str, tmp_path_factory: pytest.TempPathFactory
) -> Client:
    """Each BuildKit path in turn (see the module docstring)."""
    return find_client(str(request.param), tmp_path_factory.mktemp("empty-docker-config"))


def session_image(kind: str, client: Client) -> str:
    """An image name no other session or path uses, so its first build really builds."""
    return f"qwen-ft-{kind}-{client.path}-{SESSION_ID}"


def remove_images(name: str) -> None:
    """Every local tag naming `name` (also registry-qualified ones): ours to remove."""
    refs = docker("images", "--format", "{{.Repository}}:{{.Tag}}", check=False).stdout.split()
    for ref in refs:
        if name in ref:
            docker("rmi", "-f", ref, check=False)


@pytest.fixture(scope="session")
def built_via(build_client: Client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """The cpu image built through one BuildKit path, under a fresh name: a real build (cache hits
    after the first), not an up-to-date no-op left by an earlier session."""
    tmp = tmp_path_factory.mktemp(f"cpu-{build_client.path}")
    image = session_image("cpu", build_client)
    project = copy_project(tmp / "project", image=image)
    wheelhouse = find_wheelhouse(tmp)
    base_args = build_options(wheelhouse)
    proc = cli(project, "build", "cpu", *base_args, client=build_client)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((project / "build" / "report.json").read_text())
    yield Built(project, wheelhouse, report, base_args, image=image, client=build_client)
    remove_images(image)
