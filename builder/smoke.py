"""Smoke: run each built image's `contract` and `smoke` in a throwaway container.

Three stages, each testable alone:

* planning (`plan_image`, pure): which step each image gets on this host. A GPU image whose
  SM a host GPU can run (same major, device minor >= image minor) gets the GPU step with the
  image's own dtype; otherwise, and on a host without GPUs, the CPU step in fp32/sdpa, and
  the report says so;
* running (`run`): contract then smoke, one container at a time, through an engine
  (`DockerEngine.run_container`: killed at `--timeout`, always removed, even on Ctrl-C);
* reporting (`judge`, `image_row`, `report_json`, `render_markdown`, pure):
  build/reports/smoke.json and smoke.md.

`execute` chains them for the `smoke` command (builder/commands/smoke.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from builder import contract
from builder.engine import ContainerEngine, ContainerRun, parse_json_lines
from builder.errors import ConfigError, SmokeFailed

if TYPE_CHECKING:
    from builder.audit import AuditResult
    from builder.config import MatrixConfig
    from builder.hostprobe import GpuInfo
    from builder.knowledge import Knowledge
    from builder.project import Project
    from builder.resolve import Cell

DEFAULT_TIMEOUT_S = 600.0
NO_GPU_NOTE = "cpu step only: no GPU on this host"


class SmokeEngine(ContainerEngine, Protocol):
    """What smoke needs from an engine (DockerEngine; tests use a recording fake)."""

    def check(self) -> str: ...


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Options:
    steps: int | None = None  # None: the runtime's default (8)
    timeout: float = DEFAULT_TIMEOUT_S
    model: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cpu_only: bool = False
    rerun: bool = False  # ignore cached verdicts (a fresh pass is still stored)
    nproc: str | None = None  # `--nproc N|all`: ranks under torchrun in the container
    deepspeed: str | None = None  # `--deepspeed zero2|zero3|zero2-offload|zero3-offload`


@dataclass(frozen=True)
class AuditOptions:
    wheelhouse: Path | None = None
    cuobjdump: Path | None = None


@dataclass(frozen=True)
class ImagePlan:
    """One image and the step it gets on this host."""

    name: str  # the cell id, e.g. cpu-fp32
    ref: str  # its first tag, e.g. qwen-ft:cpu-fp32
    target: str
    sm: int | None
    dtype: str  # what the image trains in
    attn: str
    gpu: bool  # GPU step (else the CPU step)
    gpu_name: str | None
    note: str
    env: Mapping[str, str]  # extra container ENV for the smoke step
    smoke_flags: tuple[str, ...]  # extra runtime flags for the smoke step


def plan_image(
    cell: Cell, gpus: Sequence[GpuInfo], *, cpu_only: bool = False, sm_of: Callable[[GpuInfo], int | None]
) -> ImagePlan:
    """Pure: GPU step where a host GPU runs the image's kernels, else the CPU step (fp32, sdpa)."""
    plan = cell.plan

    def image_plan(gpu: bool, gpu_name: str | None, note: str, env: Mapping[str, str]) -> ImagePlan:
        flags = () if gpu else ("--device", "cpu", "--dtype", "fp32", "--attn", "sdpa")
        return ImagePlan(
            name=cell.id,
            ref=cell.local_ref,
            target=cell.spec.target,
            sm=cell.sm,
            dtype=plan.dtype,
            attn=plan.attn_implementation,
            gpu=gpu,
            gpu_name=gpu_name,
            note=note,
            env=env,
            smoke_flags=flags,
        )

    image_sm = cell.sm
    fitting = [] if image_sm is None else [g for g in gpus if contract.runs_on(image_sm, sm_of(g))]
    if fitting and not cpu_only:
        first = fitting[0]
        env: dict[str, str] = {}
        if len(fitting) < len(gpus):  # a mixed host: pin the GPU that fits (nvidia-smi order)
            env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(first.index)}
        return image_plan(True, first.name, "", env)
    if cpu_only:
        why = "cpu step only: --cpu-only"
    elif not gpus:
        why = NO_GPU_NOTE
    elif image_sm is None:
        why = "cpu image"
    else:
        seen = ", ".join(sorted({f"{g.name} sm_{sm_of(g)}" for g in gpus}))
        why = f"cpu step only: no GPU here runs sm_{image_sm} code ({seen})"
    if image_sm is not None:
        why += f"; ran fp32/sdpa, the image trains in {plan.dtype}/{plan.attn_implementation}"
    # A GPU image on the CPU: its SM ENV would fail the runtime's device check, so unset it
    # (the runtime then skips that check); the flags override its half-precision defaults.
    return image_plan(False, None, why, {} if image_sm is None else {contract.ENV_VARS["sm"]: ""})


