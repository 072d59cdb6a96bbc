"""Docker tier, issue #12: the arm64 cpu image built for real under qemu-user-static, its
contract and a LoRA step run under emulation, a two-platform manifest list pushed to the local
registry, and each platform pulled back by digest with the plain docker CLI.

Needs binfmt_misc with qemu-aarch64 (F flag) and the debootstrapped arm64 base
(ci/setup-host.sh, ci/make-base-image.sh --arch arm64); fails rather than skips under
QWEN_FT_REQUIRE_DOCKER=1. Timings go to build/arm64-metrics.json (docs/benchmarks.md), not into
assertions.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from docker_support import (
    DOCKER,
    REGISTRY,
    ROOT,
    SESSION_ID,
    Built,
    build_options,
    cli,
    copy_project,
    docker,
    require_engine,
    unavailable,
)

pytestmark = pytest.mark.docker

ARM64_BASE = os.environ.get("QWEN_FT_BASE_IMAGE_ARM64", "qwen-ft-local/debian:bookworm-arm64")
BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
METRICS = ROOT / "build" / "arm64-metrics.json"


def _binfmt_ready() -> str | None:
    try:
        text = BINFMT.read_text()
    except OSError:
        return f"{BINFMT} is missing (run ci/setup-host.sh: binfmt_misc + qemu-user-static)"
    if not text.startswith("enabled") or not any(
        line.startswith("flags:") and "F" in line for line in text.splitlines()
    ):
        return f"{BINFMT} is not enabled with the F flag: {' '.join(text.split())}"
    return None


@pytest.fixture(scope="session")
def built_both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Built, str, float]]:
    require_engine()
    problem = _binfmt_ready()
    if problem:
        unavailable(problem)
    if docker("image", "inspect", ARM64_BASE, check=False).returncode != 0:
        unavailable(f"arm64 base image {ARM64_BASE} missing; run ci/make-base-image.sh --arch arm64")
    tmp = tmp_path_factory.mktemp("arm64")
    image = f"qwen-ft-arm64-{SESSION_ID}"
    project = copy_project(tmp / "project", image=image)
    wheelhouse = Path(os.environ.get("QWEN_FT_WHEELHOUSE", "/opt/wheels"))
    registry = f"{REGISTRY}/ci-{SESSION_ID}"
    start = time.monotonic()
    proc = cli(
        project,
        "build",
        "cpu",
        "--push",
        "--registry",
        registry,
        "--base-map",
        f"debian:bookworm-slim@linux/arm64={ARM64_BASE}",
        *build_options(wheelhouse, platform="linux/amd64,linux/arm64"),
        timeout=3600,
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((project / "build" / "report.json").read_text())
    yield Built(project, wheelhouse, report, (), image=image), registry, seconds


def _timed_run(platform: str, ref: str, *cmd: str) -> tuple[dict[str, object], float]:
    start = time.monotonic()
    proc = docker("run", "--rm", "--platform", platform, ref, "qwen-ft-runtime", *cmd, timeout=1800)
    seconds = time.monotonic() - start
    return json.loads(proc.stdout.strip().splitlines()[-1]), seconds


def test_two_platform_list_pushed_and_each_platform_pulled_back_by_digest(
    built_both: tuple[Built, str, float],
) -> None:
    built, registry, build_s = built_both
    images = {str(i["image"]): i for i in built.report["images"]}  # type: ignore[attr-defined]
    assert set(images) == {"cpu-fp32", "cpu-fp32-arm64"}
    assert all(i["status"] in ("built", "up-to-date") for i in images.values()), images
    alias = f"{registry}/{built.image}:cpu-fp32"
    listing = json.loads(docker("manifest", "inspect", "--insecure", alias).stdout)
    entries = {
        f"{m['platform']['os']}/{m['platform']['architecture']}": m["digest"] for m in listing["manifests"]
    }
    assert set(entries) == {"linux/amd64", "linux/arm64"}
    for platform, digest in entries.items():
        ref = f"{registry}/{built.image}@{digest}"
        docker("pull", "-q", ref)
        arch = docker("image", "inspect", "-f", "{{.Os}}/{{.Architecture}}", ref).stdout.strip()
        assert arch == platform
    # a pinned tag is one stack: the arm64 one holds arm64 only, so an amd64 host is refused
    pinned = json.loads(
        docker(
            "manifest", "inspect", "--insecure", f"{registry}/{built.image}:cpu-fp32-torch2.10.0-py3.11"
        ).stdout
    )
    assert [m["platform"]["architecture"] for m in pinned["manifests"]] == ["arm64"]
    METRICS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(METRICS.read_text()) if METRICS.exists() else {}
    data.update(
        build_and_push_s=round(build_s, 1),
        image_seconds={k: v["seconds"] for k, v in images.items()},
        docker=DOCKER,
    )
    METRICS.write_text(json.dumps(data, indent=2) + "\n")


def test_contract_and_lora_step_under_emulation(built_both: tuple[Built, str, float]) -> None:
    built, _, _ = built_both
    local = {"linux/amd64": f"{built.image}:cpu-fp32", "linux/arm64": f"{built.image}:cpu-fp32-arm64"}
    timings: dict[str, dict[str, float]] = {}
    for platform, ref in local.items():
        arch = docker("image", "inspect", "-f", "{{.Architecture}}", ref).stdout.strip()
        assert arch == platform.split("/")[1]
        contract, contract_s = _timed_run(platform, ref, "contract")
        assert contract["ok"] is True, contract
        smoke, smoke_s = _timed_run(platform, ref, "smoke", "--steps", "2", "--tiny", "qwen2-tiny")
        assert smoke["entry"] == "smoke" and smoke["ok"] is True, smoke
        machine = docker("run", "--rm", "--platform", platform, ref, "uname", "-m").stdout.strip()
        assert machine == {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}[platform]
        timings[platform] = {"contract_s": round(contract_s, 2), "smoke_s": round(smoke_s, 2)}
    data = json.loads(METRICS.read_text()) if METRICS.exists() else {}
    data["runs"] = timings
    data["emulation_slowdown_smoke"] = round(
        timings["linux/arm64"]["smoke_s"] / timings["linux/amd64"]["smoke_s"], 1
    )
    METRICS.parent.mkdir(parents=True, exist_ok=True)
    METRICS.write_text(json.dumps(data, indent=2) + "\n")
