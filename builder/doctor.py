"""`doctor`: which image this machine (or another one) should run, and why a run failed.

Three stages, each testable alone:

* probing (`builder.hostprobe`): GPUs, driver, CPU architecture, Docker and the NVIDIA
  container runtime, through NVML or `nvidia-smi` and an injectable command runner;
* advice (`advise`): pure; maps each GPU to a matrix target by the binary-compatibility
  rule, checks the driver against the image's minimum and proposes another cell when
  the recommended image needs a newer driver;
* diagnosis (`diagnose`): pure; matches a log against builder/knowledge/signatures.yaml.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from packaging.version import Version

from builder import contract, resolve
from builder.config import MatrixConfig, TargetConfig
from builder.contract import qualify
from builder.errors import ConfigError, KnowledgeError
from builder.hostprobe import (
    GpuInfo,
    HostInfo,
    Runner,
    driver_version,
    parse_compute_cap,
    probe_host,
)
from builder.knowledge import Knowledge
from builder.knowledge import platforms as platform_facts
from builder.knowledge.platforms import AARCH64
from builder.knowledge.signatures import Signature, load_signatures
from builder.resolve import Cell, Resolution, Space, finish

SMOKE = " ".join(contract.runtime_argv("smoke"))


# ----------------------------------------------------------------------------- input parsing


def parse_driver(text: str) -> str:
    """Validate `--assume-driver`; a CUDA version given by mistake gets its own hint."""
    v = driver_version(text)
    if v is None:
        raise ConfigError(
            f"--assume-driver {text!r} is not an NVIDIA driver version "
            "(expected e.g. 535.104.05, as nvidia-smi's 'Driver Version' shows)"
        )
    if v.major < 300:
        raise ConfigError(
            f"--assume-driver {text!r} looks like a CUDA version; give the driver version "
            "(e.g. 535.104.05; nvidia-smi prints both)"
        )
    return text.strip()


def _name_matches(pattern: str, name: str) -> bool:
    # Word-ish match so 'A10' does not take 'A100' (same rule as Knowledge.gpu_by_name).
    return re.search(rf"(?<![A-Z0-9]){re.escape(pattern.upper())}(?!\d)", name.upper()) is not None


def sm_for_name(kb: Knowledge, config: MatrixConfig, name: str) -> int | None:
    """The SM of a GPU name: gpus.yaml first, then the `gpus:` lists of matrix.yaml targets."""
    gpu = kb.gpu_by_name(name)
    if gpu is not None:
        return gpu.sm
    best: tuple[int, int] | None = None
    for target in config.targets.values():
        for pattern in target.gpus:
            longer = best is None or len(pattern) > best[0]
            if target.sm is not None and longer and _name_matches(pattern, name):
                best = (len(pattern), target.sm)
    return best[1] if best else None


def known_gpu_names(kb: Knowledge, config: MatrixConfig) -> list[str]:
    names = {g.name for g in kb.gpus} | {n for t in config.targets.values() for n in t.gpus}
    return sorted(names, key=str.lower)


def parse_assumed_gpu(
    kb: Knowledge, config: MatrixConfig, text: str, index: int, driver: str | None
) -> GpuInfo:
    """`--assume-gpu` takes a GPU name ("V100", "A10G") or an SM ("sm_70", "70", "8.6")."""
    spec = text.strip()
    m = re.fullmatch(r"(?i)(?:sm_?)?(\d{2,3})", spec)
    if m:
        return GpuInfo(index, f"sm_{m.group(1)}", int(m.group(1)), driver)
    cc = parse_compute_cap(spec)
    if cc is not None:
        return GpuInfo(index, f"sm_{cc}", cc, driver)
    sm = sm_for_name(kb, config, spec)
    if sm is None:
        raise ConfigError(
            f"--assume-gpu {spec!r} is neither a known GPU nor an SM (e.g. sm_70, 8.6); "
            f"known GPUs: {', '.join(known_gpu_names(kb, config))}"
        )
    return GpuInfo(index, spec, sm, driver)


# ----------------------------------------------------------------------------- advice


@dataclass(frozen=True)
class Choice:
    """An image for a GPU: built (in the resolution) or a cell to add to matrix.yaml."""

    cell: Cell
    tag: str  # registry-qualified, the alias tag when the image has one
    min_driver: str | None
    min_driver_reason: str
    built: bool

    @property
    def image(self) -> str:
        return self.cell.id

    def explain_command(self) -> str:
        s = self.cell.spec
        return (
            f"qwen-ft-images explain {s.target} --cuda {s.cuda} --torch {s.torch} "
            f"--python {s.python} --flash-attn {s.flash_attn}"
        )

    def include_line(self) -> str:
        s = self.cell.spec
        return (
            f'{{target: {s.target}, cuda: "{s.cuda}", torch: "{s.torch}", '
            f'python: "{s.python}", flash_attn: "{s.flash_attn}"}}'
        )


@dataclass(frozen=True)
class GpuAdvice:
    gpu: GpuInfo
    target: str | None
    mapping: str  # how the GPU was mapped to its target
    image: Choice | None  # the target's recommended (or best selected) image
    driver_ok: bool | None  # None: driver unknown
    fallback: Choice | None
    run_command: str | None
    usable: bool
    notes: tuple[str, ...] = ()
    tag: str | None = None  # the image this GPU should run (the fallback when the driver needs one)


@dataclass(frozen=True)
class TrainCommand:
    """One `docker run` that trains across the GPUs that run the same image."""

    gpus: tuple[int, ...]
    tag: str
    command: str


@dataclass(frozen=True)
class Report:
    host: HostInfo
    gpus: tuple[GpuAdvice, ...]
    cpu: Choice | None
    cpu_run_command: str | None
    diagnoses: tuple[Diagnosis, ...] = ()
    notes: tuple[str, ...] = field(default=())
    build: str | None = None  # the build path (builder.engine.describe_build_path); None: no docker
    train: tuple[TrainCommand, ...] = ()

    @property
    def ok(self) -> bool:
        return all(g.usable for g in self.gpus)


def run_command(tag: str, device: int | None, platform_name: str = "linux/amd64") -> str:
    # No NVIDIA_DISABLE_REQUIRE here: the images set it, since their floor is their min-driver label.
    gpus = f"--gpus '\"device={device}\"' " if device is not None else ""
    # The tag is a manifest list; naming the platform makes a wrong host refuse instead of emulate.
    on = f"--platform {platform_name} " if platform_name != "linux/amd64" else ""
    return f"docker run {gpus}{on}--rm -it {tag} {SMOKE}"


def target_for_sm(config: MatrixConfig, sm: int, name: str = "") -> tuple[TargetConfig | None, str]:
    """Exact SM first; else the highest target of the same major with a lower minor.

    NVIDIA's rule: a cubin for sm_XY runs on any GPU with major X and minor >= Y, so an
    sm_89 GPU runs sm_86 (or sm_80) code, but sm_90 code needs a sm_90 build.
    """
    gpu_targets = [t for t in config.targets.values() if t.sm is not None]
    exact = [t for t in gpu_targets if t.sm == sm]
    if exact:
        named = [t for t in exact if any(_name_matches(p, name) for p in t.gpus)]
        return (named or exact)[0], f"sm_{sm} = target {(named or exact)[0].name}"
    compatible = [t for t in gpu_targets if t.sm is not None and t.sm != sm and contract.runs_on(t.sm, sm)]
    if compatible:
        best = max(compatible, key=lambda t: t.sm or 0)
        return best, (
            f"no sm_{sm} target; sm_{best.sm} code runs on sm_{sm} (same major, lower minor: "
            "NVIDIA binary compatibility)"
        )
    return None, f"no target in matrix.yaml runs on sm_{sm} (binary compatibility needs the same major)"


def _driver_fits(driver: str | None, needed: str | None) -> bool | None:
    if needed is None:
        return True
    if driver is None:
        return None
    have = driver_version(driver)
    return None if have is None else have >= Version(needed)


def _on_gpu(kb: Knowledge, config: MatrixConfig, target: TargetConfig, cell: Cell, sm: int) -> Cell | None:
    """The cell re-checked for the GPU's own SM (its min driver can differ), or None if invalid."""
    if cell.sm == sm:
        return cell
    try:
        again = resolve.check(kb, replace(target, sm=sm), cell.spec, dtype=cell.dtype, origin="doctor")
    except KnowledgeError:
        return None
    return again if isinstance(again, Cell) else None


