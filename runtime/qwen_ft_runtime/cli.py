"""`qwen-ft-runtime {contract,smoke,train}`: one JSON line on stdout, logs on stderr.

Exit codes: 0 ok, 1 a check or the run failed, 2 usage or input error (one line, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .env import ATTNS, DTYPES, ENV_VARS, FLAGS, Plan
from .errors import OOM_HINT, UsageError
from .report import emit, stdout_to_stderr

PROG = "qwen-ft-runtime"
RANK_ERROR_PAUSE_S = 5.0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_precision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, help=f"override the image's {ENV_VARS['dtype']}")
    parser.add_argument("--attn", choices=ATTNS, help=f"override the image's {ENV_VARS['attn']}")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-len", type=int, default=None)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--nproc",
        metavar="N|all",
        help="ranks to start under torchrun: N GPUs (NCCL), all visible GPUs, or N CPU processes (gloo)",
    )
    parser.add_argument(
        "--deepspeed",
        metavar="STAGE|PATH.json",
        help="DeepSpeed ZeRO: zero2, zero3, zero2-offload, zero3-offload (shipped configs) or a config file",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    contract = commands.add_parser("contract", help="check the installed stack against the plan")
    for field, flag in FLAGS.items():
        contract.add_argument(
            flag, dest=f"plan_{field}", metavar="VALUE", help=f"overrides {ENV_VARS[field]}"
        )

    smoke = commands.add_parser("smoke", help="a few real LoRA steps on tiny Qwen2/Qwen3 models")
    smoke.add_argument("--model", help="local Qwen checkpoint instead of the tiny models")
    smoke.add_argument(
        "--tiny",
        action="append",
        choices=("qwen2-tiny", "qwen3-tiny"),
        help="only these tiny models (repeatable); default both",
    )
    smoke.add_argument("--steps", type=int, default=8)
    smoke.add_argument("--batch-size", type=_positive_int, default=4)
    smoke.add_argument("--lr", type=float, default=None)
    _add_precision(smoke)
    smoke.set_defaults(max_len=256)

    train = commands.add_parser("train", help="fine-tune on a JSONL chat file")
    train.add_argument("--model", required=True, help="local Qwen checkpoint directory")
    train.add_argument("--data", required=True, help='JSONL, one {"messages": [...]} per line')
    train.add_argument("--output", required=True, help="adapter and checkpoints go here")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (or --epochs)")
    length.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--batch-size", type=_positive_int, default=4)
    train.add_argument("--lr", type=float, default=None, help="default 2e-4; 1e-4 when training in fp16")
    train.add_argument("--warmup-ratio", type=float, default=0.03)
    train.add_argument("--log-every", type=int, default=10)
    train.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    train.add_argument(
        "--resume",
        metavar="DIR|auto",
        help="a checkpoint-N directory, or auto for the latest in --output",
    )
    train.add_argument("--lora-r", type=_positive_int, default=16)
    train.add_argument("--lora-alpha", type=_positive_int, default=32)
    train.add_argument("--lora-dropout", type=float, default=0.05)
    _add_precision(train)
    train.set_defaults(max_len=2048)
    return parser


def _setup_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=f"[{PROG}] %(levelname)s %(message)s")


def _prelaunch(args: argparse.Namespace) -> int:
    """Check what can be checked once, before any rank starts, and count the ranks."""
    from .dist import check_batch, parse_nproc, resolve_nproc

    requested = parse_nproc(args.nproc or "1")
    spec = None
    if args.deepspeed:
        from .ds import load_spec

        spec = load_spec(args.deepspeed)
    if args.command == "train":
        from .train import validate_inputs

        validate_inputs(args)
    elif args.model:
        from .model import checkpoint_model_type

        checkpoint_model_type(Path(args.model))
    import torch

    gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    nproc = resolve_nproc(requested, args.device, gpus)
    check_batch(args.batch_size, nproc)
    if args.command == "train":
        from .train import check_resume_state, resolve_resume

        check_resume_state(resolve_resume(args.resume, Path(args.output)), args.deepspeed, nproc)
    if spec is not None:
        from .ds import check_spec

        check_spec(spec, "cuda" if gpus else "cpu", args.batch_size, nproc)
    return nproc


def main(argv: Sequence[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw_argv)
    _setup_logging()
    from .dist import in_launched_rank

    rank0 = not in_launched_rank() or os.environ.get("RANK") == "0"
    try:
        wants_ranks = args.command in ("smoke", "train") and (args.nproc or args.deepspeed)
        if wants_ranks and not in_launched_rank():
            nproc = _prelaunch(args)
            if nproc > 1:
                from .dist import launch, strip_nproc

                return launch(nproc, strip_nproc(raw_argv))
        if args.command == "contract":
            from .contract import run_contract

            overrides = {field: getattr(args, f"plan_{field}") for field in FLAGS}
            with stdout_to_stderr():  # a GPU contract imports DeepSpeed ops, which log to stdout
                payload, ok = run_contract(Plan.load(overrides=overrides))
            emit(payload)
            return 0 if ok else 1
        with stdout_to_stderr():
            if args.command == "smoke":
                from .smoke import run_smoke

                payload, code = run_smoke(args)
            else:
                from .train import run_train

                payload, code = run_train(args)
        if rank0:  # one JSON line for the whole job; rank 0 gathers the others' figures
            emit(payload)
        return code
    except UsageError as exc:
        if not rank0:
            # Every rank reads the same inputs and usually fails the same way. Rank 0 says so
            # and exits first, and torchrun then stops this rank before it repeats the line;
            # an error of this rank alone still gets printed after the pause.
            time.sleep(RANK_ERROR_PAUSE_S)
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            first = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
            print(f"{PROG} {args.command}: error: {first}; {OOM_HINT}", file=sys.stderr)
            return 2
        raise
