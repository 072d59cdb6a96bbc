"""`train`: LoRA (or full) fine-tuning on a JSONL chat file, with checkpoints and resume."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from . import __version__
from .data import chat_format, load_jsonl, steps_per_epoch
from .env import Plan, device_info, versions
from .errors import UsageError
from .model import checkpoint_config, checkpoint_model_type, load_tokenizer

log = logging.getLogger(__name__)

# 2e-4 is the usual LoRA LR. On fp16 images it is halved: the Qwen maintainers answer fp16 NaN
# reports with "fp16 NaN is common ... use a lower learning rate" (QwenLM/Qwen3#670), and fp16's
# narrow range makes large updates the usual trigger.
DEFAULT_LR = 2e-4
FP16_LR = 1e-4


def default_lr(dtype: str) -> float:
    return FP16_LR if dtype == "fp16" else DEFAULT_LR


def resolve_resume(resume: str | None, output: Path) -> Path | None:
    from .loop import find_latest_checkpoint

    if resume is None:
        return None
    if resume == "auto":
        found = find_latest_checkpoint(output)
        if found is None:
            log.info("--resume auto: no checkpoint in %s, starting fresh", output)
        return found
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise UsageError(f"--resume {path}: not a checkpoint directory (no state.json)")
    return path


def check_resume_state(checkpoint: Path | None, deepspeed: str | None, world_size: int) -> None:
    """A checkpoint resumes only the way it was saved: DeepSpeed's ZeRO shards are not the plain
    optimizer state, and they are split for a fixed number of ranks."""
    if checkpoint is None:
        return
    state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    saved = state.get("deepspeed")
    if saved != deepspeed:
        how = f"with --deepspeed {saved}" if saved else "without --deepspeed"
        raise UsageError(f"{checkpoint} was saved {how}; resume it the same way")
    saved_world = int(state.get("world_size", 1))
    if deepspeed and saved_world != world_size:
        raise UsageError(
            f"{checkpoint} holds ZeRO shards for {saved_world} ranks; resume with --nproc {saved_world}"
        )


def validate_inputs(args: argparse.Namespace) -> list[Any]:
    """Everything a user can get wrong, checked before torch is imported (seconds)."""
    checkpoint_model_type(Path(args.model))
    conversations = load_jsonl(Path(args.data))
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be at least 1")
    if args.batch_size < 1 or args.max_len < 8:
        raise UsageError("--batch-size must be >= 1 and --max-len >= 8")
    return conversations


def run_train(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    conversations = validate_inputs(args)
    resume = resolve_resume(args.resume, Path(args.output))
    check_resume_state(resume, args.deepspeed, int(os.environ.get("WORLD_SIZE", "1")))
    spec = None
    if args.deepspeed:
        from .ds import load_spec

        spec = load_spec(args.deepspeed)

    from . import dist
    from .precision import pick_device

    plan = Plan.load()
    device = pick_device(args.device, dist.local_rank())
    ctx = dist.init(device.type, deepspeed=spec is not None)
    try:
        return _train(args, conversations, resume, spec, plan, device, ctx)
    finally:
        dist.shutdown(ctx)


def _train(
    args: argparse.Namespace,
    conversations: list[Any],
    resume: Path | None,
    spec: Any,
    plan: Plan,
    device: Any,
    ctx: Any,
) -> tuple[dict[str, Any], int]:
    import torch

    from . import dist
    from .data import encode_all
    from .loop import LoopConfig, NonFiniteLoss, rank_figures, save_adapter, train_loop
    from .model import load_pretrained, param_counts, prepare, weight_dtype
    from .precision import runtime_precision

    model_path, data_path, output = Path(args.model), Path(args.data), Path(args.output)
    dist.quiet_other_ranks(ctx)
    dist.check_batch(args.batch_size, ctx.world_size)
    _, precision = runtime_precision(
        device.type,
        flag_dtype=args.dtype,
        flag_attn=args.attn,
        image_dtype=plan.dtype,
        image_attn=plan.attn,
    )
    if precision.problems:
        raise UsageError("; ".join(precision.problems) + " (override with --dtype/--attn if intended)")
    lr = args.lr if args.lr is not None else default_lr(precision.dtype)
    tokenizer = load_tokenizer(model_path)
    examples, dropped = encode_all(conversations, tokenizer, args.max_len)
    if dropped:
        log.warning("%d samples dropped: nothing left to train on after --max-len %d", dropped, args.max_len)
    if not examples:
        raise UsageError(f"{data_path}: no sample has an assistant token within --max-len")
    per_epoch = steps_per_epoch(len(examples), args.batch_size)
    steps = args.steps if args.steps is not None else max(1, round(args.epochs * per_epoch))
    warmup_steps = math.ceil(args.warmup_ratio * steps)
    ds_config = None
    zero3 = None  # must stay referenced while the model loads
    if spec is not None:
        from .ds import run_config

        ds_config, zero3 = run_config(
            spec,
            dtype=precision.dtype,
            lr=lr,
            batch_size=args.batch_size,
            world_size=ctx.world_size,
            steps=steps,
            warmup_steps=warmup_steps,
            device_type=device.type,
            hidden_size=int(checkpoint_config(model_path).get("hidden_size", 0)),
            sharded_load=True,
        )
    model, _ = load_pretrained(
        model_path,
        precision.attn,
        weight_dtype(args.method, precision.dtype),
        device,
        tokenizer=tokenizer,
        sharded=zero3 is not None,
    )
    model = prepare(
        model,
        args.method,
        gradient_checkpointing=args.gradient_checkpointing,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
    )
    trainable, total = param_counts(model)
    config = LoopConfig(
        steps=steps,
        lr=lr,
        dtype=precision.dtype,
        batch_size=args.batch_size,
        seed=args.seed,
        schedule="cosine",
        warmup_steps=warmup_steps,
        log_every=args.log_every,
        save_every=args.save_every,
        output=output,
        method=args.method,
    )
    log.info(
        "train %s on %d samples: %d steps (%d/epoch), %s %s, lr %g, %d/%d params trainable",
        model_path,
        len(examples),
        steps,
        per_epoch,
        precision.dtype,
        precision.attn,
        lr,
        trainable,
        total,
    )
    if ctx.is_main:
        output.mkdir(parents=True, exist_ok=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    torch.manual_seed(args.seed)
    payload: dict[str, Any] = {
        "entry": "train",
        "model": str(model_path),
        "data": str(data_path),
        "output": str(output),
        "method": args.method,
        "dtype": precision.dtype,
        "attn_implementation": precision.attn,
        "lr": lr,
        "steps": steps,
        "samples": len(examples),
        "dropped_samples": dropped,
        "trainable_params": trainable,
        "total_params": total,
        "resumed_from": str(resume) if resume else None,
        "chat_format": chat_format(tokenizer),
        **ctx.as_dict(),
        "deepspeed": None,
        "versions": versions(),
        "device": device_info(device.type),
        "runtime_version": __version__,
    }
    try:
        result = train_loop(
            model, examples, config, device, pad_id, resume=resume, ctx=ctx, ds_config=ds_config, ds_spec=spec
        )
    except NonFiniteLoss as exc:
        hint = " (fp16: try a lower --lr)" if precision.dtype == "fp16" else ""
        log.error("%s%s", exc, hint)
        payload.update(ok=False, failed_check="finite_loss", error=str(exc), losses=exc.losses)
        return payload, 1
    save_adapter(model, output, ctx, result.engine, everything=args.method == "full")
    if ctx.is_main:
        tokenizer.save_pretrained(str(output))
    rank_times = dist.gather(ctx, rank_figures(ctx, device, result))
    del zero3
    payload.update(
        ok=True,
        failed_check=None,
        start_step=result.start_step,
        losses=[round(x, 6) for x in result.losses],
        skipped_steps=result.skipped_steps,
        loss_scale=result.loss_scale,
        step_time_s=result.step_time_s,
        tokens_per_s=result.tokens_per_s,
        deepspeed=result.deepspeed,
        ranks=rank_times,
    )
    log.info("saved %s to %s", "adapter" if args.method == "lora" else "model", output)
    return payload, 0