def min_driver(cell: Cell) -> tuple[str | None, str]:
    return cell.plan.min_driver, cell.plan.min_driver_reason


def _choice(kb: Knowledge, config: MatrixConfig, cell: Cell, on_gpu: Cell, built: bool) -> Choice:
    need, why = min_driver(on_gpu)
    return Choice(
        cell=cell,
        tag=qualify(cell.plan.tags[0], config.registry),
        min_driver=need,
        min_driver_reason=why,
        built=built,
    )


def _search_space(kb: Knowledge, target: TargetConfig) -> list[Space]:
    """Tier 0: the target's own torch/python/flash-attn axes; tier 1: everything known.

    CUDA always ranges over every known variant, since the CUDA variant is what sets the
    driver floor (e.g. a cu126 or cu118 cell for an older driver).
    """
    known = resolve.known_space(kb, target)
    own = Space(known.cuda, target.axes.torch, target.axes.python, target.axes.flash_attn)
    return [own, known]


def find_fallback(
    kb: Knowledge,
    config: MatrixConfig,
    resolution_cells: Sequence[Cell],
    target: TargetConfig,
    sm: int,
    driver: str,
) -> tuple[Choice | None, str | None]:
    """The best cell for `target` that runs on sm_`sm` with `driver`, and the lowest driver any needs.

    Built images of the target come first; otherwise the resolver's search looks through
    the cells around the target's axes, with "this driver is new enough" as its predicate.
    """
    lowest: list[Version] = []

    def fits(cell: Cell) -> bool:
        need, _ = min_driver(cell)
        if need:
            lowest.append(Version(need))
        return bool(_driver_fits(driver, need))

    built = [c for c in resolution_cells if c.spec.target == target.name]
    on_gpu = {c.spec.key(): g for c in built if (g := _on_gpu(kb, config, target, c, sm)) is not None}
    pick = resolve.best(
        kb, [c for c in built if c.spec.key() in on_gpu], lambda c: fits(on_gpu[c.spec.key()])
    )
    if pick is not None:
        return _choice(kb, config, pick, on_gpu[pick.spec.key()], built=True), None
    gpu_target = replace(target, sm=sm, recommended=None)
    for space in _search_space(kb, target):
        found = resolve.search(kb, gpu_target, space.specs(target.name), accept=fits, origin="doctor")
        if found is not None:
            # Tags and labels for the target's real SM, as `explain` would print them.
            planned = resolve.check(kb, target, found.spec, origin="doctor")
            shown = finish(
                planned if isinstance(planned, Cell) else found, image=config.image, recommended=False
            )
            return _choice(kb, config, shown, found, built=False), None
    return None, str(min(lowest)) if lowest else None