def contract_argv() -> list[str]:
    return contract.runtime_argv("contract")


def smoke_argv(plan: ImagePlan, options: Options) -> list[str]:
    argv = contract.runtime_argv("smoke", *plan.smoke_flags)
    if options.steps is not None:
        argv += ["--steps", str(options.steps)]
    if options.model is not None:
        argv += ["--model", contract.MODEL_MOUNT]
    if options.nproc is not None:
        argv += ["--nproc", options.nproc]
    if options.deepspeed is not None:
        argv += ["--deepspeed", options.deepspeed]
    return argv


# The configs every image ships (qwen_ft_runtime/ds_configs); a JSON path would name a file
# inside the container, so the host passes only these names.
DEEPSPEED_CONFIGS = ("zero2", "zero3", "zero2-offload", "zero3-offload")


def check_parallel(nproc: str | None, deepspeed: str | None) -> None:
    """`--nproc` is a positive count or `all`; `--deepspeed` one of the shipped configs."""
    if nproc is not None and nproc != "all" and not (nproc.isdigit() and int(nproc) > 0):
        raise ConfigError(f"--nproc {nproc!r}: expected a positive number of processes or 'all'")
    if deepspeed is not None and deepspeed not in DEEPSPEED_CONFIGS:
        raise ConfigError(
            f"--deepspeed {deepspeed!r}: expected one of {', '.join(DEEPSPEED_CONFIGS)} "
            "(for your own JSON, run `qwen-ft-runtime smoke --deepspeed PATH.json` in the image)"
        )


def parse_env(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE, e.g. {contract.ENV_VARS['triton']}=keep")
        out[key.strip()] = value
    return out


def check_built(engine: SmokeEngine, cells: Sequence[Cell]) -> None:
    """Every selected image exists and was built by this tool, or one line saying what to build."""
    missing: list[Cell] = []
    foreign: list[str] = []
    for cell in cells:
        ref = cell.local_ref
        labels = engine.image_labels(ref)
        if labels is None:
            missing.append(cell)
        elif labels.get(contract.TARGET) != cell.spec.target:
            foreign.append(f"{ref} (its {contract.TARGET} label is {labels.get(contract.TARGET)!r})")
    if missing:
        refs = ", ".join(c.local_ref for c in missing)
        names = " ".join(c.id for c in missing)
        noun = "image" if len(missing) == 1 else "images"
        raise ConfigError(f"{noun} {refs} not built; run qwen-ft-images build {names}")
    if foreign:
        raise ConfigError(
            f"not built by qwen-ft-images: {'; '.join(foreign)}; run qwen-ft-images build "
            + " ".join(c.id for c in cells)
        )


# ----------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class StepResult:
    step: str  # contract | smoke
    ok: bool
    exit_code: int | None
    seconds: float
    timed_out: bool
    payload: dict[str, Any] | None
    error: str | None  # why it failed when no check says so
    log: str | None = None

    @property
    def checks(self) -> list[dict[str, Any]]:
        return list((self.payload or {}).get("checks") or [])

    @property
    def failures(self) -> list[str]:
        """Failing check names, prefixed by the step: contract:triton, smoke:timeout, ..."""
        failed = [f"{self.step}:{c.get('name')}" for c in self.checks if not c.get("ok")]
        if self.timed_out:
            failed.append(f"{self.step}:timeout")
        elif self.payload is None:
            failed.append(f"{self.step}:{'usage' if self.exit_code == 2 else 'output'}")
        elif not failed and not self.ok:
            failed.append(f"{self.step}:exit_code")
        return failed


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def judge(step: str, run: ContainerRun, timeout: float) -> StepResult:
    """Pure: a step passes when it exits 0 and its one JSON line says ok."""
    docs = [d for d in parse_json_lines(run.stdout) if d.get("entry") == step]
    payload = docs[-1] if docs else None
    error = None
    if run.timed_out:
        error = f"timed out after {timeout:g} s; killed"
    elif payload is None:
        error = f"exit {run.exit_code}, no JSON line: {_last_line(run.stderr) or 'no output'}"
    elif run.exit_code != 0 and payload.get("ok"):
        error = f"exit {run.exit_code} although the JSON says ok"
    ok = not run.timed_out and run.exit_code == 0 and payload is not None and payload.get("ok") is True
    return StepResult(step, ok, run.exit_code, round(run.seconds, 2), run.timed_out, payload, error)


@dataclass(frozen=True)
class SmokeResult:
    plan: ImagePlan
    image_id: str | None
    steps: tuple[StepResult, ...]
    wall_s: float
    cached: Mapping[str, str] | None = None  # {"at", "host", "key"} when reused from the verdict cache

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)

    @property
    def failures(self) -> list[str]:
        return [f for s in self.steps for f in s.failures]

    def step(self, name: str) -> StepResult | None:
        return next((s for s in self.steps if s.step == name), None)


