"""Plan parsing from ENV and flags, and version comparison (no torch needed)."""

from __future__ import annotations

import pytest
from qwen_ft_runtime.env import Plan, parse_sm, same_release, version_at_least
from qwen_ft_runtime.errors import UsageError


@pytest.mark.parametrize(
    ("text", "capability"),
    [
        ("70", (7, 0)),
        ("86", (8, 6)),
        ("100", (10, 0)),
        ("120", (12, 0)),
        ("sm_90a", (9, 0)),
        ("none", None),
    ],
)
def test_parse_sm(text: str, capability: tuple[int, int] | None) -> None:
    assert parse_sm(text) == capability


def test_parse_sm_rejects_garbage() -> None:
    with pytest.raises(UsageError):
        parse_sm("volta")


def test_versions_compare_on_public_release() -> None:
    assert same_release("2.8.0+cu128", "2.8.0")
    assert same_release("2.8.0", "2.8")
    assert not same_release("2.7.1+cu126", "2.8.0")
    assert version_at_least("4.51.3", "4.51.0")
    assert version_at_least("5.0.0", "4.51.0")
    assert not version_at_least("4.50.3", "4.51.0")
    assert not version_at_least("0.11.1", "0.12.0")


def test_plan_reads_env_and_flags_override() -> None:
    env = {"QWEN_FT_SM": "70", "QWEN_FT_DTYPE": "fp16", "QWEN_FT_CUDA": "12.6"}
    plan = Plan.load(env, {"cuda": "12.8", "sm": None})
    assert (plan.sm, plan.capability, plan.dtype, plan.cuda) == ("70", (7, 0), "fp16", "12.8")
    assert plan.attn is None and not plan.is_cpu
    assert Plan.load({"QWEN_FT_SM": "none"}).is_cpu


def test_plan_rejects_bad_values_naming_their_source() -> None:
    with pytest.raises(UsageError, match="QWEN_FT_DTYPE"):
        Plan.load({"QWEN_FT_DTYPE": "float16"})
    with pytest.raises(UsageError, match="--expect-triton"):
        Plan.load({}, {"triton": "maybe"})