def host_platform(cpu_arch: str) -> str | None:
    """The OCI platform of a host from its `uname -m` (x86_64 -> linux/amd64, aarch64 -> linux/arm64)."""
    found = platform_facts.load().by_machine(cpu_arch)
    return found.name if found else None


def parse_arch(text: str) -> str:
    """`--assume-arch`: aarch64 or x86_64 (arm64/amd64 are accepted as their aliases)."""
    found = platform_facts.load().by_machine(text.strip())
    if found is None:
        machines = ", ".join(p.machine for p in platform_facts.load().platforms.values())
        raise ConfigError(f"--assume-arch {text!r} is not a CPU architecture; use one of {machines}")
    return found.machine


def advise_gpu(
    kb: Knowledge,
    config: MatrixConfig,
    cells: Sequence[Cell],
    gpu: GpuInfo,
    platform_name: str = "linux/amd64",
) -> GpuAdvice:
    notes: list[str] = []
    sm = gpu.sm
    if sm is None:
        sm = sm_for_name(kb, config, gpu.name)
        if sm is None:
            return GpuAdvice(
                gpu, None, f"unknown GPU {gpu.name!r} and no compute capability reported", None, None,
                None, None, usable=False,
                notes=("pass --assume-gpu SM (e.g. --assume-gpu 8.6) to plan for it",),
            )  # fmt: skip
        notes.append(f"compute capability not reported; sm_{sm} from the name {gpu.name!r}")
    elif kb.gpu_by_name(gpu.name) is None and not gpu.name.startswith("sm_"):
        notes.append(f"{gpu.name!r} is not in gpus.yaml; mapped by its reported sm_{sm}")
    target, mapping = target_for_sm(config, sm, gpu.name)
    if target is None:
        known = next((g.name for g in kb.gpus if g.sm == sm), None)
        name = re.sub(r"[^a-z0-9]", "", known.lower()) if known else f"sm{sm}"
        hint = (
            f"to build for it, add `{name}: {{sm: {sm}}}` under targets: in matrix.yaml "
            f"and check it with `qwen-ft-images explain {name}`"
        )
        return GpuAdvice(
            gpu, None, mapping, None, None, None, None, usable=False, notes=(*notes, mapping, hint)
        )
    facts = platform_facts.load()
    grace = next((h for p in facts.platforms.values() for h in p.hosts if _name_matches(h, gpu.name)), None)
    if grace is not None and platform_name != facts.platform(AARCH64).name:
        notes.append(
            f"{grace} is a Grace (aarch64) host, but the CPU here is {platform_name}: the "
            f"{platform_name} image cannot run on it, and an arm64 image runs on this host only under "
            "emulation, where CUDA does not work; run the docker line below on the Grace host itself "
            "(or plan for it with --assume-arch aarch64)"
        )
    mine = [c for c in cells if c.spec.target == target.name]
    if not mine:
        return GpuAdvice(
            gpu, target.name, mapping, None, None, None, None, usable=False,
            notes=(*notes, f"no selected image for target {target.name}"),
        )  # fmt: skip
    here = [c for c in mine if platform_name in c.platforms]
    if not here:
        return GpuAdvice(
            gpu, target.name, mapping, None, None, None, None, usable=False,
            notes=(
                *notes,
                f"target {target.name} has no {platform_name} image: its images are "
                f"{', '.join(sorted({p for c in mine for p in c.platforms}))}; add {platform_name} to "
                f"targets.{target.name}.axes.platform and check it with "
                f"`qwen-ft-images explain {target.name} --platform {platform_name}`",
            ),
        )  # fmt: skip
    mine = here
    # The recommended image unless the selectors left only pinned ones.
    usable_cells = [(c, _on_gpu(kb, config, target, c, sm)) for c in mine]
    runnable = [(c, g) for c, g in usable_cells if g is not None]
    if not runnable:
        return GpuAdvice(
            gpu, target.name, mapping, None, None, None, None, usable=False,
            notes=(*notes, f"none of target {target.name}'s images is valid on sm_{sm}"),
        )  # fmt: skip
    first, first_on_gpu = next(((c, g) for c, g in runnable if c.recommended), runnable[0])
    image = _choice(kb, config, first, first_on_gpu, built=True)
    driver_ok = _driver_fits(gpu.driver, image.min_driver)
    fallback: Choice | None = None
    use = image
    usable = True
    if driver_ok is None:
        notes.append(
            f"driver unknown: {image.tag} needs >= {image.min_driver}; pass --assume-driver to check"
        )
    elif not driver_ok:
        assert gpu.driver is not None
        fallback, lowest = find_fallback(kb, config, mine, target, sm, gpu.driver)
        notes.append(
            f"{image.tag} needs driver >= {image.min_driver} ({image.min_driver_reason}); "
            f"this host has {gpu.driver}"
        )
        if fallback is None:
            usable = False
            if lowest:
                notes.append(f"no known cell runs on driver {gpu.driver}: upgrade the driver to >= {lowest}")
            else:
                notes.append(f"no known cell runs on driver {gpu.driver}: upgrade the driver")
        else:
            use = fallback
            if not fallback.built:
                notes.append(
                    f"{fallback.tag} is not built yet: add {fallback.include_line()} to matrix.yaml "
                    f"include:, check it with `{fallback.explain_command()}`, then build it"
                )
    return GpuAdvice(
        gpu=gpu,
        target=target.name,
        mapping=mapping,
        image=image,
        driver_ok=driver_ok,
        fallback=fallback,
        run_command=run_command(use.tag, gpu.index, platform_name),
        usable=usable,
        notes=tuple(notes),
        tag=use.tag if usable else None,
    )