def audit_step(result: AuditResult | None, error: str | None = None, seconds: float = 0.0) -> StepResult:
    """The kernel audit as a smoke step: one check per failing binary (or one summary check)."""
    if result is None:
        check = {"name": "unavailable", "ok": False, "detail": error}
        return StepResult(
            "audit", False, None, seconds, False, {"entry": "audit", "ok": False, "checks": [check]}, error
        )
    failing = [{"name": b.short_path, "ok": False, "detail": b.detail} for b in result.failures]
    summary = {
        "name": "kernels",
        "ok": result.ok,
        "detail": f"{len(result.binaries)} binaries with device code checked against sm_{result.sm}",
    }
    payload = {"entry": "audit", "ok": result.ok, "checks": [summary, *failing]}
    return StepResult("audit", result.ok, None, round(result.seconds, 2), False, payload, None)


def _losses(run: Mapping[str, Any]) -> list[Any]:
    return list(run.get("losses") or [])


def image_row(result: SmokeResult) -> dict[str, Any]:
    """One image's entry in smoke.json."""
    plan = result.plan
    smoke = result.step("smoke")
    payload = (smoke.payload if smoke else None) or {}
    device = payload.get("device") or {
        "type": "cuda" if plan.gpu else "cpu",
        "name": plan.gpu_name,
        "sm": None,
    }
    runs = []
    for run in payload.get("runs") or []:
        losses = _losses(run)
        runs.append(
            {
                "model": run.get("model"),
                "tokens_per_s": run.get("tokens_per_s"),
                "step_time_s": run.get("step_time_s"),
                "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None,
                "losses": losses,
                "peak_mem_bytes": run.get("peak_mem_bytes"),
                "peak_mem_kind": run.get("peak_mem_kind"),
            }
        )
    failures = result.failures
    return {
        "image": plan.name,
        "ref": plan.ref,
        "image_id": result.image_id,
        "target": plan.target,
        "ok": result.ok,
        "failed_check": failures[0] if failures else None,
        "failed_checks": failures,
        "step": "gpu" if plan.gpu else "cpu",
        "note": plan.note or None,
        "device": {"kind": "gpu" if device.get("type") == "cuda" else "cpu", **device},
        "dtype": payload.get("dtype"),
        "attention": payload.get("attn_implementation"),
        "image_dtype": plan.dtype,
        "image_attention": plan.attn,
        "wall_s": round(result.wall_s, 2),
        "cached": dict(result.cached) if result.cached else None,
        "checks": [
            {"step": s.step, "name": c.get("name"), "ok": c.get("ok"), "detail": c.get("detail")}
            for s in result.steps
            for c in s.checks
        ],
        "runs": runs,
        "world_size": payload.get("world_size"),
        "backend": payload.get("backend"),
        "launcher": payload.get("launcher"),
        "deepspeed": payload.get("deepspeed"),
        # Per rank: rank, device, step_time_s (median), first_step_s, total_step_s, tokens_per_s,
        # peak_mem_bytes; with several models, the last model's (the runtime keeps them per run).
        "ranks": _ranks(payload),
        "import_to_first_step_s": payload.get("import_to_first_step_s"),
        "steps": {
            s.step: {
                "ok": s.ok,
                "exit_code": s.exit_code,
                "seconds": s.seconds,
                "timed_out": s.timed_out,
                "failed_check": (s.payload or {}).get("failed_check"),
                "error": s.error,
                "log": s.log,
            }
            for s in result.steps
        },
    }


