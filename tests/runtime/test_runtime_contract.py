"""`contract` on this host's CPU torch: passes for the cpu plan, fails each broken promise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from qwen_ft_runtime.cli import main
from runtime_helpers import one_json_line, run_cli

pytestmark = pytest.mark.torch


def _cpu_plan() -> list[str]:
    import torch

    return [
        "--target",
        "cpu",
        "--alias",
        "cpu-fp32",
        "--target-sm",
        "none",
        "--expect-dtype",
        "fp32",
        "--expect-attn",
        "sdpa",
        "--expect-torch",
        torch.__version__.split("+")[0],
        "--expect-cuda",
        "none",
        "--expect-flash-attn",
        "none",
        "--expect-triton",
        "remove",
    ]


def _contract(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main(["contract", *args])
    return code, one_json_line(capsys.readouterr().out)


def _check(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in report["checks"] if c["name"] == name)


def test_cpu_plan_passes_on_this_host(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _contract(capsys, *_cpu_plan())
    assert code == 0, report["checks"]
    assert report["ok"] and report["failed_check"] is None
    names = {c["name"] for c in report["checks"]}
    assert {
        "torch_version",
        "torch_cuda",
        "arch_list",
        "triton",
        "flash_attn",
        "plan_precision",
        "transformers",
        "peft",
    } <= names
    assert all(set(c) == {"name", "ok", "detail"} for c in report["checks"])
    assert report["plan"]["sm"] == "none" and report["device"]["type"] == "cpu"


def test_wrong_torch_cuda_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _contract(capsys, *_cpu_plan(), "--expect-cuda", "12.6")
    assert code == 1
    assert report["failed_check"] == "torch_cuda"
    assert "None" in _check(report, "torch_cuda")["detail"]


def test_target_sm_missing_from_arch_list_fails(capsys: pytest.CaptureFixture[str]) -> None:
    # The CPU wheel's get_arch_list() is empty, as a cu128 wheel's lacks sm_70.
    code, report = _contract(capsys, *_cpu_plan(), "--target-sm", "70", "--expect-dtype", "fp16")
    assert code == 1
    assert not _check(report, "arch_list")["ok"]
    assert "sm_70" in _check(report, "arch_list")["detail"]


def test_inconsistent_precision_plan_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _contract(capsys, *_cpu_plan(), "--expect-dtype", "bf16")
    assert code == 1 and report["failed_check"] == "plan_precision"


def test_wrong_torch_version_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _contract(capsys, *_cpu_plan(), "--expect-torch", "2.8.0")
    assert code == 1 and report["failed_check"] == "torch_version"


def test_triton_present_but_plan_says_remove(tmp_path: Path) -> None:
    fake = tmp_path / "site"
    (fake / "triton").mkdir(parents=True)
    (fake / "triton" / "__init__.py").write_text("__version__ = '3.4.0'\n")
    result = run_cli(["contract", *_cpu_plan()], extra_pythonpath=[fake])
    assert result.returncode == 1, result.stderr
    report = one_json_line(result.stdout)
    assert report["failed_check"] == "triton"
    assert not _check(report, "triton")["ok"]


def test_triton_keep_fails_when_absent(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _contract(capsys, *_cpu_plan(), "--expect-triton", "keep")
    assert code == 1 and report["failed_check"] == "triton"


def test_contract_reads_the_image_env(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QWEN_FT_CUDA", "12.8")
    code, report = _contract(capsys)
    assert code == 1 and report["failed_check"] == "torch_cuda"
    assert report["plan"]["cuda"] == "12.8"
