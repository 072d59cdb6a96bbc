"""The cached paths of an up-to-date `make images`: smoke verdicts reused only when nothing that
decides them changed, failures never cached, and a build that is up to date answered from one
Engine API snapshot."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from test_smoke import CONTRACT_TRITON, CPU_LABELS, FakeEngine, out, run_cli

from builder import config, contract, knowledge, resolve, smoke, uptodate
from builder.hostprobe import GpuInfo
from builder.uptodate import LocalImage, Snapshot

L4 = GpuInfo(0, "NVIDIA L4", 89, "550.54.15")


def smoke_cpu(monkeypatch, capsys, project: Path, engine: FakeEngine, *args: str, gpus=()) -> dict:
    code, _, stderr = run_cli(monkeypatch, capsys, project, engine, "cpu", *args, gpus=gpus)
    report = json.loads((project / "build" / "reports" / "smoke.json").read_text())
    report["_code"], report["_stderr"] = code, stderr
    return report


def test_an_unchanged_key_reuses_the_verdict_and_says_so(monkeypatch, capsys, project_copy: Path) -> None:
    engine = FakeEngine({"qwen-ft:cpu-fp32": CPU_LABELS})
    first = smoke_cpu(monkeypatch, capsys, project_copy, engine)
    assert first["_code"] == 0 and first["images"][0]["cached"] is None
    runs = len(engine.calls)
    assert runs == 2  # contract, smoke
    again = smoke_cpu(monkeypatch, capsys, project_copy, engine)
    assert again["_code"] == 0
    assert len(engine.calls) == runs, "nothing ran the second time"
    cached = again["images"][0]["cached"]
    assert cached["at"].endswith("Z") and cached["host"]
    assert "(cached" in again["_stderr"]
    assert again["images"][0]["checks"] == first["images"][0]["checks"]


def test_rerun_runs_again(monkeypatch, capsys, project_copy: Path) -> None:
    engine = FakeEngine({"qwen-ft:cpu-fp32": CPU_LABELS})
    smoke_cpu(monkeypatch, capsys, project_copy, engine)
    report = smoke_cpu(monkeypatch, capsys, project_copy, engine, "--rerun")
    assert len(engine.calls) == 4 and report["images"][0]["cached"] is None


def test_a_changed_runtime_file_runs_again(monkeypatch, capsys, project_copy: Path) -> None:
    engine = FakeEngine({"qwen-ft:cpu-fp32": CPU_LABELS})
    smoke_cpu(monkeypatch, capsys, project_copy, engine)
    (project_copy / "runtime" / "qwen_ft_runtime" / "smoke.py").write_text("# changed\n", encoding="utf-8")
    smoke_cpu(monkeypatch, capsys, project_copy, engine)
    assert len(engine.calls) == 4


def test_a_different_host_runs_again(monkeypatch, capsys, project_copy: Path) -> None:
    engine = FakeEngine({"qwen-ft:cpu-fp32": CPU_LABELS})
    smoke_cpu(monkeypatch, capsys, project_copy, engine)
    smoke_cpu(monkeypatch, capsys, project_copy, engine, gpus=[L4])  # a GPU appeared
    assert len(engine.calls) == 4
    smoke_cpu(monkeypatch, capsys, project_copy, engine, gpus=[L4])
    assert len(engine.calls) == 4, "the same host again: cached"
    newer = GpuInfo(0, "NVIDIA L4", 89, "570.86.10")  # a driver update
    smoke_cpu(monkeypatch, capsys, project_copy, engine, gpus=[newer])
    assert len(engine.calls) == 6


def test_other_smoke_arguments_run_again(monkeypatch, capsys, project_copy: Path) -> None:
    engine = FakeEngine({"qwen-ft:cpu-fp32": CPU_LABELS})
    smoke_cpu(monkeypatch, capsys, project_copy, engine)
    smoke_cpu(monkeypatch, capsys, project_copy, engine, "--steps", "3")
    assert len(engine.calls) == 4


def test_a_failure_is_never_cached(monkeypatch, capsys, project_copy: Path) -> None:
    engine = FakeEngine(
        {"qwen-ft:cpu-fp32": CPU_LABELS}, answers={("qwen-ft:cpu-fp32", "contract"): out(CONTRACT_TRITON, 1)}
    )
    assert smoke_cpu(monkeypatch, capsys, project_copy, engine)["_code"] == 8
    assert smoke_cpu(monkeypatch, capsys, project_copy, engine)["_code"] == 8
    assert len(engine.calls) == 4, "the failed image ran both times"
    assert not list((project_copy / "build" / "cache" / "verdicts").glob("*.json"))


def test_a_corrupt_or_failing_entry_is_not_a_pass(tmp_path: Path, project_copy: Path) -> None:
    res = resolve.resolve(config.load(project_copy / "matrix.yaml"), knowledge.load())
    plan = smoke.plan_image(res.recommended("cpu"), [], sm_of=lambda g: g.sm)
    cache = smoke.VerdictCache(tmp_path)
    (tmp_path / "k1.json").write_text("{not json")
    assert cache.get("k1", plan, "sha256:x") is None
    failed = smoke.SmokeResult(
        plan, "sha256:x", (smoke.StepResult("contract", False, 1, 1.0, False, None, "x"),), 1.0
    )
    cache.put("k2", failed)
    assert not (tmp_path / "k2.json").exists()
    # A hand-edited entry that records a failure is still not reused as a pass.
    ok = smoke.SmokeResult(
        plan, "sha256:x", (smoke.StepResult("contract", True, 0, 1.0, False, {"ok": True}, None),), 1.0
    )
    cache.put("k3", ok)
    data = json.loads((tmp_path / "k3.json").read_text())
    data["steps"][0]["ok"] = False
    (tmp_path / "k3.json").write_text(json.dumps(data))
    assert cache.get("k3", plan, "sha256:x") is None


def test_concurrent_writers_leave_one_whole_entry(tmp_path: Path, project_copy: Path) -> None:
    res = resolve.resolve(config.load(project_copy / "matrix.yaml"), knowledge.load())
    plan = smoke.plan_image(res.recommended("cpu"), [], sm_of=lambda g: g.sm)
    folder = tmp_path / "verdicts"
    cache = smoke.VerdictCache(folder)
    step = smoke.StepResult(
        "smoke", True, 0, 1.0, False, {"ok": True, "checks": [{"name": "x" * 5000, "ok": True}]}, None
    )
    result = smoke.SmokeResult(plan, "sha256:x", (step,), 1.0)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(50):
                cache.put("same", result)
                got = cache.get("same", plan, "sha256:x")
                assert got is not None and got.ok
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [p.name for p in folder.iterdir()] == ["same.json"], "no temporary files left behind"


# ----------------------------------------------------------------------------- the no-op build


TAGS = ("qwen-ft:cpu-fp32", "qwen-ft:cpu-fp32-torch2.13.0-py3.11", "qwen-ft:cpu-dddddddddddd")
JOB = {"name": "cpu-fp32", "digest": "d" * 64, "tags": list(TAGS)}


def test_up_to_date_needs_the_hash_label_and_every_tag_on_one_image() -> None:
    good = LocalImage("sha256:a", 10, {contract.CONTENT_HASH: "d" * 64}, TAGS)
    found = uptodate.up_to_date([JOB], Snapshot("20.10.24", {TAGS[-1]: good}))
    assert found is not None and found[0].id == "sha256:a"
    moved = LocalImage("sha256:a", 10, {contract.CONTENT_HASH: "d" * 64}, TAGS[1:])
    assert uptodate.up_to_date([JOB], Snapshot("x", {TAGS[-1]: moved})) is None, "alias moved or missing"
    stale = LocalImage("sha256:a", 10, {contract.CONTENT_HASH: "e" * 64}, TAGS)
    assert uptodate.up_to_date([JOB], Snapshot("x", {TAGS[-1]: stale})) is None, "another content hash"
    assert uptodate.up_to_date([JOB], Snapshot("x", {})) is None, "not built"
    assert uptodate.up_to_date([JOB], None) is None, "no snapshot: the full path decides"


@pytest.mark.parametrize("host", ["tcp://127.0.0.1:2375", "ssh://me@box"])
def test_the_snapshot_is_only_taken_over_a_local_socket(monkeypatch, host: str) -> None:
    monkeypatch.setenv("DOCKER_HOST", host)
    assert uptodate.local_images(["qwen-ft:cpu-fp32"]) is None


def test_the_snapshot_of_a_missing_socket_is_none(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'nope.sock'}")
    assert uptodate.local_images(["qwen-ft:cpu-fp32"]) is None
