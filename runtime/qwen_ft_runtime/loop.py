"""The training loop shared by `smoke` and `train`, with fp16 loss scaling and checkpoints."""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import Example, batch_indices, collate
from .errors import UsageError
from .model import torch_dtype

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, value: float, what: str = "loss", losses: Sequence[float] = ()) -> None:
        super().__init__(f"{what} is {value} at step {step}")
        self.step = step
        self.value = value
        self.losses = list(losses)  # the finite ones before it, for the report


@dataclass(frozen=True)
class LoopConfig:
    steps: int
    lr: float
    dtype: str  # compute dtype: autocast to it unless fp32
    batch_size: int
    seed: int = 0
    # HF Trainer's max_grad_norm default; also what keeps a single fp16 spike from wrecking
    # the adapter once the scaler has unscaled the gradients.
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    schedule: str = "constant"  # or "cosine"
    warmup_steps: int = 0
    log_every: int = 0
    save_every: int = 0
    output: Path | None = None
    method: str = "lora"


@dataclass
class RunResult:
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)  # 1-based, fp16 overflow skips
    start_step: int = 0
    first_step_end: float | None = None  # perf_counter() when the first step finished
    loss_scale: float | None = None
    # Bytes of weights + gradients + optimizer state once training ran: exact on any device,
    # unlike a CPU process's peak RSS, which the torch import alone dwarfs on small models.
    train_state_bytes: int | None = None

    @property
    def step_time_s(self) -> float | None:
        return statistics.median(self.step_times) if self.step_times else None

    @property
    def tokens_per_s(self) -> float | None:
        """Median per-step throughput, leaving out the first step (kernel selection and
        allocator warm-up) whenever there is anything else to measure."""
        rates = [n / t for n, t in zip(self.tokens, self.step_times, strict=True) if t > 0]
        if len(rates) > 1:
            rates = rates[1:]
        return statistics.median(rates) if rates else None


def make_scaler(dtype: str, device: torch.device) -> Any:
    """Dynamic loss scaling for fp16 only; a disabled scaler is a transparent pass-through."""
    enabled = dtype == "fp16"
    try:
        return torch.amp.GradScaler(device.type, enabled=enabled)
    except (AttributeError, TypeError):  # torch < 2.3 only has the CUDA-specific class
        return torch.cuda.amp.GradScaler(enabled=enabled and device.type == "cuda")


