"""`contract` checks for DeepSpeed: the planned release, its prebuilt ops, and that loading
them needs no compiler. Without a GPU nothing of DeepSpeed is imported (its import detects an
accelerator and logs); the record DeepSpeed's setup.py writes at build time is read instead.

DeepSpeed v0.19.8 `OpBuilder.load()` (op_builder/builder.py) imports an op's prebuilt library
only when `installed_ops[name]` is true, the recorded `accelerator_name` equals the runtime
accelerator, and the recorded torch major.minor (and, on a GPU, CUDA major.minor) equal the
running ones; in every other case it JIT-compiles, which needs nvcc. Each condition is a check.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import runpy
from pathlib import Path
from typing import Any

from .env import DS_OP_MODULES, NONE, Plan, dist_version, module_present, parse_ds_ops, same_release
from .report import Check, skipped

RECORD = "git_version_info_installed.py"


def deepspeed_dir() -> Path | None:
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def read_record(package: Path) -> dict[str, Any] | None:
    """The build-time record (`installed_ops`, `accelerator_name`, `torch_info`), run as a
    plain file so the deepspeed package itself is not imported."""
    path = package / RECORD
    if not path.is_file():
        return None
    return runpy.run_path(str(path))


def op_library(package: Path, op: str) -> Path | None:
    """The compiled extension DeepSpeed imports for `op`, if one was installed."""
    relative = DS_OP_MODULES[op].removeprefix("deepspeed.").split(".")
    folder = package.joinpath(*relative[:-1])
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = folder / f"{relative[-1]}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def planned(plan: Plan) -> bool:
    return plan.deepspeed is not None and plan.deepspeed.lower() != NONE


def check_version(plan: Plan) -> Check:
    present = module_present("deepspeed")
    if plan.deepspeed is None:
        return skipped("deepspeed_version", f"no plan; deepspeed {'present' if present else 'absent'}")
    if plan.deepspeed.lower() == NONE:
        detail = "deepspeed found but plan says none" if present else "absent"
        return Check("deepspeed_version", not present, detail)
    installed = dist_version("deepspeed")
    if installed is None:
        return Check("deepspeed_version", False, f"plan {plan.deepspeed} but deepspeed is not installed")
    ok = same_release(installed, plan.deepspeed)
    return Check("deepspeed_version", ok, f"installed {installed}, expected {plan.deepspeed}")


def check_ops(plan: Plan, torch_version: str, torch_cuda: str | None) -> Check:
    """Every planned op installed, for the right accelerator and this torch/CUDA."""
    name = "deepspeed_ops"
    if not planned(plan) or plan.ds_ops is None:
        return skipped(name, "no DeepSpeed ops planned")
    ops = parse_ds_ops(plan.ds_ops)
    package = deepspeed_dir()
    record = read_record(package) if package is not None else None
    if record is None:
        return Check(name, False, f"no DeepSpeed build record ({RECORD}); is deepspeed installed?")
    installed = record.get("installed_ops", {})
    missing = [op for op in ops if not installed.get(op)]
    problems = [f"not installed: {', '.join(missing)}"] if missing else []
    accelerator = record.get("accelerator_name")
    if not plan.is_cpu and plan.sm is not None and accelerator != "cuda":
        # Without DS_ACCELERATOR=cuda a build host with no GPU builds the CPU variants under
        # the same op names; a GPU would then JIT-compile the CUDA ones at first use.
        problems.append(
            f"ops built for accelerator {accelerator!r}, not 'cuda' (build with DS_ACCELERATOR=cuda)"
        )
    info = record.get("torch_info", {})
    running = ".".join(torch_version.split(".")[:2])
    if ops and info.get("version") != running:
        problems.append(f"ops built against torch {info.get('version')}, running {running}")
    if ops and torch_cuda is not None and info.get("cuda_version") != ".".join(torch_cuda.split(".")[:2]):
        problems.append(f"ops built against CUDA {info.get('cuda_version')}, torch has {torch_cuda}")
    listed = ", ".join(ops) or "none"
    return Check(name, not problems, "; ".join(problems) or f"installed for {accelerator}: {listed}")


def check_prebuilt(plan: Plan) -> Check:
    """Loading needs no compiler: each planned op has its compiled library in the package."""
    name = "deepspeed_no_compiler"
    if not planned(plan) or plan.ds_ops is None:
        return skipped(name, "no DeepSpeed ops planned")
    package = deepspeed_dir()
    if package is None:
        return Check(name, False, "deepspeed is not installed")
    found = {op: op_library(package, op) for op in parse_ds_ops(plan.ds_ops)}
    absent = [op for op, path in found.items() if path is None]
    if absent:
        return Check(name, False, f"no prebuilt library for {', '.join(absent)}: it would JIT-compile")
    shown = ", ".join(f"{op}={path.name}" for op, path in found.items() if path) or "no ops planned"
    return Check(name, True, shown)


def check_load(plan: Plan) -> Check:
    """Only on a GPU: import each planned op's library, as `OpBuilder.load()` would."""
    name = "deepspeed_ops_load"
    if not planned(plan) or plan.ds_ops is None:
        return skipped(name, "no DeepSpeed ops planned")
    failures = []
    for op in parse_ds_ops(plan.ds_ops):
        try:
            importlib.import_module(DS_OP_MODULES[op])
        except Exception as exc:  # a bad .so raises ImportError, OSError, RuntimeError...
            failures.append(f"{op}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return Check(name, not failures, "; ".join(failures) or f"loaded {plan.ds_ops}")


def checks(plan: Plan, torch_version: str, torch_cuda: str | None, gpu_visible: bool) -> list[Check]:
    found = [check_version(plan), check_ops(plan, torch_version, torch_cuda), check_prebuilt(plan)]
    if gpu_visible:
        found.append(check_load(plan))
    return found
