"""Multi-process runs: `--nproc N|all` re-executes the command under torchrun, one rank per GPU
(NCCL) or N CPU processes (gloo), and each rank finds its place from torchrun's ENV."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

log = logging.getLogger(__name__)

# torchrun sets these for every worker; a process that sees WORLD_SIZE is already a rank.
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def parse_nproc(text: str) -> int | str:
    """`--nproc` value: a positive int, or `all` (every visible GPU, counted later)."""
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"--nproc {text!r}: expected a positive number or all") from None
    if value < 1:
        raise UsageError(f"--nproc {value}: expected at least 1 process")
    return value


def resolve_nproc(requested: int | str, device: str, gpu_count: int) -> int:
    """How many ranks to start. GPU runs need one visible GPU per rank; CPU runs (`--device cpu`,
    or no GPU at all) start that many gloo processes."""
    use_gpu = device == "cuda" or (device == "auto" and gpu_count > 0)
    if requested == "all":
        if not use_gpu:
            raise UsageError(
                "--nproc all counts visible GPUs and none is visible; give a number for CPU ranks"
            )
        return gpu_count
    assert isinstance(requested, int)
    if use_gpu and gpu_count == 0:
        raise UsageError(
            f"--nproc {requested} on --device cuda but no GPU is visible; use --device cpu for CPU ranks"
        )
    if use_gpu and requested > gpu_count:
        raise UsageError(
            f"--nproc {requested} but only {gpu_count} GPU(s) visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            f"use --nproc {gpu_count} or --nproc all"
        )
    return requested


def check_batch(batch_size: int, world_size: int) -> None:
    """`--batch-size` is the global batch per optimizer step; each rank takes an equal slice."""
    if batch_size % world_size:
        raise UsageError(
            f"--batch-size {batch_size} is the global batch and must be a multiple of the "
            f"{world_size} ranks (each takes {batch_size}/{world_size})"
        )


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def in_launched_rank() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N`: the ranks must not launch again."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--nproc":
            skip = True
            continue
        if item.startswith("--nproc="):
            continue
        out.append(item)
    return out


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run `python -m qwen_ft_runtime ARGV` as `nproc` ranks under torchrun (in this process).

    Returns rank 0's exit code (else the first failing rank's). torchrun's failure report is a
    traceback-shaped box; the ranks already said what went wrong, so it is caught here.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    env_threads = os.environ.get("OMP_NUM_THREADS")
    if env_threads is None:
        # torchrun would force 1 thread per rank with a warning; share the cores instead.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    args = [
        "--standalone",
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "--max_restarts=0",
        "-m",
        "qwen_ft_runtime",
        *argv,
    ]
    log.info("launching %d ranks: torchrun %s", nproc, " ".join(args))
    try:
        torchrun(args)
    except ChildFailedError as exc:
        # The rank that failed first holds the cause; torchrun then kills the rest (by signal,
        # a negative exit code).
        _, first = exc.get_first_failure()
        code = int(first.exitcode)
        return code if code > 0 else 1
    return 0


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None  # None: a single process, no process group
    launcher: str | None = None  # "torchrun" when started by it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "backend": self.backend,
            "launcher": self.launcher,
        }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init(device_type: str, *, deepspeed: bool) -> DistContext:
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU).

    A single process that runs DeepSpeed still needs a (one-rank) group, so it gets the ENV
    torchrun would have given it.
    """
    launched = in_launched_rank()
    if not launched and not deepspeed:
        return DistContext()
    if not launched:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    import torch
    import torch.distributed as torch_dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ["WORLD_SIZE"])
    ctx = DistContext(rank, local_rank, world, None, None)
    quiet_other_ranks(ctx)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)  # before the group, so NCCL binds the right GPU
    if not torch_dist.is_initialized():
        if deepspeed:
            from .ds import import_deepspeed, no_jit_comm_on_cpu

            ds = import_deepspeed()
            if device_type == "cpu" and no_jit_comm_on_cpu():
                log.info("deepspeed: shm comm op not prebuilt; CPU ranks use gloo collectives")
            ds.init_distributed(dist_backend=backend)
        else:
            torch_dist.init_process_group(backend=backend)
    return DistContext(rank, local_rank, world, backend, "torchrun" if launched else None)


def shutdown(ctx: DistContext) -> None:
    """Leave the group together: a rank that tears gloo down while another still talks to it
    aborts in C++ ("terminate called without an active exception", exit -6), seen on a loaded
    2-core host after a ZeRO-3 save."""
    if ctx.distributed:
        import torch.distributed as torch_dist

        if torch_dist.is_initialized():
            with contextlib.suppress(RuntimeError):
                torch_dist.barrier()
            torch_dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        import torch.distributed as torch_dist

        torch_dist.barrier()


def all_sum(ctx: DistContext, value: float, device: Any) -> float:
    """Sum a scalar over ranks (a plain float in a single process)."""
    if not ctx.distributed:
        return value
    import torch
    import torch.distributed as torch_dist

    tensor = torch.tensor(
        [value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device
    )
    torch_dist.all_reduce(tensor)
    return float(tensor.item())


def gather(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (just `[obj]` in a single process)."""
    if not ctx.distributed:
        return [obj]
    import torch.distributed as torch_dist

    out: list[Any] = [None] * ctx.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def quiet_other_ranks(ctx: DistContext) -> None:
    """Only rank 0 logs at INFO; the others would repeat every line."""
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
