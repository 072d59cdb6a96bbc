"""`qwen-ft-images compare`: loss curves, memory and speed per dtype x method, in one image.

The logic lives in `builder.comparison` (planning, running, interpreting, reporting) and
`builder.chart` (the PNG, an optional extra); this module wires them to the command line.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import platform
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from builder.errors import ConfigError, Interrupted, SmokeFailed

if TYPE_CHECKING:
    from builder.cli import Context
    from builder.comparison import CombinationResult, Executor, Subject
    from builder.config import MatrixConfig
    from builder.hostprobe import GpuInfo
    from builder.knowledge import Knowledge
    from builder.resolve import Cell


def _find_cell(obj: Context, name: str) -> tuple[Cell | None, MatrixConfig | None, Knowledge]:
    """The matrix cell `name` names exactly (target, alias, id or pinned tag), if any."""
    from builder import knowledge

    if not obj.matrix_path.exists():
        return None, None, knowledge.load()
    cfg, kb, res = obj.load()
    hits = [c for c in res.cells if name in (c.spec.target, c.alias, c.id, c.pinned)]
    if len(hits) > 1:
        hits = [c for c in hits if c.recommended] or hits
    if len(hits) > 1:
        raise ConfigError(
            f"'{name}' names {len(hits)} images ({', '.join(c.id for c in hits)}); name one by its id"
        )
    return (hits[0] if hits else None), cfg, kb


def _sm_of(kb: Knowledge, cfg: MatrixConfig | None) -> Any:
    def sm_of(gpu: GpuInfo) -> int | None:
        if gpu.sm is not None:
            return gpu.sm
        if cfg is not None:
            from builder.doctor import sm_for_name

            return sm_for_name(kb, cfg, gpu.name)
        known = kb.gpu_by_name(gpu.name)
        return None if known is None else known.sm

    return sm_of


def _native_subject(cell: Cell) -> Subject:
    from builder.comparison import Subject

    assert cell.plan is not None
    return Subject(
        name=cell.id,
        image=None,
        sm=cell.sm,
        attn=cell.plan.attn_implementation,
        flash_attn=cell.plan.flash_attn.version is not None,
        torch=cell.plan.torch.version,
    )


def _check_model(path: Path) -> None:
    """Refuse a path that is not a local Qwen checkpoint before any run starts, with the runtime's
    own check and message (it only reads config.json). Each run checks again inside the image."""
    if not path.exists():
        raise ConfigError(f"model path not found: {path}")
    import importlib

    try:  # the runtime ships in this distribution, but is not part of the typed builder
        model = importlib.import_module("qwen_ft_runtime.model")
        errors = importlib.import_module("qwen_ft_runtime.errors")
    except ImportError:  # not installed on this host: each run checks
        return
    try:
        model.checkpoint_model_type(path)
    except errors.UsageError as exc:
        raise ConfigError(str(exc)) from None


def _host_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _clean(value: Any) -> Any:
    # JSON has no Infinity/NaN; strict parsers (jq, browsers) reject Python's extension.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


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
@click.option("--docker", "docker_exe", envvar="QWEN_FT_DOCKER", help="docker executable (default: docker).")
@click.pass_obj
def command(
    obj: Context,
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
    docker_exe: str | None,
) -> None:
    """Run the same training steps once per dtype x method and compare the curves.

    IMAGE_OR_TARGET is a matrix target, alias or image id (its image must be built), or any
    local image reference built by this tool. Every run gets the same seed, data and initial
    weights, one container each (--native: one host process each). Combinations this hardware
    cannot run are skipped with the reason. Writes build/reports/compare-<name>.json, .md and
    (with matplotlib, the `plot` extra) .png. Exit 2 for bad input or when everything is skipped,
    8 when a run failed (e.g. NaN loss; the others still run).
    """
    from builder import chart, comparison, hostprobe

    dtype_list = comparison.parse_choices(dtypes, comparison.DTYPES, "dtype")
    method_list = comparison.parse_choices(methods, comparison.METHODS, "method")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--lr {lr}: expected a positive number")
    if model is not None:
        _check_model(model)
    options = comparison.Options(steps=steps, seed=seed, lr=lr, model=model, tiny=tiny, timeout=timeout)
    project = obj.project
    cell, cfg, kb = _find_cell(obj, image_or_target)
    run_id = uuid.uuid4().hex[:12]
    executor: Executor
    if native:
        if cell is None:
            raise ConfigError(
                f"'{image_or_target}' is no target, alias or image id in {obj.matrix_path}; "
                "--native takes one of those (an image reference needs Docker)"
            )
        if _host_version("torch") is None or importlib.util.find_spec("transformers") is None:
            raise ConfigError(
                "--native needs torch, transformers and peft here: pip install 'qwen-ft-images[smoke]'"
            )
        subject = _native_subject(cell)
        executor = comparison.NativeExecutor(runtime_dir=project.runtime)
    else:
        from builder.engine import CommandLog, DockerEngine

        engine = DockerEngine(docker_exe, CommandLog(project.build / "logs" / "commands.sh"))
        ref = cell.plan.tags[0] if cell is not None and cell.plan is not None else image_or_target
        labels = engine.image_labels(ref)
        if labels is None:
            if cell is not None:
                raise ConfigError(f"image {ref} not built; run qwen-ft-images build {cell.id}")
            raise ConfigError(
                f"'{image_or_target}' is neither a target, alias or image id in {obj.matrix_path} "
                "nor a local image"
            )
        subject = comparison.subject_from_labels(ref, labels, name=cell.id if cell is not None else None)
        executor = comparison.DockerExecutor(
            engine,
            ref,
            gpus=False,
            model=model,
            labels={"io.qwen-ft.compare-project": str(project.root), "io.qwen-ft.compare-run": run_id},
        )
    gpus = () if device == "cpu" else hostprobe.probe_gpus(hostprobe.system_runner).gpus
    hw = comparison.choose_hardware(
        subject,
        gpus,
        requested=device,
        native=native,
        sm_of=_sm_of(kb, cfg),
        cpu_name=f"CPU ({platform.machine() or 'unknown'})",
        host_torch=_host_version("torch"),
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
    log_dir = project.build / "logs" / "compare" / subject.name
    log_dir.mkdir(parents=True, exist_ok=True)
    results: list[CombinationResult] = []
    try:
        for combo in combos:
            if combo.skip is not None:
                results.append(comparison.skipped(combo))
                continue
            model_arg = executor.model_arg(model) if model is not None else None
            args = comparison.runtime_args(combo, options, hw, model_arg)
            click.echo(f"  [{len(results) + 1}/{len(combos)}] {combo.label} ({combo.attn}) ...", err=True)
            run = executor.run(args, hw.env, timeout)
            log = log_dir / f"{combo.dtype}-{combo.method}.log"
            log.write_text(
                f"$ {comparison.RUNTIME} {' '.join(args)}\n# exit {run.exit_code}, {run.seconds:.1f} s\n"
                f"{run.stderr}\n# stdout\n{run.stdout}",
                encoding="utf-8",
            )
            result = comparison.interpret(combo, run, model)
            result.log = str(log.relative_to(project.root))
            results.append(result)
            shown = (
                f"ok, loss {result.losses[0]:.4f} → {result.losses[-1]:.4f}"
                if result.status == "ok"
                else f"{result.status}: {result.reason}"
            )
            click.echo(f"      {shown} ({run.seconds:.1f} s)", err=True)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: the running combination was stopped; no report written") from None
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
    reports = project.build / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    stem = f"compare-{subject.name}"
    png = reports / f"{stem}.png"
    drawn = None
    if chart.available():
        drawn = chart.plot(data, png)
    else:
        png.unlink(missing_ok=True)  # a stale chart must not sit beside a new report
    data["chart"] = str(png.relative_to(project.root)) if drawn else None
    json_path = reports / f"{stem}.json"
    json_path.write_text(json.dumps(_clean(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    md_path = reports / f"{stem}.md"
    md_path.write_text(comparison.render_markdown(data, png.name if drawn else None), encoding="utf-8")
    for line in comparison.summary_lines(data):
        click.echo(line)
    written = [json_path, md_path, *([png] if drawn else [])]
    click.echo("report: " + ", ".join(str(p.relative_to(project.root)) for p in written), err=True)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise SmokeFailed(
            f"compare {subject.name}: {len(failed)} of {len(runnable)} runs failed: "
            + "; ".join(f"{r.label}: {r.reason}" for r in failed)
            + f" (report {md_path.relative_to(project.root)})"
        )
