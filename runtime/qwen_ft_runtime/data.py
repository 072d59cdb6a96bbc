"""ChatML encoding with assistant-only labels, synthetic samples, and JSONL loading."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import UsageError

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # what torch's cross_entropy (and transformers' loss) skip
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
ROLES = ("system", "user", "assistant")

Message = dict[str, str]
Conversation = list[Message]


class TokenizerLike(Protocol):
    """The part of a Hugging Face tokenizer used here."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def convert_tokens_to_ids(self, tokens: str) -> Any: ...


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def special_id(tokenizer: TokenizerLike, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if not isinstance(token_id, int) or token_id == unk:
        raise UsageError(f"tokenizer has no {token} token; is this a Qwen chat tokenizer?")
    return token_id


def encode_chat(messages: Sequence[Message], tokenizer: TokenizerLike, max_len: int | None = None) -> Example:
    """Render ChatML and label only assistant replies, each including its <|im_end|>.

    Segments are encoded separately (rather than rendering one string and searching for
    offsets) so the label boundary is exact by construction. The "\\n" after <|im_end|> is
    masked: Qwen's chat template emits it, but the model never has to generate it.
    """
    im_start, im_end = special_id(tokenizer, IM_START), special_id(tokenizer, IM_END)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    input_ids: list[int] = []
    labels: list[int] = []
    for message in messages:
        head = [im_start, *tokenizer.encode(f"{message['role']}\n", add_special_tokens=False)]
        body = [*tokenizer.encode(message["content"], add_special_tokens=False), im_end]
        trained = message["role"] == "assistant"
        input_ids += head + body + newline
        labels += (
            [IGNORE_INDEX] * len(head)
            + (body if trained else [IGNORE_INDEX] * len(body))
            + [IGNORE_INDEX] * len(newline)
        )
    if max_len is not None:
        input_ids, labels = input_ids[:max_len], labels[:max_len]
    return Example(input_ids, labels)


ASSISTANT_HEAD = f"{IM_START}assistant\n"


def chat_format(tokenizer: Any) -> str:
    """`chat_template` when the checkpoint ships one (every Qwen release does), else `chatml`:
    the hand-written rendering, for the in-code tiny tokenizer."""
    return "chat_template" if getattr(tokenizer, "chat_template", None) else "chatml"


def assistant_spans(text: str, expected: int) -> list[tuple[int, int]]:
    """Character spans of the assistant replies in a rendered ChatML conversation: from after
    `<|im_start|>assistant\n` up to and including the `<|im_end|>` that closes the turn.

    Whatever the template puts inside the turn is trained on, so Qwen3's `<think>` block is
    learnt as part of the reply, as the model has to generate it.
    """
    spans: list[tuple[int, int]] = []
    position = 0
    while True:
        head = text.find(ASSISTANT_HEAD, position)
        if head < 0:
            break
        start = head + len(ASSISTANT_HEAD)
        end = text.find(IM_END, start)
        if end < 0:
            raise UsageError("chat template left an assistant turn without <|im_end|>")
        spans.append((start, end + len(IM_END)))
        position = end
    if len(spans) != expected:
        raise UsageError(
            f"chat template rendered {len(spans)} assistant turns for {expected} assistant messages; "
            "is this a Qwen (ChatML) chat template?"
        )
    return spans


def encode_templated(messages: Sequence[Message], tokenizer: Any, max_len: int | None = None) -> Example:
    """Render with the checkpoint's own `apply_chat_template`, label the assistant turns.

    Labels come from character offsets into the one rendered string, so every token is the
    one the model sees at inference; a token straddling a span edge is left unlabelled.
    """
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    spans = assistant_spans(text, sum(1 for m in messages if m["role"] == "assistant"))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [
        token if any(lo <= start and end <= hi for lo, hi in spans) else IGNORE_INDEX
        for token, (start, end) in zip(input_ids, encoded["offset_mapping"], strict=True)
    ]
    if max_len is not None:
        input_ids, labels = input_ids[:max_len], labels[:max_len]
    return Example(input_ids, labels)


def encode_all(
    conversations: Iterable[Conversation], tokenizer: Any, max_len: int | None
) -> tuple[list[Example], int]:
    """Encoded examples and how many were dropped because truncation left nothing to train on
    (an all-masked example makes the mean loss 0/0 = NaN)."""
    encode = encode_templated if chat_format(tokenizer) == "chat_template" else encode_chat
    examples: list[Example] = []
    dropped = 0
    for conversation in conversations:
        example = encode(conversation, tokenizer, max_len)
        if example.trained_tokens == 0:
            dropped += 1
        else:
            examples.append(example)
    return examples, dropped


# --- synthetic data ---------------------------------------------------------------------------

_WORDS = (
    *("red", "green", "blue", "amber", "violet", "cyan", "olive", "coral"),
    *("cat", "dog", "owl", "fox", "bee", "elk", "yak", "emu"),
    *("one", "two", "three", "four", "five", "six", "seven", "eight"),
)
SYSTEM_PROMPT = "You are a helpful assistant."


def synthetic_conversations(count: int, seed: int) -> list[Conversation]:
    """Two-turn chats whose answers are a deterministic function of the question (echo, then
    reverse), so the task is learnable rather than noise the loss can't go below."""
    rng = random.Random(seed)
    conversations: list[Conversation] = []
    for _ in range(count):
        words = rng.sample(_WORDS, rng.randint(3, 5))
        phrase = " ".join(words)
        conversations.append(
            [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"Repeat: {phrase}"},
                {"role": "assistant", "content": phrase},
                {"role": "user", "content": "Now reverse it."},
                {"role": "assistant", "content": " ".join(reversed(words))},
            ]
        )
    return conversations


