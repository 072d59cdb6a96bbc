"""`compare`: pure planning/metric rules, the chart, real CPU runs (--native) and one in the cpu image."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from docker_support import Built, cli, copy_project, docker

from builder import chart, comparison, contract
from builder.comparison import Combination, Hardware, Subject
from builder.engine import ContainerRun
from builder.errors import ConfigError
from builder.hostprobe import GpuInfo

ROOT = Path(__file__).resolve().parent.parent
CPU = Hardware("cpu", "CPU (x86_64)", None, "2.13.0", False)
V100 = Hardware("cuda", "Tesla V100-SXM2-16GB", 70, "2.8.0", False)
A100_FA = Hardware("cuda", "NVIDIA A100-SXM4-80GB", 80, "2.8.0", True)
A100_NO_FA = Hardware("cuda", "NVIDIA A100-SXM4-80GB", 80, "2.8.0", False)


# ----------------------------------------------------------------------------- helpers


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (always the first chunk)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def compare(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`qwen-ft-images compare ...` in a fresh interpreter: real exit codes and stderr."""
    env = {k: v for k, v in os.environ.items() if k not in contract.ENV_VARS.values()}
    return subprocess.run(
        [sys.executable, "-m", "builder", "--matrix", str(project / "matrix.yaml"), "compare", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def load_report(project: Path, name: str = "cpu-fp32") -> dict[str, Any]:
    data = json.loads((project / "build" / "reports" / f"compare-{name}.json").read_text())
    assert isinstance(data, dict)
    return data


def combo(report: dict[str, Any], label: str) -> dict[str, Any]:
    dtype, method = label.split("/")
    return next(c for c in report["combinations"] if (c["dtype"], c["method"]) == (dtype, method))


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert lines, proc.stdout
    return lines[-1]


# ----------------------------------------------------------------------------- input


def test_dtype_and_method_lists_are_parsed_and_deduplicated() -> None:
    assert comparison.parse_choices("fp32, BF16,fp32", comparison.DTYPES, "dtype") == ("fp32", "bf16")
    assert comparison.parse_choices("full,lora", comparison.METHODS, "method") == ("full", "lora")


@pytest.mark.parametrize(
    ("text", "allowed", "what", "message"),
    [
        ("fp32,fp8", comparison.DTYPES, "dtype", "unknown dtype 'fp8'"),
        ("bf61", comparison.DTYPES, "dtype", "did you mean 'bf16'?"),
        ("lora,qlora", comparison.METHODS, "method", "unknown method 'qlora'; did you mean 'lora'?"),
        (" , ", comparison.METHODS, "method", "no method given"),
    ],
)
def test_unknown_or_empty_choice_is_a_config_error(
    text: str, allowed: tuple[str, ...], what: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        comparison.parse_choices(text, allowed, what)


# ----------------------------------------------------------------------------- planning


def _skips(hw: Hardware, attn: str = "auto", image_attn: str = "sdpa") -> dict[str, str | None]:
    combos = comparison.plan_combinations(comparison.DTYPES, comparison.METHODS, attn, image_attn, hw)
    return {c.label: c.skip for c in combos}


def test_bf16_is_skipped_below_sm80_and_runs_on_ampere() -> None:
    skips = _skips(V100)
    assert skips["bf16/lora"] == skips["bf16/full"]
    assert (
        skips["bf16/lora"]
        == "bf16 needs SM>=80 (no bf16 tensor cores before Ampere); Tesla V100-SXM2-16GB is sm_70"
    )
    assert {k for k, v in skips.items() if v is None} == {"fp32/lora", "fp16/lora", "fp32/full", "fp16/full"}
    assert all(v is None for v in _skips(A100_FA).values())


def test_cpu_runs_fp16_and_bf16_on_current_torch_but_not_fp16_on_old_torch() -> None:
    assert all(v is None for v in _skips(CPU).values())  # torch 2.13: CPU autocast fp16 + GradScaler("cpu")
    old = Hardware("cpu", "CPU (x86_64)", None, "2.1.2", False)
    skips = _skips(old)
    assert skips["fp16/lora"] == "fp16 autocast on the CPU needs torch>=2.3; this is torch 2.1.2"
    assert skips["bf16/lora"] is None and skips["fp32/full"] is None


def test_attention_auto_uses_flash_where_it_can_and_explicit_flash_skips_where_absent() -> None:
    auto = comparison.plan_combinations(("fp32", "bf16"), ("lora",), "auto", "flash_attention_2", A100_FA)
    assert [(c.label, c.attn, c.skip) for c in auto] == [
        ("fp32/lora", "sdpa", None),  # flash-attn needs half precision
        ("bf16/lora", "flash_attention_2", None),
    ]
    forced = {
        c.label: c.skip
        for c in comparison.plan_combinations(("bf16",), ("lora",), "flash_attention_2", "sdpa", A100_NO_FA)
    }
    assert forced == {"bf16/lora": "flash_attention_2 needs flash-attn, which is absent here"}
    on_cpu = _skips(CPU, attn="flash_attention_2")
    assert set(on_cpu.values()) == {"flash_attention_2 needs a CUDA GPU"}


def _gpu(index: int, name: str, sm: int | None) -> GpuInfo:
    return GpuInfo(index=index, name=name, sm=sm, driver="550.54.15")


def _hw(subject: Subject, gpus: list[GpuInfo], requested: str = "auto", native: bool = False) -> Hardware:
    return comparison.choose_hardware(
        subject,
        gpus,
        requested=requested,
        native=native,
        sm_of=lambda g: g.sm,
        cpu_name="CPU (x86_64)",
        host_torch="2.13.0",
    )


CPU_IMAGE = Subject("cpu-fp32", "qwen-ft:cpu-fp32", None, "sdpa", False, "2.13.0")
A100_IMAGE = Subject("a100-bf16", "qwen-ft:a100-bf16", 80, "flash_attention_2", True, "2.8.0")
V100_IMAGE = Subject("v100-fp16", "qwen-ft:v100-fp16", 70, "sdpa", False, "2.8.0")


def test_hardware_comes_from_the_host_gpu_and_the_image() -> None:
    v100, a100 = _gpu(0, "Tesla V100-SXM2-16GB", 70), _gpu(1, "NVIDIA A100-SXM4-80GB", 80)
    on_v100 = _hw(V100_IMAGE, [v100])
    assert (on_v100.device, on_v100.sm, on_v100.torch, dict(on_v100.env)) == ("cuda", 70, "2.8.0", {})
    mixed = _hw(A100_IMAGE, [v100, a100])  # pins the GPU that runs sm_80 code
    assert (mixed.device, mixed.sm, mixed.flash_attn) == ("cuda", 80, True)
    assert mixed.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1"}
    cpu_image = _hw(CPU_IMAGE, [a100])
    assert (cpu_image.device, cpu_image.note, dict(cpu_image.env)) == ("cpu", "cpu image", {})
    # A GPU image on the CPU: QWEN_FT_SM unset so the runtime's device check does not fail.
    no_gpu = _hw(A100_IMAGE, [])
    assert (no_gpu.device, no_gpu.note, dict(no_gpu.env)) == (
        "cpu",
        "no GPU on this host",
        {"QWEN_FT_SM": ""},
    )
    wrong = _hw(A100_IMAGE, [v100])
    assert wrong.device == "cpu" and "no GPU here runs sm_80 code (Tesla V100-SXM2-16GB sm_70)" in wrong.note
    with pytest.raises(ConfigError, match="--device cuda: no GPU here runs sm_80 code"):
        _hw(A100_IMAGE, [v100], requested="cuda")
    with pytest.raises(ConfigError, match="cpu image"):
        _hw(CPU_IMAGE, [a100], requested="cuda")
    native = _hw(CPU_IMAGE, [v100], native=True)  # the host's torch: any host GPU
    assert (native.device, native.sm, native.torch) == ("cuda", 70, "2.13.0")
    assert _hw(A100_IMAGE, [a100], requested="cpu").device == "cpu"


def test_runtime_args_pass_the_same_seed_steps_and_lr_to_every_combination() -> None:
    options = comparison.Options(steps=6, seed=3)
    args = comparison.runtime_args(Combination("bf16", "full", "sdpa"), options, CPU, None)
    assert args == [
        "smoke", "--dtype", "bf16", "--method", "full", "--attn", "sdpa",
        "--steps", "6", "--seed", "3", "--device", "cpu", "--tiny", "qwen2-tiny",
    ]  # fmt: skip
    # A real checkpoint: one LR for every dtype (the runtime would lower fp16's).
    with_model = comparison.Options(model=Path("/ckpt"))
    for dtype in ("fp16", "bf16"):
        args = comparison.runtime_args(Combination(dtype, "lora", "sdpa"), with_model, CPU, "/model")
        assert args[-4:] == ["--model", "/model", "--lr", "0.0002"]


# ----------------------------------------------------------------------------- interpreting


def _smoke_payload(losses: list[float], checks: list[dict[str, Any]]) -> str:
    run = {
        "losses": losses,
        "step_time_s": 0.01,
        "tokens_per_s": 1000.0,
        "peak_mem_bytes": 2**28,
        "peak_mem_kind": "process_max_rss",
        "train_state_bytes": 2**20,
        "trainable_params": 10,
        "total_params": 100,
        "lr": 5e-3,
        "weight_dtype": "fp16",
        "loss_scale": 65536.0,
        "skipped_steps": [],
    }
    return "log noise\n" + json.dumps({"entry": "smoke", "ok": False, "checks": checks, "runs": [run]}) + "\n"


FP16_LORA = Combination("fp16", "lora", "sdpa")


def test_a_nonfinite_loss_fails_the_combination_naming_its_step() -> None:
    checks = [{"name": "qwen2-tiny:finite_loss", "ok": False, "detail": "loss is nan at step 3"}]
    result = comparison.interpret(FP16_LORA, ContainerRun(1, _smoke_payload([6.2, 6.1], checks), "", 4.0))
    assert (result.status, result.nan_step, result.reason) == ("failed", 3, "loss is nan at step 3")
    assert result.losses == [6.2, 6.1]  # the finite steps before it, for the chart


def test_a_loss_that_did_not_fall_is_still_a_curve_and_other_failures_fail() -> None:
    flat = [{"name": "qwen2-tiny:loss_decreases", "ok": False, "detail": "first 6.2, mean of last 1 6.2"}]
    result = comparison.interpret(FP16_LORA, ContainerRun(1, _smoke_payload([6.2, 6.2], flat), "", 1.0))
    assert result.status == "ok" and result.reason is not None and "did not decrease" in result.reason
    oom = [{"name": "qwen2-tiny:memory", "ok": False, "detail": "CUDA out of memory; lower --batch-size"}]
    result = comparison.interpret(FP16_LORA, ContainerRun(1, _smoke_payload([], oom), "", 1.0))
    assert (result.status, result.reason) == (
        "failed",
        "qwen2-tiny:memory: CUDA out of memory; lower --batch-size",
    )
    crashed = comparison.interpret(FP16_LORA, ContainerRun(139, "", "Traceback\nSegmentation fault\n", 1.0))
    assert (
        crashed.status == "failed"
        and crashed.reason == "runtime exited 139 without a report: Segmentation fault"
    )
    late = comparison.interpret(FP16_LORA, ContainerRun(None, "", "", 600.0, timed_out=True))
    assert (late.status, late.reason) == ("failed", "timed out after 600 s")


def test_runtime_usage_error_stops_the_comparison_with_the_host_path() -> None:
    stderr = (
        "[qwen-ft-runtime] INFO something\nqwen-ft-runtime smoke: error: /model is not a Qwen checkpoint "
        "(model_type='llama'; expected one of qwen2, qwen2_moe, qwen3, qwen3_moe)\n"
    )
    with pytest.raises(ConfigError) as info:
        comparison.interpret(FP16_LORA, ContainerRun(2, "", stderr, 1.0), Path("/data/llama-3"))
    assert info.value.message.startswith("/data/llama-3 is not a Qwen checkpoint (model_type='llama'")


# ----------------------------------------------------------------------------- metrics


def test_relative_deviation_on_known_curves() -> None:
    ref = [2.0, 1.0, 0.5]
    assert comparison.relative_deviation([2.0, 1.0, 0.5], ref) == (0.0, 1)
    # |2.1-2|/2 = 0.05, |1.2-1|/1 = 0.2, |0.45-0.5|/0.5 = 0.1: the largest at step 2.
    gap, step = comparison.relative_deviation([2.1, 1.2, 0.45], ref) or (None, None)
    assert step == 2 and gap == pytest.approx(0.2)
    # Only the shared steps count (a failed run stops early); nothing shared: None.
    assert comparison.relative_deviation([2.0, 1.1], ref) == (pytest.approx(0.1), 2)
    assert comparison.relative_deviation([], ref) is None
    assert comparison.relative_deviation([0.0, 1.0], [0.0, 1.0]) == (0.0, 1)
    assert comparison.relative_deviation([0.1], [0.0]) == (math.inf, 1)
    assert comparison.verdict(0.05) == "within" and comparison.verdict(0.0501) == "exceeds"
    assert comparison.verdict(None) == "n/a"
    assert comparison.DEVIATION_LIMIT == 0.05


def _result(
    dtype: str, method: str, losses: list[float], status: str = "ok", **kw: Any
) -> comparison.CombinationResult:
    return comparison.CombinationResult(dtype, method, "sdpa", status, losses=losses, **kw)


def test_each_curve_is_judged_against_fp32_of_its_own_method() -> None:
    results = [
        _result("fp32", "lora", [4.0, 2.0], trainable_params=10, train_state_bytes=100, tokens_per_s=50.0),
        _result("bf16", "lora", [4.0, 2.02]),
        _result("fp16", "lora", [4.0], "failed", nan_step=2, reason="loss is nan at step 2"),
        _result("fp32", "full", [4.0, 1.0], trainable_params=40, train_state_bytes=400, tokens_per_s=25.0),
        _result("fp16", "full", [4.4, 1.2]),
        _result("bf16", "full", [], "skipped", reason="bf16 needs SM>=80"),
    ]
    rows = {f"{r.dtype}/{r.method}": d for r, d in zip(results, comparison.deviations(results), strict=True)}
    assert rows["fp32/lora"]["verdict"] == rows["fp32/full"]["verdict"] == "reference"
    assert rows["bf16/lora"]["max_rel_deviation"] == pytest.approx(0.01)
    assert rows["bf16/lora"]["verdict"] == "within"
    assert (rows["fp16/full"]["max_rel_deviation"], rows["fp16/full"]["deviation_step"]) == (
        pytest.approx(0.2),
        2,
    )
    assert rows["fp16/full"]["verdict"] == "exceeds"
    assert rows["fp16/lora"]["verdict"] == "failed" and rows["bf16/full"]["verdict"] == "skipped"
    (ratio,) = comparison.full_vs_lora(results)
    assert ratio["dtype"] == "fp32" and ratio["trainable_params"] == 4.0
    assert ratio["train_state_bytes"] == 4.0 and ratio["tokens_per_s"] == 0.5
    assert comparison.deviations([_result("bf16", "lora", [1.0])])[0]["verdict"] == "no fp32 reference"


# ----------------------------------------------------------------------------- the chart


def test_chart_is_a_900x400_png_with_one_line_per_curve(tmp_path: Path) -> None:
    results = [
        _result("fp32", "lora", [6.2, 6.0, 5.9], peak_mem_bytes=2**29, peak_mem_kind="process_max_rss",
                train_state_bytes=2**20, tokens_per_s=900.0),
        _result("bf16", "lora", [6.2, 6.01, 5.9], peak_mem_bytes=2**29, peak_mem_kind="process_max_rss",
                train_state_bytes=2**19, tokens_per_s=1200.0),
        _result("fp16", "lora", [6.2], "failed", nan_step=2, reason="loss is nan at step 2"),
        _result("bf16", "full", [], "skipped", reason="no"),
    ]  # fmt: skip
    report = comparison.report_json(
        {"name": "cpu-fp32", "model": "qwen2-tiny", "seed": 0, "hardware": {"device": "cpu"}}, results
    )
    drawn = chart.plot(report, tmp_path / "c.png")
    # A line per combination with losses (the failed one up to its NaN), none for the skipped.
    assert drawn.series == ("fp32 lora", "bf16 lora", "fp16 lora (NaN at step 2)")
    assert drawn.bars == ("fp32 lora", "bf16 lora") and drawn.memory_metric == "train_state_bytes"
    assert png_size(drawn.path) == (900, 400)
    assert drawn.path.stat().st_size > 10_000  # drawn, not blank


# ----------------------------------------------------------------------------- real runs (CPU)


@pytest.fixture(scope="module")
def native_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """fp32 and bf16, LoRA and full, on the tiny Qwen2 with this host's torch."""
    project = copy_project(tmp_path_factory.mktemp("compare"))
    proc = compare(
        project, "cpu", "--native", "--dtypes", "fp32,bf16", "--methods", "lora,full", "--steps", "4"
    )
    return project, proc


@pytest.mark.torch
def test_fp32_and_bf16_lora_give_two_curves_and_reports(
    native_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    project, proc = native_run
    assert proc.returncode == 0, proc.stderr
    report = load_report(project)
    assert (report["name"], report["image"], report["native"]) == ("cpu-fp32", None, True)
    assert report["hardware"]["device"] == "cpu" and report["steps"] == 4
    fp32, bf16 = combo(report, "fp32/lora"), combo(report, "bf16/lora")
    for c in (fp32, bf16):
        assert c["status"] == "ok" and c["reason"] is None
        assert len(c["losses"]) == 4 and all(math.isfinite(x) for x in c["losses"])
        assert c["losses"][-1] < c["losses"][0]
        assert c["step_time_s"] > 0 and c["tokens_per_s"] > 0 and c["peak_mem_bytes"] > 0
        assert c["weight_dtype"] == c["dtype"]  # LoRA stores the frozen base in the compute dtype
    assert fp32["losses"] != bf16["losses"]  # two curves, not one run reported twice
    assert fp32["verdict"] == "reference"
    assert bf16["verdict"] == "within" and 0 < bf16["max_rel_deviation"] < comparison.DEVIATION_LIMIT
    assert report["same_start"]["ok"]  # same seed: same model and batch for LoRA and full
    assert png_size(project / report["chart"]) == (900, 400)
    md = (project / "build" / "reports" / "compare-cpu-fp32.md").read_text()
    assert "![loss curves, memory and speed](compare-cpu-fp32.png)" in md
    assert "## Full fine-tuning vs LoRA" in md and "within 5%" in md
    assert "fp32 lora" in proc.stdout and "bf16 lora" in proc.stdout


@pytest.mark.torch
def test_full_mode_trains_more_parameters_and_needs_more_memory_than_lora(
    native_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    project, proc = native_run
    assert proc.returncode == 0, proc.stderr
    report = load_report(project)
    for dtype in ("fp32", "bf16"):
        lora, full = combo(report, f"{dtype}/lora"), combo(report, f"{dtype}/full")
        assert full["status"] == "ok" and full["weight_dtype"] == "fp32"  # fp32 master weights
        assert full["trainable_params"] == full["total_params"] > lora["trainable_params"] > 0
        # Exact state (weights + grads + AdamW): the CPU's process RSS is mostly torch itself.
        assert full["train_state_bytes"] > lora["train_state_bytes"] > 0
    ratios = {r["dtype"]: r for r in report["full_vs_lora"]}
    assert set(ratios) == {"fp32", "bf16"}
    assert ratios["fp32"]["trainable_params"] > 4 and ratios["fp32"]["train_state_bytes"] > 1.5


@pytest.mark.torch
def test_same_seed_repeats_the_curve_and_another_seed_changes_it(
    native_run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    project, _ = native_run
    first = combo(load_report(project), "fp32/lora")["losses"]
    again_project = copy_project(tmp_path / "again")
    again = compare(again_project, "cpu", "--native", "--dtypes", "fp32", "--methods", "lora", "--steps", "2")
    assert again.returncode == 0, again.stderr
    assert combo(load_report(again_project), "fp32/lora")["losses"] == first[:2]
    other = compare(
        again_project,
        "cpu",
        "--native",
        "--dtypes",
        "fp32",
        "--methods",
        "lora",
        "--steps",
        "2",
        "--seed",
        "1",
    )
    assert other.returncode == 0, other.stderr
    assert combo(load_report(again_project), "fp32/lora")["losses"][0] != first[0]


@pytest.mark.torch
def test_nan_fails_its_combination_naming_the_step_and_the_others_still_run(tmp_path: Path) -> None:
    # A real divergence, no fault injection: an LR of 1e6 drives the fp32 adapters past fp16's
    # range (65504) on the first update, so fp16's second forward overflows; fp32 stays finite.
    project = copy_project(tmp_path)
    proc = compare(
        project,
        "cpu",
        "--native",
        "--dtypes",
        "fp16,fp32",
        "--methods",
        "lora",
        "--steps",
        "3",
        "--lr",
        "1e6",
    )
    assert proc.returncode == 8, proc.stderr
    assert error_line(proc) == (
        "error: compare cpu-fp32: 1 of 2 runs failed: fp16/lora: loss is nan at step 2 "
        "(report build/reports/compare-cpu-fp32.md)"
    )
    report = load_report(project)
    fp16, fp32 = combo(report, "fp16/lora"), combo(report, "fp32/lora")
    assert (fp16["status"], fp16["nan_step"], len(fp16["losses"])) == ("failed", 2, 1)
    assert fp16["log"] and (project / fp16["log"]).is_file()
    assert fp32["status"] == "ok" and len(fp32["losses"]) == 3  # ran after the failure
    md = (project / "build" / "reports" / "compare-cpu-fp32.md").read_text()
    assert "failed: NaN at step 2" in md and "- fp16/lora: loss is nan at step 2" in md
    assert png_size(project / report["chart"]) == (900, 400)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--dtypes", "fp32,fp8"), "error: unknown dtype 'fp8' (expected: fp32, fp16, bf16)"),
        (
            ("--methods", "qlora"),
            "error: unknown method 'qlora'; did you mean 'lora'? (expected: lora, full)",
        ),
        (
            ("--dtypes", "fp32,bf16", "--methods", "lora", "--attn", "flash_attention_2"),
            "error: every requested combination is skipped on CPU",
        ),
        (("--model", "/nonexistent/qwen"), "error: model path not found: /nonexistent/qwen"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(project_copy: Path, args: tuple[str, ...], message: str) -> None:
    proc = compare(project_copy, "cpu", "--native", "--device", "cpu", *args)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(message)
    assert not (project_copy / "build" / "reports").exists()  # nothing ran


def test_a_model_that_is_not_qwen_gets_the_runtimes_message(project_copy: Path, tmp_path: Path) -> None:
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    proc = compare(project_copy, "cpu", "--native", "--device", "cpu", "--model", str(llama))
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: {llama} is not a Qwen checkpoint "
        "(model_type='llama'; expected one of qwen2, qwen2_moe, qwen3, qwen3_moe)\n"
    )


def test_native_needs_a_matrix_name(project_copy: Path) -> None:
    proc = compare(project_copy, "qwen-ft:cpu-fp32", "--native")
    assert proc.returncode == 2
    assert "--native takes one of those" in proc.stderr and len(proc.stderr.splitlines()) == 1


# ----------------------------------------------------------------------------- Docker tier


@pytest.mark.docker
def test_compare_in_the_cpu_image(built_cpu: Built) -> None:
    project = built_cpu.project
    proc = cli(
        project, "compare", "cpu", "--dtypes", "fp32,bf16", "--methods", "lora", "--steps", "3", timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = load_report(project)
    assert report["image"] == "qwen-ft:cpu-fp32" and report["native"] is False
    assert report["hardware"]["device"] == "cpu" and report["hardware"]["note"] == "cpu image"
    assert [(c["dtype"], c["status"]) for c in report["combinations"]] == [("fp32", "ok"), ("bf16", "ok")]
    for c in report["combinations"]:
        assert len(c["losses"]) == 3 and c["train_state_bytes"] > 0 and c["peak_mem_bytes"] > 0
    assert combo(report, "bf16/lora")["verdict"] == "within"
    assert png_size(project / report["chart"]) == (900, 400)
    commands = (project / "build" / "logs" / "commands.sh").read_text()
    assert "qwen-ft:cpu-fp32 qwen-ft-runtime smoke --dtype bf16 --method lora" in commands
    leftover = docker("ps", "-a", "-q", "--filter", f"label=io.qwen-ft.compare-project={project}")
    assert leftover.stdout.split() == []  # one container per combination, each removed