def train_command(kb: Knowledge, tag: str, gpus: Sequence[int] | None) -> str:
    """The complete `docker run` for a LoRA fine-tune on `gpus` (None: every GPU of the host).

    Every rank is a process in one container (torchrun, `--nproc all`), so the container needs
    the IPC and ulimit flags of builder/knowledge/deepspeed.yaml container_run; the model and
    data are mounted read-only and the output as the calling user (any UID runs the images).
    """
    devices = "all" if gpus is None else "'\"device=" + ",".join(str(g) for g in gpus) + "\"'"
    flags = " ".join(f.flag for f in kb.deepspeed.run_flags)
    return (
        f'docker run --gpus {devices} {flags} --user "$(id -u):0" --rm -it '
        f'-v "$MODEL_DIR":{contract.MODEL_MOUNT}:ro -v "$DATA_DIR":{contract.DATA_MOUNT}:ro '
        f'-v "$OUTPUT_DIR":{contract.OUTPUT_MOUNT} {tag} '
        + " ".join(
            contract.runtime_argv(
                "train",
                "--model",
                contract.MODEL_MOUNT,
                "--data",
                f"{contract.DATA_MOUNT}/train.jsonl",
                "--output",
                contract.OUTPUT_MOUNT,
                "--nproc",
                "all",
                "--deepspeed",
                "zero2",
            )
        )
    )


