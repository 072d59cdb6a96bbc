"""`compare`: the same training steps once per dtype x method, and how far the curves drift.

The advice for older GPUs, as a command: try the training flow on a small batch, compare loss
curves across precisions before trusting fp16, weigh full fine-tuning against LoRA by memory and
speed. Four stages, each testable alone:

* planning (`choose_hardware`, `plan_combinations`, pure): which device the steps run on and
  which combinations it cannot run (skipped, with the reason), from the host's GPUs (hostprobe)
  and the image's labels;
* running (`run_all`): one runtime `smoke` process per combination, in a container of
  the image or (`--native`) on this host's python, through an `Executor`. One process each so
  that a process-wide peak (CPU RSS) is per combination, and a crash or NaN in one leaves the
  others untouched; the price is one interpreter start (a few seconds) per combination;
* interpreting (`interpret`, pure): the runtime's JSON line into a `CombinationResult`;
* reporting (`relative_deviation`, `report_json`, `render_markdown`, pure): the JSON and
  Markdown under build/reports/; the chart is `builder.chart`, an optional extra.

Every combination gets the same seed, so the runtime builds the same initial weights and the
same batches (its `smoke` seeds model init and data); with LoRA the B matrices start at zero,
so fp32 LoRA and fp32 full start from the same model and the same first loss: the report
checks that.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from packaging.version import InvalidVersion, Version

from builder import contract
from builder.engine import ContainerEngine, ContainerRun, parse_json_lines
from builder.errors import ConfigError, SmokeFailed

if TYPE_CHECKING:
    from builder.config import MatrixConfig
    from builder.hostprobe import GpuInfo
    from builder.knowledge import Knowledge
    from builder.project import Project
    from builder.resolve import Cell

DTYPES = ("fp32", "fp16", "bf16")
METHODS = ("lora", "full")
ATTNS = ("auto", "sdpa", "flash_attention_2")
TINY_MODELS = ("qwen2-tiny", "qwen3-tiny")
DEFAULT_STEPS = 20
DEFAULT_TIMEOUT_S = 1800.0
# The runtime's own defaults give fp16 a lower LR on a real checkpoint (1e-4, QwenLM/Qwen3#670);
# a comparison needs one LR for every dtype, so compare passes the runtime's train default.
# The tiny models need no flag: the runtime's tiny LR depends on the method only.
MODEL_LR = 2e-4

# The verdict threshold: the largest relative gap, at any step, between a half-precision loss
# curve and the fp32 curve of the same method. Rounding alone stays far below it (bf16 keeps
# 8 mantissa bits, ~0.4 % per value, and autocast keeps reductions and the loss in fp32: on
# the tiny model, bf16 and fp16 stay within 0.1 % of fp32 over 20 steps). What it is there to
# catch moves the curve by tens of percent within a few dozen steps: gradients that underflow
# without loss scaling, half-precision master weights that round small updates away, overflow.
# 5 % leaves a wide margin above rounding and is well below those.
DEVIATION_LIMIT = 0.05

# CPU autocast: bf16 since torch 1.10; fp16 since 2.2 (pytorch/pytorch#112484), and the
# runtime's fp16 path also needs torch.amp.GradScaler("cpu"), new in 2.3.
CPU_AUTOCAST_MIN_TORCH = {"bf16": "1.10", "fp16": "2.3"}


# ----------------------------------------------------------------------------- input


def parse_choices(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """'fp32, bf16' -> ('fp32', 'bf16'); unknown or empty is a one-line ConfigError."""
    chosen: list[str] = []
    for raw in text.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        if item not in allowed:
            close = difflib.get_close_matches(item, list(allowed), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown {what} '{raw.strip()}'{hint} (expected: {', '.join(allowed)})")
        if item not in chosen:
            chosen.append(item)
    if not chosen:
        raise ConfigError(f"no {what} given (expected a comma-separated list of {', '.join(allowed)})")
    return tuple(chosen)


def safe_name(text: str) -> str:
    """A file-name-safe report name: 'ghcr.io/acme/qwen-ft:v100-fp16' -> 'qwen-ft-v100-fp16'."""
    last = text.rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-") or "image"


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Subject:
    """What is compared: an image (its labels) or, with --native, a matrix cell."""

    name: str  # report name: build/reports/compare-<name>.*
    image: str | None  # docker reference; None with --native
    sm: int | None  # the image's target SM; None for the cpu image
    attn: str  # the attention the image trains with
    flash_attn: bool  # flash-attn is in the image
    torch: str | None  # the image's torch release


def subject_from_labels(ref: str, labels: Mapping[str, str], name: str | None = None) -> Subject:
    if contract.TARGET not in labels:
        raise ConfigError(
            f"{ref} has no {contract.LABEL_PREFIX}.* labels: not an image built by qwen-ft-images"
        )
    sm_text = labels.get(contract.SM, "none")
    return Subject(
        name=name or safe_name(labels.get(contract.ALIAS) or ref),
        image=ref,
        sm=None if sm_text in ("none", "") else int(sm_text),
        attn=labels.get(contract.ATTN, "sdpa"),
        flash_attn=labels.get(contract.FLASH_ATTN, "none") != "none",
        torch=labels.get(contract.TORCH),
    )


@dataclass(frozen=True)
class Hardware:
    """Where the steps run."""

    device: str  # cuda | cpu
    name: str  # "Tesla V100-SXM2-16GB" or "CPU (x86_64)"
    sm: int | None  # the GPU's SM; None on the CPU
    torch: str | None  # torch release that runs the steps
    flash_attn: bool  # flash-attn importable there
    note: str = ""  # why this device
    env: Mapping[str, str] = field(default_factory=dict)  # extra ENV for each run

    def describe(self) -> str:
        where = self.name if self.sm is None else f"{self.name} (sm_{self.sm})"
        torch = f", torch {self.torch}" if self.torch else ""
        return where + torch


def choose_hardware(
    subject: Subject,
    gpus: Sequence[GpuInfo],
    *,
    requested: str,
    native: bool,
    sm_of: Callable[[GpuInfo], int | None],
    cpu_name: str,
    host_torch: str | None = None,
    host_flash_attn: bool = False,
) -> Hardware:
    """Pure: the GPU when the host has one that runs the image's kernels, else the CPU.

    `requested` is --device: auto, cuda or cpu. With --native the host's torch runs the steps,
    so any host GPU will do; in a container, a GPU image needs a GPU its SM runs on, and the cpu
    image's torch has no CUDA. A GPU image on the CPU gets its SM ENV unset, so the runtime does
    not fail its device check; compare passes --dtype/--attn, so the image's half-precision
    defaults do not apply.
    """
    torch = host_torch if native else subject.torch
    flash = host_flash_attn if native else subject.flash_attn

    def cpu(note: str) -> Hardware:
        env = {contract.ENV_VARS["sm"]: ""} if not native and subject.sm is not None else {}
        return Hardware("cpu", cpu_name, None, torch, False, note, env)

    if requested == "cpu":
        return cpu("--device cpu")
    if native:
        candidates = list(gpus)
    elif subject.sm is None:
        if requested == "cuda":
            raise ConfigError(f"{subject.image} is the cpu image (CPU-only torch); --device cuda needs GPUs")
        return cpu("cpu image")
    else:
        image_sm = subject.sm
        candidates = [g for g in gpus if contract.runs_on(image_sm, sm_of(g))]
    if candidates:
        gpu = candidates[0]
        env: dict[str, str] = {}
        if len(candidates) < len(gpus):  # a mixed host: pin the GPU that fits (nvidia-smi order)
            env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(gpu.index)}
        note = f"GPU {gpu.index}" + (f" of {len(gpus)}" if len(gpus) > 1 else "")
        return Hardware("cuda", gpu.name, sm_of(gpu), torch, flash, note, env)
    seen = ", ".join(sorted({f"{g.name} sm_{sm_of(g)}" for g in gpus}))
    why = f"no GPU here runs sm_{subject.sm} code ({seen})" if gpus else "no GPU on this host"
    if requested == "cuda":
        raise ConfigError(f"--device cuda: {why}; `qwen-ft-images doctor` names the image for this host")
    return cpu(why)


@dataclass(frozen=True)
class Combination:
    dtype: str
    method: str
    attn: str
    skip: str | None = None  # why it cannot run here; None: it runs

    @property
    def label(self) -> str:
        return f"{self.dtype}/{self.method}"


def _older(version: str | None, minimum: str) -> bool:
    if not version:
        return False
    try:
        return Version(version.split("+", 1)[0]) < Version(minimum)
    except InvalidVersion:
        return False


def dtype_problem(dtype: str, hw: Hardware) -> str | None:
    if hw.device == "cuda" and dtype == "bf16" and (hw.sm is None or hw.sm < 80):
        sm = "an unknown SM" if hw.sm is None else f"sm_{hw.sm}"
        return f"bf16 needs SM>=80 (no bf16 tensor cores before Ampere); {hw.name} is {sm}"
    minimum = CPU_AUTOCAST_MIN_TORCH.get(dtype)
    if hw.device == "cpu" and minimum is not None and _older(hw.torch, minimum):
        return f"{dtype} autocast on the CPU needs torch>={minimum}; this is torch {hw.torch}"
    return None


def attn_problem(attn: str, dtype: str, hw: Hardware) -> str | None:
    if attn != "flash_attention_2":
        return None
    if hw.device != "cuda":
        return "flash_attention_2 needs a CUDA GPU"
    if hw.sm is None or hw.sm < 80:
        return f"flash_attention_2 needs SM>=80; {hw.name} is sm_{hw.sm}"
    if not hw.flash_attn:
        return "flash_attention_2 needs flash-attn, which is absent here"
    if dtype == "fp32":
        return "flash_attention_2 needs fp16 or bf16 compute"
    return None


def plan_combinations(
    dtypes: Sequence[str], methods: Sequence[str], attn: str, image_attn: str, hw: Hardware
) -> list[Combination]:
    """Pure: every method x dtype, each with its attention and, if it cannot run here, why.

    `attn` auto: the image's attention where the combination can use it, else sdpa (fp32, the
    CPU and pre-Ampere GPUs cannot run flash_attention_2). An explicit attention that a
    combination cannot use skips it.
    """
    out: list[Combination] = []
    for method in methods:
        for dtype in dtypes:
            if attn == "auto":
                chosen = image_attn if attn_problem(image_attn, dtype, hw) is None else "sdpa"
                skip = dtype_problem(dtype, hw)
            else:
                chosen = attn
                skip = dtype_problem(dtype, hw) or attn_problem(attn, dtype, hw)
            out.append(Combination(dtype, method, chosen, skip))
    return out


@dataclass(frozen=True)
class Options:
    steps: int = DEFAULT_STEPS
    seed: int = 0
    lr: float | None = None
    model: Path | None = None  # a host path; None: the tiny model
    tiny: str = TINY_MODELS[0]
    timeout: float = DEFAULT_TIMEOUT_S

    @property
    def model_name(self) -> str:
        return str(self.model) if self.model is not None else self.tiny

    @property
    def run_lr(self) -> float | None:
        if self.lr is not None:
            return self.lr
        return MODEL_LR if self.model is not None else None


def runtime_args(combo: Combination, options: Options, hw: Hardware, model_arg: str | None) -> list[str]:
    """The runtime command line (after the program) for one combination."""
    args = ["smoke", "--dtype", combo.dtype, "--method", combo.method, "--attn", combo.attn]
    args += ["--steps", str(options.steps), "--seed", str(options.seed), "--device", hw.device]
    args += ["--model", model_arg] if model_arg is not None else ["--tiny", options.tiny]
    lr = options.run_lr
    if lr is not None:
        args += ["--lr", repr(lr)]
    return args


# ----------------------------------------------------------------------------- running


class Executor(Protocol):
    """Runs the runtime once: in a container of the image, or on this host's python."""

    def model_arg(self, host_path: Path) -> str: ...
    def run(self, args: Sequence[str], env: Mapping[str, str], timeout: float) -> ContainerRun: ...


