"""Docker tier: concurrent runs of one project, and proxy secrets in a real build (issue 14,
findings 5 and 3), with real processes against the real daemon.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from docker_support import DOCKER, Built, copy_project

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent


def _start(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "builder", "--matrix", str(project / "matrix.yaml"), *args]
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "QWEN_FT_DOCKER": DOCKER, **(env or {})},
    )


def _edit_runtime(project: Path, marker: str) -> None:
    """Change only the runtime, so only the image's last layer rebuilds."""
    init = project / "runtime" / "qwen_ft_runtime" / "__init__.py"
    init.write_text(init.read_text() + f"\n# {marker}\n")


def test_concurrent_builds_of_one_project_fail_fast_naming_the_holder(
    tmp_path: Path, built_cpu: Built
) -> None:
    project = copy_project(tmp_path / "race", image="qwen-ft-race")
    _edit_runtime(project, f"race {time.time()}")  # a real (last-layer) build, so the runs overlap
    procs = [_start(project, "build", "cpu", *built_cpu.base_args) for _ in range(4)]
    outcomes = []
    for proc in procs:
        _, stderr = proc.communicate(timeout=900)
        outcomes.append((proc.pid, proc.returncode, stderr))
    pids = {pid for pid, _, _ in outcomes}
    for pid, code, stderr in outcomes:
        assert "Traceback" not in stderr, stderr
        assert code in (0, 11), (code, stderr)
        if code == 11:
            lines = stderr.strip().splitlines()
            assert len(lines) == 1, stderr
            m = re.fullmatch(
                r"error: another build is running \(pid (\d+): qwen-ft-images build\) in .*", lines[0]
            )
            assert m, lines[0]
            assert int(m.group(1)) in pids - {pid}, "names another of these runs"
    codes = [code for _, code, _ in outcomes]
    assert codes.count(0) >= 1 and codes.count(11) >= 1, codes
    report = json.loads((project / "build" / "report.json").read_text())
    assert [(r["image"], r["status"]) for r in report["images"]] in (
        [("cpu-fp32", "built")],
        [("cpu-fp32", "up-to-date")],
    )
    assert not (project / "build" / "context" / "runtime").is_symlink()


def test_concurrent_renders_all_succeed_and_leave_no_temp_files(project_copy: Path) -> None:
    images = project_copy / "images"
    for round_ in range(3):  # the write phase is short: several rounds make the race likely
        for dockerfile in images.glob("*/Dockerfile"):
            dockerfile.write_text(dockerfile.read_text() + f"# stale {round_}\n")
        procs = [_start(project_copy, "render") for _ in range(8)]
        for proc in procs:
            _, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    check = _start(project_copy, "render", "--check")
    _, stderr = check.communicate(timeout=120)
    assert check.returncode == 0, stderr
    assert not [p for p in images.rglob("*") if p.name.endswith(".tmp")]


SECRET = "pa55@w0rd-9c41"


def test_proxy_credentials_stay_out_of_argv_files_and_messages(tmp_path: Path, built_cpu: Built) -> None:
    """The proxy password is never visible to `ps`, in commands.sh, the build log, the report or output."""
    project = copy_project(tmp_path / "proxied", image="qwen-ft-proxied")
    warm = subprocess.run(
        [
            sys.executable,
            "-m",
            "builder",
            "--matrix",
            str(project / "matrix.yaml"),
            "build",
            "cpu",
            *built_cpu.base_args,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "QWEN_FT_DOCKER": DOCKER},
    )
    assert warm.returncode == 0, warm.stderr
    _edit_runtime(project, f"proxied {time.time()}")  # only the COPY layer runs: the proxy is never dialled
    url = f"http://builder:{SECRET}@proxy.invalid:3128"
    # Through the environment: a command-line flag's value would show in `ps` itself.
    proxies = {"QWEN_FT_HTTP_PROXY": url, "QWEN_FT_HTTPS_PROXY": url}
    proc = _start(project, "build", "cpu", *built_cpu.base_args, env=proxies)
    seen_build = False
    try:
        while proc.poll() is None:
            listing = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
            leaks = [line for line in listing.splitlines() if SECRET in line]
            assert not leaks, leaks
            seen_build = seen_build or (" build " in listing and "--iidfile" in listing)
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert seen_build, "ps was sampled while docker build ran"
    assert SECRET not in stdout + stderr
    for path in (project / "build").rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert SECRET.encode() not in path.read_bytes(), path
    log = (project / "build" / "logs" / "cpu-fp32.log").read_text()
    assert "--build-arg HTTP_PROXY" in log and "--build-arg HTTPS_PROXY" in log
    report = json.loads((project / "build" / "report.json").read_text())
    assert report["options"]["http_proxy"] == "http://***@proxy.invalid:3128"