def train_commands(kb: Knowledge, host_gpus: int, gpus: Sequence[GpuAdvice]) -> tuple[TrainCommand, ...]:
    """One training line per image: GPUs of different targets cannot share one container's ranks."""
    by_tag: dict[str, list[int]] = {}
    for g in gpus:
        if g.usable and g.tag is not None:
            by_tag.setdefault(g.tag, []).append(g.gpu.index)
    return tuple(
        TrainCommand(tuple(ids), tag, train_command(kb, tag, None if len(ids) == host_gpus else ids))
        for tag, ids in by_tag.items()
    )


def advise(
    kb: Knowledge,
    resolution: Resolution,
    cells: Sequence[Cell],
    host: HostInfo,
    diagnoses: Sequence[Diagnosis] = (),
) -> Report:
    config = resolution.config
    notes: list[str] = []
    on = host_platform(host.cpu_arch)
    if on is None:
        notes.append(f"this CPU is {host.cpu_arch}: no image is built for it; pass --assume-arch to plan")
        on = "linux/amd64"
    gpus = tuple(advise_gpu(kb, config, cells, g, on) for g in host.gpus)
    cpus = [c for c in cells if c.sm is None and on in c.platforms]
    cpu_cell = next((c for c in cpus if c.recommended), None) or next(iter(cpus), None)
    cpu = _choice(kb, config, cpu_cell, cpu_cell, built=True) if cpu_cell else None
    if host.gpus and host.source != "assumed" and host.nvidia_runtime is None and host.docker is not None:
        notes.append(
            "NVIDIA Container Toolkit not found: `docker run --gpus` will fail with 'could not select "
            "device driver'; install nvidia-container-toolkit and run `nvidia-ctk runtime configure`"
        )
    return Report(
        host=host,
        gpus=gpus,
        cpu=cpu,
        cpu_run_command=run_command(cpu.tag, None, on) if cpu else None,
        diagnoses=tuple(diagnoses),
        notes=tuple(notes),
        train=train_commands(kb, len(host.gpus), gpus),
    )


# ----------------------------------------------------------------------------- log signatures


@dataclass(frozen=True)
class Diagnosis:
    signature: Signature
    line: int  # 1-based
    excerpt: str
    groups: Mapping[str, str]
    images: tuple[str, ...]  # tags of the matrix's images that avoid the failure
    notes: tuple[str, ...] = ()


def _matches_filter(cell: Cell, rules: Mapping[str, Any]) -> bool:
    plan = cell.plan
    sm = cell.sm
    checks: dict[str, Callable[[Any], bool]] = {
        "sm_below": lambda v: sm is not None and sm < int(v),
        "sm_at_least": lambda v: sm is not None and sm >= int(v),
        "attn_implementation": lambda v: plan.attn_implementation == v,
        "triton": lambda v: plan.triton == v,
        "dtype": lambda v: plan.dtype == v,
        "recommended": lambda v: cell.recommended == bool(v),
        "cpu": lambda v: (sm is None) == bool(v),
    }
    return all(checks[k](v) for k, v in rules.items())


