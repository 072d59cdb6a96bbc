"""Unit tier for build planning and orchestration, against a recording fake of the engine."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from builder import build, config, content, knowledge, record, resolve
from builder import jobs as jobplan
from builder.content import content_hash
from builder.contract import CONTENT_HASH as HASH_LABEL
from builder.engine import BuildOutcome, BuildRequest, DockerEngine, _summarise_error, split_ref
from builder.errors import EngineError, RegistryError
from builder.project import Project

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class FakeEngine:
    """Records every call; images and a registry live in dicts."""

    fail: set[str] = field(default_factory=set)
    images: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)  # ref -> (id, labels)
    registry: dict[str, str] = field(default_factory=dict)  # remote ref -> digest
    digests: dict[str, list[str]] = field(default_factory=dict)  # image id -> repo digests
    calls: list[tuple[str, ...]] = field(default_factory=list)
    platform_of: dict[str, str] = field(default_factory=dict)  # image id or digest -> platform
    lists: dict[str, dict[str, str]] = field(default_factory=dict)  # remote ref -> {platform: digest}
    requests: list[BuildRequest] = field(default_factory=list)

    def check(self) -> str:
        return "fake"

    def build(self, req: BuildRequest, log: Path, on_step: Callable[[str], None]) -> BuildOutcome:
        self.calls.append(("build", req.name))
        on_step("[1/1] RUN something")
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("log\n")
        if req.name in self.fail:
            return BuildOutcome(False, None, "[stage-0 4/8] RUN pip install", "no space left on device", log)
        image_id = f"sha256:{req.name}-{req.labels[HASH_LABEL][:6]}"
        self.images[image_id] = (image_id, dict(req.labels))
        self.platform_of[image_id] = req.platform or "linux/amd64"
        self.requests.append(req)
        return BuildOutcome(True, image_id, None, None, log)

    def image_labels(self, ref: str) -> Mapping[str, str] | None:
        hit = self.images.get(ref)
        return None if hit is None else hit[1]

    def image_id(self, ref: str) -> str | None:
        hit = self.images.get(ref)
        return None if hit is None else hit[0]

    def image_size(self, ref: str) -> int:
        return 123

    def repo_digests(self, ref: str) -> list[str]:
        image_id = self.image_id(ref) or ref
        return self.digests.get(image_id, [])

    def tag(self, image_id: str, ref: str) -> None:
        self.calls.append(("tag", ref))
        self.images[ref] = self.images[image_id]

    def push(self, ref: str) -> str:
        self.calls.append(("push", ref))
        image_id = self.images[ref][0]
        digest = "sha256:" + image_id.split(":")[1]
        self.registry[ref] = digest
        self.platform_of[digest] = self.platform_of[image_id]
        repo = ref.rsplit(":", 1)[0]
        self.digests.setdefault(image_id, []).append(f"{repo}@{digest}")
        return digest

    swapped: dict[str, str] = field(default_factory=dict)  # digest -> the image a racing push left there

    def pull(self, ref: str) -> str:
        self.calls.append(("pull", ref))
        digest = ref.split("@", 1)[1] if "@" in ref else self.registry[ref]
        image_id = self.swapped.get(digest, "sha256:" + digest.split(":", 1)[1])
        self.images[ref] = (image_id, {})
        return image_id

    def remote_digest(self, ref: str) -> str | None:
        return self.registry.get(ref)

    def remove_image(self, ref: str) -> None:
        self.images.pop(ref, None)

    def create_manifest_list(self, target: str, sources: Sequence[str]) -> str:
        self.calls.append(("manifest", target, *sources))
        entries = {}
        for src in sources:
            digest = src.split("@", 1)[1]
            entries[self.platform_of[digest]] = digest
        self.lists[target] = entries
        self.registry[target] = "sha256:list-" + target.rsplit(":", 1)[1]
        return self.registry[target]

    def manifest_platforms(self, ref: str) -> dict[str, str] | None:
        """A list while the tag still points at it; a plain image pushed over it answers {}."""
        if ref in self.lists and self.registry.get(ref, "").startswith("sha256:list-"):
            return dict(self.lists[ref])
        return {} if ref in self.registry else None

    def pull_ref(self, ref: str) -> None:
        self.calls.append(("pull", ref))

    def image_platform(self, ref: str) -> str | None:
        return self.platform_of.get(ref.split("@", 1)[-1])


def plan(project_root: Path = ROOT, options: jobplan.BuildOptions | None = None) -> list[jobplan.BuildJob]:
    project = Project.at(project_root)
    cfg = config.load(project.matrix)
    kb = knowledge.load()
    res = resolve.resolve(cfg, kb)
    return jobplan.plan_jobs(project, res, kb, res.cells, options or jobplan.BuildOptions())


@pytest.fixture
def project(project_copy: Path) -> Project:
    return Project.at(project_copy)


def test_base_map_rules() -> None:
    rules = jobplan.parse_base_map(
        ["nvidia/cuda:*=mirror.local/nvidia/cuda:*", "debian:bookworm-slim=local/deb:1"]
    )
    assert (
        jobplan.map_base("nvidia/cuda:12.6.3-base-ubuntu24.04", rules)
        == "mirror.local/nvidia/cuda:12.6.3-base-ubuntu24.04"
    )
    assert jobplan.map_base("debian:bookworm-slim", rules) == "local/deb:1"
    assert jobplan.map_base("python:3.11", rules) == "python:3.11"
    with pytest.raises(Exception, match="PATTERN=REPLACEMENT"):
        jobplan.parse_base_map(["nvidia/cuda"])


def test_plan_tags_and_hash() -> None:
    jobs = {j.name: j for j in plan()}
    v100 = jobs["v100-fp16"]
    assert v100.tags[:2] == ("qwen-ft:v100-fp16", "qwen-ft:v100-fp16-cu126-torch2.14.1-py3.12")
    assert v100.tags[2] == f"qwen-ft:v100-{v100.digest[:12]}"
    assert v100.labels == {HASH_LABEL: v100.digest}
    assert v100.build_args["BASE_IMAGE"] == "nvidia/cuda:12.6.3-base-ubuntu24.04"
    text = (ROOT / "images" / "v100-fp16" / "Dockerfile").read_text()
    assert v100.digest == content_hash(text, ROOT / "runtime", v100.build_args)
    extra = jobs["v100-fp16-cu128-torch2.8.0-py3.10"]
    assert len(extra.tags) == 2  # no alias for an extra image


def test_base_map_changes_the_content_hash() -> None:
    plain = {j.name: j.digest for j in plan()}
    mapped = {
        j.name: j.digest
        for j in plan(
            options=jobplan.BuildOptions(base_map=jobplan.parse_base_map(["nvidia/cuda:*=m/cuda:*"]))
        )
    }
    assert plain["cpu-fp32"] == mapped["cpu-fp32"]
    assert plain["v100-fp16"] != mapped["v100-fp16"]


def test_changing_one_target_changes_only_its_hash(project_copy: Path) -> None:
    before = {j.name: j.digest for j in plan(project_copy)}
    matrix = project_copy / "matrix.yaml"
    matrix.write_text(
        matrix.read_text().replace("  t4:\n    sm: 75\n", '  t4:\n    sm: 75\n    axes: {torch: ["2.8.0"]}\n')
    )
    after = {j.name: j.digest for j in plan(project_copy)}
    changed = {name for name in before if before[name] != after.get(name)}
    assert changed == {"t4-fp16"}


def test_run_builds_then_skips_when_up_to_date(project: Project) -> None:
    engine = FakeEngine()
    jobs = plan(project.root)
    results = build.run(project, jobs, engine, jobplan.BuildOptions(jobs=3))
    assert all(r.status == "built" for r in results)
    assert sum(1 for c in engine.calls if c[0] == "build") == len(jobs)
    for job in jobs:
        ids = {engine.image_id(t) for t in job.tags}
        assert len(ids) == 1, "alias, pinned and hash tag name one image"
    engine.calls.clear()
    again = build.run(project, jobs, engine, jobplan.BuildOptions(jobs=3))
    assert all(r.status == "up-to-date" for r in again)
    assert engine.calls == [], "no build and no re-tag when nothing changed"


def test_failure_does_not_tag_and_others_continue(project: Project) -> None:
    jobs = [j for j in plan(project.root) if j.name in ("cpu-fp32", "v100-fp16")]
    engine = FakeEngine(fail={"v100-fp16"})
    old_id = "sha256:previous-good"
    engine.images[old_id] = (old_id, {})
    engine.images["qwen-ft:v100-fp16"] = (old_id, {})
    results = {r.image: r for r in build.run(project, jobs, engine, jobplan.BuildOptions())}
    assert results["cpu-fp32"].status == "built"
    failed = results["v100-fp16"]
    assert failed.status == "failed"
    assert failed.failed_step == "[stage-0 4/8] RUN pip install"
    assert failed.error == "no space left on device"
    assert failed.log is not None and failed.log.endswith("build/logs/v100-fp16.log")
    assert engine.image_id("qwen-ft:v100-fp16") == old_id, "the previous good tag is untouched"


def test_fail_fast_skips_the_rest(project: Project) -> None:
    jobs = plan(project.root)
    engine = FakeEngine(fail={jobs[0].name})
    results = build.run(project, jobs, engine, jobplan.BuildOptions(jobs=1, fail_fast=True))
    assert results[0].status == "failed"
    assert {r.status for r in results[1:]} == {"skipped"}


REG = "127.0.0.1:5000/team"


def test_push_publishes_one_manifest_list_per_tag(project: Project) -> None:
    """cpu: amd64 on torch 2.13.0, arm64 on PyPI's CPU build 2.10.0. The alias is one list of
    both; each pinned tag is a list of its own stack's platform; every digest is pulled back."""
    jobs = [j for j in plan(project.root) if j.cell.spec.target == "cpu"]
    assert [(j.name, j.platform) for j in jobs] == [
        ("cpu-fp32", "linux/amd64"),
        ("cpu-fp32-arm64", "linux/arm64"),
    ]
    engine = FakeEngine()
    results = build.run(project, jobs, engine, jobplan.BuildOptions(push=True, registry=REG))
    assert all(r.ok for r in results), [r.error for r in results]
    amd, arm = (engine.registry[f"{REG}/{j.hash_ref}"] for j in jobs)
    assert engine.lists[f"{REG}/qwen-ft:cpu-fp32"] == {"linux/amd64": amd, "linux/arm64": arm}
    assert engine.lists[f"{REG}/qwen-ft:cpu-fp32-torch2.13.0-py3.11"] == {"linux/amd64": amd}
    assert engine.lists[f"{REG}/qwen-ft:cpu-fp32-torch2.10.0-py3.11"] == {"linux/arm64": arm}
    assert ("pull", f"{REG}/qwen-ft@{arm}") in engine.calls and (
        "pull",
        f"{REG}/qwen-ft@{amd}",
    ) in engine.calls
    # the arm64 build asks BuildKit for its platform; amd64 keeps the command it always had
    assert [r.platform for r in engine.requests] == [None, "linux/arm64"]
    # locally, one image per tag: the arm64 image's alias carries its architecture
    assert jobs[1].tags[:2] == ("qwen-ft:cpu-fp32-arm64", "qwen-ft:cpu-fp32-torch2.10.0-py3.11-arm64")
    assert results[1].pushed[f"{REG}/qwen-ft:cpu-fp32"] == "sha256:list-cpu-fp32"