@dataclass
class DockerExecutor:
    engine: ContainerEngine
    image: str
    gpus: bool
    model: Path | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def model_arg(self, host_path: Path) -> str:
        return contract.MODEL_MOUNT

    def run(self, args: Sequence[str], env: Mapping[str, str], timeout: float) -> ContainerRun:
        volumes = {str(self.model.resolve()): contract.MODEL_MOUNT} if self.model is not None else None
        return self.engine.run_container(
            self.image,
            contract.runtime_argv(*args),
            timeout=timeout,
            gpus=self.gpus,
            env=env,
            volumes=volumes,
            labels=self.labels,
        )


@dataclass
class NativeExecutor:
    """`python -m qwen_ft_runtime` with this interpreter; the project's runtime/ first on the path."""

    runtime_dir: Path | None = None
    python: str = sys.executable

    def model_arg(self, host_path: Path) -> str:
        return str(host_path.resolve())

    def run(self, args: Sequence[str], env: Mapping[str, str], timeout: float) -> ContainerRun:
        child = {k: v for k, v in os.environ.items() if k not in contract.ENV_VARS.values()}
        child.update(env)
        if self.runtime_dir is not None and (self.runtime_dir / contract.MODULE).is_dir():
            paths = [str(self.runtime_dir), *filter(None, [child.get("PYTHONPATH")])]
            child["PYTHONPATH"] = os.pathsep.join(paths)
        start = time.monotonic()
        try:
            done = subprocess.run(
                [self.python, "-m", contract.MODULE, *args],
                capture_output=True,
                text=True,
                env=child,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
            return ContainerRun(None, out, err, time.monotonic() - start, timed_out=True)
        return ContainerRun(done.returncode, done.stdout, done.stderr, time.monotonic() - start)


# ----------------------------------------------------------------------------- interpreting


@dataclass
class CombinationResult:
    dtype: str
    method: str
    attn: str
    status: str  # ok | skipped | failed
    reason: str | None = None
    losses: list[float] = field(default_factory=list)
    nan_step: int | None = None  # 1-based step whose loss was not finite
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    peak_mem_bytes: int | None = None
    peak_mem_kind: str | None = None
    train_state_bytes: int | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    lr: float | None = None
    weight_dtype: str | None = None
    loss_scale: float | None = None
    skipped_steps: list[int] = field(default_factory=list)
    seconds: float | None = None  # wall time of the whole process or container
    log: str | None = None

    @property
    def label(self) -> str:
        return f"{self.dtype}/{self.method}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_NONFINITE_STEP = re.compile(r"\bat step (\d+)\b")
_USAGE_PREFIX = re.compile(rf"^{re.escape(contract.ENTRY_POINT)} \w+: error: ")


def skipped(combo: Combination) -> CombinationResult:
    return CombinationResult(combo.dtype, combo.method, combo.attn, "skipped", combo.skip)


def usage_message(stderr: str, model: Path | None = None) -> str:
    """The runtime's one-line usage error, with the container's model path put back as the host's."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    text = _USAGE_PREFIX.sub("", lines[-1]) if lines else "the runtime rejected its arguments"
    if model is not None:
        text = re.sub(rf"{re.escape(contract.MODEL_MOUNT)}(?=[/\s:),']|$)", str(model), text)
    return text


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _integer(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def interpret(combo: Combination, run: ContainerRun, model: Path | None = None) -> CombinationResult:
    """Pure: one runtime `smoke` run into a result.

    Exit 2 is bad input (e.g. `--model` is not a Qwen checkpoint): the same for every
    combination, so it stops the comparison as a ConfigError carrying the runtime's message. A
    non-finite loss fails the combination naming its step; a loss that did not decrease is
    still a curve to compare (ok, with the note); any other failed check fails it.
    """
    result = CombinationResult(combo.dtype, combo.method, combo.attn, "failed", seconds=round(run.seconds, 2))
    if run.timed_out:
        result.reason = f"timed out after {run.seconds:.0f} s"
        return result
    if run.exit_code == 2:
        raise ConfigError(usage_message(run.stderr, model))
    payloads = [p for p in parse_json_lines(run.stdout) if p.get("entry") == "smoke"]
    if not payloads:
        last = _last_line(run.stderr)
        result.reason = f"runtime exited {run.exit_code} without a report" + (f": {last}" if last else "")
        return result
    payload = payloads[-1]
    runs = payload.get("runs") or []
    entry: Mapping[str, Any] = runs[0] if runs and isinstance(runs[0], dict) else {}
    losses = entry.get("losses") or []
    result.losses = [float(x) for x in losses if isinstance(x, (int, float)) and math.isfinite(x)]
    result.step_time_s = _number(entry.get("step_time_s"))
    result.tokens_per_s = _number(entry.get("tokens_per_s"))
    result.peak_mem_bytes = _integer(entry.get("peak_mem_bytes"))
    result.peak_mem_kind = entry.get("peak_mem_kind")
    result.train_state_bytes = _integer(entry.get("train_state_bytes"))
    result.trainable_params = _integer(entry.get("trainable_params"))
    result.total_params = _integer(entry.get("total_params"))
    result.lr = _number(entry.get("lr"))
    result.weight_dtype = entry.get("weight_dtype")
    result.loss_scale = _number(entry.get("loss_scale"))
    result.skipped_steps = [int(s) for s in entry.get("skipped_steps") or []]
    failing = [c for c in payload.get("checks") or [] if isinstance(c, dict) and not c.get("ok")]
    hard = [c for c in failing if not str(c.get("name", "")).endswith(":loss_decreases")]
    if hard:
        check = hard[0]
        name, detail = str(check.get("name", "")), str(check.get("detail", ""))
        if name.endswith(":finite_loss"):
            step = _NONFINITE_STEP.search(detail)
            result.nan_step = int(step.group(1)) if step else None
            result.reason = detail
        else:
            result.reason = f"{name}: {detail}"
        return result
    if not result.losses:
        result.reason = f"runtime exited {run.exit_code} with no losses"
        return result
    result.status = "ok"
    if failing:
        result.reason = f"loss did not decrease ({failing[0].get('detail', '')})"
    return result


# ----------------------------------------------------------------------------- reporting


def relative_deviation(losses: Sequence[float], reference: Sequence[float]) -> tuple[float, int] | None:
    """max over steps of |l - l_ref| / |l_ref|, and the 1-based step where it is largest.

    Compared over the steps both curves have; None when they share none. A zero reference
    loss counts as no deviation if the other loss is zero too, else as infinite.
    """
    worst: tuple[float, int] | None = None
    for step, (value, ref) in enumerate(zip(losses, reference, strict=False), start=1):
        gap = abs(value - ref) / abs(ref) if ref != 0 else (0.0 if value == 0 else math.inf)
        if worst is None or gap > worst[0]:
            worst = (gap, step)
    return worst


def verdict(deviation: float | None, limit: float = DEVIATION_LIMIT) -> str:
    if deviation is None:
        return "n/a"
    return "within" if deviation <= limit else "exceeds"


def _reference(results: Sequence[CombinationResult], method: str) -> CombinationResult | None:
    return next((r for r in results if r.method == method and r.dtype == "fp32" and r.status == "ok"), None)


def deviations(results: Sequence[CombinationResult]) -> list[dict[str, Any]]:
    """Per result: its deviation from the fp32 curve of the same method, and the verdict."""
    out: list[dict[str, Any]] = []
    for r in results:
        ref = _reference(results, r.method)
        row: dict[str, Any] = {"max_rel_deviation": None, "deviation_step": None, "verdict": "n/a"}
        if r.status != "ok":
            row["verdict"] = r.status
        elif r.dtype == "fp32":
            row["verdict"] = "reference"
        elif ref is None:
            row["verdict"] = "no fp32 reference"
        else:
            found = relative_deviation(r.losses, ref.losses)
            if found is not None:
                row.update(max_rel_deviation=found[0], deviation_step=found[1], verdict=verdict(found[0]))
        out.append(row)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def full_vs_lora(results: Sequence[CombinationResult]) -> list[dict[str, Any]]:
    """Per dtype where both ran: full fine-tuning's figures divided by LoRA's."""
    out = []
    ran = {(r.dtype, r.method): r for r in results if r.status == "ok"}
    for dtype in dict.fromkeys(r.dtype for r in results):
        full, lora = ran.get((dtype, "full")), ran.get((dtype, "lora"))
        if full is None or lora is None:
            continue
        out.append(
            {
                "dtype": dtype,
                "trainable_params": _ratio(full.trainable_params, lora.trainable_params),
                "train_state_bytes": _ratio(full.train_state_bytes, lora.train_state_bytes),
                "peak_mem_bytes": _ratio(full.peak_mem_bytes, lora.peak_mem_bytes),
                "peak_mem_kind": full.peak_mem_kind,
                "tokens_per_s": _ratio(full.tokens_per_s, lora.tokens_per_s),
                "step_time_s": _ratio(full.step_time_s, lora.step_time_s),
            }
        )
    return out


def same_start(results: Sequence[CombinationResult]) -> dict[str, Any] | None:
    """fp32 LoRA and fp32 full must share their first loss: the same seed builds the same model
    and batch, and LoRA's zero-initialised B leaves that model's output unchanged."""
    lora = next((r for r in results if r.label == "fp32/lora" and r.losses), None)
    full = next((r for r in results if r.label == "fp32/full" and r.losses), None)
    if lora is None or full is None:
        return None
    ok = lora.losses[0] == full.losses[0]
    return {"ok": ok, "lora": lora.losses[0], "full": full.losses[0]}


def report_json(meta: Mapping[str, Any], results: Sequence[CombinationResult]) -> dict[str, Any]:
    combos = [{**r.as_dict(), **d} for r, d in zip(results, deviations(results), strict=True)]
    return {
        "command": "compare",
        **meta,
        "deviation_limit": DEVIATION_LIMIT,
        "combinations": combos,
        "full_vs_lora": full_vs_lora(results),
        "same_start": same_start(results),
    }


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def _pct(value: Any) -> str:
    return "-" if value is None else ("inf" if math.isinf(value) else f"{value * 100:.2f} %")


def _times(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


MEM_KIND_TEXT = {
    "cuda_max_memory_allocated": "peak CUDA memory (torch.cuda.max_memory_allocated)",
    "process_max_rss": "process peak RSS (ru_maxrss: the whole process, torch included)",
}


def render_markdown(report: Mapping[str, Any], chart: str | None) -> str:
    combos: list[dict[str, Any]] = report["combinations"]
    limit = report["deviation_limit"]
    hw = report["hardware"]
    where = f"Image `{report['image']}`" if report.get("image") else "This host's python (`--native`)"
    note = f" ({hw['note']})" if hw.get("note") else ""
    lines = [
        f"# compare: {report['name']}",
        "",
        f"{where} on {hw['description']}{note}. "
        f"Model {report['model']}, {report['steps']} steps, seed {report['seed']}: the same data and "
        "initial weights for every combination, one runtime process each.",
        "",
    ]
    if chart:
        lines += [f"![loss curves, memory and speed]({chart})", ""]
    lines += [
        "| dtype | method | attn | status | loss first → last | max deviation from fp32 | verdict "
        "| step time | tokens/s | peak memory | train state | trainable params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in combos:
        losses = c["losses"]
        curve = f"{losses[0]:.4f} → {losses[-1]:.4f}" if losses else "-"
        dev = _pct(c["max_rel_deviation"])
        if c["deviation_step"] is not None:
            dev += f" (step {c['deviation_step']})"
        status = c["status"] if c["nan_step"] is None else f"failed: NaN at step {c['nan_step']}"
        lines.append(
            f"| {c['dtype']} | {c['method']} | {c['attn']} | {status} | {curve} | {dev} | {c['verdict']} "
            f"| {_fmt(c['step_time_s'], '.4f')} s | {_fmt(c['tokens_per_s'], ',.0f')} "
            f"| {_mib(c['peak_mem_bytes'])} | {_mib(c['train_state_bytes'])} "
            f"| {_fmt(c['trainable_params'], ',d')} |"
        )
    kinds = sorted({c["peak_mem_kind"] for c in combos if c["peak_mem_kind"]})
    lines += [
        "",
        f"**Verdict.** A curve is *within* when, at every step, its loss is within {limit:.0%} of the "
        "fp32 loss of the same method: max over steps of |l - l_fp32| / |l_fp32| ≤ "
        f"{limit:g}. Rounding stays far below that (bf16 and fp16 keep fp32 reductions and loss "
        "under autocast); underflowing gradients, half-precision master weights or overflow move "
        "a curve by tens of percent, or to NaN, within a few dozen steps. *exceeds* means: do not "
        "trust that precision for this model before finding out why.",
        "",
        "**Memory.** *train state* is weights + gradients + optimizer state, counted from the "
        "tensors (exact on any device). *peak memory* is "
        + "; ".join(MEM_KIND_TEXT.get(k, k) for k in kinds)
        + (
            ". On the CPU that peak is mostly torch itself: compare full and LoRA by the train state there."
            if "process_max_rss" in kinds
            else "."
        ),
    ]
    ratios: list[dict[str, Any]] = report["full_vs_lora"]
    if ratios:
        lines += [
            "",
            "## Full fine-tuning vs LoRA",
            "",
            "Full's figure divided by LoRA's, same dtype (above 1: full needs more, or is faster).",
            "",
            "| dtype | trainable params | train state | peak memory | tokens/s | step time |",
            "|---|---|---|---|---|---|",
        ]
        for r in ratios:
            lines.append(
                f"| {r['dtype']} | {_times(r['trainable_params'])} | {_times(r['train_state_bytes'])} "
                f"| {_times(r['peak_mem_bytes'])} | {_times(r['tokens_per_s'])} "
                f"| {_times(r['step_time_s'])} |"
            )
    start = report.get("same_start")
    if start is not None:
        state = "ok" if start["ok"] else "MISMATCH"
        lines += [
            "",
            f"**Same start: {state}.** fp32 LoRA begins at {start['lora']:.6f}, fp32 full at "
            f"{start['full']:.6f}; they must agree, since the same seed builds the same model and "
            "batch and LoRA's B matrices start at zero.",
        ]
    skipped_rows = [c for c in combos if c["status"] == "skipped"]
    failed_rows = [c for c in combos if c["status"] == "failed"]
    noted = [c for c in combos if c["status"] == "ok" and c["reason"]]
    for title, rows in (("Skipped", skipped_rows), ("Failed", failed_rows), ("Notes", noted)):
        if rows:
            lines += ["", f"## {title}", ""]
            for c in rows:
                log = f" (log: `{c['log']}`)" if c.get("log") and c["status"] == "failed" else ""
                lines.append(f"- {c['dtype']}/{c['method']}: {c['reason']}{log}")
    return "\n".join(lines) + "\n"


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """A few plain lines for the terminal."""
    out = []
    for c in report["combinations"]:
        head = f"{c['dtype']:>4} {c['method']:<4} {c['status']:<7}"
        if c["status"] == "ok":
            losses = c["losses"]
            dev = _pct(c["max_rel_deviation"]) if c["max_rel_deviation"] is not None else c["verdict"]
            out.append(
                f"{head} loss {losses[0]:.4f} → {losses[-1]:.4f}  vs fp32 {dev:<9} "
                f"{_fmt(c['tokens_per_s'], ',.0f')} tok/s  state {_mib(c['train_state_bytes'])}  "
                f"peak {_mib(c['peak_mem_bytes'])}"
            )
        else:
            out.append(f"{head} {c['reason']}")
    return out


# ----------------------------------------------------------------------------- helpers


def sm_resolver(kb: Knowledge, cfg: MatrixConfig | None) -> Any:
    def sm_of(gpu: GpuInfo) -> int | None:
        if gpu.sm is not None:
            return gpu.sm
        if cfg is not None:
            from builder.doctor import sm_for_name

            return sm_for_name(kb, cfg, gpu.name)
        known = kb.gpu_by_name(gpu.name)
        return None if known is None else known.sm

    return sm_of


def native_subject(cell: Cell) -> Subject:
    return Subject(
        name=cell.id,
        image=None,
        sm=cell.sm,
        attn=cell.plan.attn_implementation,
        flash_attn=cell.plan.flash_attn.version is not None,
        torch=cell.plan.torch.version,
    )


def check_model(path: Path) -> None:
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


def host_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def json_safe(value: Any) -> Any:
    # JSON has no Infinity/NaN; strict parsers (jq, browsers) reject Python's extension.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


# ----------------------------------------------------------------------------- the stage


def locate(
    project: Project,
    name: str,
    cell: Cell | None,
    *,
    native: bool,
    docker: str,
    model: Path | None,
    run_id: str,
) -> tuple[Subject, Executor]:
    """What to compare (a matrix image, any image built by this tool, or --native) and how to run it."""
    if native:
        if cell is None:
            raise ConfigError(
                f"'{name}' is no target, alias or image id in {project.matrix}; "
                "--native takes one of those (an image reference needs Docker)"
            )
        if host_version("torch") is None or importlib.util.find_spec("transformers") is None:
            raise ConfigError(
                "--native needs torch, transformers and peft here: pip install 'qwen-ft-images[smoke]'"
            )
        return native_subject(cell), NativeExecutor(runtime_dir=project.runtime)
    from builder.engine import CommandLog, DockerEngine

    engine = DockerEngine(docker, CommandLog(project.logs / "commands.sh"))
    ref = cell.plan.tags[0] if cell is not None else name
    labels = engine.image_labels(ref)
    if labels is None:
        if cell is not None:
            raise ConfigError(f"image {ref} not built; run qwen-ft-images build {cell.id}")
        raise ConfigError(
            f"'{name}' is neither a target, alias or image id in {project.matrix} nor a local image"
        )
    subject = subject_from_labels(ref, labels, name=cell.id if cell is not None else None)
    executor = DockerExecutor(
        engine,
        ref,
        gpus=False,
        model=model,
        labels={contract.COMPARE_PROJECT: str(project.root), contract.COMPARE_RUN: run_id},
    )
    return subject, executor


def run_all(
    combos: Sequence[Combination],
    executor: Executor,
    options: Options,
    hw: Hardware,
    log_dir: Path,
    root: Path,
    say: Callable[[str], None],
) -> list[CombinationResult]:
    """One run per combination (skipped ones are recorded as such), each with its own log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    results: list[CombinationResult] = []
    for combo in combos:
        if combo.skip is not None:
            results.append(skipped(combo))
            continue
        model_arg = executor.model_arg(options.model) if options.model is not None else None
        args = runtime_args(combo, options, hw, model_arg)
        say(f"  [{len(results) + 1}/{len(combos)}] {combo.label} ({combo.attn}) ...")
        run = executor.run(args, hw.env, options.timeout)
        log = log_dir / f"{combo.dtype}-{combo.method}.log"
        log.write_text(
            f"$ {' '.join(contract.runtime_argv(*args))}\n# exit {run.exit_code}, {run.seconds:.1f} s\n"
            f"{run.stderr}\n# stdout\n{run.stdout}",
            encoding="utf-8",
        )
        result = interpret(combo, run, options.model)
        result.log = str(log.relative_to(root))
        results.append(result)
        shown = (
            f"ok, loss {result.losses[0]:.4f} → {result.losses[-1]:.4f}"
            if result.status == "ok"
            else f"{result.status}: {result.reason}"
        )
        say(f"      {shown} ({run.seconds:.1f} s)")
    return results


def write_outputs(project: Project, data: dict[str, Any], name: str) -> list[Path]:
    """build/reports/compare-<name>.json, .md and (with matplotlib) .png."""
    from builder import chart

    reports = project.reports
    reports.mkdir(parents=True, exist_ok=True)
    stem = f"compare-{name}"
    png = reports / f"{stem}.png"
    drawn = None
    if chart.available():
        drawn = chart.plot(data, png)
    else:
        png.unlink(missing_ok=True)  # a stale chart must not sit beside a new report
    data["chart"] = str(png.relative_to(project.root)) if drawn else None
    json_path = reports / f"{stem}.json"
    json_path.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    md_path = reports / f"{stem}.md"
    md_path.write_text(render_markdown(data, png.name if drawn else None), encoding="utf-8")
    return [json_path, md_path, *([png] if drawn else [])]


def raise_for_failures(name: str, results: Sequence[CombinationResult], runnable: int, report: str) -> None:
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise SmokeFailed(
            f"compare {name}: {len(failed)} of {runnable} runs failed: "
            + "; ".join(f"{r.label}: {r.reason}" for r in failed)
            + f" (report {report})"
        )