def diagnose(
    text: str,
    kb: Knowledge,
    config: MatrixConfig,
    cells: Sequence[Cell],
    signatures: Iterable[Signature] | None = None,
) -> list[Diagnosis]:
    """Every known signature found in `text`, in the order they first appear."""
    lines = text.splitlines()
    found: list[Diagnosis] = []
    for sig in signatures if signatures is not None else load_signatures():
        hit = _first_hit(sig, lines)
        if hit is None or not all(any(p.search(line) for line in lines) for p in sig.requires):
            continue
        number, line, match = hit
        groups = {k: v for k, v in match.groupdict().items() if v is not None}
        # dict: one alias can be the tag of several platforms' images
        images = tuple(
            dict.fromkeys(
                qualify(c.plan.tags[0], config.registry)
                for c in cells
                if c.plan is not None and sig.images and _matches_filter(c, sig.images)
            )
        )
        found.append(
            Diagnosis(
                sig,
                number,
                line.strip()[:300],
                groups,
                images,
                tuple(_group_notes(kb, config, cells, groups)),
            )
        )
    superseded = {i for d in found for i in d.signature.supersedes}
    return sorted((d for d in found if d.signature.id not in superseded), key=lambda d: d.line)


def _first_hit(sig: Signature, lines: Sequence[str]) -> tuple[int, str, re.Match[str]] | None:
    for number, line in enumerate(lines, 1):
        for pattern in sig.patterns:
            m = pattern.search(line)
            if m:
                return number, line, m
    return None


def _group_notes(
    kb: Knowledge, config: MatrixConfig, cells: Sequence[Cell], groups: Mapping[str, str]
) -> list[str]:
    """What the captured values mean for this matrix (the GPU's image, the driver a CUDA needs)."""
    notes = []
    if "sm" in groups:
        sm = int(groups["sm"])
        target, _ = target_for_sm(config, sm)
        cell = next((c for c in cells if target and c.spec.target == target.name and c.recommended), None)
        if cell is not None and cell.plan is not None:
            notes.append(f"the log names sm_{sm}: use {qualify(cell.plan.tags[0], config.registry)}")
        else:
            notes.append(f"the log names sm_{sm}: no selected image serves it")
    if "cuda" in groups and groups["cuda"] in kb.cuda:
        cuda = kb.cuda[groups["cuda"]]
        notes.append(f"CUDA {cuda.cuda} needs driver >= {cuda.toolkit_driver} for that check ({cuda.source})")
    if "found" in groups and groups["found"].isdigit():
        found = int(groups["found"])
        notes.append(
            f"found version {found} = a driver for CUDA {found // 1000}.{found % 1000 // 10} at most"
        )
    return notes


# ----------------------------------------------------------------------------- output


def choice_json(choice: Choice | None) -> dict[str, Any] | None:
    if choice is None:
        return None
    s = choice.cell.spec
    return {
        "image": choice.image,
        "tag": choice.tag,
        "min_driver": choice.min_driver,
        "built": choice.built,
        "cell": {
            "cuda": s.cuda,
            "torch": s.torch,
            "python": s.python,
            "flash_attn": s.flash_attn,
            "dtype": choice.cell.dtype,
        },
        "explain": choice.explain_command(),
    }


def report_json(report: Report) -> dict[str, Any]:
    """The `doctor --json` object, documented in docs/doctor.md. Keep field names stable."""
    h = report.host
    return {
        "schema": 1,
        "ok": report.ok,
        "host": {
            "cpu_arch": h.cpu_arch,
            "docker": h.docker,
            "nvidia_runtime": h.nvidia_runtime,
            "build": report.build,
            "driver": h.driver,
            "source": h.source,
            "problem": h.problem,
            "notes": [*h.notes, *report.notes],
        },
        "gpus": [
            {
                "index": g.gpu.index,
                "name": g.gpu.name,
                "sm": g.gpu.sm,
                "memory_mib": g.gpu.memory_mib,
                "driver": g.gpu.driver,
                "target": g.target,
                "mapping": g.mapping,
                "image": g.image.image if g.image else None,
                "tag": g.image.tag if g.image else None,
                "driver_ok": g.driver_ok,
                "needs_driver": g.image.min_driver if g.image else None,
                "fallback": choice_json(g.fallback),
                "run_command": g.run_command,
                "usable": g.usable,
                "notes": list(g.notes),
            }
            for g in report.gpus
        ],
        "train": [{"gpus": list(t.gpus), "tag": t.tag, "command": t.command} for t in report.train],
        "cpu": (
            {"image": report.cpu.image, "tag": report.cpu.tag, "run_command": report.cpu_run_command}
            if report.cpu
            else None
        ),
        "diagnoses": [
            {
                "id": d.signature.id,
                "title": d.signature.title,
                "line": d.line,
                "excerpt": d.excerpt,
                "cause": d.signature.cause,
                "fix": d.signature.fix,
                "source": d.signature.source,
                "images": list(d.images),
                "notes": list(d.notes),
            }
            for d in report.diagnoses
        ],
    }