def test_pinned_lists_are_immutable_and_the_alias_moves(project: Project) -> None:
    (job,) = [j for j in plan(project.root) if j.name == "cpu-fp32"]
    engine = FakeEngine()
    opts = jobplan.BuildOptions(push=True, registry=REG)
    (first,) = build.run(project, [job], engine, opts)
    assert first.ok and len(first.pushed) == 3  # content tag, then the alias and pinned lists
    digest = first.pushed[f"{REG}/{job.hash_ref}"]
    assert ("pull", f"{REG}/qwen-ft@{digest}") in engine.calls, "pulled back by digest"
    pinned = f"{REG}/qwen-ft:cpu-fp32-torch2.13.0-py3.11"
    engine.lists[pinned] = {"linux/amd64": "sha256:someone-else"}
    engine.lists[f"{REG}/qwen-ft:cpu-fp32"] = {"linux/amd64": "sha256:older"}
    engine.images.clear()
    (second,) = build.run(project, [job], engine, opts)
    assert second.status == "failed" and second.failed_in == "push"
    assert second.error is not None and "immutable" in second.error and "--force" in second.error
    (forced,) = build.run(project, [job], engine, jobplan.BuildOptions(push=True, registry=REG, force=True))
    assert forced.ok and engine.lists[pinned] != {"linux/amd64": "sha256:someone-else"}


