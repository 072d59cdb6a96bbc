"""`smoke`: real LoRA / full steps on tiny Qwen2 and Qwen3, fp32 and fp16, on the CPU."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from qwen_ft_runtime.cli import main
from runtime_helpers import one_json_line, run_cli

pytestmark = pytest.mark.torch

RUN_KEYS = {
    "model",
    "losses",
    "step_time_s",
    "tokens_per_s",
    "peak_mem_bytes",
    "peak_mem_kind",
    "train_state_bytes",
    "trainable_params",
    "total_params",
    "loss_scale",
}
TOP_KEYS = {
    "entry",
    "ok",
    "failed_check",
    "checks",
    "versions",
    "device",
    "dtype",
    "attn_implementation",
    "method",
    "runs",
    "import_to_first_step_s",
}
VERSION_KEYS = {
    "python",
    "torch",
    "torch_cuda",
    "transformers",
    "peft",
    "accelerate",
    "flash_attn",
    "triton",
}


def _smoke(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main(["smoke", *args])
    return code, one_json_line(capsys.readouterr().out)


def test_lora_loss_decreases_on_tiny_qwen2_and_qwen3(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _smoke(capsys, "--steps", "8")
    assert code == 0, report["checks"]
    assert report["ok"] and report["failed_check"] is None
    assert report.keys() >= TOP_KEYS and report["versions"].keys() >= VERSION_KEYS
    assert (report["dtype"], report["attn_implementation"]) == ("fp32", "sdpa")
    assert report["device"] == {"type": "cpu", "name": report["device"]["name"], "sm": None}
    assert [r["model"] for r in report["runs"]] == ["qwen2-tiny", "qwen3-tiny"]
    for run in report["runs"]:
        assert run.keys() >= RUN_KEYS
        losses = run["losses"]
        assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
        assert sum(losses[-2:]) / 2 < losses[0] - 0.1
        assert 0 < run["trainable_params"] < run["total_params"]
        assert run["peak_mem_kind"] == "process_max_rss" and run["peak_mem_bytes"] > 0
        assert run["loss_scale"] is None and run["tokens_per_s"] > 0
    assert report["import_to_first_step_s"] > 0


def test_fp16_path_scales_loss_and_keeps_adapters_fp32(capsys: pytest.CaptureFixture[str]) -> None:
    # CPU autocast runs fp16 kernels and GradScaler("cpu") is the real dynamic scaler.
    code, report = _smoke(capsys, "--dtype", "fp16", "--tiny", "qwen3-tiny", "--steps", "6")
    assert code == 0, report["checks"]
    (run,) = report["runs"]
    assert report["dtype"] == "fp16" and report["precision_source"]["dtype"] == "flag"
    assert run["weight_dtype"] == "fp16" and run["trainable_dtypes"] == ["float32"]
    assert run["loss_scale"] is not None and run["loss_scale"] > 1


def test_full_method_trains_every_parameter(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _smoke(capsys, "--method", "full", "--tiny", "qwen2-tiny", "--steps", "6")
    assert code == 0, report["checks"]
    (run,) = report["runs"]
    assert run["trainable_params"] == run["total_params"]
    # fp32 weights + gradients + two AdamW moments: at least 16 bytes per parameter.
    assert run["train_state_bytes"] >= 16 * run["total_params"]


def test_smoke_on_a_saved_checkpoint(capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path) -> None:
    code, report = _smoke(capsys, "--model", str(tiny_checkpoint), "--steps", "6", "--lr", "5e-3")
    assert code == 0, report["checks"]
    (run,) = report["runs"]
    assert run["model"] == str(tiny_checkpoint)


def test_image_on_the_wrong_device_fails_a_named_check(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QWEN_FT_SM", "80")
    monkeypatch.setenv("QWEN_FT_DTYPE", "bf16")
    code, report = _smoke(capsys, "--steps", "2")
    assert code == 1
    assert report["failed_check"] == "device" and report["runs"] == []


def test_cli_prints_exactly_one_json_line() -> None:
    result = run_cli(["smoke", "--tiny", "qwen2-tiny", "--steps", "4"])
    assert result.returncode == 0, result.stderr
    report = one_json_line(result.stdout)
    assert report["entry"] == "smoke" and report["ok"]
    assert "smoke qwen2-tiny" in result.stderr  # logs go to stderr


@pytest.mark.parametrize("kind", ["missing", "not_qwen"])
def test_bad_model_path_is_a_one_line_usage_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model"
    if kind == "not_qwen":
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = run_cli(["smoke", "--model", str(path)])
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert ("not found" if kind == "missing" else "not a Qwen checkpoint") in result.stderr


def test_nan_fails_naming_the_step(capsys: pytest.CaptureFixture[str]) -> None:
    # An absurd LR drives the fp32 adapters far past fp16's range: real inf/NaN activations.
    code, report = _smoke(capsys, "--dtype", "fp16", "--lr", "1e6", "--tiny", "qwen2-tiny", "--steps", "4")
    assert code == 1
    assert report["failed_check"] == "qwen2-tiny:finite_loss"
    failed = next(c for c in report["checks"] if not c["ok"])
    assert re.fullmatch(r"loss is (nan|inf|-inf) at step \d", failed["detail"])
    (run,) = report["runs"]
    assert len(run["losses"]) == int(failed["detail"][-1]) - 1


def test_max_len_too_short_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["smoke", "--tiny", "qwen2-tiny", "--max-len", "8"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--max-len 8" in captured.err
