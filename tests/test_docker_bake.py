"""Docker tier: `docker buildx bake` on the generated file, for real, against what `build` does.

Needs the buildx plugin: these FAIL rather than skip when QWEN_FT_REQUIRE_BUILDX=1.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from docker_support import (
    REGISTRY,
    SESSION_ID,
    Client,
    build_options,
    cli,
    copy_project,
    docker,
    find_client,
    find_wheelhouse,
    remove_images,
)

pytestmark = pytest.mark.docker

IMAGE = f"qwen-ft-bake-{SESSION_ID}"
TARGET = "cpu-fp32"


@dataclass(frozen=True)
class Baked:
    project: Path
    args: tuple[str, ...]
    buildx: Client


@pytest.fixture(scope="module")
def baked(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baked]:
    tmp = tmp_path_factory.mktemp("bake")
    buildx = find_client("buildx", tmp / "unused")
    project = copy_project(tmp / "project", image=IMAGE)
    assert cli(project, "render").returncode == 0  # bake refuses a stale images/
    args = build_options(find_wheelhouse(tmp))
    yield Baked(project, args, buildx)
    remove_images(IMAGE)


def write_bake(b: Baked, *extra: str) -> Path:
    out = b.project / "docker-bake.json"
    proc = cli(b.project, "bake", "-o", str(out), "cpu", *b.args, *extra)
    assert proc.returncode == 0, proc.stderr
    return out


def bake(b: Baked, *args: str, timeout: float = 1800) -> dict[str, Any]:
    """Run `docker buildx bake` from the project root, as docs/bake.md says; returns its metadata."""
    meta = b.project / "bake-metadata.json"
    meta.unlink(missing_ok=True)
    proc = b.buildx.run(
        "buildx",
        "bake",
        "-f",
        "docker-bake.json",
        "--metadata-file",
        str(meta),
        *args,
        timeout=timeout,
        cwd=b.project,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data: dict[str, Any] = json.loads(meta.read_text())
    return data


def dry_run(b: Baked, *extra: str) -> tuple[list[str], list[str], str]:
    """`build --dry-run`'s build command, tags and content-hash prefix for the cpu image."""
    proc = cli(b.project, "build", "cpu", "--dry-run", *b.args, *extra, client=b.buildx)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(f"# {TARGET}:"))
    head = lines[first]  # "# cpu-fp32: content hash <12>; tags a, b, c"
    short_hash = head.split("content hash ", 1)[1].split(";", 1)[0]
    tags = head.split("; tags ", 1)[1].split(", ")
    return shlex.split(lines[first + 1]), tags, short_hash


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_print_agrees_with_build(baked: Baked) -> None:
    """Same tags, build args, secret, Dockerfile, context and content hash as `build` would use."""
    write_bake(baked)
    proc = baked.buildx.run("buildx", "bake", "-f", "docker-bake.json", "--print", TARGET, cwd=baked.project)
    assert proc.returncode == 0, proc.stderr
    target = json.loads(proc.stdout)["target"][TARGET]
    argv, tags, short_hash = dry_run(baked)
    assert argv[:4] == [baked.buildx.exe, "buildx", "build", "--load"]
    assert target["tags"] == tags
    assert target["args"] == dict(a.split("=", 1) for a in flag_values(argv, "--build-arg"))
    assert target["secret"] == flag_values(argv, "--secret")
    build_labels = dict(a.split("=", 1) for a in flag_values(argv, "--label"))
    assert build_labels["io.qwen-ft.content-hash"].startswith(short_hash)
    assert {k: target["labels"][k] for k in build_labels} == build_labels
    context = (baked.project / target["context"]).resolve()
    assert context == Path(argv[-1]).resolve()
    dockerfile = (context / target["dockerfile"]).resolve()
    assert dockerfile.read_text() == Path(flag_values(argv, "-f")[0]).read_text()


def test_bake_load_is_the_image_build_makes(baked: Baked) -> None:
    proc = cli(baked.project, "build", "cpu", *baked.args, client=baked.buildx)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((baked.project / "build" / "report.json").read_text())["images"][0]
    assert result["status"] == "built", "a fresh image name: the build really ran"
    built_id = result["image_id"]
    labels = json.loads(docker("image", "inspect", built_id).stdout)[0]["Config"]["Labels"]
    for ref in result["tags"]:
        docker("rmi", ref)
    assert docker("image", "inspect", built_id, check=False).returncode != 0, "gone before bake"

    write_bake(baked)
    meta = bake(baked, TARGET, "--load")[TARGET]
    # The docker driver's --load reports the image ID as containerimage.digest.
    assert meta.get("containerimage.config.digest", meta["containerimage.digest"]) == built_id
    for ref in result["tags"]:
        assert json.loads(docker("image", "inspect", ref).stdout)[0]["Id"] == built_id, ref
    # Every label bake sets is one the built image carries (bake repeats the Dockerfile's LABELs).
    data = json.loads((baked.project / "docker-bake.json").read_text())
    assert data["target"][TARGET]["labels"] == labels


def test_bake_push_and_pull_by_digest(baked: Baked) -> None:
    """With a registry: push with bake, pull back by digest, and get the image build makes."""
    registry = f"{REGISTRY}/qwen-ft-bake-{SESSION_ID}"
    write_bake(baked, "--registry", registry)
    # The default `docker` driver cannot export a cache (docs/bake.md): bake's own --set drops it.
    meta = bake(baked, TARGET, "--push", "--set", "*.cache-to=")
    digest = meta[TARGET]["containerimage.digest"]
    image_id = meta[TARGET]["containerimage.config.digest"]
    assert digest.startswith("sha256:")
    _, tags, _ = dry_run(baked, "--registry", registry, "--push")
    remote = [f"{registry}/{t}" for t in tags]
    for ref in remote:
        docker("rmi", "-f", ref, check=False)
    by_digest = f"{registry}/{IMAGE}@{digest}"
    pulled = docker("pull", by_digest)
    assert digest in pulled.stdout
    assert json.loads(docker("image", "inspect", by_digest).stdout)[0]["Id"] == image_id
    for ref in remote:  # every tag bake pushed names that manifest
        assert f"Digest: {digest}" in docker("pull", ref).stdout, ref
