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

from .data import IGNORE_INDEX, Example, batch_indices, collate
from .dist import DistContext, all_sum, barrier
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
    # Per rank; under ZeRO the weights and optimizer state are this rank's shards.
    train_state_bytes: int | None = None
    deepspeed: dict[str, Any] | None = None  # Engine.describe() when DeepSpeed ran
    engine: Any = None  # the ds.Engine, for saving under ZeRO-3

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


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions (fp32), and how many there are."""
    shifted = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    total = torch.nn.functional.cross_entropy(flat, shifted, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((shifted != IGNORE_INDEX).sum())


def train_loop(
    model: Any,
    examples: Sequence[Example],
    config: LoopConfig,
    device: torch.device,
    pad_id: int,
    *,
    resume: Path | None = None,
    ctx: DistContext | None = None,
    ds_config: dict[str, Any] | None = None,
    ds_spec: Any = None,
) -> RunResult:
    """Train `model` in place. With several ranks each takes its slice of the global batch.

    The loss is the global token mean: each rank's token-loss sum over the global count of
    labelled tokens, times the world size because DDP and ZeRO average gradients over ranks.
    So N ranks take exactly the step one process takes on the whole batch.
    """
    ctx = ctx or DistContext()
    params = [p for p in model.parameters() if p.requires_grad]
    engine = None
    if ds_config is not None:
        from .ds import initialize

        engine = initialize(model, params, ds_config, ds_spec)
        forward: Any = engine.engine
        optimizer: Any = engine.engine.optimizer
        scaler = make_scaler("fp32", device)  # DeepSpeed scales fp16 losses itself
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        scaler = make_scaler(config.dtype, device)
        forward = model
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
    result = RunResult()
    if resume is not None:
        result.start_step = restore_checkpoint(
            resume, model, optimizer, scaler, config, ctx=ctx, engine=engine
        )
        log.info("resumed from %s at step %d", resume, result.start_step)
    autocast_dtype = torch_dtype(config.dtype)
    # DeepSpeed's fp16/bf16 modes cast the module itself; autocast is for the plain path.
    use_autocast = config.dtype != "fp32" and engine is None
    model.train()
    for step in range(result.start_step, config.steps):
        if engine is None or not engine.owns_lr:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
        chosen = batch_indices(len(examples), config.batch_size, step, config.seed)
        mine = chosen[ctx.rank :: ctx.world_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in mine], pad_id).items()}
        labels = batch.pop("labels")
        _sync(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
            logits = forward(**batch).logits
        loss_sum, count = token_loss(logits, labels)
        global_count = all_sum(ctx, float(count), device)
        loss = loss_sum * (ctx.world_size / global_count)
        loss_value = all_sum(ctx, float(loss_sum.detach()), device) / global_count
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(step + 1, loss_value, losses=result.losses)
        if engine is not None:
            grad_norm, skipped = _deepspeed_step(engine.engine, loss)
        else:
            grad_norm, skipped = optimizer_step(loss, params, optimizer, scaler, config.max_grad_norm)
        if not math.isfinite(grad_norm) and not scaler.is_enabled() and not skipped:
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
            save_checkpoint(config.output, step + 1, model, optimizer, scaler, config, ctx=ctx, engine=engine)
    if engine is not None:
        result.engine = engine
        result.deepspeed = engine.describe()
        if config.dtype == "fp16":
            scale = getattr(optimizer, "loss_scale", None)
            result.loss_scale = None if scale is None else float(scale)
        basic = getattr(optimizer, "optimizer", optimizer)
        result.train_state_bytes = train_state_bytes(model, basic)
    else:
        result.loss_scale = float(scaler.get_scale()) if scaler.is_enabled() else None
        result.train_state_bytes = train_state_bytes(model, optimizer)
    return result


def rank_figures(ctx: DistContext, device: torch.device, result: RunResult) -> dict[str, Any]:
    """This rank's timings, for rank 0 to gather into the report."""
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return {
        "rank": ctx.rank,
        "device": str(device),
        "step_time_s": None if result.step_time_s is None else round(result.step_time_s, 6),
        "first_step_s": round(result.step_times[0], 6) if result.step_times else None,
        "total_step_s": round(sum(result.step_times), 6),
        "tokens_per_s": None if result.tokens_per_s is None else round(result.tokens_per_s, 1),
        "peak_mem_bytes": peak,
    }


def _deepspeed_step(engine: Any, loss: torch.Tensor) -> tuple[float, bool]:
    """DeepSpeed's backward + step: it clips (gradient_clipping), scales fp16 losses
    dynamically and skips overflowing steps itself; read back what it did."""
    skipped_before = int(getattr(engine, "skipped_steps", 0))
    engine.backward(loss)
    engine.step()
    norm = engine.get_global_grad_norm()
    skipped = int(getattr(engine, "skipped_steps", 0)) > skipped_before
    value = float(norm) if norm is not None else float("nan")
    return value, skipped


