"""`smoke`: a few real optimizer steps on tiny Qwen2/Qwen3 models (or a given checkpoint)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import IMPORT_T0, __version__
from .data import encode_all, synthetic_conversations
from .dist import DistContext
from .env import Plan, device_info, versions
from .errors import OOM_HINT, UsageError
from .model import TINY_MODELS, checkpoint_config, checkpoint_model_type, tiny_config
from .precision import Precision, device_compatible, sm_label
from .report import Check, first_failure, skipped

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Tiny random models need a bold LR to move visibly in 8 steps (full fine-tuning of every
# weight diverges at the LoRA value); a real checkpoint gets train.default_lr instead.
TINY_LR = {"lora": 5e-3, "full": 1e-3}

# Every run entry has all of these; a run that failed early leaves the rest null.
RUN_KEYS = (
    "model",
    "weight_dtype",
    "lr",
    "trainable_dtypes",
    "trainable_params",
    "total_params",
    "tokens_per_step",
    "losses",
    "step_time_s",
    "tokens_per_s",
    "peak_mem_bytes",
    "peak_mem_kind",
    "train_state_bytes",
    "loss_scale",
    "skipped_steps",
    "chat_format",
    "deepspeed",
    "ranks",
)


def loss_decreased(losses: list[float]) -> bool:
    """The pass rule: mean of the last quarter (at least one step) is below the first loss."""
    if len(losses) < 2:
        return False
    tail = losses[-max(1, len(losses) // 4) :]
    return statistics.fmean(tail) < losses[0]


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), so interpreter start-up counts too."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22 overall; fields[0] here is field 3
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _peak_memory(device_type: str) -> tuple[int, str]:
    if device_type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated()), "cuda_max_memory_allocated"
    # ru_maxrss is KiB on Linux and a process-lifetime peak, not per run.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) * (1 if sys.platform == "darwin" else 1024), "process_max_rss"


def _device_check(plan: Plan, capability: tuple[int, int] | None) -> Check:
    if plan.sm is None:
        return skipped("device", "image states no target SM")
    target = plan.capability
    if target is None:
        return Check("device", True, f"cpu image on {sm_label(capability)}")
    if capability is None:
        return Check("device", False, f"image targets {sm_label(target)} but no GPU is visible")
    ok = device_compatible(capability, target)
    return Check("device", ok, f"device {sm_label(capability)}, image targets {sm_label(target)}")


def run_smoke(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    model_path: Path | None = Path(args.model) if args.model else None
    if model_path is not None:
        checkpoint_model_type(model_path)  # fail fast, before the heavy imports
    if args.steps < 2:
        raise UsageError("--steps must be at least 2 to judge whether the loss decreases")
    spec = None
    if args.deepspeed:
        from .ds import load_spec

        spec = load_spec(args.deepspeed)

    from . import dist
    from .precision import pick_device

    device = pick_device(args.device, dist.local_rank())
    ctx = dist.init(device.type, deepspeed=spec is not None)
    try:
        dist.quiet_other_ranks(ctx)
        dist.check_batch(args.batch_size, ctx.world_size)
        if spec is not None:
            from .ds import check_spec

            check_spec(spec, device.type, args.batch_size, ctx.world_size)
        return _run(args, model_path, device, ctx, spec)
    finally:
        dist.shutdown(ctx)


def _run(
    args: argparse.Namespace, model_path: Path | None, device: torch.device, ctx: DistContext, spec: Any
) -> tuple[dict[str, Any], int]:
    import torch

    from .precision import runtime_precision

    plan = Plan.load()
    capability, precision = runtime_precision(
        device.type,
        flag_dtype=args.dtype,
        flag_attn=args.attn,
        image_dtype=plan.dtype,
        image_attn=plan.attn,
    )
    checks = [
        _device_check(plan, capability),
        Check(
            "precision",
            not precision.problems,
            "; ".join(precision.problems) or _describe(precision),
        ),
    ]
    runs: list[dict[str, Any]] = []
    first_step_end: float | None = None
    if all(c.ok for c in checks):
        targets = [str(model_path)] if model_path else list(args.tiny or TINY_MODELS)
        for target in targets:
            torch.manual_seed(args.seed)
            run, run_checks, step_end = _smoke_one(target, model_path, args, device, precision, ctx, spec)
            runs.append(run)
            checks.extend(run_checks)
            first_step_end = first_step_end or step_end
    ok = all(c.ok for c in checks)
    import_to_first = None if first_step_end is None else first_step_end - IMPORT_T0
    age = process_age_s()
    process_to_first = (
        None if first_step_end is None or age is None else age - (time.perf_counter() - first_step_end)
    )
    payload = {
        "entry": "smoke",
        "ok": ok,
        "failed_check": first_failure(checks),
        "checks": [c.as_dict() for c in checks],
        "versions": versions(),
        "device": device_info(device.type),
        "dtype": precision.dtype,
        "attn_implementation": precision.attn,
        "precision_source": {"dtype": precision.dtype_source, "attn": precision.attn_source},
        "method": args.method,
        "steps": args.steps,
        "seed": args.seed,
        **ctx.as_dict(),
        "deepspeed": spec.name if spec is not None else None,
        "plan": plan.as_dict(),
        "runs": runs,
        "import_to_first_step_s": _round(import_to_first),
        "process_start_to_first_step_s": _round(process_to_first),
        "runtime_version": __version__,
    }
    return payload, 0 if ok else 1


def _describe(precision: Precision) -> str:
    return f"{precision.dtype} ({precision.dtype_source}), {precision.attn} ({precision.attn_source})"


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _smoke_one(
    target: str,
    model_path: Path | None,
    args: argparse.Namespace,
    device: torch.device,
    precision: Precision,
    ctx: DistContext,
    spec: Any,
) -> tuple[dict[str, Any], list[Check], float | None]:
    """One model's run: its report entry, its checks, and when its first step ended."""
    import torch

    from . import dist
    from .data import build_tokenizer, chat_format
    from .loop import LoopConfig, NonFiniteLoss, rank_figures, train_loop
    from .model import (
        build_tiny,
        load_pretrained,
        param_counts,
        prepare,
        trainable_dtypes,
        weight_dtype,
    )
    from .train import default_lr

    weights = weight_dtype(args.method, precision.dtype)
    run: dict[str, Any] = dict.fromkeys(RUN_KEYS)
    run.update(model=target, weight_dtype=weights)
    checks: list[Check] = []
    try:
        if model_path is not None:
            lr = args.lr or default_lr(precision.dtype)
            hidden = int(checkpoint_config(model_path).get("hidden_size", 0))
        else:
            lr = args.lr or TINY_LR[args.method]
            hidden = int(tiny_config(target).hidden_size)
        ds_config = None
        zero3 = None
        if spec is not None:
            from .ds import run_config

            # Only a checkpoint loads sharded; the tiny models are built whole and ZeRO-3
            # partitions them when the engine starts.
            ds_config, zero3 = run_config(
                spec,
                dtype=precision.dtype,
                lr=lr,
                batch_size=args.batch_size,
                world_size=ctx.world_size,
                steps=args.steps,
                warmup_steps=0,
                device_type=device.type,
                hidden_size=hidden,
                sharded_load=model_path is not None,
            )
        if model_path is not None:
            model, tokenizer = load_pretrained(
                model_path, precision.attn, weights, device, sharded=zero3 is not None
            )
        else:
            tokenizer = build_tokenizer()
            model = build_tiny(target, precision.attn, weights, args.seed).to(device)
        run["chat_format"] = chat_format(tokenizer)
        model = prepare(model, args.method, gradient_checkpointing=args.gradient_checkpointing)
        trainable, total = param_counts(model)
        conversations = synthetic_conversations(args.batch_size, args.seed)
        examples, _ = encode_all(conversations, tokenizer, args.max_len)
        if not examples:
            raise UsageError(f"--max-len {args.max_len} leaves no assistant token to train on")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        config = LoopConfig(
            steps=args.steps,
            lr=lr,
            dtype=precision.dtype,
            batch_size=args.batch_size,
            seed=args.seed,
            method=args.method,
        )
        run.update(
            lr=lr,
            trainable_dtypes=trainable_dtypes(model),
            trainable_params=trainable,
            total_params=total,
            tokens_per_step=sum(len(e.input_ids) for e in examples),
        )
        if args.method == "lora" and ds_config is not None and precision.dtype != "fp32":
            # DeepSpeed casts the module to fp16/bf16 and keeps fp32 masters in its optimizer.
            checks.append(skipped(f"{target}:trainable_fp32", "DeepSpeed holds the fp32 master weights"))
        elif args.method == "lora":
            dtypes = run["trainable_dtypes"]
            checks.append(Check(f"{target}:trainable_fp32", dtypes == ["float32"], f"{dtypes}"))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        log.info(
            "smoke %s: %d steps, %s, %s, lr %g",
            target,
            args.steps,
            precision.dtype,
            precision.attn,
            lr,
        )
        result = train_loop(
            model, examples, config, device, pad_id, ctx=ctx, ds_config=ds_config, ds_spec=spec
        )
        del zero3
    except NonFiniteLoss as exc:
        checks.append(Check(f"{target}:finite_loss", False, str(exc)))
        run["losses"] = [round(x, 6) for x in exc.losses]
        return run, checks, None
    except torch.cuda.OutOfMemoryError:
        checks.append(Check(f"{target}:memory", False, "CUDA out of memory; " + OOM_HINT))
        return run, checks, None
    except UsageError:
        raise
    except Exception as exc:
        # Whatever breaks (an import, a kernel, a shape) is the finding: keep the one-line
        # report and put the traceback on stderr for whoever reads the logs.
        log.exception("smoke %s failed", target)
        first_line = (str(exc).splitlines() or [""])[0]
        checks.append(Check(f"{target}:run", False, f"{type(exc).__name__}: {first_line}"))
        return run, checks, None
    peak, kind = _peak_memory(device.type)
    run.update(
        losses=[round(x, 6) for x in result.losses],
        step_time_s=_round(result.step_time_s, 6),
        tokens_per_s=_round(result.tokens_per_s, 1),
        peak_mem_bytes=peak,
        peak_mem_kind=kind,
        train_state_bytes=result.train_state_bytes,
        loss_scale=result.loss_scale,
        skipped_steps=result.skipped_steps,
        deepspeed=result.deepspeed,
        ranks=dist.gather(ctx, rank_figures(ctx, device, result)),
    )
    finite = all(math.isfinite(x) for x in result.losses)
    checks.append(Check(f"{target}:finite_loss", finite, f"{len(result.losses)} finite losses"))
    decreased = loss_decreased(result.losses)
    tail = result.losses[-max(1, len(result.losses) // 4) :]
    checks.append(
        Check(
            f"{target}:loss_decreases",
            decreased,
            f"first {result.losses[0]:.4f}, mean of last {len(tail)} {statistics.fmean(tail):.4f}",
        )
    )
    return run, checks, result.first_step_end
