"""`contract`: does the installed stack match the image's plan? Needs no GPU."""

from __future__ import annotations

import importlib
from typing import Any

from . import __version__, ds_contract
from .env import (
    NONE,
    Plan,
    device_info,
    dist_version,
    module_present,
    same_release,
    version_at_least,
    versions,
)
from .precision import (
    arch_list_covers,
    bf16_capable,
    device_compatible,
    plan_problems,
    probe_capability,
    probe_flash_attn,
    sm_label,
)
from .report import Check, first_failure, skipped

# Qwen3 support landed in transformers 4.51 (Qwen2 needs 4.37); peft 0.12 added
# get_peft_model(autocast_adapter_dtype=...), which keeps adapters fp32 on half-precision bases.
MIN_TRANSFORMERS = "4.51.0"
MIN_PEFT = "0.12.0"


def check_torch_version(plan: Plan, installed: str) -> Check:
    if plan.torch is None:
        return skipped("torch_version", f"no expected version; installed {installed}")
    ok = same_release(installed, plan.torch)
    return Check("torch_version", ok, f"installed {installed}, expected {plan.torch}")


def check_torch_cuda(plan: Plan, torch_cuda: str | None) -> Check:
    if plan.cuda is None:
        return skipped("torch_cuda", f"no expected CUDA; torch built with {torch_cuda}")
    if plan.cuda.lower() == NONE:
        ok = torch_cuda is None
    else:
        # Major.minor: torch reports e.g. "12.6" while a plan may say "12.6.3".
        ok = torch_cuda is not None and torch_cuda.split(".")[:2] == plan.cuda.split(".")[:2]
    return Check("torch_cuda", ok, f"torch.version.cuda={torch_cuda}, expected {plan.cuda}")


def check_arch_list(plan: Plan, arch_list: list[str]) -> Check:
    if plan.sm is None:
        return skipped("arch_list", "no target SM")
    target = plan.capability
    if target is None:
        return skipped("arch_list", "cpu image: no CUDA kernels expected")
    ok, detail = arch_list_covers(target, arch_list)
    return Check("arch_list", ok, detail)


def check_triton(plan: Plan) -> Check:
    present = module_present("triton")
    if plan.triton is None:
        return skipped("triton", f"no plan; triton {'present' if present else 'absent'}")
    if plan.triton == "remove":
        detail = "triton found by importlib but plan says remove" if present else "absent"
        return Check("triton", not present, detail)
    if not present:
        return Check("triton", False, "plan says keep but triton is not installed")
    try:
        module = importlib.import_module("triton")
    except Exception as exc:  # a broken triton raises all sorts; the contract must report it
        return Check("triton", False, f"import failed: {type(exc).__name__}: {exc}")
    return Check("triton", True, f"imports, version {getattr(module, '__version__', '?')}")


def check_flash_attn(plan: Plan) -> Check:
    if plan.flash_attn is None:
        return skipped("flash_attn", "no plan")
    if plan.flash_attn.lower() == NONE:
        present = module_present("flash_attn")
        detail = "flash_attn found but plan says none" if present else "absent"
        return Check("flash_attn", not present, detail)
    importable, info = probe_flash_attn()
    if not importable:
        return Check("flash_attn", False, f"plan {plan.flash_attn} but import failed: {info}")
    ok = same_release(info, plan.flash_attn)
    return Check("flash_attn", ok, f"imports version {info}, expected {plan.flash_attn}")


def check_plan_precision(plan: Plan) -> Check:
    if plan.sm is None:
        return skipped("plan_precision", "no target SM")
    flash_planned = plan.flash_attn is not None and plan.flash_attn.lower() != NONE
    problems = plan_problems(plan.capability, plan.is_cpu, plan.dtype, plan.attn, flash_planned)
    detail = "; ".join(problems) or f"dtype={plan.dtype} attn={plan.attn} fit {plan.sm}"
    return Check("plan_precision", not problems, detail)


def check_library(name: str, minimum: str | None) -> Check:
    try:
        importlib.import_module(name)
    except Exception as exc:
        return Check(name, False, f"import failed: {type(exc).__name__}: {exc}")
    version = dist_version(name) or "unknown"
    if minimum is None:
        return Check(name, True, f"imports, version {version}")
    ok = version != "unknown" and version_at_least(version, minimum)
    return Check(name, ok, f"version {version}, need >= {minimum}")


def check_device(plan: Plan, capability: tuple[int, int] | None) -> list[Check]:
    """Only when a GPU is visible: is it one this image was built for?"""
    if capability is None:
        return []
    target = plan.capability
    if plan.sm is None or target is None:
        reason = "no target SM" if plan.sm is None else "cpu image"
        device_sm = skipped("device_sm", f"{reason}; device is {sm_label(capability)}")
    else:
        device_sm = Check(
            "device_sm",
            device_compatible(capability, target),
            f"device {sm_label(capability)}, image targets {sm_label(target)}",
        )
    bf16 = bf16_capable(capability)
    needs_bf16 = plan.dtype == "bf16"
    device_bf16 = Check(
        "device_bf16",
        bf16 or not needs_bf16,
        f"bf16 {'supported' if bf16 else 'unsupported'} (capability major "
        f"{capability[0]}); image dtype {plan.dtype}",
    )
    return [device_sm, device_bf16]


def compiled_arch_list() -> list[str]:
    """The arch flags torch was compiled with, GPU or not.

    torch.cuda.get_arch_list() returns [] whenever no GPU is visible (it checks
    is_available() first), which is every build host and CI runner; the flags it would
    return are compiled into torch._C, so read them there. CPU builds lack the function.
    """
    import torch

    flags = getattr(torch._C, "_cuda_getArchFlags", None)
    text = flags() if callable(flags) else None
    return str(text).split() if text else []


def run_contract(plan: Plan) -> tuple[dict[str, Any], bool]:
    import torch

    installed = versions()
    capability = probe_capability()
    checks = [
        check_torch_version(plan, torch.__version__),
        check_torch_cuda(plan, torch.version.cuda),
        check_arch_list(plan, compiled_arch_list()),
        check_triton(plan),
        check_flash_attn(plan),
        check_plan_precision(plan),
        check_library("transformers", MIN_TRANSFORMERS),
        check_library("peft", MIN_PEFT),
        check_library("accelerate", None),
        *ds_contract.checks(plan, torch.__version__, torch.version.cuda, capability is not None),
        *check_device(plan, capability),
    ]
    ok = all(c.ok for c in checks)
    device = device_info("cpu" if capability is None else "cuda")
    payload = {
        "entry": "contract",
        "ok": ok,
        "failed_check": first_failure(checks),
        "checks": [c.as_dict() for c in checks],
        "plan": plan.as_dict(),
        "versions": installed,
        "device": device,
        "runtime_version": __version__,
    }
    return payload, ok