def train_state_bytes(model: Any, optimizer: torch.optim.Optimizer) -> int:
    """Weights (all), one gradient per trainable weight (its own dtype) and every optimizer
    state tensor (AdamW: two moments and a step count per trainable weight).

    Gradients are counted from the trainable weights because each step frees them
    (`zero_grad(set_to_none=True)`); during the step they existed at exactly that size.
    """

    def size(tensor: torch.Tensor) -> int:
        # A ZeRO-3 parameter is an empty placeholder; its shard on this rank is ds_tensor.
        tensor = getattr(tensor, "ds_tensor", tensor)
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


def _rng_file(rank: int) -> str:
    # Each rank draws its own dropout masks, so each saves its own RNG.
    return "rng.pt" if rank == 0 else f"rng-{rank}.pt"


DEEPSPEED_TAG = "deepspeed"  # engine.save_checkpoint's tag: checkpoint-N/deepspeed/


def save_adapter(
    model: Any, path: Path, ctx: DistContext, engine: Any = None, *, everything: bool = False
) -> None:
    """`save_pretrained` from rank 0: the adapter (LoRA), or the whole model (`everything`).

    Under ZeRO-3 every rank holds a shard of each weight, so all ranks gather the weights to be
    saved first (a collective: every rank must call this).
    """
    from .ds import gathered

    stage = engine.spec.stage if engine is not None else 0
    with gathered(model, stage, trainable_only=not everything):
        if ctx.is_main:
            model.save_pretrained(str(path))
    barrier(ctx)


def save_checkpoint(
    output: Path,
    step: int,
    model: Any,
    optimizer: Any,
    scaler: Any,
    config: LoopConfig,
    *,
    ctx: DistContext | None = None,
    engine: Any = None,
) -> Path:
    """`checkpoint-<step>/`: adapter (LoRA), optimizer and weights, scaler, RNG, step.

    Without DeepSpeed the trainable weights and optimizer go in `trainable.pt`/`optimizer.pt`
    (identical on every rank under DDP, so rank 0 writes them). With DeepSpeed every rank writes
    its ZeRO shards through `engine.save_checkpoint` under `deepspeed/`. Written to a temporary
    directory and renamed, so `--resume auto` never picks up a half-written checkpoint.
    """
    ctx = ctx or DistContext()
    final = output / f"{CHECKPOINT_PREFIX}{step}"
    staging = output / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if ctx.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier(ctx)
    if engine is not None:
        engine.engine.save_checkpoint(str(staging), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    if config.method == "lora":
        save_adapter(model, staging, ctx, engine)  # loadable on its own as a PEFT adapter
    if engine is None and ctx.is_main:
        torch.save(_trainable_state(model), staging / "trainable.pt")
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scaler.state_dict(), staging / "scaler.pt")
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, staging / _rng_file(ctx.rank))
    if ctx.is_main:
        state = {
            "step": step,
            "steps": config.steps,
            "method": config.method,
            "seed": config.seed,
            "batch_size": config.batch_size,
            "dtype": config.dtype,
            "world_size": ctx.world_size,
            "deepspeed": engine.spec.name if engine is not None else None,
        }
        (staging / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    barrier(ctx)
    if ctx.is_main:
        shutil.rmtree(final, ignore_errors=True)
        staging.replace(final)
        log.info("saved %s", final)
    barrier(ctx)
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
    optimizer: Any,
    scaler: Any,
    config: LoopConfig,
    *,
    ctx: DistContext | None = None,
    engine: Any = None,
) -> int:
    ctx = ctx or DistContext()
    state_file = path / "state.json"
    if not state_file.is_file():
        raise UsageError(f"{path} is not a checkpoint (no state.json)")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if state.get("method") != config.method:
        raise UsageError(f"{path} was trained with --method {state.get('method')}, not {config.method}")
    # --deepspeed and world-size mismatches were refused before any rank started
    # (train.check_resume_state).
    for key in ("seed", "batch_size", "dtype"):
        if state.get(key) != getattr(config, key):
            log.warning(
                "checkpoint %s differs from this run (%s vs %s): batches will not line up",
                key,
                state.get(key),
                getattr(config, key),
            )
    if engine is not None:
        loaded, _ = engine.engine.load_checkpoint(
            str(path), tag=DEEPSPEED_TAG, load_module_strict=False, load_optimizer_states=True
        )
        if loaded is None:
            raise UsageError(f"{path}/{DEEPSPEED_TAG} could not be loaded by DeepSpeed")
    else:
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
    rng_file = path / _rng_file(ctx.rank)
    if rng_file.is_file():
        rng = torch.load(rng_file, map_location="cpu", weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])
