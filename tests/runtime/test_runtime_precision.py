"""Dtype/attention rules per compute capability, with the capability faked (pure functions)."""

from __future__ import annotations

import pytest
from qwen_ft_runtime.errors import UsageError
from qwen_ft_runtime.precision import (
    arch_list_covers,
    bf16_capable,
    device_compatible,
    plan_problems,
    resolve,
)

VOLTA_TURING = [(7, 0), (7, 5)]
AMPERE_PLUS = [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]


@pytest.mark.parametrize("capability", VOLTA_TURING)
@pytest.mark.parametrize("flash", [True, False])
def test_pre_ampere_is_fp16_sdpa_even_with_flash_attn(capability: tuple[int, int], flash: bool) -> None:
    chosen = resolve(capability, flash)
    assert (chosen.dtype, chosen.attn, chosen.problems) == ("fp16", "sdpa", ())
    assert not bf16_capable(capability)


@pytest.mark.parametrize("capability", AMPERE_PLUS)
def test_ampere_plus_is_bf16_and_flash_attn_only_if_present(capability: tuple[int, int]) -> None:
    assert resolve(capability, True).attn == "flash_attention_2"
    assert resolve(capability, False).attn == "sdpa"
    assert resolve(capability, True).dtype == resolve(capability, False).dtype == "bf16"


def test_cpu_is_fp32_sdpa() -> None:
    chosen = resolve(None, True)
    assert (chosen.dtype, chosen.attn, chosen.dtype_source) == ("fp32", "sdpa", "device")


def test_impossible_flag_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="bf16 needs SM>=80"):
        resolve((7, 0), False, flag_dtype="bf16")
    with pytest.raises(UsageError, match="flash_attn"):
        resolve((9, 0), False, flag_attn="flash_attention_2")


def test_image_values_win_over_device_and_report_problems() -> None:
    # An Ampere image (bf16 + flash-attn) started on a V100: the wrong image, not a user typo.
    chosen = resolve((7, 0), False, image_dtype="bf16", image_attn="flash_attention_2")
    assert chosen.dtype_source == chosen.attn_source == "image"
    assert len(chosen.problems) == 2
    fine = resolve((8, 0), True, image_dtype="fp16", image_attn="sdpa")
    assert (fine.dtype, fine.attn, fine.problems) == ("fp16", "sdpa", ())


def test_flag_beats_image() -> None:
    chosen = resolve((9, 0), True, flag_dtype="fp16", image_dtype="bf16")
    assert (chosen.dtype, chosen.dtype_source) == ("fp16", "flag")


@pytest.mark.parametrize(
    ("target", "is_cpu", "dtype", "attn", "flash", "problems"),
    [
        ((7, 0), False, "fp16", "sdpa", False, 0),
        ((7, 0), False, "bf16", "sdpa", False, 1),
        ((7, 5), False, "fp16", "flash_attention_2", True, 2),  # flash-attn and its use
        ((8, 0), False, "bf16", "flash_attention_2", True, 0),
        ((9, 0), False, "bf16", "flash_attention_2", False, 1),
        ((9, 0), False, "fp32", "sdpa", False, 1),
        (None, True, "fp32", "sdpa", False, 0),
        (None, True, "bf16", "sdpa", False, 1),
        (None, True, "fp32", "flash_attention_2", True, 2),
    ],
)
def test_plan_rules(
    target: tuple[int, int] | None, is_cpu: bool, dtype: str, attn: str, flash: bool, problems: int
) -> None:
    assert len(plan_problems(target, is_cpu, dtype, attn, flash)) == problems


def test_device_compatibility_is_same_major_and_not_older_minor() -> None:
    assert device_compatible((8, 6), (8, 0))
    assert device_compatible((8, 9), (8, 6))
    assert not device_compatible((8, 0), (8, 6))
    assert not device_compatible((9, 0), (8, 0))  # sm_80 SASS does not run on Hopper
    assert not device_compatible((7, 0), (8, 0))


def test_arch_list_coverage() -> None:
    cu126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
    cu128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
    assert arch_list_covers((7, 0), cu126)[0]
    assert not arch_list_covers((7, 0), cu128)[0]  # cu128 wheels dropped Volta
    ok, detail = arch_list_covers((8, 9), cu126)
    assert ok and "sm_86" in detail
    assert arch_list_covers((10, 0), cu128)[0]
    ok, detail = arch_list_covers((12, 1), ["compute_120"])
    assert ok and "PTX" in detail
    ok, detail = arch_list_covers((7, 0), [])
    assert not ok and "empty" in detail
