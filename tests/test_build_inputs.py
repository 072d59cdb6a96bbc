"""What a build may read and write (issue 14, findings 1, 3 and 15), without a Docker daemon.

- the build context holds only regular files from inside the project (finding 1);
- proxy credentials reach `docker build` only through its environment, never an argv,
  a file or a message (finding 3);
- staging build/context/ never deletes the user's own wheels (finding 15).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_config_errors import assert_one_line_error

from builder import proxy
from builder.content import stage_context
from builder.engine import BuildRequest, CommandLog, DockerEngine
from builder.errors import ConfigError
from builder.project import Project


def _cli(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "builder", "--matrix", str(project / "matrix.yaml"), *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


# ----------------------------------------------------------------------------- finding 1


@pytest.fixture
def secret_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    (home / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY----- not really\n")
    return home


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_symlink_in_the_context_is_refused_naming_it(
    project_copy: Path, secret_dir: Path, kind: str
) -> None:
    link = project_copy / "runtime" / "qwen_ft_runtime" / ("id_rsa" if kind == "file" else "ssh")
    link.symlink_to(secret_dir / "id_rsa" if kind == "file" else secret_dir)
    for args in (("bake", "-o", "-", "cpu"), ("ci-matrix", "--json", "cpu")):
        proc = _cli(project_copy, *args)
        assert_one_line_error(proc, str(link), "symbolic link", "regular files from inside the project")
    staged = project_copy / "build" / "context" / "runtime"
    assert not any(p.name in ("id_rsa", "ssh") for p in staged.rglob("*")) if staged.exists() else True


def test_a_link_to_dev_zero_is_refused_at_once(project_copy: Path) -> None:
    link = project_copy / "runtime" / "qwen_ft_runtime" / "zero.bin"
    link.symlink_to("/dev/zero")
    assert_one_line_error(_cli(project_copy, "bake", "-o", "-", "cpu"), "zero.bin", "symbolic link")


def test_a_fifo_in_the_context_is_refused(project_copy: Path) -> None:
    fifo = project_copy / "runtime" / "qwen_ft_runtime" / "pipe"
    os.mkfifo(fifo)
    assert_one_line_error(_cli(project_copy, "bake", "-o", "-", "cpu"), "pipe", "not a regular file")


def test_a_symlinked_runtime_folder_is_refused(project_copy: Path, secret_dir: Path) -> None:
    runtime = project_copy / "runtime"
    runtime.rename(project_copy / "runtime.real")
    runtime.symlink_to(secret_dir)
    assert_one_line_error(_cli(project_copy, "bake", "-o", "-", "cpu"), "runtime", "symbolic link")


def test_staged_context_is_exactly_the_regular_files(project_copy: Path) -> None:
    project = Project.at(project_copy)
    ctx = stage_context(project, None)
    staged = sorted(p.relative_to(ctx / "runtime") for p in (ctx / "runtime").rglob("*") if p.is_file())
    assert staged, "something was staged"
    assert all(not (ctx / "runtime" / p).is_symlink() for p in staged)
    assert not [p for p in staged if "__pycache__" in p.parts or p.suffix == ".pyc"]


# ----------------------------------------------------------------------------- finding 15


def test_wheelhouse_inside_build_context_is_refused_and_kept(project_copy: Path) -> None:
    house = project_copy / "build" / "context" / "wheelhouse"
    house.mkdir(parents=True)
    wheel = house / "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"my only copy")
    for sub in (house, project_copy / "build" / "context"):
        proc = _cli(project_copy, "bake", "-o", "-", "cpu", "--wheelhouse", str(sub))
        assert_one_line_error(proc, "--wheelhouse", "every build replaces")
    relative = _cli(project_copy, "bake", "-o", "-", "cpu", "--wheelhouse", "build/context/wheelhouse")
    assert_one_line_error(relative, "every build replaces")
    assert wheel.read_bytes() == b"my only copy"


def test_a_linked_staging_folder_is_unlinked_not_emptied(project_copy: Path, tmp_path_factory) -> None:
    mine = tmp_path_factory.mktemp("my-wheels")
    (mine / "keep.whl").write_bytes(b"keep")
    ctx = project_copy / "build" / "context"
    ctx.mkdir(parents=True)
    (ctx / "wheelhouse").symlink_to(mine, target_is_directory=True)
    (ctx / "runtime").symlink_to(mine, target_is_directory=True)
    stage_context(Project.at(project_copy), None)
    assert (mine / "keep.whl").read_bytes() == b"keep"
    assert not (ctx / "wheelhouse").is_symlink() and (ctx / "wheelhouse").is_dir()


# ----------------------------------------------------------------------------- finding 3

SECRET = "s3cr@t/pw"  # holds '@': a naive split at the first '@' leaks "t/pw"
PROXY = "http://alice:s3cr@t%2Fpw@proxy.corp:3128"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pw@proxy:3128", "http://***@proxy:3128"),
        ("http://proxy:3128", "http://proxy:3128"),
        ("http://alice:p@ss@w0rd@proxy.corp:3128", "http://***@proxy.corp:3128"),
        ("socks5h://a:b@c@[::1]:1080", "socks5h://***@[::1]:1080"),
        ("alice:p@ss@proxy:3128", "***@proxy:3128"),
        ("", ""),
        (None, None),
    ],
)
def test_redact_drops_everything_before_the_last_at(url: str | None, shown: str | None) -> None:
    assert proxy.redact(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "alice:pw@proxy:3128",
        "proxy.corp:3128",
        "ftp://proxy:21",
        "http://",
        "http://a:b/c@proxy:3128",
        "http://p:x",
    ],
)
def test_a_proxy_that_is_not_a_url_is_one_line_before_building(project_copy: Path, url: str) -> None:
    proc = _cli(project_copy, "build", "--dry-run", "cpu", "--http-proxy", url, env={"QWEN_FT_DOCKER": "sh"})
    assert_one_line_error(proc, "--http-proxy")
    assert "pw" not in proc.stderr.replace("--http-proxy", "")


def test_dry_run_settings_never_show_proxy_credentials(project_copy: Path) -> None:
    proc = _cli(
        project_copy, "build", "--dry-run", "cpu", "--https-proxy", PROXY, env={"QWEN_FT_DOCKER": "sh"}
    )
    assert "https_proxy = 'http://***@proxy.corp:3128'" in proc.stdout, proc.stdout + proc.stderr
    assert "s3cr" not in proc.stdout + proc.stderr


FAKE_DOCKER = """#!/bin/sh
# A docker CLI stand-in: records its argv and proxy environment, and "builds" an image id.
if [ "$1" = buildx ] && [ "$2" = version ]; then echo "github.com/docker/buildx v0.0.0"; exit 0; fi
printf '%s\\n' "$@" > "$FAKE_ARGV"
env | grep -i _proxy= > "$FAKE_ENV" || true
while [ $# -gt 0 ]; do
  if [ "$1" = --iidfile ]; then echo sha256:0123 > "$2"; fi
  shift
done
echo "#1 [1/1] FROM scratch"
"""


def test_proxy_values_reach_docker_only_through_its_environment(tmp_path: Path, monkeypatch) -> None:
    exe = tmp_path / "docker"
    exe.write_text(FAKE_DOCKER)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("FAKE_ARGV", str(tmp_path / "argv"))
    monkeypatch.setenv("FAKE_ENV", str(tmp_path / "env"))
    commands = tmp_path / "logs" / "commands.sh"
    engine = DockerEngine(str(exe), CommandLog(commands))
    proxies = {"HTTP_PROXY": PROXY, "http_proxy": PROXY, "NO_PROXY": "localhost"}
    req = BuildRequest(
        name="cpu-fp32",
        dockerfile=tmp_path / "Dockerfile",
        context=tmp_path,
        build_args={"BASE_IMAGE": "debian:bookworm-slim"},
        labels={},
        proxies=proxies,
    )
    log = tmp_path / "logs" / "cpu-fp32.log"
    outcome = engine.build(req, log, lambda step: None)
    assert outcome.ok, outcome
    argv = (tmp_path / "argv").read_text().splitlines()
    assert "HTTP_PROXY" in argv and "http_proxy" in argv, "the names are passed"
    assert not [a for a in argv if "s3cr" in a or "proxy.corp" in a], argv
    env = (tmp_path / "env").read_text()
    assert f"HTTP_PROXY={PROXY}" in env and f"http_proxy={PROXY}" in env, "the values reach docker"
    for path in (commands, log):
        text = path.read_text()
        assert "s3cr" not in text and "proxy.corp" not in text, (path, text)
    assert "reads HTTP_PROXY, NO_PROXY, http_proxy from the environment" in commands.read_text()
    dry_argv, dry_env = engine.build_argv(req, tmp_path / "x.iid")
    assert "s3cr" not in json.dumps([dry_argv, dry_env])


def test_check_accepts_real_proxy_urls() -> None:
    for url in ("http://proxy:3128", "https://u:p%40x@proxy.corp:8443/", PROXY, "socks5h://[::1]:1080"):
        proxy.check("--http-proxy", url)
    with pytest.raises(ConfigError, match=r"\*\*\*@"):
        proxy.check("--http-proxy", "ftp://alice:s3cr3t@proxy:21")
