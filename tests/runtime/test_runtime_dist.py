"""`--nproc` / `--deepspeed`: rank arithmetic, config handling, bad input, and real CPU ranks.

The multi-process tests start real torchrun ranks on the CPU (gloo) and compare them with one
process at the same global batch and seed.

Tolerance: 1e-4 absolute on losses near 6. N ranks compute exactly the step one process does
(each rank's token-loss sum over the global token count, gradients averaged over ranks), so
the only difference is the order in which fp32 gradient sums are added (gloo's all-reduce
versus one matmul). That reorders roundings of ~1e-7 relative per step; over 6 AdamW steps
the measured gap is <= 1e-6 (the rounding of the JSON losses). 1e-4 leaves room for other CPUs' summation orders and is still
~500x smaller than the loss change of one step (~0.05), so a rank that trained on the wrong
slice, or gradients summed instead of averaged, fails it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
from qwen_ft_runtime.dist import check_batch, parse_nproc, resolve_nproc, strip_nproc
from qwen_ft_runtime.ds import PRESETS, load_spec, preset_path, resolve_config
from qwen_ft_runtime.errors import UsageError
from runtime_helpers import one_json_line, run_cli

LOSS_TOLERANCE = 1e-4


# --- rank arithmetic (no torch) ---------------------------------------------------------------


def test_parse_nproc() -> None:
    assert parse_nproc("2") == 2
    assert parse_nproc("all") == "all"
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(UsageError):
            parse_nproc(bad)


def test_resolve_nproc_counts_gpus_and_refuses_more_than_visible() -> None:
    assert resolve_nproc("all", "auto", 8) == 8
    assert resolve_nproc(2, "auto", 8) == 2
    assert resolve_nproc(2, "auto", 0) == 2  # no GPU: CPU ranks
    assert resolve_nproc(3, "cpu", 2) == 3  # --device cpu ignores the GPUs
    with pytest.raises(UsageError, match="only 2 GPU"):
        resolve_nproc(4, "auto", 2)
    with pytest.raises(UsageError, match="none is visible"):
        resolve_nproc("all", "auto", 0)
    with pytest.raises(UsageError, match="no GPU is visible"):
        resolve_nproc(2, "cuda", 0)


def test_strip_nproc_and_global_batch() -> None:
    argv = ["smoke", "--nproc", "2", "--steps", "4", "--nproc=3", "--deepspeed", "zero2"]
    assert strip_nproc(argv) == ["smoke", "--steps", "4", "--deepspeed", "zero2"]
    check_batch(4, 2)
    with pytest.raises(UsageError, match="multiple of the 2 ranks"):
        check_batch(3, 2)


# --- DeepSpeed configs (no deepspeed needed) ----------------------------------------------------


def _resolve(name: str, dtype: str = "fp16", **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "dtype": dtype,
        "lr": 1e-4,
        "batch_size": 16,
        "world_size": 8,
        "steps": 100,
        "warmup_steps": 3,
        "max_grad_norm": 1.0,
        "weight_decay": 0.0,
        "device_type": "cuda",
        "hidden_size": 64,
    }
    settings.update(overrides)
    return resolve_config(load_spec(name), **settings)


def test_presets_ship_as_package_data_and_follow_qwens_recipe() -> None:
    for name in PRESETS:
        raw = json.loads(preset_path(name).read_text())
        assert raw["optimizer"]["type"] == "AdamW"
        assert raw["train_micro_batch_size_per_gpu"] == "auto"
        assert raw["fp16"]["loss_scale"] == 0  # dynamic loss scaling
        assert raw["zero_optimization"]["stage"] == (3 if name.startswith("zero3") else 2)
        offload = raw["zero_optimization"]["offload_optimizer"]["device"]
        assert offload == ("cpu" if name.endswith("offload") else "none")


def test_auto_values_are_filled_from_the_run() -> None:
    config = _resolve("zero2", "fp16")
    assert config["fp16"]["enabled"] is True and config["bf16"]["enabled"] is False
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["train_batch_size"] == 16
    assert config["gradient_accumulation_steps"] == 1 and config["gradient_clipping"] == 1.0
    assert config["optimizer"]["params"]["lr"] == 1e-4
    assert "torch_adam" not in config["optimizer"]["params"]  # GPU: DeepSpeed's FusedAdam
    bf16 = _resolve("zero3", "bf16")
    assert bf16["bf16"]["enabled"] is True and bf16["fp16"]["enabled"] is False
    assert bf16["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    cpu = _resolve("zero2", "fp32", device_type="cpu", world_size=2)
    assert not cpu["fp16"]["enabled"] and not cpu["bf16"]["enabled"]
    assert cpu["optimizer"]["params"]["torch_adam"] is True


def test_user_json_that_contradicts_the_run_or_leaves_unknown_autos_is_refused(tmp_path: Path) -> None:
    forced = tmp_path / "fp16.json"
    forced.write_text(json.dumps({"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(UsageError, match=r"fp16\.enabled is True but this run trains in bf16"):
        _resolve(str(forced), "bf16")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"zero_optimization": {"stage": 2}, "mystery": {"knob": "auto"}}))
    with pytest.raises(UsageError, match=r"mystery\.knob"):
        _resolve(str(unknown))
    stage = tmp_path / "stage.json"
    stage.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    with pytest.raises(UsageError, match="stage is 4"):
        load_spec(str(stage))


# --- bad input on the command line --------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc", "0"], "--nproc 0: expected at least 1"),
        (["--deepspeed", "zero5"], "--deepspeed 'zero5': expected one of zero2, zero3"),
        (["--deepspeed", "{bad}"], "invalid JSON"),
        (["--device", "cuda", "--nproc", "4"], "--nproc 4 on --device cuda but no GPU is visible"),
        (["--nproc", "2", "--batch-size", "3"], "multiple of the 2 ranks"),
    ],
)
def test_bad_parallel_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    if "{bad}" in args:
        bad = tmp_path / "ds.json"
        bad.write_text('{"zero_optimization": {"stage": 2},}')
        args = [str(bad) if a == "{bad}" else a for a in args]
    result = run_cli(["smoke", "--tiny", "qwen2-tiny", *args])
    assert result.returncode == 2
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# --- real ranks on the CPU ------------------------------------------------------------------------


def _smoke_json(*args: str) -> dict[str, Any]:
    result = run_cli(["smoke", "--tiny", "qwen2-tiny", "--steps", "6", "--batch-size", "4", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    return one_json_line(result.stdout)


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    report = _smoke_json()
    assert report["world_size"] == 1 and report["backend"] is None
    return report


def _losses(report: dict[str, Any]) -> list[float]:
    runs = report["runs"]
    assert isinstance(runs, list) and len(runs) == 1
    return [float(x) for x in runs[0]["losses"]]


@pytest.mark.torch
def test_two_gloo_ranks_match_one_process(one_process: dict[str, Any]) -> None:
    report = _smoke_json("--nproc", "2")
    assert report["ok"], report["failed_check"]
    assert (report["world_size"], report["backend"], report["launcher"]) == (2, "gloo", "torchrun")
    ranks = report["runs"][0]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["step_time_s"] > 0 and r["total_step_s"] > 0 for r in ranks)
    assert _losses(report) == pytest.approx(_losses(one_process), abs=LOSS_TOLERANCE)


def _require_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        if os.environ.get("QWEN_FT_REQUIRE_DEEPSPEED") == "1":
            pytest.fail("deepspeed is not installed but QWEN_FT_REQUIRE_DEEPSPEED=1")
        pytest.skip("deepspeed not installed (pip install '.[deepspeed]')")


@pytest.mark.torch
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_on_two_gloo_ranks_matches_one_process(
    one_process: dict[str, Any], stage: str
) -> None:
    _require_deepspeed()
    report = _smoke_json("--nproc", "2", "--deepspeed", stage)
    assert report["ok"], report["failed_check"]
    assert (report["world_size"], report["backend"], report["deepspeed"]) == (2, "gloo", stage)
    engine = report["runs"][0]["deepspeed"]
    assert engine["stage"] == int(stage[-1]) and engine["accelerator"] == "cpu"
    assert engine["zero_optimizer"] == (
        "DeepSpeedZeroOptimizer_Stage3" if stage == "zero3" else "DeepSpeedZeroOptimizer"
    )
    assert _losses(report) == pytest.approx(_losses(one_process), abs=LOSS_TOLERANCE)


@pytest.mark.torch
def test_zero3_train_saves_a_gathered_adapter_and_resumes_exactly(
    tiny_checkpoint: Path, chat_jsonl: Path, tmp_path: Path
) -> None:
    """ZeRO-3 shards every weight across ranks: the adapter on disk must still be whole, and a
    resume from the sharded checkpoint must reproduce the uninterrupted run's losses."""
    _require_deepspeed()
    import shutil

    output = tmp_path / "out"
    args = [
        "train",
        *("--model", str(tiny_checkpoint), "--data", str(chat_jsonl), "--output", str(output)),
        *("--steps", "4", "--save-every", "2", "--batch-size", "2", "--lr", "5e-3"),
        *("--nproc", "2", "--deepspeed", "zero3"),
    ]
    first = run_cli(args)
    assert first.returncode == 0, first.stderr[-3000:]
    report = one_json_line(first.stdout)
    assert report["world_size"] == 2 and report["deepspeed"]["stage"] == 3
    assert report["total_params"] > report["trainable_params"]  # counted through the shards
    checkpoint = output / "checkpoint-2"
    assert {"deepspeed", "rng.pt", "rng-1.pt", "state.json", "adapter_model.safetensors"} <= {
        p.name for p in checkpoint.iterdir()
    }

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint)), str(output)
    )
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.shape[1] == 16 for p in lora_b)  # whole (r=16), not an empty shard
    assert any(float(p.abs().sum()) > 0 for p in lora_b)  # B starts at zero: it trained

    shutil.rmtree(output / "checkpoint-4")
    resumed = run_cli([*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = one_json_line(resumed.stdout)
    assert again["start_step"] == 2
    assert again["losses"] == pytest.approx(report["losses"][2:], abs=1e-5)

    wrong = run_cli([*args[:-2], "--deepspeed", "zero2", "--resume", str(checkpoint)])
    assert wrong.returncode == 2 and "saved with --deepspeed zero3" in wrong.stderr
