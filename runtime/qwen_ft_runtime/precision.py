"""Dtype and attention choice as pure functions of the compute capability.

`capability` is `(major, minor)` of a CUDA device, or None for the CPU. Everything here except
the two `probe_*` functions is pure so the per-SM rules are testable without a GPU.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

Capability = tuple[int, int] | None

# Autocast dtype per name; fp32 means autocast off.
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def sm_label(capability: Capability) -> str:
    return "cpu" if capability is None else f"sm_{capability[0]}{capability[1]}"


def bf16_capable(capability: Capability) -> bool:
    # Judged from the capability, not torch.cuda.is_bf16_supported(): recent torch answers True
    # on V100 because it can emulate bf16, but there are no bf16 tensor cores before Ampere.
    return capability is not None and capability[0] >= 8


def default_dtype(capability: Capability) -> str:
    if capability is None:
        return "fp32"
    return "bf16" if bf16_capable(capability) else "fp16"


def default_attn(capability: Capability, flash_attn_available: bool) -> str:
    if capability is not None and capability[0] >= 8 and flash_attn_available:
        return "flash_attention_2"
    return "sdpa"


def dtype_problem(dtype: str, capability: Capability) -> str | None:
    if dtype == "bf16" and capability is not None and not bf16_capable(capability):
        return f"bf16 needs SM>=80, device is {sm_label(capability)}"
    return None


def attn_problem(attn: str, dtype: str, capability: Capability, flash_attn_available: bool) -> str | None:
    if attn != "flash_attention_2":
        return None
    if capability is None:
        return "flash_attention_2 needs a CUDA GPU"
    if capability[0] < 8:
        return f"flash_attention_2 needs SM>=80, device is {sm_label(capability)}"
    if not flash_attn_available:
        return "flash_attention_2 needs flash_attn, which is not importable"
    if dtype == "fp32":
        return "flash_attention_2 needs fp16 or bf16 compute"
    return None


@dataclass(frozen=True)
class Precision:
    dtype: str
    attn: str
    # Where each value came from: "flag", "image" (its dtype/attention ENV) or "device".
    dtype_source: str
    attn_source: str
    # Why the image's planned values cannot run on this device; empty when they can.
    problems: tuple[str, ...] = ()


def resolve(
    capability: Capability,
    flash_attn_available: bool,
    *,
    flag_dtype: str | None = None,
    flag_attn: str | None = None,
    image_dtype: str | None = None,
    image_attn: str | None = None,
) -> Precision:
    """Flag > image ENV > device default.

    An impossible flag is the user's mistake (UsageError). An impossible image value means the
    image runs on the wrong GPU; that is reported as a problem for the caller to fail a check.
    """
    dtype, dtype_source = _pick(flag_dtype, image_dtype, default_dtype(capability))
    attn, attn_source = _pick(flag_attn, image_attn, default_attn(capability, flash_attn_available))
    problems: list[str] = []
    for problem, source in (
        (dtype_problem(dtype, capability), dtype_source),
        (attn_problem(attn, dtype, capability, flash_attn_available), attn_source),
    ):
        if problem is None:
            continue
        if source == "flag":
            raise UsageError(problem)
        problems.append(problem)
    return Precision(dtype, attn, dtype_source, attn_source, tuple(problems))


def _pick(flag: str | None, image: str | None, device: str) -> tuple[str, str]:
    if flag is not None:
        return flag, "flag"
    if image is not None:
        return image, "image"
    return device, "device"


def plan_problems(
    target: Capability, is_cpu: bool, dtype: str | None, attn: str | None, flash_attn_planned: bool
) -> list[str]:
    """SM rules an image plan must obey, independent of the machine it is checked on."""
    problems: list[str] = []
    if is_cpu:
        if dtype not in (None, "fp32"):
            problems.append(f"cpu image must default to fp32, plans {dtype}")
        if attn not in (None, "sdpa"):
            problems.append(f"cpu image must use sdpa, plans {attn}")
        if flash_attn_planned:
            problems.append("cpu image must not include flash-attn")
        return problems
    if target is None:
        return problems
    if dtype == "fp32":
        problems.append(f"{sm_label(target)} image plans fp32; GPU images train in fp16 or bf16")
    if dtype == "bf16" and not bf16_capable(target):
        problems.append(f"bf16 needs SM>=80, image targets {sm_label(target)}")
    if flash_attn_planned and target[0] < 8:
        problems.append(f"flash-attn 2 needs SM>=80, image targets {sm_label(target)}")
    if attn == "flash_attention_2":
        if target[0] < 8:
            problems.append(f"flash_attention_2 needs SM>=80, image targets {sm_label(target)}")
        if not flash_attn_planned:
            problems.append("flash_attention_2 planned but flash-attn is not")
    return problems


def device_compatible(device: tuple[int, int], target: tuple[int, int]) -> bool:
    """Kernels built for `target` run on `device`: same major, device minor >= target minor."""
    return device[0] == target[0] and device[1] >= target[1]


def arch_list_covers(target: tuple[int, int], arch_list: Sequence[str]) -> tuple[bool, str]:
    """Whether torch ships kernels for `target`, and how.

    Exact `sm_XY` first; else SASS for a lower minor of the same major (binary compatible,
    e.g. sm_86 kernels serve sm_89); else PTX (`compute_XY` at or below target) that the
    driver JIT-compiles, slowly, at first use.
    """
    wanted = f"sm_{target[0]}{target[1]}"
    sass: list[tuple[int, int]] = []
    ptx: list[tuple[int, int]] = []
    for entry in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)a?", entry)
        if not match:
            continue
        digits = match.group(2)
        cap = (int(digits[:-1]), int(digits[-1]))
        (sass if match.group(1) == "sm" else ptx).append(cap)
    if target in sass:
        return True, f"{wanted} in arch list"
    same_major = [c for c in sass if device_compatible(target, c)]
    if same_major:
        best = max(same_major)
        return True, f"{wanted} served by sm_{best[0]}{best[1]} kernels (same major)"
    jit = [c for c in ptx if c <= target]
    if jit:
        best = max(jit)
        return True, f"{wanted} only via PTX JIT from compute_{best[0]}{best[1]}"
    shown = ", ".join(arch_list) if arch_list else "empty"
    return False, f"{wanted} missing from torch.cuda.get_arch_list() ({shown})"


def probe_capability() -> Capability:
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return int(major), int(minor)


def probe_flash_attn() -> tuple[bool, str]:
    """(importable, version or the import error). Import, not find_spec: a flash_attn wheel
    built against another torch is present but dies on import with an undefined symbol."""
    try:
        import flash_attn  # type: ignore[import-not-found, unused-ignore]
    except (ImportError, OSError) as exc:
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return True, str(getattr(flash_attn, "__version__", "unknown"))


def pick_device(name: str, local_rank: int = 0) -> Any:
    """`auto` is a visible CUDA device (this rank's: torchrun's LOCAL_RANK), else the CPU."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device("cpu")


def runtime_precision(
    device_type: str,
    *,
    flag_dtype: str | None,
    flag_attn: str | None,
    image_dtype: str | None,
    image_attn: str | None,
) -> tuple[Capability, Precision]:
    capability = probe_capability() if device_type == "cuda" else None
    # Only worth importing flash_attn where it could be used at all.
    flash = capability is not None and capability[0] >= 8 and probe_flash_attn()[0]
    precision = resolve(
        capability,
        flash,
        flag_dtype=flag_dtype,
        flag_attn=flag_attn,
        image_dtype=image_dtype,
        image_attn=image_attn,
    )
    return capability, precision
