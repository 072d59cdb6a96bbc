"""`smoke` without Docker: step planning, judging, the report, and the command over a recording fake engine."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from builder import cli, hostprobe, resolve, smoke
from builder.engine import ContainerRun
from builder.errors import ConfigError
from builder.hostprobe import GpuInfo, GpuProbe

ROOT = Path(__file__).resolve().parent.parent

V100 = GpuInfo(0, "Tesla V100-SXM2-16GB", 70, "535.104.05")
H100 = GpuInfo(1, "NVIDIA H100 80GB HBM3", 90, "550.54.15")
L4 = GpuInfo(0, "NVIDIA L4", 89, "550.54.15")


def sm_of(gpu: GpuInfo) -> int | None:
    return gpu.sm


@pytest.fixture(scope="module")
def res() -> resolve.Resolution:
    from builder import config, knowledge

    return resolve.resolve(config.load(ROOT / "matrix.yaml"), knowledge.load())


def cell(res: resolve.Resolution, target: str) -> resolve.Cell:
    return res.recommended(target)


# ----------------------------------------------------------------------------- planning


def test_cpu_image_without_gpu_runs_the_cpu_step(res: resolve.Resolution) -> None:
    plan = smoke.plan_image(cell(res, "cpu"), [], sm_of=sm_of)
    assert (plan.name, plan.ref, plan.gpu) == ("cpu-fp32", "qwen-ft:cpu-fp32", False)
    assert plan.note == "cpu step only: no GPU on this host"
    assert plan.env == {}, "the cpu image's own QWEN_FT_SM=none passes the device check"
    assert smoke.smoke_argv(plan, smoke.Options(steps=4)) == [
        "qwen-ft-runtime", "smoke", "--device", "cpu", "--dtype", "fp32", "--attn", "sdpa", "--steps", "4",
    ]  # fmt: skip


def test_gpu_image_without_gpu_runs_fp32_on_the_cpu_and_says_so(res: resolve.Resolution) -> None:
    plan = smoke.plan_image(cell(res, "v100"), [], sm_of=sm_of)
    assert not plan.gpu
    assert plan.note == "cpu step only: no GPU on this host; ran fp32/sdpa, the image trains in fp16/sdpa"
    assert plan.env == {"QWEN_FT_SM": ""}, "an empty QWEN_FT_SM makes the runtime skip its device check"
    assert "--dtype" in plan.smoke_flags and "fp32" in plan.smoke_flags


def test_gpu_image_with_a_fitting_gpu_runs_the_gpu_step_in_its_own_dtype(res: resolve.Resolution) -> None:
    plan = smoke.plan_image(cell(res, "v100"), [V100], sm_of=sm_of)
    assert plan.gpu and plan.gpu_name == V100.name and plan.note == ""
    assert plan.env == {} and plan.smoke_flags == ()
    assert smoke.smoke_argv(plan, smoke.Options()) == ["qwen-ft-runtime", "smoke"]


def test_mixed_host_pins_the_gpu_that_fits(res: resolve.Resolution) -> None:
    plan = smoke.plan_image(cell(res, "h100"), [V100, H100], sm_of=sm_of)
    assert plan.gpu and plan.gpu_name == H100.name
    assert plan.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1"}


def test_binary_compatibility_decides_which_gpu_fits(res: resolve.Resolution) -> None:
    assert smoke.plan_image(cell(res, "a10"), [L4], sm_of=sm_of).gpu, "sm_86 code runs on an sm_89 L4"
    other = smoke.plan_image(cell(res, "v100"), [H100], sm_of=sm_of)
    assert not other.gpu
    assert other.note.startswith("cpu step only: no GPU here runs sm_70 code (NVIDIA H100 80GB HBM3 sm_90)")
    unknown = smoke.plan_image(cell(res, "v100"), [GpuInfo(0, "Mystery", None, None)], sm_of=sm_of)
    assert not unknown.gpu


def test_cpu_image_on_a_gpu_host_and_cpu_only(res: resolve.Resolution) -> None:
    assert smoke.plan_image(cell(res, "cpu"), [H100], sm_of=sm_of).note == "cpu image"
    forced = smoke.plan_image(cell(res, "h100"), [H100], cpu_only=True, sm_of=sm_of)
    assert not forced.gpu and forced.note.startswith("cpu step only: --cpu-only")


def test_parse_env() -> None:
    assert smoke.parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(smoke.ConfigError, match="KEY=VALUE"):
        smoke.parse_env(["nope"])


# ----------------------------------------------------------------------------- judging

CONTRACT_OK = {
    "entry": "contract",
    "ok": True,
    "failed_check": None,
    "checks": [{"name": "torch_version", "ok": True, "detail": "2.13.0"}],
}
CONTRACT_TRITON = {
    "entry": "contract",
    "ok": False,
    "failed_check": "triton",
    "checks": [
        {"name": "torch_version", "ok": True, "detail": "2.13.0"},
        {"name": "triton", "ok": False, "detail": "expected present, absent"},
    ],
}


def smoke_payload(ok: bool = True, losses: Sequence[float] = (6.2, 6.0, 5.9, 5.8)) -> dict[str, Any]:
    return {
        "entry": "smoke",
        "ok": ok,
        "failed_check": None if ok else "qwen2-tiny:loss_decreases",
        "checks": [
            {"name": "device", "ok": True, "detail": "cpu image on cpu"},
            {"name": "qwen2-tiny:loss_decreases", "ok": ok, "detail": "first 6.2"},
        ],
        "device": {"type": "cpu", "name": "x86_64", "sm": None},
        "dtype": "fp32",
        "attn_implementation": "sdpa",
        "runs": [
            {"model": "qwen2-tiny", "losses": list(losses), "tokens_per_s": 2435.9, "step_time_s": 0.15},
            {"model": "qwen3-tiny", "losses": list(losses), "tokens_per_s": 425.4, "step_time_s": 0.55},
        ],
        "import_to_first_step_s": 4.7,
    }


def out(payload: Mapping[str, Any], code: int | None = None, stderr: str = "log line\n") -> ContainerRun:
    if code is None:
        code = 0 if payload.get("ok") else 1
    return ContainerRun(code, "noise\n" + json.dumps(payload) + "\n", stderr, 1.234)


def test_judge_passes_only_exit_0_with_ok_json() -> None:
    good = smoke.judge("contract", out(CONTRACT_OK), 60)
    assert good.ok and good.failures == [] and good.error is None and good.seconds == 1.23
    bad = smoke.judge("contract", out(CONTRACT_TRITON), 60)
    assert not bad.ok and bad.failures == ["contract:triton"]
    liar = smoke.judge("contract", out(CONTRACT_OK, code=3), 60)
    assert not liar.ok and liar.failures == ["contract:exit_code"]


def test_judge_names_timeouts_usage_errors_and_missing_output() -> None:
    timed = smoke.judge("smoke", ContainerRun(None, "", "step 1\n", 5.0, timed_out=True), 5)
    assert timed.failures == ["smoke:timeout"] and timed.error == "timed out after 5 s; killed"
    usage = smoke.judge(
        "smoke", ContainerRun(2, "", "qwen-ft-runtime smoke: error: /model: no config\n", 1), 60
    )
    assert usage.failures == ["smoke:usage"]
    assert usage.error == "exit 2, no JSON line: qwen-ft-runtime smoke: error: /model: no config"
    crash = smoke.judge("smoke", ContainerRun(137, "", "", 1), 60)
    assert crash.failures == ["smoke:output"] and crash.error == "exit 137, no JSON line: no output"
    wrong = smoke.judge("smoke", out(CONTRACT_OK), 60)
    assert wrong.payload is None, "only a line of the step's own entry counts"


# ----------------------------------------------------------------------------- running with a fake engine


@dataclass
class FakeEngine:
    """Records every container run; answers from a script keyed by (image, step)."""

    images: Mapping[str, Mapping[str, str]]
    answers: Mapping[tuple[str, str], ContainerRun] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)

    def check(self) -> str:
        return "20.10.24"

    def image_labels(self, ref: str) -> Mapping[str, str] | None:
        return self.images.get(ref)

    def image_id(self, ref: str) -> str | None:
        return f"sha256:{abs(hash(ref)):x}" if ref in self.images else None

    def run_container(
        self,
        image: str,
        command: Sequence[str],
        *,
        timeout: float,
        gpus: bool = False,
        env: Mapping[str, str] | None = None,
        volumes: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> ContainerRun:
        self.calls.append(
            {
                "image": image,
                "argv": list(command),
                "timeout": timeout,
                "gpus": gpus,
                "env": dict(env or {}),
                "volumes": dict(volumes or {}),
                "labels": dict(labels or {}),
            }
        )
        step = command[1]
        default = out(CONTRACT_OK) if step == "contract" else out(smoke_payload())
        return self.answers.get((image, step), default)


CPU_LABELS = {"io.qwen-ft.target": "cpu"}
V100_LABELS = {"io.qwen-ft.target": "v100"}


def test_run_contract_then_smoke_in_each_image(res: resolve.Resolution, tmp_path: Path) -> None:
    engine = FakeEngine({"qwen-ft:cpu-fp32": CPU_LABELS, "qwen-ft:v100-fp16": V100_LABELS})
    engine.answers = {("qwen-ft:v100-fp16", "contract"): out(CONTRACT_TRITON)}
    plans = [smoke.plan_image(cell(res, t), [], sm_of=sm_of) for t in ("cpu", "v100")]
    model = tmp_path / "model"
    model.mkdir()
    options = smoke.Options(steps=4, timeout=30, model=model, env={"X": "1"})
    seen: list[tuple[str, str, bool]] = []
    results = smoke.run(
        engine,
        plans,
        options,
        logs=tmp_path / "logs",
        labels={"io.qwen-ft.smoke-run": "r1"},
        on_step=lambda p, s, r: seen.append((p.name, s, r is not None)),
    )
    assert [(c["image"], c["argv"][1]) for c in engine.calls] == [
        ("qwen-ft:cpu-fp32", "contract"),
        ("qwen-ft:cpu-fp32", "smoke"),
        ("qwen-ft:v100-fp16", "contract"),
        ("qwen-ft:v100-fp16", "smoke"),
    ], "a failing contract does not skip the smoke step (its result is still worth having)"
    contract, smoke_call = engine.calls[2], engine.calls[3]
    assert contract["env"] == {"X": "1"} and contract["volumes"] == {}
    assert smoke_call["env"] == {"QWEN_FT_SM": "", "X": "1"}
    assert smoke_call["volumes"] == {str(model.resolve()): "/model"}
    assert smoke_call["argv"][-4:] == ["--steps", "4", "--model", "/model"]
    assert all(c["timeout"] == 30 and not c["gpus"] and c["labels"] for c in engine.calls)
    assert seen[:2] == [("cpu-fp32", "contract", False), ("cpu-fp32", "contract", True)]
    assert [r.ok for r in results] == [True, False]
    assert results[1].failures == ["contract:triton"]
    log = Path(results[1].steps[0].log or "")
    assert log == tmp_path / "logs" / "v100-fp16.contract.log"
    assert "expected present, absent" in log.read_text()
    message = smoke.failure_message(results)
    assert message.startswith("1 of 2 images failed smoke: v100-fp16 (contract:triton)")


def test_report_row_and_markdown(res: resolve.Resolution, tmp_path: Path) -> None:
    engine = FakeEngine({"qwen-ft:cpu-fp32": CPU_LABELS})
    plans = [smoke.plan_image(cell(res, "cpu"), [], sm_of=sm_of)]
    results = smoke.run(engine, plans, smoke.Options(), logs=tmp_path, labels={})
    report = smoke.report_json(results, {"started": 0, "engine": "20.10.24", "host": {"gpus": []}})
    assert report["ok"] is True
    row = report["images"][0]
    assert row["image"] == "cpu-fp32" and row["ref"] == "qwen-ft:cpu-fp32"
    assert row["ok"] and row["failed_check"] is None and row["failed_checks"] == []
    assert row["dtype"] == "fp32" and row["attention"] == "sdpa"
    assert row["device"] == {"kind": "cpu", "type": "cpu", "name": "x86_64", "sm": None}
    assert row["note"] == "cpu step only: no GPU on this host"
    assert [c["step"] + ":" + c["name"] for c in row["checks"]] == [
        "contract:torch_version",
        "smoke:device",
        "smoke:qwen2-tiny:loss_decreases",
    ]
    assert row["runs"][0] == {
        "model": "qwen2-tiny",
        "tokens_per_s": 2435.9,
        "step_time_s": 0.15,
        "loss_first": 6.2,
        "loss_last": 5.8,
        "losses": [6.2, 6.0, 5.9, 5.8],
        "peak_mem_bytes": None,
        "peak_mem_kind": None,
    }
    assert row["import_to_first_step_s"] == 4.7
    assert set(row["steps"]) == {"contract", "smoke"}
    md = smoke.render_markdown(report)
    table_row = next(line for line in md.splitlines() if line.startswith("| `qwen-ft:cpu-fp32`"))
    assert "| pass | cpu (x86_64) | - | fp32 | sdpa |" in table_row
    assert "qwen2-tiny 2436; qwen3-tiny 425" in table_row
    assert "qwen2-tiny 6.200→5.800" in table_row
    assert "cpu step only: no GPU on this host" in table_row
    assert "- smoke:qwen2-tiny:loss_decreases: ok (first 6.2)" in md


def test_a_non_finite_loss_is_reported_as_text() -> None:
    run = {"loss_first": 6.2, "loss_last": "nan"}
    assert smoke.fmt_losses(run) == "6.200→nan"
    assert smoke.fmt_losses({"loss_first": None}) == "-"


# ----------------------------------------------------------------------------- the command line


def run_cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    project: Path,
    engine: FakeEngine,
    *args: str,
    gpus: Sequence[GpuInfo] = (),
) -> tuple[int, str, str]:
    import builder.engine
    import builder.uptodate

    monkeypatch.setattr(builder.engine, "DockerEngine", lambda *a, **k: engine)
    monkeypatch.setattr(builder.uptodate, "local_images", lambda *a, **k: None)  # the fake is the engine
    monkeypatch.setattr(
        hostprobe, "probe_gpus", lambda *a, **k: GpuProbe("nvidia-smi" if gpus else "none", tuple(gpus))
    )
    monkeypatch.setattr(sys, "argv", ["qwen-ft-images", "-f", str(project / "matrix.yaml"), "smoke", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def test_cli_writes_both_reports_and_prints_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], project_copy: Path
) -> None:
    engine = FakeEngine({"qwen-ft:cpu-fp32": CPU_LABELS})
    code, stdout, stderr = run_cli(monkeypatch, capsys, project_copy, engine, "cpu", "--json", "--steps", "3")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report == json.loads((project_copy / "build" / "reports" / "smoke.json").read_text())
    assert report["options"]["steps"] == 3 and report["host"]["gpus"] == []
    assert (project_copy / "build" / "reports" / "smoke.md").is_file()
    assert "smoke summary" in stderr and "cpu-fp32: smoke ok" in stderr
    assert {c["labels"]["io.qwen-ft.smoke-project"] for c in engine.calls} == {str(project_copy)}


def test_cli_gpu_host_passes_the_gpus(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    project_copy: Path,
    res: resolve.Resolution,
) -> None:
    refs = [c.plan.tags[0] for c in resolve.select(res, ["v100"]) if c.plan is not None]
    engine = FakeEngine(dict.fromkeys(refs, V100_LABELS))
    code, _, stderr = run_cli(monkeypatch, capsys, project_copy, engine, "v100", "--no-audit", gpus=[V100])
    assert code == 0, stderr
    assert [c["image"] for c in engine.calls] == [r for r in refs for _ in (0, 1)]
    assert all(c["gpus"] for c in engine.calls)
    assert engine.calls[1]["argv"] == ["qwen-ft-runtime", "smoke"]
    assert "smoke on gpu (Tesla V100-SXM2-16GB)" in stderr


def test_cli_failure_is_exit_8_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], project_copy: Path
) -> None:
    engine = FakeEngine({"qwen-ft:cpu-fp32": CPU_LABELS})
    engine.answers = {("qwen-ft:cpu-fp32", "smoke"): out(smoke_payload(ok=False, losses=(6.0, 6.1)))}
    code, _, stderr = run_cli(monkeypatch, capsys, project_copy, engine, "cpu")
    assert code == 8
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 1 images failed smoke: cpu-fp32 (smoke:qwen2-tiny:loss_decreases)")
    report = json.loads((project_copy / "build" / "reports" / "smoke.json").read_text())
    assert report["ok"] is False
    assert report["images"][0]["failed_check"] == "smoke:qwen2-tiny:loss_decreases"


@pytest.mark.parametrize(
    ("images", "args", "code", "fragment"),
    [
        ({}, ["cpu"], 2, "error: image qwen-ft:cpu-fp32 not built; run qwen-ft-images build cpu-fp32"),
        ({"qwen-ft:cpu-fp32": {}}, ["cpu"], 2, "not built by qwen-ft-images: qwen-ft:cpu-fp32"),
        ({}, ["z100"], 2, "matches no image"),
        (CPU_LABELS, ["cpu", "--steps", "1"], 2, "--steps must be at least 2"),
        (CPU_LABELS, ["cpu", "--env", "oops"], 2, "KEY=VALUE"),
    ],
)
def test_cli_bad_input_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    project_copy: Path,
    images: Mapping[str, Any],
    args: list[str],
    code: int,
    fragment: str,
) -> None:
    labels = {"qwen-ft:cpu-fp32": images} if images is CPU_LABELS else images
    engine = FakeEngine(labels)
    got, _, stderr = run_cli(monkeypatch, capsys, project_copy, engine, *args)
    assert got == code, stderr
    assert fragment in stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
    assert engine.calls == [], "nothing runs before the inputs are checked"


def test_cli_ctrl_c_is_130_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], project_copy: Path
) -> None:
    class Interrupting(FakeEngine):
        def run_container(self, image: str, command: Sequence[str], **kwargs: Any) -> ContainerRun:
            raise KeyboardInterrupt

    code, stdout, stderr = run_cli(
        monkeypatch, capsys, project_copy, Interrupting({"qwen-ft:cpu-fp32": CPU_LABELS}), "cpu"
    )
    assert code == 130 and stdout == ""
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted: the running container was removed")


def test_gpu_images_get_the_kernel_audit_step() -> None:
    """The audit runs as a third step for GPU images; its failures name the binary."""
    from types import SimpleNamespace

    from builder import smoke as smoke_mod

    assert smoke_mod.audit_step(None, "cuobjdump missing").failures == ["audit:unavailable"]
    bad = SimpleNamespace(
        short_path="torch/lib/libtorch_cuda.so", detail="has sm_70..sm_120 SASS, no PTX; needs sm_60"
    )
    result = SimpleNamespace(ok=False, failures=[bad], binaries=[bad, bad], sm=60, seconds=12.3)
    step = smoke_mod.audit_step(result)  # type: ignore[arg-type]
    assert not step.ok and step.failures == ["audit:kernels", "audit:torch/lib/libtorch_cuda.so"]
    good = SimpleNamespace(ok=True, failures=[], binaries=[bad], sm=70, seconds=1.0)
    assert smoke_mod.audit_step(good).ok  # type: ignore[arg-type]


def test_nproc_and_deepspeed_pass_through_and_the_report_shows_ranks(
    res: resolve.Resolution, tmp_path: Path
) -> None:
    payload = {
        **smoke_payload(),
        "world_size": 2,
        "backend": "gloo",
        "launcher": "torchrun",
        "deepspeed": "zero2",
        "runs": [
            {
                "model": "qwen2-tiny",
                "losses": [6.2, 5.8],
                "tokens_per_s": 900.0,
                "step_time_s": 0.4,
                "ranks": [
                    {
                        "rank": 0,
                        "device": "cpu",
                        "step_time_s": 0.41,
                        "first_step_s": 1.2,
                        "total_step_s": 3.3,
                    },
                    {
                        "rank": 1,
                        "device": "cpu",
                        "step_time_s": 0.43,
                        "first_step_s": 1.3,
                        "total_step_s": 3.4,
                    },
                ],
            }
        ],
    }
    engine = FakeEngine(
        {"qwen-ft:cpu-fp32": CPU_LABELS},
        {("qwen-ft:cpu-fp32", "contract"): out(CONTRACT_OK), ("qwen-ft:cpu-fp32", "smoke"): out(payload)},
    )
    plans = [smoke.plan_image(cell(res, "cpu"), [], sm_of=sm_of)]
    options = smoke.Options(nproc="2", deepspeed="zero2")
    results = smoke.run(engine, plans, options, logs=tmp_path, labels={})
    assert engine.calls[1]["argv"][-4:] == ["--nproc", "2", "--deepspeed", "zero2"]
    row = smoke.report_json(results, {"started": 0, "engine": "x", "host": {"gpus": []}})["images"][0]
    assert (row["world_size"], row["backend"], row["launcher"]) == (2, "gloo", "torchrun")
    assert [r["rank"] for r in row["ranks"]] == [0, 1] and row["ranks"][1]["step_time_s"] == 0.43
    assert smoke.fmt_ranks(row) == "2 x gloo (torchrun, zero2): r0 0.41s r1 0.43s"
    key = smoke.verdict_key("id", "rt", plans[0], options, False, [])
    assert key != smoke.verdict_key("id", "rt", plans[0], smoke.Options(), False, [])


@pytest.mark.parametrize(
    ("nproc", "deepspeed", "message"),
    [
        ("0", None, "--nproc '0': expected a positive number"),
        ("two", None, "--nproc 'two'"),
        (None, "zero4", "--deepspeed 'zero4': expected one of zero2, zero3"),
        (None, "/tmp/ds.json", "run `qwen-ft-runtime smoke --deepspeed PATH.json` in the image"),
    ],
)
def test_parallel_flags_are_checked(nproc: str | None, deepspeed: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        smoke.check_parallel(nproc, deepspeed)
    smoke.check_parallel("all", "zero3-offload")
