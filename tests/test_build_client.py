"""Which docker client builds, and how: buildx plugin, built-in BuildKit, or a one-line error naming another."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from builder.engine import (
    BuildClient,
    ProbeRun,
    docker_clients_on_path,
    find_build_client,
    probe_build_client,
)
from builder.errors import EngineError

ROOT = Path(__file__).resolve().parent.parent
NO_BUILDX = (1, "")  # docker: 'buildx' is not a docker command.


def table(answers: Mapping[str, tuple[int, str]]) -> ProbeRun:
    def run(argv: Sequence[str]) -> tuple[int, str] | None:
        exe = argv[0]
        if not any(k.startswith(exe + " ") for k in answers):
            return None  # not installed
        return answers.get(" ".join(argv), (1, ""))

    return run


MODERN = {
    "/a/docker buildx version": NO_BUILDX,
    "/a/docker version --format {{.Client.Version}}": (0, "28.2.2\n"),
}
OLD = {
    "/b/docker buildx version": NO_BUILDX,
    "/b/docker version --format {{.Client.Version}}": (0, "20.10.24+dfsg1\n"),
}
BUILDX = {"/c/docker buildx version": (0, "github.com/docker/buildx 0.13.1+ds1 0.13.1+ds1-3\n")}


def test_buildx_plugin_wins() -> None:
    client = find_build_client("/c/docker", table(BUILDX), others=[])
    assert client == BuildClient(
        "/c/docker", "buildx", buildx="github.com/docker/buildx 0.13.1+ds1 0.13.1+ds1-3"
    )
    assert client.argv == ["/c/docker", "buildx", "build", "--load"] and client.env == {}
    assert client.describe() == "docker buildx build --load (/c/docker, buildx 0.13.1+ds1)"


def test_pre_23_client_uses_builtin_buildkit() -> None:
    client = find_build_client("/b/docker", table(OLD), others=[])
    assert client.path == "builtin" and client.version == "20.10.24+dfsg1"
    assert client.argv == ["/b/docker", "build"] and client.env == {"DOCKER_BUILDKIT": "1"}


def test_modern_client_without_plugin_names_the_one_that_works() -> None:
    run = table({**MODERN, **OLD})
    with pytest.raises(EngineError) as err:
        find_build_client("/a/docker", run, others=["/a/docker", "/b/docker"])
    msg = err.value.message
    assert "\n" not in msg
    assert msg.startswith("/a/docker (28.2.2) has no buildx plugin and no built-in BuildKit")
    assert "/b/docker (20.10.24+dfsg1) has built-in BuildKit: pass --docker /b/docker" in msg
    with pytest.raises(EngineError, match="/c/docker has the buildx plugin: pass --docker /c/docker"):
        find_build_client("/a/docker", table({**MODERN, **BUILDX}), others=["/c/docker"])


def test_modern_client_alone_says_to_install_buildx() -> None:
    with pytest.raises(EngineError) as err:
        find_build_client("/a/docker", table(MODERN), others=["/a/docker", "/missing/docker"])
    assert "install the docker-buildx plugin" in err.value.message and "--docker /" not in err.value.message


def test_a_client_that_cannot_run_is_none() -> None:
    assert probe_build_client("/missing/docker", table({})) is None


def test_clients_on_path_in_order_one_per_real_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, usr, alias = tmp_path / "local", tmp_path / "usr", tmp_path / "bin"
    for folder in (first, usr):
        folder.mkdir()
        exe = folder / "docker"
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    alias.symlink_to(usr)  # like /bin -> /usr/bin
    (tmp_path / "noexec").mkdir()
    (tmp_path / "noexec" / "docker").write_text("")
    monkeypatch.setenv("PATH", os.pathsep.join(map(str, (first, tmp_path / "noexec", alias, usr))))
    assert docker_clients_on_path() == [str(first / "docker"), str(alias / "docker")]


def _fake_docker(folder: Path, version: str, buildx: bool) -> Path:
    folder.mkdir(parents=True)
    exe = folder / "docker"
    exe.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = buildx ]; then {"echo github.com/docker/buildx v0.13.1 x" if buildx else "exit 1"}; exit 0; fi\n'
        f'if [ "$1" = version ]; then echo {version}; exit 0; fi\n'
        "exit 1\n"
    )
    exe.chmod(0o755)
    return exe


def _dry_run(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "builder", "build", "cpu", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )


def test_cli_error_names_the_other_client(tmp_path: Path) -> None:
    """The real subprocess probe, through the CLI: one line, exit 5, naming the client that works."""
    modern = _fake_docker(tmp_path / "local", "28.2.2", buildx=False)
    old = _fake_docker(tmp_path / "usr", "20.10.24", buildx=False)
    proc = _dry_run(
        {"QWEN_FT_DOCKER": str(modern), "PATH": f"{modern.parent}:{old.parent}:{os.environ['PATH']}"}
    )
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"pass --docker {old} (or set QWEN_FT_DOCKER={old})" in proc.stderr
    ok = _dry_run({"QWEN_FT_DOCKER": str(old)})
    assert ok.returncode == 0, ok.stderr
    assert f"DOCKER_BUILDKIT=1 {old} build --progress=plain" in ok.stdout
    buildx = _fake_docker(tmp_path / "bx", "28.2.2", buildx=True)
    ok = _dry_run({"QWEN_FT_DOCKER": str(buildx)})
    assert ok.returncode == 0 and f"\n{buildx} buildx build --load --progress=plain" in ok.stdout