def test_a_list_whose_platform_failed_is_not_published(project: Project) -> None:
    jobs = [j for j in plan(project.root) if j.cell.spec.target == "cpu"]
    engine = FakeEngine(fail={"cpu-fp32-arm64"})
    results = build.run(project, jobs, engine, jobplan.BuildOptions(push=True, registry=REG))
    assert [r.ok for r in results] == [True, False]
    assert f"{REG}/qwen-ft:cpu-fp32" not in engine.lists  # never a list missing a platform
    assert f"{REG}/qwen-ft:cpu-fp32-torch2.13.0-py3.11" in engine.lists


def test_a_pulled_back_platform_must_match(project: Project) -> None:
    (job,) = [j for j in plan(project.root) if j.name == "cpu-fp32-arm64"]
    engine = FakeEngine()
    real = engine.image_platform
    engine.image_platform = lambda ref: "linux/amd64" if real(ref) == "linux/arm64" else real(ref)  # type: ignore[method-assign]
    (result,) = build.run(project, [job], engine, jobplan.BuildOptions(push=True, registry=REG))
    assert not result.ok and "not linux/arm64" in (result.error or "")


def test_hashes_and_platform_filter_per_platform(project: Project) -> None:
    both = [j for j in plan(project.root) if j.cell.spec.target == "cpu"]
    only = [
        j
        for j in plan(project.root, jobplan.BuildOptions(platforms=("linux/arm64",)))
        if j.cell.spec.target == "cpu"
    ]
    assert [j.name for j in only] == ["cpu-fp32-arm64"]
    assert only[0].digest == both[1].digest != both[0].digest


