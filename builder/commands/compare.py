"""`compare`: loss curves, memory and speed per dtype x method, in one image.

The stages live in `builder.comparison` (locate, plan, run, report) and `builder.chart`
(the PNG, an optional extra); this module wires them to the command line.
"""

from __future__ import annotations

import importlib.util
import math
import platform
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from builder.commands.common import Context, interrupt_as, option
from builder.errors import ConfigError

if TYPE_CHECKING:
    pass


@click.command("compare")
@click.argument("image_or_target")
@click.option(
    "--dtypes", default="fp32,fp16,bf16", show_default=True, help="Comma-separated: fp32, fp16, bf16."
)
@click.option("--methods", default="lora,full", show_default=True, help="Comma-separated: lora, full.")
@click.option(
    "--steps", type=click.IntRange(min=2), default=20, show_default=True, help="Optimizer steps per run."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds model init and data alike.")
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    help="A local Qwen checkpoint directory (mounted read-only); default: a tiny random Qwen.",
)
@click.option(
    "--tiny",
    type=click.Choice(["qwen2-tiny", "qwen3-tiny"]),
    default="qwen2-tiny",
    show_default=True,
    help="The tiny model, without --model.",
)
@click.option("--lr", type=float, help="One LR for every run (default: the runtime's, equal across dtypes).")
@click.option(
    "--attn",
    type=click.Choice(["auto", "sdpa", "flash_attention_2"]),
    default="auto",
    show_default=True,
    help="auto: the image's attention where a run can use it, else sdpa.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cuda", "cpu"]),
    default="auto",
    show_default=True,
    help="auto: a host GPU that runs the image's kernels, else the CPU.",
)
@click.option("--native", is_flag=True, help="Run the runtime on this host's python, not in a container.")
@click.option(
    "--timeout", type=float, default=1800.0, show_default=True, help="Seconds allowed per combination."
)
@option("docker")
@click.pass_obj
def command(
    obj: Context,
    /,
    image_or_target: str,
    dtypes: str,
    methods: str,
    steps: int,
    seed: int,
    model: Path | None,
    tiny: str,
    lr: float | None,
    attn: str,
    device: str,
    native: bool,
    timeout: float,
    **cli: Any,
) -> None:
    """Run the same training steps once per dtype x method and compare the curves.

    IMAGE_OR_TARGET is a matrix target, alias or image id (its image must be built), or any
    local image reference built by this tool. Every run gets the same seed, data and initial
    weights, one container each (--native: one host process each). Combinations this hardware
    cannot run are skipped with the reason. Writes build/reports/compare-<name>.json, .md and
    (with matplotlib, the `plot` extra) .png. Exit 2 for bad input or when everything is skipped,
    8 when a run failed (e.g. NaN loss; the others still run).
    """
    from builder import chart, comparison, hostprobe, knowledge, resolve

    dtype_list = comparison.parse_choices(dtypes, comparison.DTYPES, "dtype")
    method_list = comparison.parse_choices(methods, comparison.METHODS, "method")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--lr {lr}: expected a positive number")
    if model is not None:
        comparison.check_model(model)
    settings = obj.settings(cli)
    options = comparison.Options(steps=steps, seed=seed, lr=lr, model=model, tiny=tiny, timeout=timeout)
    project = obj.project
    cell, cfg = None, None
    kb = knowledge.load()
    if obj.matrix_path.exists():
        cfg, kb, res = obj.load()
        cell = resolve.select_one(res, image_or_target)
    subject, executor = comparison.locate(
        project,
        image_or_target,
        cell,
        native=native,
        docker=settings["docker"],
        model=model,
        run_id=uuid.uuid4().hex[:12],
    )
    gpus = () if device == "cpu" else hostprobe.probe_gpus(hostprobe.system_runner).gpus
    hw = comparison.choose_hardware(
        subject,
        gpus,
        requested=device,
        native=native,
        sm_of=comparison.sm_resolver(kb, cfg),
        cpu_name=f"CPU ({platform.machine() or 'unknown'})",
        host_torch=comparison.host_version("torch"),
        host_flash_attn=importlib.util.find_spec("flash_attn") is not None,
    )
    if isinstance(executor, comparison.DockerExecutor):
        executor.gpus = hw.device == "cuda"
    combos = comparison.plan_combinations(dtype_list, method_list, attn, subject.attn, hw)
    runnable = [c for c in combos if c.skip is None]
    if not runnable:
        grouped: dict[str, list[str]] = {}
        for c in combos:
            grouped.setdefault(c.skip or "", []).append(c.label)
        reasons = "; ".join(f"{why} ({', '.join(labels)})" for why, labels in grouped.items())
        raise ConfigError(f"every requested combination is skipped on {hw.describe()}: {reasons}")
    where = subject.image or "this host's python"
    click.echo(
        f"compare {subject.name}: {len(runnable)} of {len(combos)} combinations in {where} on "
        f"{hw.describe()} ({hw.note}); {options.model_name}, {steps} steps, seed {seed}",
        err=True,
    )
    for c in combos:
        if c.skip:
            click.echo(f"  skip {c.label}: {c.skip}", err=True)
    if not chart.available():
        click.echo(
            "note: matplotlib is not installed, so no chart: pip install 'qwen-ft-images[plot]'", err=True
        )
    started = time.time()
    with interrupt_as("interrupted: the running combination was stopped; no report written"):
        results = comparison.run_all(
            combos,
            executor,
            options,
            hw,
            project.logs / "compare" / subject.name,
            project.root,
            say=lambda line: click.echo(line, err=True),
        )
    meta = {
        "name": subject.name,
        "image": subject.image,
        "native": native,
        "hardware": {
            "device": hw.device,
            "name": hw.name,
            "sm": hw.sm,
            "torch": hw.torch,
            "flash_attn": hw.flash_attn,
            "note": hw.note,
            "description": hw.describe(),
        },
        "model": options.model_name,
        "steps": steps,
        "seed": seed,
        "lr": options.run_lr,
        "dtypes": list(dtype_list),
        "methods": list(method_list),
        "attn": attn,
        "started": round(started, 3),
        "seconds": round(time.time() - started, 2),
    }
    data = comparison.report_json(meta, results)
    written = comparison.write_outputs(project, data, subject.name)
    for line in comparison.summary_lines(data):
        click.echo(line)
    click.echo("report: " + ", ".join(str(p.relative_to(project.root)) for p in written), err=True)
    comparison.raise_for_failures(
        subject.name, results, len(runnable), str(written[1].relative_to(project.root))
    )
