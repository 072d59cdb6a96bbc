"""`train` on JSONL with a saved tiny checkpoint: adapter, checkpoints, resume, input errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from qwen_ft_runtime.cli import main
from runtime_helpers import one_json_line, run_cli

pytestmark = pytest.mark.torch


def _train(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main(["train", *args])
    return code, one_json_line(capsys.readouterr().out)


def test_train_writes_a_loadable_adapter_and_resumes_exactly(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, chat_jsonl: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    args = [
        "--model",
        str(tiny_checkpoint),
        "--data",
        str(chat_jsonl),
        "--output",
        str(output),
        "--steps",
        "4",
        "--save-every",
        "2",
        "--batch-size",
        "2",
        "--lr",
        "5e-3",
        "--log-every",
        "1",
    ]
    code, first = _train(capsys, *args)
    assert code == 0 and first["ok"]
    assert first["start_step"] == 0 and len(first["losses"]) == 4
    assert (output / "adapter_config.json").is_file()
    for step in (2, 4):
        checkpoint = output / f"checkpoint-{step}"
        assert json.loads((checkpoint / "state.json").read_text())["step"] == step
        assert {"optimizer.pt", "scaler.pt", "trainable.pt", "adapter_config.json"} <= {
            p.name for p in checkpoint.iterdir()
        }

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint))
    adapted = PeftModel.from_pretrained(base, str(output))
    lora = {n: p for n, p in adapted.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())  # B starts at 0: it trained
    assert torch.isfinite(adapted(input_ids=torch.tensor([[1, 5, 9]])).logits).all()

    # Lose the last checkpoint, as a killed job would, and resume from checkpoint-2: the same
    # batches, LR, dropout RNG and optimizer moments give the same last two losses.
    shutil.rmtree(output / "checkpoint-4")
    code, resumed = _train(capsys, *args, "--resume", "auto")
    assert code == 0 and resumed["start_step"] == 2
    assert resumed["resumed_from"] == str(output / "checkpoint-2")
    assert resumed["losses"] == pytest.approx(first["losses"][2:], abs=1e-5)


def test_resume_from_an_explicit_directory_that_is_not_a_checkpoint(
    tiny_checkpoint: Path, chat_jsonl: Path, tmp_path: Path
) -> None:
    result = run_cli(
        [
            "train",
            "--model",
            str(tiny_checkpoint),
            "--data",
            str(chat_jsonl),
            "--output",
            str(tmp_path / "o"),
            "--resume",
            str(tmp_path),
        ]
    )
    assert result.returncode == 2 and "not a checkpoint" in result.stderr


def test_malformed_jsonl_names_file_and_line_without_traceback(
    tiny_checkpoint: Path, chat_jsonl: Path, tmp_path: Path
) -> None:
    lines = chat_jsonl.read_text().splitlines()
    lines.insert(2, '{"messages": [{"role": "user", "content": "unterminated}')
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    result = run_cli(
        [
            "train",
            "--model",
            str(tiny_checkpoint),
            "--data",
            str(bad),
            "--output",
            str(tmp_path),
        ]
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{bad}:3: invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_path_is_exit_2(chat_jsonl: Path, tmp_path: Path) -> None:
    result = run_cli(
        [
            "train",
            "--model",
            str(tmp_path / "nope"),
            "--data",
            str(chat_jsonl),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "model path not found" in result.stderr and "Traceback" not in result.stderr