def _ranks(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each rank's timings per model: [{model, rank, device, step_time_s, ...}]."""
    out = []
    for run in payload.get("runs") or []:
        for rank in run.get("ranks") or []:
            out.append({"model": run.get("model"), **rank})
    return out


def fmt_ranks(row: Mapping[str, Any]) -> str:
    """`2 x gloo (torchrun, zero2): r0 0.41s r1 0.43s` — world size, backend, per-rank step time."""
    world = row.get("world_size")
    if not world:
        return "-"
    how = ", ".join(str(x) for x in (row.get("launcher"), _ds_name(row.get("deepspeed"))) if x)
    head = f"{world} x {row.get('backend') or 'single'}" + (f" ({how})" if how else "")
    models = sorted({r["model"] for r in row.get("ranks") or []}, key=str)
    parts = []
    for model in models:
        times = " ".join(
            f"r{r['rank']} {_num(r.get('step_time_s'), '.2f')}s" for r in row["ranks"] if r["model"] == model
        )
        parts.append(f"{model}: {times}" if len(models) > 1 else times)
    return head + (": " + "; ".join(parts) if parts else "")


def _ds_name(value: Any) -> str | None:
    if isinstance(value, Mapping):
        stage = value.get("stage")
        return f"zero{stage}" if stage is not None else "deepspeed"
    return str(value) if value else None


def report_json(results: Sequence[SmokeResult], meta: Mapping[str, Any]) -> dict[str, Any]:
    return {**meta, "ok": all(r.ok for r in results), "images": [image_row(r) for r in results]}


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else str(value)


def fmt_losses(run: Mapping[str, Any]) -> str:
    first, last = run.get("loss_first"), run.get("loss_last")
    if first is None:
        return "-"
    return f"{_num(first, '.3f')}→{_num(last, '.3f')}"


def fmt_device(row: Mapping[str, Any]) -> str:
    device = row["device"]
    name = device.get("name") or ""
    return f"{device['kind']} ({name})" if name else str(device["kind"])


def _per_model(row: Mapping[str, Any], fmt: Callable[[Mapping[str, Any]], str], sep: str = "; ") -> str:
    return sep.join(f"{r['model']} {fmt(r)}" for r in row["runs"]) or "-"


def fmt_tokens(run: Mapping[str, Any]) -> str:
    value = run.get("tokens_per_s")
    return "-" if value is None else f"{_num(value, '.0f')}"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Mapping[str, Any]) -> str:
    """Pure: smoke.md, one table row per image, then each image's checks."""
    host = report.get("host") or {}
    gpus = host.get("gpus") or []
    lines = [
        "# Smoke report",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(report.get('started') or 0))}; "
        f"Docker {report.get('engine')}; host GPUs: "
        + (", ".join(f"{g['name']} (sm_{g['sm']})" for g in gpus) or "none"),
        "",
        "| image | result | device | ranks | dtype | attention | tokens/s | loss first→last | wall "
        "| failed check | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["images"]:
        cells = [
            f"`{row['ref']}`",
            "pass" if row["ok"] else "**FAIL**",
            fmt_device(row),
            fmt_ranks(row),
            row["dtype"] or "-",
            row["attention"] or "-",
            _per_model(row, fmt_tokens),
            _per_model(row, fmt_losses),
            f"{row['wall_s']:.1f} s",
            ", ".join(row["failed_checks"]) or "-",
            row["note"] or "",
        ]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    for row in report["images"]:
        lines += ["", f"## {row['image']}", ""]
        for c in row["checks"]:
            mark = "ok" if c["ok"] else "**FAILED**"
            lines.append(f"- {c['step']}:{c['name']}: {mark} ({_md(c['detail'])})")
        for name, step in row["steps"].items():
            if step["error"]:
                lines.append(f"- {name}: **{_md(step['error'])}** (log: {step['log']})")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the verdict cache


def host_key(gpus: Sequence[GpuInfo], sm_of: Callable[[GpuInfo], int | None]) -> list[str]:
    """What about this host can change a verdict: CPU architecture, each GPU, its SM and driver."""
    return [platform.machine(), *(f"{g.name}|sm_{sm_of(g)}|{g.driver}" for g in gpus)]


