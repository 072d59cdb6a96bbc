"""`--deepspeed zero2|zero3|zero2-offload|zero3-offload|PATH.json`: the shipped ZeRO configs,
HF-style `auto` values filled from the run, and the engine that replaces DDP + GradScaler.

The shipped configs are Qwen's finetune recipe (QwenLM/Qwen finetune/ds_config_zero2.json and
ds_config_zero3.json) less its `scheduler` block: the runtime owns the LR schedule (warmup then
cosine, a pure function of the step, so resume needs no scheduler state). A user JSON that has a
`scheduler` keeps it, and DeepSpeed steps it.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UsageError

log = logging.getLogger(__name__)

PRESETS = ("zero2", "zero3", "zero2-offload", "zero3-offload")
CONFIG_DIR = "ds_configs"  # package data of qwen_ft_runtime (pyproject package-data)

# Trainer defaults (HF TrainingArguments) for the optimizer values Qwen's configs leave `auto`.
ADAM_BETAS = [0.9, 0.999]
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class DsSpec:
    """What `--deepspeed` named, parsed and checked before any rank starts."""

    name: str  # the preset, or the JSON path as given
    raw: dict[str, Any]

    @property
    def stage(self) -> int:
        return int(self.raw.get("zero_optimization", {}).get("stage", 0))

    def offload(self, what: str) -> str:
        section = self.raw.get("zero_optimization", {}).get(f"offload_{what}") or {}
        return str(section.get("device", "none"))

    @property
    def offloads(self) -> bool:
        return self.offload("optimizer") != "none" or self.offload("param") != "none"


def preset_path(name: str) -> Path:
    return Path(str(resources.files("qwen_ft_runtime").joinpath(CONFIG_DIR, f"{name}.json")))


def load_spec(value: str) -> DsSpec:
    """A preset name or a path to a JSON file; anything else is a one-line usage error."""
    if value in PRESETS:
        path = preset_path(value)
    elif value.endswith(".json") or Path(value).exists():
        path = Path(value)
        if not path.is_file():
            raise UsageError(f"--deepspeed {value}: file not found")
    else:
        raise UsageError(
            f"--deepspeed {value!r}: expected one of {', '.join(PRESETS)} or a path to a .json file"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"--deepspeed {value}: invalid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--deepspeed {value}: cannot read: {exc}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"--deepspeed {value}: expected a JSON object")
    stage = (
        raw.get("zero_optimization", {}).get("stage", 0)
        if isinstance(raw.get("zero_optimization"), dict)
        else None
    )
    if stage not in (0, 1, 2, 3):
        raise UsageError(f"--deepspeed {value}: zero_optimization.stage is {stage!r}, expected 0, 1, 2 or 3")
    return DsSpec(value, raw)


def check_spec(spec: DsSpec, device_type: str, batch_size: int, world_size: int) -> None:
    """Combinations that cannot work, refused before any rank starts."""
    if device_type == "cpu" and spec.offloads:
        raise UsageError(
            f"--deepspeed {spec.name} offloads to the CPU, which only helps GPU runs; "
            "on the CPU use zero2 or zero3"
        )
    from .dist import check_batch

    check_batch(batch_size, world_size)


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


def _fill(section: dict[str, Any], key: str, value: Any) -> None:
    if _is_auto(section.get(key)):
        section[key] = value


def _find_auto(node: Any, where: str = "") -> str | None:
    if _is_auto(node):
        return where or "(root)"
    if isinstance(node, dict):
        for key, child in node.items():
            found = _find_auto(child, f"{where}.{key}" if where else key)
            if found:
                return found
    return None


def resolve_config(
    spec: DsSpec,
    *,
    dtype: str,
    lr: float,
    batch_size: int,
    world_size: int,
    steps: int,
    warmup_steps: int,
    max_grad_norm: float,
    weight_decay: float,
    device_type: str,
    hidden_size: int,
) -> dict[str, Any]:
    """Fill the `auto` values the way HF Trainer does, from this run's settings.

    Precision follows the run's dtype (which follows the image): fp16 enables DeepSpeed's
    dynamic loss scaling, bf16 its bf16 mode, fp32 neither. A config that explicitly enables a
    different precision is refused rather than silently trained in another dtype.
    """
    config = copy.deepcopy(spec.raw)
    micro = batch_size // world_size
    for key, value in (
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", 1),
        ("train_batch_size", batch_size),
        ("gradient_clipping", max_grad_norm),
    ):
        _fill(config, key, value)
    for half in ("fp16", "bf16"):
        section = config.get(half)
        if not isinstance(section, dict):
            continue
        wanted = dtype == half
        _fill(section, "enabled", wanted)
        if bool(section.get("enabled")) != wanted:
            raise UsageError(
                f"--deepspeed {spec.name}: {half}.enabled is {section.get('enabled')} but this run trains in "
                f'{dtype}; set it to "auto" or pass --dtype {half}'
            )
    if dtype in ("fp16", "bf16") and not isinstance(config.get(dtype), dict):
        config[dtype] = {"enabled": True}
    optimizer = config.get("optimizer")
    if isinstance(optimizer, dict):
        params = optimizer.setdefault("params", {})
        _fill(params, "lr", lr)
        _fill(params, "betas", ADAM_BETAS)
        _fill(params, "eps", ADAM_EPS)
        _fill(params, "weight_decay", weight_decay)
        if device_type == "cpu" and str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
            # DeepSpeed's CPU FusedAdam is a C++ op it would JIT-compile at start; torch's
            # AdamW is the same update and needs no compiler.
            params.setdefault("torch_adam", True)
    scheduler = config.get("scheduler")
    if isinstance(scheduler, dict):
        params = scheduler.setdefault("params", {})
        _fill(params, "warmup_min_lr", 0.0)
        _fill(params, "warmup_max_lr", lr)
        _fill(params, "warmup_num_steps", warmup_steps)
        _fill(params, "total_num_steps", steps)
    zero = config.get("zero_optimization")
    if isinstance(zero, dict):
        # HF Trainer's values for these, from the model's hidden size.
        _fill(zero, "reduce_bucket_size", hidden_size * hidden_size)
        _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        _fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size)
    left = _find_auto(config)
    if left is not None:
        raise UsageError(f'--deepspeed {spec.name}: {left} is "auto" and the runtime has no value for it')
    return config


@dataclass
class Engine:
    """A DeepSpeed engine and what the report says about it."""

    engine: Any
    config: dict[str, Any]
    spec: DsSpec

    @property
    def owns_lr(self) -> bool:
        return self.engine.lr_scheduler is not None

    def describe(self) -> dict[str, Any]:
        import deepspeed  # type: ignore[import-not-found, unused-ignore]
        from deepspeed.accelerator import get_accelerator  # type: ignore[import-not-found, unused-ignore]

        zero_optimizer = self.engine.optimizer
        basic = getattr(zero_optimizer, "optimizer", zero_optimizer)
        return {
            "config": self.spec.name,
            "stage": self.spec.stage,
            "offload_optimizer": self.spec.offload("optimizer"),
            "offload_param": self.spec.offload("param"),
            "optimizer": type(basic).__name__,
            "zero_optimizer": type(zero_optimizer).__name__,
            "fp16": bool(self.config.get("fp16", {}).get("enabled")),
            "bf16": bool(self.config.get("bf16", {}).get("enabled")),
            "version": deepspeed.__version__,
            "accelerator": get_accelerator().device_name(),
        }


def import_deepspeed() -> Any:
    try:
        import deepspeed  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise UsageError(f"--deepspeed needs the deepspeed package, which does not import: {exc}") from None
    return deepspeed


SHM_OP = "deepspeed_shm_comm"


def no_jit_comm_on_cpu() -> bool:
    """Keep DeepSpeed from compiling its shared-memory all-reduce op when CPU ranks start.

    DeepSpeed's CPU accelerator JIT-builds `deepspeed_shm_comm` with the host's C++ compiler
    as its process group comes up; with no compiler that is a fatal `Error building extension
    'deepspeed_shm_comm'`, and with one it costs about a minute on the first run. Marking the
    op incompatible (unless it was prebuilt) makes DeepSpeed use the plain gloo collectives.
    Returns whether the op was turned off.
    """
    import deepspeed.ops  # type: ignore[import-not-found, unused-ignore]
    from deepspeed.git_version_info import installed_ops  # type: ignore[import-not-found, unused-ignore]

    if installed_ops.get(SHM_OP):
        return False
    compatible = deepspeed.ops.__compatible_ops__  # computed on first access
    compatible[SHM_OP] = False
    return True


def hf_zero3_context(config: dict[str, Any]) -> Any:
    """Keep this alive while loading a checkpoint under ZeRO-3: transformers then builds the
    model inside `deepspeed.zero.Init`, so each rank only ever holds its shard of the weights."""
    try:
        from transformers.integrations import HfDeepSpeedConfig  # type: ignore[attr-defined, unused-ignore]
    except ImportError:  # transformers < 4.31 spelled it differently
        from transformers.deepspeed import HfDeepSpeedConfig  # type: ignore[no-redef, import-not-found, unused-ignore]
    return HfDeepSpeedConfig(config)  # type: ignore[no-untyped-call, unused-ignore]


def run_config(
    spec: DsSpec,
    *,
    dtype: str,
    lr: float,
    batch_size: int,
    world_size: int,
    steps: int,
    warmup_steps: int,
    device_type: str,
    hidden_size: int,
    sharded_load: bool,
) -> tuple[dict[str, Any], Any]:
    """The config for one `smoke` or `train` run (gradients clipped at 1.0, no weight decay,
    as both have always run), and, for ZeRO-3 with a checkpoint loaded sharded, the
    `hf_zero3_context` the caller must keep referenced while the model loads (else None)."""
    config = resolve_config(
        spec,
        dtype=dtype,
        lr=lr,
        batch_size=batch_size,
        world_size=world_size,
        steps=steps,
        warmup_steps=warmup_steps,
        max_grad_norm=1.0,
        weight_decay=0.0,
        device_type=device_type,
        hidden_size=hidden_size,
    )
    zero3 = hf_zero3_context(config) if spec.stage == 3 and sharded_load else None
    return config, zero3


def initialize(model: Any, params: list[Any], config: dict[str, Any], spec: DsSpec) -> Engine:
    deepspeed = import_deepspeed()
    optimizer = None
    if "optimizer" not in config:
        import torch

        lr = 0.0  # set by the loop before every step
        optimizer = torch.optim.AdamW(params, lr=lr)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, config=config
    )
    return Engine(engine, config, spec)


def gathered(model: Any, stage: int, *, trainable_only: bool = True) -> Any:
    """Context in which the trainable (or all) parameters are whole on every rank; ZeRO-3
    shards them, and `save_pretrained` would otherwise write empty tensors."""
    import contextlib

    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed  # type: ignore[import-not-found, unused-ignore]

    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