def test_same_stack_on_two_platforms_is_one_image(project: Project) -> None:
    """Where the plan is identical (PyPI's torch 2.14.1 is cu130 on both, and only CUDA DeepSpeed
    ops, which do not depend on the host ISA), one Dockerfile, one job per platform, and every tag
    a two-platform list."""
    m = project.matrix
    text = m.read_text().replace(
        "  h100:\n    sm: 90\n",
        '  h100:\n    sm: 90\n    recommended: {cuda: "13.0", torch: "2.14.1", python: "3.12", flash_attn: "none"}\n'
        "    deepspeed_ops: [fused_adam]\n",
    )
    m.write_text(text)
    jobs = [j for j in plan(project.root) if j.cell.spec.target == "h100"]
    assert [(j.name, j.platform) for j in jobs] == [
        ("h100-bf16", "linux/amd64"),
        ("h100-bf16-arm64", "linux/arm64"),
    ]
    assert jobs[0].cell is jobs[1].cell and jobs[0].cell.platforms == ("linux/amd64", "linux/arm64")
    lists = build.manifest_lists(jobs)
    assert {t: [j.platform for j in js] for t, js in lists.items()} == {
        "qwen-ft:h100-bf16": ["linux/amd64", "linux/arm64"],
        "qwen-ft:h100-bf16-cu130-torch2.14.1-py3.12": ["linux/amd64", "linux/arm64"],
    }