def render_text(report: Report, *, log_name: str | None = None) -> str:
    h = report.host
    out: list[str] = []
    runtime = h.nvidia_runtime or "not found"
    out.append(
        f"host     {h.cpu_arch}, docker {h.docker or 'not available'}, NVIDIA container runtime: {runtime}"
    )
    if report.build is not None:
        out.append(f"build    {report.build}")
    if h.source == "none":
        out.append(f"GPUs     none found: {h.problem}")
    else:
        out.append(f"GPUs     {len(h.gpus)} ({h.source}), driver {h.driver or 'unknown'}")
    for note in (*h.notes, *report.notes):
        out.append(f"  note: {note}")
    for g in report.gpus:
        sm = f"sm_{g.gpu.sm}" if g.gpu.sm is not None else "sm unknown"
        label = g.gpu.name if g.gpu.name == sm else f"{g.gpu.name} ({sm})"
        out.append("")
        out.append(f"GPU {g.gpu.index}    {label} -> {g.target or 'no target'}")
        if g.target:
            out.append(f"  mapping  {g.mapping}")
        if g.image is not None:
            status = {True: "ok", False: "TOO OLD", None: "unknown"}[g.driver_ok]
            out.append(f"  image    {g.image.tag} (needs driver >= {g.image.min_driver}; driver {status})")
        if g.fallback is not None:
            built = "built" if g.fallback.built else "not built yet"
            out.append(f"  instead  {g.fallback.tag} (needs driver >= {g.fallback.min_driver}; {built})")
            out.append(f"  check    {g.fallback.explain_command()}")
        for note in g.notes:
            out.append(f"  note: {note}")
        if g.run_command:
            out.append(f"  run      {g.run_command}")
    for t in report.train:
        out.append("")
        which = f"GPUs {','.join(str(g) for g in t.gpus)}" if len(t.gpus) > 1 else f"GPU {t.gpus[0]}"
        out.append(f"train    LoRA across {which} ({len(t.gpus)} ranks, DeepSpeed ZeRO-2) with {t.tag}:")
        out.append(f"  run      {t.command}")
        out.append(
            "  mounts   MODEL_DIR (checkpoint, read-only), DATA_DIR (train.jsonl, read-only), "
            "OUTPUT_DIR (adapter)"
        )
    out.append("")
    if report.cpu is not None:
        lead = "CPU      " if report.gpus else "CPU      no GPU here; this machine can run "
        out.append(f"{lead}{report.cpu.tag}")
        out.append(f"  run      {report.cpu_run_command}")
    if not report.gpus:
        out.append(
            "  plan for a GPU machine: qwen-ft-images doctor --assume-gpu T4 --assume-driver 535.104.05"
        )
    for d in report.diagnoses:
        out.append("")
        where = f"{log_name}:{d.line}" if log_name else f"line {d.line}"
        out.append(f"diagnosis [{d.signature.id}] {d.signature.title}")
        out.append(f"  at       {where}: {d.excerpt}")
        out.append(f"  cause    {d.signature.cause}")
        out.append(f"  fix      {d.signature.fix}")
        if d.images:
            out.append(f"  images   {', '.join(d.images)}")
        for note in d.notes:
            out.append(f"  note: {note}")
        out.append(f"  source   {d.signature.source}")
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------- entry point