def optimizer_step(
    loss: torch.Tensor,
    params: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    max_grad_norm: float,
) -> tuple[float, bool]:
    """Backward, unscale, clip, step. Returns (pre-clip grad norm, whether the step was skipped).

    Unscaling before clipping makes the threshold apply to true gradients rather than to
    gradients multiplied by the current loss scale. When fp16 gradients overflow, the
    scaler skips the update and halves the scale; that is normal and shows as a skip.
    """
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    skipped = False
    if scaler.is_enabled() or math.isfinite(grad_norm):
        scaler.step(optimizer)
        scaler.update()
        skipped = scale_before is not None and scaler.get_scale() < scale_before
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def lr_at(step: int, config: LoopConfig) -> float:
    """LR for 0-based `step`: linear warmup, then constant or cosine to zero.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    warm = config.warmup_steps
    if warm and step < warm:
        return config.lr * (step + 1) / warm
    if config.schedule == "constant":
        return config.lr
    span = max(1, config.steps - warm)
    progress = min(1.0, (step - warm) / span)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_loop(
    model: Any,
    examples: Sequence[Example],
    config: LoopConfig,
    device: torch.device,
    pad_id: int,
    *,
    resume: Path | None = None,
) -> RunResult:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scaler = make_scaler(config.dtype, device)
    result = RunResult()
    if resume is not None:
        result.start_step = restore_checkpoint(resume, model, optimizer, scaler, config)
        log.info("resumed from %s at step %d", resume, result.start_step)
    autocast_dtype = torch_dtype(config.dtype)
    use_autocast = config.dtype != "fp32"
    model.train()
    for step in range(result.start_step, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        chosen = batch_indices(len(examples), config.batch_size, step, config.seed)
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in chosen], pad_id).items()}
        _sync(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
            loss = model(**batch).loss
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(step + 1, loss_value, losses=result.losses)
        grad_norm, skipped = optimizer_step(loss, params, optimizer, scaler, config.max_grad_norm)
        if not math.isfinite(grad_norm) and not scaler.is_enabled():
            raise NonFiniteLoss(step + 1, grad_norm, "gradient norm", result.losses)
        _sync(device)
        ended = time.perf_counter()
        if result.first_step_end is None:
            result.first_step_end = ended
        result.losses.append(loss_value)
        result.step_times.append(ended - started)
        result.tokens.append(int(batch["attention_mask"].sum()))
        result.grad_norms.append(grad_norm)
        if skipped:
            result.skipped_steps.append(step + 1)
        if config.log_every and ((step + 1) % config.log_every == 0 or step + 1 == config.steps):
            _log_progress(step + 1, config, loss_value, grad_norm, scaler, result)
        if config.save_every and config.output and (step + 1) % config.save_every == 0:
            save_checkpoint(config.output, step + 1, model, optimizer, scaler, config)
    result.loss_scale = float(scaler.get_scale()) if scaler.is_enabled() else None
    result.train_state_bytes = train_state_bytes(model, optimizer)
    return result


def train_state_bytes(model: Any, optimizer: torch.optim.Optimizer) -> int:
    """Weights (all), one gradient per trainable weight (its own dtype) and every optimizer
    state tensor (AdamW: two moments and a step count per trainable weight).

    Gradients are counted from the trainable weights because each step frees them
    (`zero_grad(set_to_none=True)`); during the step they existed at exactly that size.
    """

    def size(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    params = list(model.parameters())
    weights = sum(size(p) for p in params)
    grads = sum(size(p) for p in params if p.requires_grad)
    state = sum(
        size(value)
        for entry in optimizer.state.values()
        for value in entry.values()
        if torch.is_tensor(value)
    )
    return weights + grads + state


def _log_progress(
    step: int, config: LoopConfig, loss: float, grad_norm: float, scaler: Any, result: RunResult
) -> None:
    scale = f" scale {scaler.get_scale():g}" if scaler.is_enabled() else ""
    rate = result.tokens[-1] / result.step_times[-1] if result.step_times[-1] > 0 else 0.0
    log.info(
        "step %d/%d loss %.4f lr %.2e grad_norm %.3f%s tok/s %.0f",
        step,
        config.steps,
        loss,
        lr_at(step - 1, config),
        grad_norm,
        scale,
        rate,
    )


# --- checkpoints -------------------------------------------------------------------------------


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    output: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    config: LoopConfig,
) -> Path:
    """`checkpoint-<step>/`: adapter (LoRA) + trainable weights, optimizer, scaler, RNG, step.

    Written to a temporary directory and renamed, so `--resume auto` never picks up a
    checkpoint that a crash or kill left half-written.
    """
    final = output / f"{CHECKPOINT_PREFIX}{step}"
    staging = output / f".{CHECKPOINT_PREFIX}{step}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if config.method == "lora":
        model.save_pretrained(str(staging))  # loadable on its own as a PEFT adapter
    torch.save(_trainable_state(model), staging / "trainable.pt")
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    torch.save(scaler.state_dict(), staging / "scaler.pt")
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, staging / "rng.pt")
    state = {
        "step": step,
        "steps": config.steps,
        "method": config.method,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "dtype": config.dtype,
    }
    (staging / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    staging.replace(final)
    log.info("saved %s", final)
    return final


def find_latest_checkpoint(output: Path) -> Path | None:
    best: tuple[int, Path] | None = None
    if not output.is_dir():
        return None
    for child in output.iterdir():
        suffix = child.name.removeprefix(CHECKPOINT_PREFIX)
        if (
            child.name.startswith(CHECKPOINT_PREFIX)
            and suffix.isdigit()
            and (child / "state.json").is_file()
            and (best is None or int(suffix) > best[0])
        ):
            best = (int(suffix), child)
    return None if best is None else best[1]


def restore_checkpoint(
    path: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    config: LoopConfig,
) -> int:
    state_file = path / "state.json"
    if not state_file.is_file():
        raise UsageError(f"{path} is not a checkpoint (no state.json)")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if state.get("method") != config.method:
        raise UsageError(f"{path} was trained with --method {state.get('method')}, not {config.method}")
    for key in ("seed", "batch_size", "dtype"):
        if state.get(key) != getattr(config, key):
            log.warning(
                "checkpoint %s differs from this run (%s vs %s): batches will not line up",
                key,
                state.get(key),
                getattr(config, key),
            )
    saved = torch.load(path / "trainable.pt", map_location="cpu", weights_only=True)
    named = dict(model.named_parameters())
    missing = sorted({n for n, p in named.items() if p.requires_grad} - set(saved))
    if missing:
        raise UsageError(f"{path} does not match this model ({len(missing)} parameters missing)")
    with torch.no_grad():
        for name, tensor in saved.items():
            named[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scaler_state = torch.load(path / "scaler.pt", map_location="cpu", weights_only=True)
    if scaler_state and scaler.is_enabled():
        scaler.load_state_dict(scaler_state)
    rng_file = path / "rng.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, map_location="cpu", weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])
