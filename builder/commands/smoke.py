"""`smoke`: `contract`, a real LoRA step and the kernel audit in each built image."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from builder.commands.common import Context, host_platform, interruptible, option, stderr_console
from builder.errors import ConfigError
from builder.smoke import (
    DEFAULT_TIMEOUT_S,
    AuditOptions,
    ImagePlan,
    Options,
    StepResult,
    _per_model,
    fmt_device,
    fmt_losses,
    fmt_ranks,
    fmt_tokens,
)


@click.command("smoke")
@click.argument("selectors", nargs=-1)
@click.option("--steps", type=int, help="Optimizer steps per model (runtime default 8; at least 2).")
@click.option(
    "--timeout",
    type=float,
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Seconds per container; then it is killed, removed and reported as failed.",
)
@click.option(
    "--model",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="A local Qwen checkpoint, mounted read-only at /model, instead of the tiny models.",
)
@click.option("--cpu-only", is_flag=True, help="Run the CPU step even where a GPU fits the image.")
@click.option(
    "--nproc",
    metavar="N|all",
    help="Ranks per image under torchrun (gloo on the CPU, NCCL on GPUs; all = every visible GPU).",
)
@click.option(
    "--deepspeed",
    metavar="CONFIG",
    help="Train through DeepSpeed: zero2, zero3, zero2-offload or zero3-offload (the image's configs).",
)
@option("docker")
@option("as_json", help="Print the report (smoke.json) on stdout.")
@click.option("--no-audit", is_flag=True, help="Skip the kernel-coverage audit of GPU images.")
@click.option("--rerun", is_flag=True, help="Run every image again, even where a passing verdict is cached.")
@option("cuobjdump_wheelhouse")
@option("cuobjdump")
@click.option("--env", "env_items", multiple=True, hidden=True, help="KEY=VALUE for every container (tests).")
@click.pass_obj
@interruptible("interrupted: the running container was removed; no smoke report written")
def command(
    obj: Context,
    /,
    selectors: tuple[str, ...],
    steps: int | None,
    timeout: float,
    model: Path | None,
    cpu_only: bool,
    nproc: str | None,
    deepspeed: str | None,
    no_audit: bool,
    rerun: bool,
    env_items: tuple[str, ...],
    **cli: Any,
) -> None:
    """Run `contract` then `smoke` in each selected built image; none selected means all.

    With an NVIDIA GPU that runs the image's kernels, the smoke step trains on the GPU in the
    image's dtype; otherwise it trains on the CPU in fp32 and the report says so. Writes
    build/reports/smoke.json and smoke.md; exits 8 if any image fails.
    """
    from builder import resolve, smoke

    if steps is not None and steps < 2:
        raise ConfigError("--steps must be at least 2 (the loss must have a chance to fall)")
    if timeout <= 0:
        raise ConfigError("--timeout must be positive")
    smoke.check_parallel(nproc, deepspeed)
    settings = obj.settings(cli)
    options = Options(
        steps=steps,
        timeout=timeout,
        model=model,
        env=smoke.parse_env(env_items),
        cpu_only=cpu_only,
        rerun=rerun,
        nproc=nproc,
        deepspeed=deepspeed,
    )
    audit_options = (
        None
        if no_audit
        else AuditOptions(wheelhouse=settings["cuobjdump_wheelhouse"], cuobjdump=settings["cuobjdump"])
    )
    cfg, kb, res = obj.load()
    project = obj.project
    console = stderr_console()

    def on_step(plan: ImagePlan, step: str, result: StepResult | None) -> None:
        if step == "cached":
            console.print(f"{plan.name}: passed before with this image and host (cached)", markup=False)
            return
        if result is None:
            where = f"gpu ({plan.gpu_name})" if plan.gpu else "cpu"
            console.print(f"{plan.name}: {step} on {where} …", markup=False)
            return
        verdict = "ok" if result.ok else "FAILED " + ", ".join(result.failures)
        console.print(f"{plan.name}: {step} {verdict} ({result.seconds:.1f} s)", markup=False)

    results, report = smoke.execute(
        project,
        kb,
        cfg,
        resolve.on_platform(resolve.select(res, selectors), host_platform(), selectors),
        options,
        docker=settings["docker"],
        audit_options=audit_options,
        on_step=on_step,
    )
    json_path, md_path = smoke.write_reports(project, report)
    console.print(summary_table(report))
    console.print(
        f"report: {json_path.relative_to(project.root)}, {md_path.relative_to(project.root)}", markup=False
    )
    if settings["as_json"]:
        click.echo(json.dumps(report, indent=2))
    smoke.raise_for_failures(results)


def summary_table(report: Mapping[str, Any]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="smoke summary", header_style="bold")
    for col in (
        "image",
        "result",
        "device",
        "ranks",
        "dtype / attn",
        "tokens/s",
        "loss first→last",
        "wall",
        "detail",
    ):
        table.add_column(col, overflow="fold")
    for row in report["images"]:
        result = "[green]pass[/]" if row["ok"] else "[bold red]FAIL[/]"
        if row.get("cached"):
            result += f" (cached {row['cached']['at']}, {escape(row['cached']['host'])})"
        detail = ", ".join(row["failed_checks"]) or ""
        if row["note"]:
            detail = f"{detail}; {row['note']}" if detail else row["note"]
        table.add_row(
            escape(row["image"]),
            result,
            escape(fmt_device(row)),
            escape(fmt_ranks(row)),
            f"{row['dtype'] or '-'} / {row['attention'] or '-'}",
            escape(_per_model(row, fmt_tokens, "\n")),
            escape(_per_model(row, fmt_losses, "\n")),
            f"{row['wall_s']:.1f}s",
            escape(detail),
        )
    return table
