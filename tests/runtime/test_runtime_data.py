"""ChatML rendering, assistant-only labels, JSONL validation and batch order."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from qwen_ft_runtime.data import (
    IGNORE_INDEX,
    batch_indices,
    encode_chat,
    load_jsonl,
    synthetic_conversations,
)
from qwen_ft_runtime.errors import UsageError

SAMPLE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Repeat: red cat"},
    {"role": "assistant", "content": "red cat"},
    {"role": "user", "content": "Now reverse it."},
    {"role": "assistant", "content": "cat red"},
]
CHATML = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nRepeat: red cat<|im_end|>\n"
    "<|im_start|>assistant\nred cat<|im_end|>\n"
    "<|im_start|>user\nNow reverse it.<|im_end|>\n"
    "<|im_start|>assistant\ncat red<|im_end|>\n"
)


@pytest.mark.torch
def test_labels_keep_only_assistant_replies_and_their_im_end() -> None:
    from qwen_ft_runtime.data import build_tokenizer

    tokenizer = build_tokenizer()
    example = encode_chat(SAMPLE, tokenizer)
    assert len(example.input_ids) == len(example.labels)
    assert tokenizer.decode(example.input_ids) == CHATML

    # Contiguous runs of trained tokens are exactly the two replies, each with <|im_end|>.
    spans: list[list[int]] = []
    previous_trained = False
    for token, label in zip(example.input_ids, example.labels, strict=True):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token
            if not previous_trained:
                spans.append([])
            spans[-1].append(token)
        previous_trained = trained
    assert [tokenizer.decode(s) for s in spans] == ["red cat<|im_end|>", "cat red<|im_end|>"]

    # Everything else (system, user, role headers, the newline after <|im_end|>) is masked.
    masked = [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab == -100]
    text = tokenizer.decode(masked)
    assert "You are a helpful assistant." in text and "Repeat: red cat" in text
    assert "<|im_start|>assistant\n" in text


@pytest.mark.torch
def test_truncation_keeps_lengths_aligned() -> None:
    from qwen_ft_runtime.data import build_tokenizer

    example = encode_chat(SAMPLE, build_tokenizer(), max_len=12)
    assert len(example.input_ids) == len(example.labels) == 12
    assert example.trained_tokens == 0  # the prompt fills the window: nothing to learn


def test_synthetic_conversations_are_seeded_and_learnable() -> None:
    first = synthetic_conversations(4, seed=7)
    assert first == synthetic_conversations(4, seed=7)
    assert first != synthetic_conversations(4, seed=8)
    for chat in first:
        phrase = chat[1]["content"].removeprefix("Repeat: ")
        assert chat[2]["content"] == phrase
        assert chat[4]["content"] == " ".join(reversed(phrase.split()))


def _write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_loads_and_skips_blank_lines(tmp_path: Path) -> None:
    good = json.dumps({"messages": SAMPLE})
    assert load_jsonl(_write(tmp_path, good, "", good)) == [SAMPLE, SAMPLE]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"messages": [', "invalid JSON"),
        ('{"msgs": []}', 'expected {"messages"'),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "role is 'bot'"),
        ('{"messages": [{"role": "user", "content": 3}]}', "content must be a string"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = _write(tmp_path, json.dumps({"messages": SAMPLE}), bad_line)
    with pytest.raises(UsageError, match=message) as caught:
        load_jsonl(path)
    assert str(caught.value).startswith(f"{path}:2: ")


def test_batch_order_is_a_pure_function_of_step() -> None:
    steps = [batch_indices(10, 4, step, seed=1) for step in range(6)]
    assert [len(b) for b in steps] == [4, 4, 2, 4, 4, 2]
    assert sorted(itertools.chain(*steps[:3])) == list(range(10))  # each epoch covers every sample once
    assert steps[:3] != steps[3:]  # and is reshuffled
    assert batch_indices(10, 4, 4, seed=1) == steps[4]
