"""Docker tier: `audit` on real images (the GPU image itself is audited in tests/e2e/)."""

from __future__ import annotations

import json

import pytest
from docker_support import BASE_IMAGE, Built, cli

pytestmark = pytest.mark.docker


def test_foreign_image_is_refused_in_one_line(built_cpu: Built) -> None:
    proc = cli(built_cpu.project, "audit", "--image", BASE_IMAGE)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {BASE_IMAGE} was not built by qwen-ft-images (no io.qwen-ft.sm label); "
        "pass --sm N to audit it anyway"
    )


def test_cpu_image_has_nothing_to_audit(built_cpu: Built) -> None:
    proc = cli(built_cpu.project, "audit", "cpu-fp32", "--json")
    assert proc.returncode == 0, proc.stderr
    (image,) = json.loads(proc.stdout)["images"]
    assert image["sm"] is None and image["ok"] is True and "cpu image" in image["note"]
    assert (built_cpu.project / "build" / "reports" / "audit.json").is_file()


def test_probe_runs_in_a_throwaway_container(built_cpu: Built) -> None:
    # --sm forces the real probe (cuobjdump from PyPI, bind-mounted read-only): the CPU
    # image's torch has no device code, so nothing is listed and nothing fails.
    proc = cli(built_cpu.project, "audit", "cpu-fp32", "--sm", "70", "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr
    (image,) = json.loads(proc.stdout)["images"]
    assert image["sm"] == 70 and image["sm_source"] == "--sm"
    assert image["binaries"] == [] and image["shared_objects"] > 50
    assert image["cuobjdump"].startswith("Cuda compilation tools, release 13.4")
    assert image["python"].startswith("3.")
    assert _audit_containers() == [], "the audit container was not removed"


def _audit_containers() -> list[str]:
    from docker_support import docker

    return docker("ps", "-aq", "--filter", "label=io.qwen-ft.audit-run").stdout.split()