def verdict_key(
    image_id: str, runtime_digest: str, plan: ImagePlan, options: Options, audit: bool, host: Sequence[str]
) -> str:
    """The hash of everything a smoke verdict depends on (not the timeout: a pass is a pass)."""
    fields = {
        "image_id": image_id,
        "runtime": runtime_digest,
        "step": {
            "gpu": plan.gpu,
            "gpu_name": plan.gpu_name,
            "env": dict(plan.env),
            "flags": plan.smoke_flags,
        },
        "args": {
            "steps": options.steps,
            "model": str(options.model.resolve()) if options.model else None,
            "model_stamp": _model_stamp(options.model),
            "env": dict(options.env),
            "audit": audit and plan.sm is not None,
            "nproc": options.nproc,
            "deepspeed": options.deepspeed,
        },
        "host": list(host),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _model_stamp(model: Path | None) -> str | None:
    if model is None:
        return None
    from builder.memo import tree_stamp

    return tree_stamp(model) if model.is_dir() else None


@dataclass(frozen=True)
class VerdictCache:
    """Passing verdicts under build/cache/verdicts/<key>.json. Failures are never stored, so a
    failed image always runs again; writes are atomic, so concurrent runs can share the folder."""

    folder: Path

    def get(self, key: str, plan: ImagePlan, image_id: str) -> SmokeResult | None:
        try:
            data = json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))
            steps = tuple(StepResult(**step) for step in data["steps"])
            cached = {"at": str(data["at"]), "host": str(data["host"]), "key": key[:12]}
            result = SmokeResult(plan, image_id, steps, float(data["wall_s"]), cached)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return result if result.ok else None

    def put(self, key: str, result: SmokeResult) -> None:
        if not result.ok:
            return
        data = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": socket.gethostname(),
            "image": result.plan.name,
            "image_id": result.image_id,
            "wall_s": round(result.wall_s, 2),
            "steps": [asdict(step) for step in result.steps],
        }
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key[:12]}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
            Path(tmp).replace(self.folder / f"{key}.json")
        except OSError:
            pass  # a read-only build/ only costs the next run its speed


# ----------------------------------------------------------------------------- running


def _write_log(folder: Path, plan: ImagePlan, step: str, argv: Sequence[str], run: ContainerRun) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{plan.name}.{step}.log"
    path.write_text(
        f"$ {plan.ref} {' '.join(argv)}\n# exit {run.exit_code}, {run.seconds:.1f} s"
        f"{', timed out' if run.timed_out else ''}\n--- stderr\n{run.stderr}\n--- stdout\n{run.stdout}"
    )
    return path


Listener = Callable[[ImagePlan, str, StepResult | None], None]


def run(
    engine: SmokeEngine,
    plans: Sequence[ImagePlan],
    options: Options,
    *,
    logs: Path,
    labels: Mapping[str, str],
    on_step: Listener = lambda plan, step, result: None,
    auditor: Callable[[ImagePlan], StepResult] | None = None,
    verdicts: VerdictCache | None = None,
    keys: Mapping[str, str] | None = None,
) -> list[SmokeResult]:
    """Contract, smoke, then (GPU images) the kernel audit; one image's failure never stops the others.

    With `verdicts` and `keys` (image name -> verdict key), an image whose key has a stored pass
    is not run again (unless options.rerun); each new pass is stored.
    """
    volumes = {str(options.model.resolve()): contract.MODEL_MOUNT} if options.model is not None else {}
    results = []
    for plan in plans:
        key = (keys or {}).get(plan.name)
        if verdicts is not None and key is not None and not options.rerun:
            hit = verdicts.get(key, plan, engine.image_id(plan.ref) or "")
            if hit is not None:
                on_step(plan, "cached", None)
                results.append(hit)
                continue
        start = time.monotonic()
        steps: list[StepResult] = []
        for step, argv, env, mounts in (
            ("contract", contract_argv(), dict(options.env), {}),
            ("smoke", smoke_argv(plan, options), {**plan.env, **options.env}, volumes),
        ):
            on_step(plan, step, None)
            outcome = engine.run_container(
                plan.ref,
                argv,
                timeout=options.timeout,
                gpus=plan.gpu,
                env=env,
                volumes=mounts,
                labels=labels,
            )
            log = _write_log(logs, plan, step, argv, outcome)
            judged = judge(step, outcome, options.timeout)
            judged = StepResult(**{**judged.__dict__, "log": str(log)})
            steps.append(judged)
            on_step(plan, step, judged)
        if auditor is not None and plan.sm is not None:
            on_step(plan, "audit", None)
            audited = auditor(plan)
            steps.append(audited)
            on_step(plan, "audit", audited)
        result = SmokeResult(plan, engine.image_id(plan.ref), tuple(steps), time.monotonic() - start)
        if verdicts is not None and key is not None:
            verdicts.put(key, result)
        results.append(result)
    return results


