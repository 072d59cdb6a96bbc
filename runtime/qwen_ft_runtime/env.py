"""What the image promises (its QWEN_FT_* ENV, or CLI overrides) and what is really installed."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import UsageError
from .interface import ENV_VARS, NONE

DTYPES = ("bf16", "fp16", "fp32")
ATTNS = ("sdpa", "flash_attention_2")
TRITON_MODES = ("keep", "remove")

# Field -> `contract` flag that overrides its ENV variable (so tests need no ENV).
FLAGS: dict[str, str] = {
    "target": "--target",
    "alias": "--alias",
    "sm": "--target-sm",
    "dtype": "--expect-dtype",
    "attn": "--expect-attn",
    "torch": "--expect-torch",
    "cuda": "--expect-cuda",
    "flash_attn": "--expect-flash-attn",
    "triton": "--expect-triton",
    "deepspeed": "--expect-deepspeed",
    "ds_ops": "--expect-ds-ops",
}

# DeepSpeed op name -> the module its prebuilt library is imported as (each builder's
# `absolute_name()` in op_builder/, DeepSpeed v0.19.8). Only ops a plan may carry.
DS_OP_MODULES: dict[str, str] = {
    "fused_adam": "deepspeed.ops.adam.fused_adam_op",
    "cpu_adam": "deepspeed.ops.adam.cpu_adam_op",
    "cpu_adagrad": "deepspeed.ops.adagrad.cpu_adagrad_op",
    "cpu_lion": "deepspeed.ops.lion.cpu_lion_op",
    "fused_lamb": "deepspeed.ops.lamb.fused_lamb_op",
    "fused_lion": "deepspeed.ops.lion.fused_lion_op",
    "async_io": "deepspeed.ops.aio.async_io_op",
}


def parse_ds_ops(value: str) -> tuple[str, ...]:
    """`fused_adam,cpu_adam` -> ("fused_adam", "cpu_adam"); `none` or empty -> ()."""
    text = value.strip().lower()
    if text in ("", NONE):
        return ()
    return tuple(op.strip() for op in text.split(",") if op.strip())


_CHOICES: dict[str, tuple[str, ...]] = {"dtype": DTYPES, "attn": ATTNS, "triton": TRITON_MODES}


def parse_sm(value: str) -> tuple[int, int] | None:
    """`"86"` -> (8, 6), `"100"` -> (10, 0), `"sm_90a"` -> (9, 0), `"none"` -> None.

    The last digit is the minor because that is how CUDA spells compute capabilities
    (sm_100 is 10.0, sm_120 is 12.0).
    """
    text = value.strip().lower()
    if text == NONE:
        return None
    match = re.fullmatch(r"(?:sm_|compute_)?(\d{2,3})a?", text)
    if not match:
        raise UsageError(f"invalid SM {value!r}: expected e.g. 70, 86, 100 or none")
    digits = match.group(1)
    return int(digits[:-1]), int(digits[-1])


def sm_str(capability: tuple[int, int] | None) -> str | None:
    return None if capability is None else f"{capability[0]}{capability[1]}"


def public_version(version: str) -> str:
    """Drop the PEP 440 local part: `2.8.0+cu128` -> `2.8.0`."""
    return version.split("+", 1)[0].strip()


def release_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric release of a version; `4.51.0.dev0` -> (4, 51, 0), `2.8.0a0` -> (2, 8, 0)."""
    match = re.match(r"v?(\d+(?:\.\d+)*)", public_version(version))
    if not match:
        raise ValueError(f"unparseable version {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def _padded(parts: tuple[int, ...], width: int) -> tuple[int, ...]:
    return parts + (0,) * (width - len(parts))


def version_at_least(version: str, minimum: str) -> bool:
    have, need = release_tuple(version), release_tuple(minimum)
    width = max(len(have), len(need))
    return _padded(have, width) >= _padded(need, width)


def same_release(version: str, expected: str) -> bool:
    """`2.8.0+cu126` matches `2.8.0` and `2.8`; pre-releases compare on their release only."""
    have, need = release_tuple(version), release_tuple(expected)
    width = max(len(have), len(need))
    return _padded(have, width) == _padded(need, width)


@dataclass(frozen=True)
class Plan:
    """The image's build plan. A None field means "not stated", so its check is skipped."""

    target: str | None = None
    alias: str | None = None
    sm: str | None = None
    dtype: str | None = None
    attn: str | None = None
    torch: str | None = None
    cuda: str | None = None
    flash_attn: str | None = None
    triton: str | None = None
    deepspeed: str | None = None
    ds_ops: str | None = None

    @property
    def capability(self) -> tuple[int, int] | None:
        return None if self.sm is None else parse_sm(self.sm)

    @property
    def is_cpu(self) -> bool:
        return self.sm is not None and self.sm.lower() == NONE

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, str | None] | None = None,
    ) -> Plan:
        """ENV first, a non-None override wins; values are validated so typos fail early."""
        environ = os.environ if environ is None else environ
        values: dict[str, str | None] = {}
        for field, var in ENV_VARS.items():
            raw = (overrides or {}).get(field)
            source = FLAGS[field] if raw is not None else var
            if raw is None:
                raw = environ.get(var)
            value = raw.strip() if raw is not None and raw.strip() else None
            if value is not None:
                _validate(field, value, source)
            values[field] = value
        return cls(**values)


def _validate(field: str, value: str, source: str) -> None:
    choices = _CHOICES.get(field)
    if choices is not None and value not in choices:
        raise UsageError(f"{source}={value!r}: expected one of {', '.join(choices)}")
    if field == "sm":
        parse_sm(value)
    if field == "ds_ops":
        unknown = [op for op in parse_ds_ops(value) if op not in DS_OP_MODULES]
        if unknown:
            raise UsageError(
                f"{source}={value!r}: unknown DeepSpeed op {', '.join(unknown)}; "
                f"expected some of {', '.join(DS_OP_MODULES)} or none"
            )
    if field in ("torch", "flash_attn", "cuda", "deepspeed") and value.lower() != NONE:
        try:
            release_tuple(value)
        except ValueError:
            raise UsageError(f"{source}={value!r}: not a version") from None


def dist_version(*names: str) -> str | None:
    """Installed distribution version without importing it (importing triton can be slow)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def versions() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": dist_version("transformers"),
        "peft": dist_version("peft"),
        "accelerate": dist_version("accelerate"),
        "flash_attn": dist_version("flash-attn", "flash_attn") if module_present("flash_attn") else None,
        "triton": dist_version("triton", "pytorch-triton") if module_present("triton") else None,
        "deepspeed": dist_version("deepspeed") if module_present("deepspeed") else None,
    }


def device_info(device_type: str) -> dict[str, Any]:
    """`{type, name, sm}` of the device training runs on; sm is e.g. "90", None on the CPU."""
    import torch

    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return {"type": "cuda", "name": torch.cuda.get_device_name(), "sm": f"{major}{minor}"}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "sm": None}
