"""What host and image agree on, in one place: label keys, ENV names, the runtime's argv
and mounts, how a tag is qualified with a registry, and which SM's code runs on which GPU.

The ENV names are defined by the in-image runtime (`qwen_ft_runtime.interface`), which
cannot import the builder; this module re-exports them so the builder has one home too.
"""

from __future__ import annotations

from collections.abc import Mapping

from qwen_ft_runtime.interface import ENTRY_POINT, ENV_VARS, MODULE

__all__ = [
    "DATA_MOUNT",
    "ENTRY_POINT",
    "ENV_VARS",
    "MODEL_MOUNT",
    "MODULE",
    "OUTPUT_MOUNT",
    "label",
    "plan_env",
    "qualify",
    "runs_on",
    "runtime_argv",
]

LABEL_PREFIX = "io.qwen-ft"


def label(name: str) -> str:
    """`label("sm")` -> `io.qwen-ft.sm`."""
    return f"{LABEL_PREFIX}.{name}"


# Labels the images carry (resolve.labels writes them).
TARGET = label("target")
SM = label("sm")
ALIAS = label("alias")
PINNED = label("pinned")
DTYPE = label("dtype")
ATTN = label("attn")
TORCH = label("torch")
CUDA = label("cuda")
PYTHON = label("python")
FLASH_ATTN = label("flash-attn")
TRITON = label("triton")
MIN_DRIVER = label("min-driver")
DEEPSPEED = label("deepspeed")
DS_OPS = label("deepspeed-ops")
SPEC = label("spec")
CONTENT_HASH = label("content-hash")
# Labels on the throwaway containers the host starts, so a crashed run's leftovers can be found.
SMOKE_RUN = label("smoke-run")
SMOKE_PROJECT = label("smoke-project")
AUDIT_RUN = label("audit-run")
COMPARE_RUN = label("compare-run")
COMPARE_PROJECT = label("compare-project")

# The OCI platforms an image can be built for (the matrix's `platform` axis).
PLATFORMS = ("linux/amd64", "linux/arm64")

# Where the host mounts a user's checkpoint (read-only) for smoke, compare and train, and
# where `doctor`'s training line mounts the data (read-only) and the output.
MODEL_MOUNT = "/model"
DATA_MOUNT = "/data"
OUTPUT_MOUNT = "/output"


def plan_env(values: Mapping[str, str]) -> dict[str, str]:
    """The image's QWEN_FT_* ENV from plan fields, in the runtime's order; every field is required."""
    missing = set(ENV_VARS) - set(values)
    if missing:
        raise ValueError(f"plan_env: missing fields {sorted(missing)}")
    return {ENV_VARS[field]: values[field] for field in ENV_VARS}


def runtime_argv(command: str, *args: str) -> list[str]:
    """The argv that runs the runtime inside an image, e.g. `qwen-ft-runtime smoke --steps 2`."""
    return [ENTRY_POINT, command, *args]


def qualify(ref: str, registry: str | None) -> str:
    """`qwen-ft:v100-fp16` -> `ghcr.io/acme/qwen-ft:v100-fp16`; unchanged without a registry."""
    registry = (registry or "").strip().rstrip("/")
    return f"{registry}/{ref}" if registry else ref


# NVIDIA's binary-compatibility rule, as recorded in builder/knowledge/gpus.yaml (binary_compat).
RUNS_ON_SOURCE = "NVIDIA CUDA C++ Programming Guide 'Binary Compatibility' (builder/knowledge/gpus.yaml)"


def runs_on(code_sm: int, device_sm: int | None) -> bool:
    """Whether a cubin built for `code_sm` runs on a GPU of `device_sm`: same major, minor <=."""
    return device_sm is not None and code_sm // 10 == device_sm // 10 and code_sm <= device_sm