def test_a_refused_push_moves_no_tag_not_even_the_alias(project: Project) -> None:
    """Finding 2(a): every immutable tag is checked before anything is pushed."""
    (job,) = [j for j in plan(project.root) if j.name == "cpu-fp32"]
    engine = FakeEngine()
    opts = jobplan.BuildOptions(push=True, registry="127.0.0.1:5000/team")
    build.run(project, [job], engine, opts)
    alias = "127.0.0.1:5000/team/qwen-ft:cpu-fp32"
    engine.registry[alias] = "sha256:the-old-alias"
    engine.registry["127.0.0.1:5000/team/qwen-ft:cpu-fp32-torch2.13.0-py3.11"] = "sha256:someone-else"
    engine.images.clear()
    engine.calls.clear()
    (second,) = build.run(project, [job], engine, opts)
    assert second.status == "failed" and second.failed_in == "push"
    assert not [c for c in engine.calls if c[0] == "push"], "nothing was pushed"
    assert engine.registry[alias] == "sha256:the-old-alias"
    assert second.pushed == {} and "nothing was pushed" in (second.error or "")


def test_a_registry_holding_another_image_fails_the_push(project: Project) -> None:
    """Finding 2(b): the pulled-back image must be the one this run built, not a racing run's."""
    (job,) = [j for j in plan(project.root) if j.name == "cpu-fp32"]
    engine = FakeEngine()
    built = engine.build(
        build.request_for(job, project.context, jobplan.BuildOptions()), project.logs / "x.log", print
    )
    assert built.image_id is not None
    engine.swapped["sha256:" + built.image_id.split(":")[1]] = "sha256:another-run"
    (result,) = build.run(
        project, [job], engine, jobplan.BuildOptions(push=True, registry="127.0.0.1:5000/t")
    )
    assert result.status == "failed" and "concurrent push" in (result.error or "")


def test_remote_digest_absent_only_for_the_registrys_not_found_codes() -> None:
    """Finding 2(c): a 403 'project not found or no read permission' is an error, not 'absent'."""
    import docker
    import requests

    from builder.engine import DockerEngine

    def error(status: int, text: str) -> docker.errors.APIError:
        response = requests.Response()
        response.status_code = status
        return docker.errors.APIError(f"{status} Client Error", response=response, explanation=text)

    class Images:
        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        def get_registry_data(self, ref: str) -> object:
            raise self.exc

    engine = DockerEngine("sh")
    for exc, absent in (
        (error(404, 'Not Found ("manifest unknown: manifest unknown")'), True),
        (error(404, 'Not Found ("name unknown: repository name not known to registry")'), True),
        (error(403, 'Forbidden ("project not found or no read permission")'), False),
        (error(404, 'Not Found ("project not found or no read permission")'), False),
        (error(500, "Internal Server Error (dial tcp: connection refused)"), False),
    ):
        engine._client = type("Client", (), {"images": Images(exc)})()  # type: ignore[assignment]
        if absent:
            assert engine.remote_digest("r.example/ns/qwen-ft:t") is None
        else:
            with pytest.raises(RegistryError, match="unreachable or refused"):
                engine.remote_digest("r.example/ns/qwen-ft:t")


def test_an_interrupted_run_says_what_it_already_pushed() -> None:
    """Finding 4: "no tag was moved" only when that is true."""
    from builder.record import ImageResult

    pushed = ImageResult("cpu-fp32", status="interrupted", pushed={"r/ns/qwen-ft:cpu-fp32": "sha256:1"})
    assert "already pushed: r/ns/qwen-ft:cpu-fp32" in build.interrupted_message([pushed])
    assert "finished and tagged before that: v100-fp16" in build.interrupted_message(
        [ImageResult("v100-fp16", status="built"), ImageResult("cpu-fp32", status="interrupted")]
    )
    assert build.interrupted_message([ImageResult("cpu-fp32", status="interrupted")]).endswith(
        "no tag was moved"
    )


def test_stage_context_links_wheels(project: Project, tmp_path: Path) -> None:
    wheels = tmp_path / "wh"
    wheels.mkdir()
    (wheels / "torch-0-py3-none-any.whl").write_bytes(b"x")
    ctx = content.stage_context(project, wheels)
    assert (ctx / "wheelhouse" / "torch-0-py3-none-any.whl").read_bytes() == b"x"
    assert (ctx / "runtime" / "qwen_ft_runtime" / "__init__.py").exists()
    assert not list(ctx.rglob("__pycache__"))