def write_reports(project: Project, report: Mapping[str, Any]) -> tuple[Path, Path]:
    folder = project.reports
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "smoke.json", folder / "smoke.md"
    for path, text in ((json_path, json.dumps(report, indent=2) + "\n"), (md_path, render_markdown(report))):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return json_path, md_path


def failure_message(results: Sequence[SmokeResult]) -> str:
    failed = [r for r in results if not r.ok]
    detail = "; ".join(f"{r.plan.name} ({', '.join(r.failures)})" for r in failed)
    return f"{len(failed)} of {len(results)} images failed smoke: {detail}; logs in build/logs/smoke/"


# ----------------------------------------------------------------------------- the stage

StepListener = Callable[["ImagePlan", str, "StepResult | None"], None]


def execute(
    project: Project,
    kb: Knowledge,
    config: MatrixConfig,
    cells: Sequence[Cell],
    options: Options,
    *,
    docker: str,
    audit_options: AuditOptions | None,
    on_step: StepListener,
) -> tuple[list[SmokeResult], dict[str, Any]]:
    """check built -> probe GPUs -> plan -> run (contract, smoke, audit) -> report.

    Ctrl-C removes the running container; the caller turns it into one line.
    """
    from builder import doctor, hostprobe
    from builder.content import tree_digest
    from builder.engine import CommandLog, DockerEngine, SnapshotEngine
    from builder.uptodate import local_images

    def docker_engine() -> DockerEngine:
        made = DockerEngine(docker, CommandLog(project.logs / "commands.sh"))
        made.check()
        return made

    snapshot = local_images(c.local_ref for c in cells)
    engine: DockerEngine | SnapshotEngine = (
        docker_engine() if snapshot is None else SnapshotEngine(snapshot, docker_engine)
    )
    engine_version = engine.check()
    check_built(engine, cells)
    probe = hostprobe.probe_gpus(hostprobe.system_runner, hostprobe.import_pynvml)

    def sm_of(gpu: GpuInfo) -> int | None:
        return gpu.sm if gpu.sm is not None else doctor.sm_for_name(kb, config, gpu.name)

    plans = [plan_image(c, probe.gpus, cpu_only=options.cpu_only, sm_of=sm_of) for c in cells]
    started = time.time()
    labels = {contract.SMOKE_RUN: uuid.uuid4().hex[:12], contract.SMOKE_PROJECT: str(project.root)}
    auditor = None
    if audit_options is not None:
        audit_opts = audit_options

        def auditor(plan: ImagePlan) -> StepResult:
            from builder import audit
            from builder.errors import FatalError

            start = time.monotonic()
            try:
                result = audit.audit_image(
                    engine,
                    plan.ref,
                    name=plan.name,
                    cache_dir=project.build / "cache" / "audit",
                    wheelhouse=audit_opts.wheelhouse,
                    cuobjdump=audit_opts.cuobjdump,
                )
            except FatalError as exc:
                return audit_step(None, exc.message, time.monotonic() - start)
            return audit_step(result)

    host = host_key(probe.gpus, sm_of)
    runtime = tree_digest(project.runtime)
    keys = {
        p.name: verdict_key(image_id, runtime, p, options, audit_options is not None, host)
        for p in plans
        if (image_id := engine.image_id(p.ref)) is not None
    }
    results = run(
        engine,
        plans,
        options,
        logs=project.logs / "smoke",
        labels=labels,
        on_step=on_step,
        auditor=auditor,
        verdicts=VerdictCache(project.build / "cache" / "verdicts"),
        keys=keys,
    )
    meta = {
        "command": "smoke",
        "started": started,
        "seconds": round(time.time() - started, 2),
        "engine": engine_version,
        "host": {
            "gpu_probe": probe.source,
            "gpu_problem": probe.problem,
            "gpus": [{"index": g.index, "name": g.name, "sm": sm_of(g)} for g in probe.gpus],
        },
        "options": {
            "steps": options.steps,
            "timeout": options.timeout,
            "model": str(options.model) if options.model else None,
            "cpu_only": options.cpu_only,
            "rerun": options.rerun,
            "env": dict(options.env),
        },
    }
    return results, report_json(results, meta)


def raise_for_failures(results: Sequence[SmokeResult]) -> None:
    if any(not r.ok for r in results):
        raise SmokeFailed(failure_message(results))