# Failures are at the end of a log; a bigger file is read from its last MAX_LOG_BYTES.
MAX_LOG_BYTES = 16 * 1024 * 1024
_BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe", "utf-16-le"),  # PowerShell's `>` and Out-File write this
    (b"\xfe\xff", "utf-16-be"),
)


def read_log(path: Path, limit: int = MAX_LOG_BYTES) -> str:
    """The text of a regular log file, at most its last `limit` bytes, decoded by its BOM.

    Devices, FIFOs and folders are refused before reading: /dev/zero would never end and
    a FIFO without a writer would block forever.
    """
    import stat

    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ConfigError(f"--log {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--log {path}: is a directory, not a log file") from None
    except OSError as exc:
        raise ConfigError(f"--log {path}: cannot read: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = (
            "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        )
        raise ConfigError(f"--log {path}: is {kind}; pass a saved log file")
    with os.fdopen(fd, "rb") as f:
        head = f.read(4)
        size = os.fstat(fd).st_size
        encoding = next((enc for bom, enc in _BOMS if head.startswith(bom)), "utf-8")
        bom = next((len(b) for b, enc in _BOMS if head.startswith(b)), 0)
        start = max(bom, size - limit)
        if encoding.startswith(("utf-16", "utf-32")):
            unit = 2 if encoding.startswith("utf-16") else 4
            start += -(start - bom) % unit  # stay on a code-unit boundary
        f.seek(start)
        data = f.read(limit)
    return data.decode(encoding, errors="replace")


def run(
    kb: Knowledge,
    resolution: Resolution,
    cells: Sequence[Cell],
    *,
    assume_gpus: Sequence[str] = (),
    assume_driver: str | None = None,
    assume_arch: str | None = None,
    log_text: str | None = None,
    runner: Runner | None = None,
    nvml_loader: Callable[[], Any] | None = None,
    which: Callable[[str], str | None] | None = None,
    machine: Callable[[], str] | None = None,
) -> Report:
    """Probe (or assume) the host, advise per GPU, and diagnose the log if one is given.

    The probes default to the real machine, looked up at call time so tests can
    replace `builder.hostprobe.system_runner` and `import_pynvml`.
    """
    from builder import hostprobe

    config = resolution.config
    driver = parse_driver(assume_driver) if assume_driver is not None else None
    assumed = [parse_assumed_gpu(kb, config, text, i, driver) for i, text in enumerate(assume_gpus)]
    host = probe_host(
        runner or hostprobe.system_runner,
        nvml_loader=nvml_loader or hostprobe.import_pynvml,
        which=which or shutil.which,
        machine=machine or platform.machine,
        probe_gpu=not assumed,
    )
    if assume_arch is not None:
        arch = parse_arch(assume_arch)
        if arch != host.cpu_arch:
            note = (
                f"CPU architecture assumed {arch} (this host is {host.cpu_arch}): the docker line is for an "
                f"{arch} host; here that image would run only under emulation, without CUDA"
            )
            host = replace(host, cpu_arch=arch, notes=(*host.notes, note))
    if assumed:
        host = replace(host, gpus=tuple(assumed), source="assumed", driver=driver, problem=None)
    elif driver is not None:
        if not host.gpus:
            raise ConfigError(
                f"--assume-driver {driver} needs a GPU to plan for and none was found here "
                f"({host.problem}); add --assume-gpu NAME_OR_SM, e.g. --assume-gpu T4"
            )
        detected = host.driver
        host = replace(
            host,
            gpus=tuple(replace(g, driver=driver) for g in host.gpus),
            driver=driver,
            notes=(*host.notes, f"driver assumed {driver} (detected {detected})"),
        )
    diagnoses = diagnose(log_text, kb, config, cells) if log_text is not None else []
    return replace(advise(kb, resolution, cells, host, diagnoses), build=_build_path(runner))


def _build_path(runner: Runner | None) -> str | None:
    """Which BuildKit path `build` would take here, probed through doctor's own runner."""
    import os

    from builder import hostprobe
    from builder.engine import describe_build_path

    run = runner or hostprobe.system_runner

    def probe(argv: Sequence[str]) -> tuple[int, str] | None:
        res = run(argv)
        return None if res is None else (res.returncode, res.stdout)

    return describe_build_path(os.environ.get("QWEN_FT_DOCKER") or "docker", probe)