def test_error_summaries() -> None:
    assert "disk full" in _summarise_error(["#9 0.1 write /x: no space left on device"])
    assert "--base-map" in _summarise_error(
        ["ERROR: failed to solve: failed to resolve source metadata for x"]
    )
    assert _summarise_error(["a", "ERROR: boom"]) == "ERROR: boom"
    assert split_ref("127.0.0.1:5000/ns/qwen-ft:cpu-fp32") == ("127.0.0.1:5000/ns/qwen-ft", "cpu-fp32")
    assert split_ref("127.0.0.1:5000/ns/qwen-ft") == ("127.0.0.1:5000/ns/qwen-ft", "latest")


def test_redact_proxy_credentials() -> None:
    assert record.redact("http://user:pw@proxy:3128") == "http://***@proxy:3128"
    assert record.redact("http://proxy:3128") == "http://proxy:3128"


class _OldClient:
    def version(self) -> dict[str, str]:
        return {"Version": "19.03.15"}


def test_too_old_daemon_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_FT_DOCKER", sys.executable)  # any executable: only the SDK is asked
    engine = DockerEngine()
    engine._client = _OldClient()  # type: ignore[assignment]
    with pytest.raises(EngineError, match=r"19\.03\.15 is too old: RUN --mount needs 20\.10\+"):
        engine.check()


def test_no_daemon_is_a_one_line_error(tmp_path: Path) -> None:
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no.sock", "QWEN_FT_DOCKER": sys.executable}
    proc = subprocess.run(
        [sys.executable, "-m", "builder", "build", "cpu"], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 5, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no Docker daemon answers")
    assert "start dockerd" in lines[0]


def test_registry_error_is_typed() -> None:
    assert RegistryError("x").exit_code == 7


def test_stale_tags_keep_current_and_named_images() -> None:
    jobs = [j for j in plan() if j.name in ("cpu-fp32", "v100-fp16")]
    cpu = next(j for j in jobs if j.name == "cpu-fp32")
    local = {
        "qwen-ft:cpu-fp32": "sha256:new",
        "qwen-ft:cpu-fp32-torch2.13.0-py3.11": "sha256:new",
        cpu.hash_ref: "sha256:new",
        "qwen-ft:cpu-0123456789ab": "sha256:old",  # superseded: stale
        "qwen-ft:cpu-aaaaaaaaaaaa": "sha256:new",  # another hash tag on the live image: kept
        "qwen-ft:v100-bbbbbbbbbbbb": "sha256:older",  # superseded v100 build: stale
        "qwen-ft:custom-cccccccccccc": "sha256:x",  # not a target of this matrix: kept
        "qwen-ft:latest": "sha256:y",
    }
    assert jobplan.stale_tags(jobs, local) == ["qwen-ft:cpu-0123456789ab", "qwen-ft:v100-bbbbbbbbbbbb"]


def test_host_ops_make_the_stack_differ_per_platform(project: Project) -> None:
    """DeepSpeed's cpu_adam is compiled for the platform's ISA (x86-64-v3 / armv8-a+NEON), so the
    same cell is two images, each with its own Dockerfile."""
    m = project.matrix
    m.write_text(
        m.read_text().replace(
            "  h100:\n    sm: 90\n",
            '  h100:\n    sm: 90\n    recommended: {cuda: "13.0", torch: "2.14.1", python: "3.12", flash_attn: "none"}\n',
        )
    )
    jobs = [j for j in plan(project.root) if j.cell.spec.target == "h100"]
    assert [j.name for j in jobs] == ["h100-bf16", "h100-bf16-arm64"]
    assert jobs[0].cell is not jobs[1].cell
    assert jobs[0].cell.plan.deepspeed.march == "x86-64-v3" and jobs[1].cell.plan.deepspeed.march == "armv8-a"
