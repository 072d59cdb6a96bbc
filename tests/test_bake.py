"""bake: the file follows buildx bake's JSON format and agrees with render and ci-matrix."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from docker_support import copy_project, find_client

from builder import bake, config, knowledge, render, resolve
from builder.project import Project

ROOT = Path(__file__).resolve().parent.parent

# Target fields the file uses, with the JSON type buildx's Target struct decodes them into
# (docker/buildx bake/bake.go; docs.docker.com/build/bake/reference/).
TARGET_FIELDS: dict[str, type] = {
    "context": str,
    "dockerfile": str,
    "tags": list,
    "labels": dict,
    "args": dict,
    "platforms": list,
    "cache-from": list,
    "cache-to": list,
    "secret": list,
}
NAME = re.compile(r"^[a-zA-Z0-9_-]+$")  # buildx validTargetNameChars


def run_bake(project: Path, *args: str) -> dict[str, Any]:
    out = project / "docker-bake.json"
    proc = subprocess.run(
        [sys.executable, "-m", "builder", "-f", str(project / "matrix.yaml"), "bake", "-o", str(out), *args],
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(out.read_text())
    return data


@pytest.fixture(scope="module")
def baked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    project = copy_project(tmp_path_factory.mktemp("project"))
    return project, run_bake(project, "--registry", "ghcr.io/acme")


def test_structure_follows_bake_json(baked: tuple[Path, dict[str, Any]]) -> None:
    _, data = baked
    assert set(data) == {"group", "target"}
    for name, group in data["group"].items():
        assert NAME.match(name) and set(group) == {"targets"}
        assert all(isinstance(t, str) and t in data["target"] for t in group["targets"])
    assert set(data["group"]["default"]["targets"]) == set(data["target"])
    assert set(data["group"]) <= {*bake.FAMILY_ORDER, "default"}
    for name, target in data["target"].items():
        assert NAME.match(name), name
        assert set(target) <= set(TARGET_FIELDS), set(target) - set(TARGET_FIELDS)
        for key, value in target.items():
            assert isinstance(value, TARGET_FIELDS[key]), (name, key)
        assert all(isinstance(v, str) for v in target["tags"] + target["platforms"])
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in target["labels"].items())
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in target["args"].items())
        # one platform per target: a classic image store (--load) holds one platform per tag
        assert target["platforms"] == (["linux/arm64"] if name.endswith("-arm64") else ["linux/amd64"])
        assert name.endswith("-arm64") == any(t.endswith("-arm64") for t in target["tags"][:-1])
        assert target["cache-from"] == [
            f"type=registry,ref=ghcr.io/acme/qwen-ft:buildcache-{_cell_id(target)}"
        ]
        assert target["cache-to"] == [target["cache-from"][0] + ",mode=max"]
        assert "io.qwen-ft.content-hash" in target["labels"]


def _cell_id(target: dict[str, Any]) -> str:
    return Path(target["dockerfile"]).parent.name


def test_groups_per_gpu_family(baked: tuple[Path, dict[str, Any]]) -> None:
    _, data = baked
    groups = data["group"]
    assert groups["volta"]["targets"] == ["v100-fp16", "v100-fp16-cu128-torch2_8_0-py3_10"]
    assert groups["ada"]["targets"] == ["l4-bf16"]
    assert groups["cpu"]["targets"] == ["cpu-fp32", "cpu-fp32-arm64"]
    assert list(groups)[-1] == "default"


def test_in_sync_with_render_and_ci(baked: tuple[Path, dict[str, Any]]) -> None:
    project, data = baked
    kb = knowledge.load()
    res = resolve.resolve(config.load(project / "matrix.yaml"), kb)
    files = render.render_all(Project.at(project), res, kb)
    ci = subprocess.run(
        [sys.executable, "-m", "builder", "ci-matrix", "--json", "--registry", "ghcr.io/acme"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    )
    hash_tags = {e["id"]: e["hash_tag"] for e in json.loads(ci.stdout)["include"]}
    assert len(data["target"]) == len(res.cells)
    for cell in res.cells:
        assert cell.plan is not None
        target = data["target"][bake.target_name(cell.id)]
        dockerfile = (project / target["context"] / target["dockerfile"]).resolve()
        assert dockerfile == (project / "images" / cell.id / "Dockerfile").resolve()
        assert dockerfile.read_text() == files[Project.at(project).dockerfile(cell.id)]
        assert target["tags"][:-1] == [f"ghcr.io/acme/{t}{cell.suffix}" for t in cell.plan.tags]
        assert target["tags"][-1] == hash_tags[cell.id]
        assert target["args"]["BASE_IMAGE"] == cell.plan.base_image
        assert {k: v for k, v in target["labels"].items() if k != "io.qwen-ft.content-hash"} == dict(
            cell.plan.labels
        )


def test_context_is_staged(baked: tuple[Path, dict[str, Any]]) -> None:
    project, data = baked
    context = project / "build" / "context"
    assert all(t["context"] == "build/context" for t in data["target"].values())
    assert (context / "wheelhouse").is_dir()  # bind-mounted by every Dockerfile
    staged = sorted(p.relative_to(context / "runtime") for p in (context / "runtime").rglob("*.py"))
    source = sorted(p.relative_to(project / "runtime") for p in (project / "runtime").rglob("*.py"))
    assert staged == source


def test_ca_bundle_is_a_secret_and_no_registry_means_no_cache(tmp_path: Path, project_copy: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    data = run_bake(project_copy, "--ca-bundle", str(bundle), "v100")
    assert set(data["target"]) == {"v100-fp16", "v100-fp16-cu128-torch2_8_0-py3_10"}
    for target in data["target"].values():
        assert target["secret"] == [f"id=ca_bundle,src={bundle.resolve()}"]
        assert "cache-from" not in target and "cache-to" not in target
        assert all(not t.startswith("ghcr.io") for t in target["tags"])


def test_bad_selector(project_copy: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "builder", "bake", "nope"],
        cwd=project_copy,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "matches no image" in proc.stderr


def test_buildx_accepts_the_file(baked: tuple[Path, dict[str, Any]]) -> None:
    """The whole matrix's file, registry cache included; tests/test_docker_bake.py builds from it."""
    buildx = find_client("buildx")
    project, data = baked
    proc = buildx.run("buildx", "bake", "-f", "docker-bake.json", "--print", cwd=project)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert set(printed["target"]) == set(data["target"])


def test_platform_filter_and_per_platform_base(tmp_path: Path) -> None:
    """bake --platform keeps only those platforms' targets; a base_map rule can name one platform."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "builder", "bake", "-o", "-", "cpu", "--platform", "linux/arm64",
            "--base-map", "debian:bookworm-slim@linux/arm64=local/debian:arm64",
            "--base-map", "debian:bookworm-slim=local/debian:amd64",
        ],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    targets = json.loads(proc.stdout)["target"]
    assert list(targets) == ["cpu-fp32-arm64"]
    (t,) = targets.values()
    assert t["platforms"] == ["linux/arm64"] and t["args"]["BASE_IMAGE"] == "local/debian:arm64"