def synthetic_corpus() -> list[str]:
    """Text a tiny tokenizer is trained on: every string synthetic samples can contain."""
    fixed = [SYSTEM_PROMPT, "Repeat: ", "Now reverse it.", *(f"{r}\n" for r in ROLES), "\n"]
    return fixed * 4 + [" ".join(_WORDS)] * 4 + [f" {w}" for w in _WORDS] * 4


def build_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer with Qwen's special tokens, built in code (no downloads).

    Byte-level, as Qwen's is, so any text still encodes; the BPE merges are learnt from the
    synthetic corpus so samples stay short.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [ENDOFTEXT, IM_START, IM_END]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(synthetic_corpus(), trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call, unused-ignore]
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
    )


# --- JSONL --------------------------------------------------------------------------------------


def load_jsonl(path: Path) -> list[Conversation]:
    """`{"messages": [{"role": ..., "content": ...}, ...]}` per line; blank lines are skipped.

    Every problem names `file:line` so a bad line in a large file is found at once.
    """
    if not path.is_file():
        raise UsageError(f"data file not found: {path}")
    conversations: list[Conversation] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            conversations.append(_conversation(record, where))
    if not conversations:
        raise UsageError(f"{path}: no samples")
    return conversations


def _conversation(record: Any, where: str) -> Conversation:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise UsageError(f'{where}: expected {{"messages": [...]}} with at least one message')
    conversation: Conversation = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UsageError(f"{where}: messages[{index}] is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise UsageError(
                f"{where}: messages[{index}].role is {role!r}, expected one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise UsageError(f"{where}: messages[{index}].content must be a string")
        conversation.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in conversation):
        raise UsageError(f"{where}: no assistant message, nothing to train on")
    return conversation


# --- batching -----------------------------------------------------------------------------------


def steps_per_epoch(count: int, batch_size: int) -> int:
    return max(1, math.ceil(count / batch_size))


def batch_indices(count: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Sample indices for optimizer step `step` (0-based).

    A pure function of the step, reshuffled each epoch, so a resumed run sees exactly the
    batches the interrupted one would have.
    """
    per_epoch = steps_per_epoch(count, batch_size)
    epoch, position = divmod(step, per_epoch)
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[position * batch_size : (position + 1) * batch_size]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids, labels, mask = [], [], []
    for example in examples:
        pad = width - len(example.input_ids)
        ids.append(example.input_ids + [pad_id] * pad)
        labels.append(example.labels + [IGNORE_INDEX] * pad)
        mask.append([1] * len(example.input_ids) + [0] * pad)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
    }
