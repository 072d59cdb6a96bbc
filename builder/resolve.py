"""Resolve matrix cells against the knowledge base: pure functions, no I/O.

`check_cell` runs every rule on one cell and returns the reasons it is invalid
(each with the rule name, a message saying what to do, and the fact's source).
`plan_cell` turns a valid cell into the build plan the templates render.
`resolve` expands targets x axes, applies include/exclude, and picks each
target's recommended cell by a documented preference order.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

from packaging.version import Version

from builder import names
from builder.config import CellSpec, MatrixConfig, TargetConfig
from builder.errors import ConfigError
from builder.knowledge import Distro, FlashAttnRelease, Knowledge, TorchRelease

LABEL_PREFIX = "io.qwen-ft"


@dataclass(frozen=True)
class Reason:
    rule: str
    message: str
    source: str


@dataclass(frozen=True)
class TorchPlan:
    version: str
    cuda: str | None
    index_url: str | None
    requirement: str
    cxx11_abi: bool


@dataclass(frozen=True)
class FlashAttnPlan:
    strategy: str  # wheel | source | none
    version: str | None
    wheel_url: str | None
    cuda_archs: str | None
    builder_image: str | None


@dataclass(frozen=True)
class Plan:
    base_image: str
    os: str
    python: str
    torch: TorchPlan
    flash_attn: FlashAttnPlan
    triton: str  # keep | remove
    triton_version: str | None
    triton_reason: str
    dtype: str
    attn_implementation: str
    torch_cuda_arch_list: str
    min_driver: str | None
    min_driver_reason: str
    stack: Mapping[str, str]
    tags: tuple[str, ...]
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Cell:
    spec: CellSpec
    sm: int | None
    dtype: str
    valid: bool
    reasons: tuple[Reason, ...]
    plan: Plan | None
    origin: str  # axes | include | pin | explain
    recommended: bool = False
    notes: tuple[Reason, ...] = field(default=())

    @property
    def alias(self) -> str:
        return f"{self.spec.target}-{self.dtype}"

    @property
    def pinned(self) -> str:
        s = self.spec
        cuda = "" if s.cuda == "none" else "-cu" + s.cuda.replace(".", "")
        fa = "" if s.flash_attn == "none" else f"-fa{s.flash_attn}"
        return f"{s.target}-{self.dtype}{cuda}-torch{s.torch}-py{s.python}{fa}"

    @property
    def id(self) -> str:
        """Stable, readable id; also the folder name under images/."""
        return self.alias if self.recommended else self.pinned


# ----------------------------------------------------------------------------- rules


def default_dtype(kb: Knowledge, sm: int | None) -> str:
    if sm is None:
        return "fp32"
    return "bf16" if kb.arch(sm).bf16 else "fp16"


def _covered(sm: int, sass: Iterable[int], ptx: Iterable[int]) -> str | None:
    """How a GPU of compute capability `sm` runs the wheel: 'sass', 'ptx' or None."""
    if any(c // 10 == sm // 10 and c % 10 <= sm % 10 for c in sass):
        return "sass"
    if any(p <= sm for p in ptx):
        return "ptx"
    return None


def _distro_for(kb: Knowledge, target: TargetConfig, spec: CellSpec) -> tuple[Distro | None, Reason | None]:
    if target.is_cpu:
        for d in kb.distros:
            if d.os == "debian" and d.python == spec.python and d.image:
                return d, None
        pythons = sorted({d.python for d in kb.distros if d.os == "debian"}, key=Version)
        return None, Reason(
            "python-base-os",
            f"no Debian base ships Python {spec.python} as its system python; "
            f"use one of {', '.join(pythons)} for the cpu target",
            "builder/knowledge/cuda.yaml distros",
        )
    cuda = kb.cuda.get(spec.cuda)
    ubuntu = cuda.ubuntu if cuda else ()
    for d in kb.distros:
        if d.os == "ubuntu" and d.python == spec.python and d.version in ubuntu:
            return d, None
    offered = [
        f"{d.python} (ubuntu{d.version})" for d in kb.distros if d.os == "ubuntu" and d.version in ubuntu
    ]
    return None, Reason(
        "python-base-os",
        f"no nvidia/cuda:{spec.cuda} image ships Python {spec.python} as its system python; "
        f"use {', '.join(offered) or 'another CUDA version'}",
        cuda.source if cuda else "builder/knowledge/cuda.yaml",
    )


def _triton_decision(
    kb: Knowledge, target: TargetConfig, spec: CellSpec, release: TorchRelease
) -> tuple[str, str | None, str, Reason | None]:
    """(keep|remove, triton version, why, invalid-reason)."""
    pin = release.triton
    if target.is_cpu:
        return "remove", None, "CPU wheels of torch do not depend on triton", None
    if pin.python_below and Version(spec.python) >= Version(pin.python_below):
        why = (
            f"torch {release.version} pins triton=={pin.version} only for Python < "
            f"{pin.python_below}, so pip installs none"
        )
        if target.triton == "keep":
            return "remove", None, why, Reason("triton-python", why + "; drop triton: keep", pin.source)
        return "remove", None, why, None
    assert target.sm is not None
    min_sm, source = kb.triton_min_sm(pin.version)
    if target.sm < min_sm:
        why = (
            f"triton {pin.version} (pinned by torch {release.version}) supports sm_{min_sm}+ only; "
            f"removed so nothing JIT-compiles for sm_{target.sm}"
        )
        if target.triton == "keep":
            return (
                "remove",
                pin.version,
                why,
                Reason(
                    "triton-unsupported-sm",
                    f"triton {pin.version} does not support sm_{target.sm} (needs sm_{min_sm}+); "
                    "set triton: auto, or use torch <= 2.6 (triton <= 3.2 supports sm_70+)",
                    source,
                ),
            )
        return "remove", pin.version, why, None
    if target.triton == "remove":
        return "remove", pin.version, "removed by the target's triton: remove", None
    if target.triton == "auto" and target.sm < kb.triton_auto_remove_below:
        why = (
            f"removed on pre-Ampere sm_{target.sm} by policy (triton: auto): bf16 Triton kernels and "
            "Triton-JIT'd flash-attn ops fail there, and fp16 + SDPA needs no Triton"
        )
        return "remove", pin.version, why, None
    return "keep", pin.version, f"triton {pin.version} supports sm_{min_sm}+", None


def _fa_rules(
    kb: Knowledge,
    target: TargetConfig,
    spec: CellSpec,
    fa: FlashAttnRelease,
    triton: str,
    triton_version: str | None,
) -> list[Reason]:
    reasons: list[Reason] = []
    if target.is_cpu:
        return [Reason("flash-attn-cpu", "flash-attn is CUDA-only; use flash_attn: none for cpu", fa.source)]
    assert target.sm is not None
    if target.sm < fa.min_sm:
        reasons.append(
            Reason(
                "flash-attn-sm",
                f"flash-attn {fa.version} needs sm_{fa.min_sm}+ ('FlashAttention only supports "
                f"Ampere GPUs or newer'); {target.name} is sm_{target.sm}: use flash_attn: none "
                "(the image uses PyTorch SDPA)",
                fa.source,
            )
        )
        rotary = next(m for m in kb.fa_triton_modules if m.module.endswith("rotary"))
        if Version(fa.version) >= Version(rotary.since) and triton == "remove" and triton_version:
            reasons.append(
                Reason(
                    "flash-attn-triton",
                    f"flash-attn {fa.version} imports Triton in {rotary.used_by} "
                    f"({rotary.module}), and Triton is removed on sm_{target.sm} "
                    "(its launcher build failed there in the seed run, QwenLM/Qwen#1199)",
                    rotary.source,
                )
            )
    if Version(spec.cuda) < Version(fa.min_cuda):
        reasons.append(
            Reason(
                "flash-attn-cuda",
                f"flash-attn {fa.version} needs CUDA {fa.min_cuda}+, the cell has {spec.cuda}",
                fa.source,
            )
        )
    if Version(spec.torch) < Version(fa.min_torch):
        reasons.append(
            Reason(
                "flash-attn-torch",
                f"flash-attn {fa.version} needs torch {fa.min_torch}+, the cell has {spec.torch}",
                fa.source,
            )
        )
    if spec.python not in fa.python:
        reasons.append(
            Reason(
                "flash-attn-python",
                f"flash-attn {fa.version} supports Python {', '.join(fa.python)}, not {spec.python}",
                fa.source,
            )
        )
    return reasons


def _fa_plan(
    kb: Knowledge,
    target: TargetConfig,
    spec: CellSpec,
    fa: FlashAttnRelease,
    release: TorchRelease,
    distro: Distro,
) -> tuple[FlashAttnPlan | None, Reason | None]:
    assert target.sm is not None
    tv = Version(spec.torch)
    torch_mm = f"{tv.major}.{tv.minor}"
    cuda_major = spec.cuda.split(".")[0]
    abi = release.abi(spec.cuda)
    token = kb.fa_cuda_token(fa.version, spec.cuda)
    if token and fa.wheels.has(torch_mm=torch_mm, cuda_major=cuda_major, python=spec.python, abi=abi):
        py = spec.python.replace(".", "")
        filename = kb.fa_wheel_filename.format(
            version=fa.version,
            cuda_token=token,
            torch_mm=torch_mm,
            abi=str(abi).upper(),
            py=py,
        )
        url = kb.fa_wheel_url.format(version=fa.version, filename=filename)
        return FlashAttnPlan("wheel", fa.version, url, None, None), None
    # No prebuilt wheel: compile in a devel stage, only for this GPU's SM.
    if cuda_major not in fa.wheels.cuda:
        return None, Reason(
            "flash-attn-source-cuda",
            f"flash-attn {fa.version} was only ever built by its CI against CUDA "
            f"{', '.join(fa.wheels.cuda)}.x; a CUDA {spec.cuda} source build is untested. "
            "Pick a CUDA 12 variant or a newer flash-attn",
            fa.source,
        )
    cuda = kb.cuda[spec.cuda]
    if cuda.latest_patch is None:
        return None, Reason(
            "cuda-image",
            f"no nvidia/cuda devel tag is recorded for CUDA {spec.cuda}, needed to compile flash-attn",
            cuda.source,
        )
    archs = None
    if fa.cuda_archs_env:
        same_major = [a for a in kb.fa_source_archs if a // 10 == target.sm // 10 and a <= target.sm]
        archs = str(max(same_major)) if same_major else None
    builder = _cuda_image(kb, spec.cuda, "devel", distro)
    return FlashAttnPlan("source", fa.version, None, archs, builder), None


def _cuda_image(kb: Knowledge, cuda: str, flavour: str, distro: Distro) -> str:
    patch = kb.cuda[cuda].latest_patch
    tag = kb.cuda_image_tag.format(patch=patch, cudnn="", flavour=flavour, ubuntu=distro.version)
    return f"{kb.cuda_image_repo}:{tag}"


def check_and_plan(
    kb: Knowledge, target: TargetConfig, spec: CellSpec, *, dtype: str | None, origin: str
) -> Cell:
    """Run every rule on one cell; return it valid with a plan, or invalid with all reasons."""
    reasons: list[Reason] = []
    sm = target.sm
    want_dtype = dtype or (target.dtype if target.dtype != "auto" else default_dtype(kb, sm))

    release = kb.torch.get(spec.torch)
    if release is None:
        known = ", ".join(kb.torch)
        return _invalid(
            spec,
            sm,
            want_dtype,
            origin,
            Reason(
                "torch-unknown",
                f"torch {spec.torch} is not in the knowledge base (known: {known}); "
                "add it to builder/knowledge/torch.yaml with its sources",
                "builder/knowledge/torch.yaml",
            ),
        )
    if spec.python not in release.python:
        reasons.append(
            Reason(
                "torch-python",
                f"torch {spec.torch} publishes wheels for Python {', '.join(release.python)}, "
                f"not {spec.python}",
                release.source,
            )
        )
    variant = "cpu" if target.is_cpu else spec.cuda
    if target.is_cpu and spec.cuda != "none":
        reasons.append(Reason("cpu-cuda", "the cpu target takes cuda: none", "matrix.yaml"))
    if not target.is_cpu and spec.cuda == "none":
        reasons.append(
            Reason("gpu-no-cuda", f"{target.name} is a GPU target; pick a CUDA variant", "matrix.yaml")
        )
        return _invalid(spec, sm, want_dtype, origin, *reasons)
    if variant not in release.variants:
        reasons.append(
            Reason(
                "torch-variant",
                f"torch {spec.torch} has no {_variant_name(variant)} wheels "
                f"(published: {', '.join(_variant_name(v) for v in release.variants)})",
                release.source,
            )
        )
    cuda = kb.cuda.get(spec.cuda) if not target.is_cpu else None
    if not target.is_cpu and cuda is None:
        reasons.append(
            Reason(
                "cuda-unknown",
                f"CUDA {spec.cuda} is not in builder/knowledge/cuda.yaml (known: {', '.join(kb.cuda)})",
                "builder/knowledge/cuda.yaml",
            )
        )
        return _invalid(spec, sm, want_dtype, origin, *reasons)
    notes: list[Reason] = []
    coverage = None
    if sm is not None and cuda is not None:
        if sm in cuda.no_sm:
            reasons.append(
                Reason(
                    "cuda-drops-sm",
                    f"CUDA {spec.cuda} cannot target sm_{sm} ({target.name}); use a CUDA 12.x variant",
                    cuda.source,
                )
            )
        if variant in release.variants:
            arch_list = kb.arch_list(spec.torch, variant)
            if arch_list is None:
                reasons.append(
                    Reason(
                        "torch-arch-unknown",
                        f"no compiled arch list is recorded for torch {spec.torch} {_variant_name(variant)}",
                        "builder/knowledge/torch.yaml arch_lists",
                    )
                )
            else:
                coverage = _covered(sm, arch_list.sm, arch_list.ptx)
                if coverage is None:
                    have = ", ".join(f"sm_{s}" for s in arch_list.sm)
                    reasons.append(
                        Reason(
                            "torch-arch",
                            f"torch {spec.torch} {_variant_name(variant)} wheels carry {have} but not "
                            f"sm_{sm} ({target.name}): 'no kernel image is available'. "
                            "Use a variant that lists it (cu126 keeps sm_70 on every release so far)",
                            arch_list.source,
                        )
                    )
                if arch_list.conflict:
                    notes.append(Reason("torch-arch-conflict", arch_list.conflict, arch_list.source))
    if sm is not None and want_dtype == "bf16" and not kb.arch(sm).bf16:
        arch = kb.arch(sm)
        reasons.append(
            Reason(
                "bf16-sm",
                f"{target.name} (sm_{sm}, {arch.family}) has no native bf16; use dtype fp16 "
                "(torch.cuda.is_bf16_supported() says True there, but bf16 kernels fail)",
                arch.source,
            )
        )
    if sm is None and want_dtype != "fp32":
        reasons.append(
            Reason("cpu-dtype", f"the cpu image trains in fp32, not {want_dtype}", "runtime precision policy")
        )

    distro, problem = _distro_for(kb, target, spec)
    if problem:
        reasons.append(problem)

    triton, triton_version, triton_why, triton_problem = _triton_decision(kb, target, spec, release)
    if triton_problem:
        reasons.append(triton_problem)

    fa = None
    if spec.flash_attn != "none":
        fa = kb.flash_attn.get(spec.flash_attn)
        if fa is None:
            reasons.append(
                Reason(
                    "flash-attn-unknown",
                    f"flash-attn {spec.flash_attn} is not in the knowledge base "
                    f"(known: {', '.join(kb.flash_attn)}); add it to builder/knowledge/flash_attn.yaml",
                    "builder/knowledge/flash_attn.yaml",
                )
            )
        else:
            reasons.extend(_fa_rules(kb, target, spec, fa, triton, triton_version))
            if triton == "remove" and sm is not None and sm >= fa.min_sm:
                notes.append(
                    Reason(
                        "flash-attn-without-triton",
                        f"flash-attn's Triton ops ({', '.join(m.module for m in kb.fa_triton_modules)}) "
                        "are unavailable in this image; its CUDA attention kernels still work",
                        kb.fa_triton_modules[0].source,
                    )
                )

    stack: dict[str, str] = {}
    for package in kb.stack:
        pin = kb.stack_pin(package, spec.python, spec.torch)
        if pin is None:
            reasons.append(
                Reason(
                    "stack",
                    f"no {package} release in builder/knowledge/stack.yaml supports Python "
                    f"{spec.python} with torch {spec.torch}",
                    "builder/knowledge/stack.yaml",
                )
            )
        else:
            stack[package] = pin.version

    if reasons:
        return _invalid(spec, sm, want_dtype, origin, *reasons)
    assert distro is not None

    fa_plan = FlashAttnPlan("none", None, None, None, None)
    if fa is not None:
        planned, problem = _fa_plan(kb, target, spec, fa, release, distro)
        if problem or planned is None:
            return _invalid(spec, sm, want_dtype, origin, *([problem] if problem else []))
        fa_plan = planned

    if target.is_cpu:
        base_image = distro.image or f"debian:{distro.codename}-slim"
        os_name = f"debian{distro.version}"
        min_driver, driver_why = None, "CPU image: no driver needed"
        arch_list_str = ""
    else:
        assert cuda is not None and sm is not None
        if cuda.latest_patch is None:
            return _invalid(
                spec,
                sm,
                want_dtype,
                origin,
                Reason(
                    "cuda-image", f"no nvidia/cuda image tag is recorded for CUDA {spec.cuda}", cuda.source
                ),
            )
        base_image = _cuda_image(kb, spec.cuda, "base", distro)
        os_name = f"ubuntu{distro.version}"
        min_driver, driver_why = _min_driver(kb, spec.cuda, sm, coverage)
        arch_list_str = f"{sm // 10}.{sm % 10}"

    is_default = variant == release.pypi_default
    index_url = None if is_default else kb.torch_index_url.format(variant=_variant_name(variant))
    requirement = f"torch=={spec.torch}" if is_default else f"torch=={spec.torch}+{_variant_name(variant)}"
    torch_plan = TorchPlan(
        version=spec.torch,
        cuda=None if target.is_cpu else spec.cuda,
        index_url=index_url,
        requirement=requirement,
        cxx11_abi=release.abi(variant),
    )
    attn = "flash_attention_2" if fa_plan.strategy != "none" else "sdpa"
    cell = Cell(
        spec=spec,
        sm=sm,
        dtype=want_dtype,
        valid=True,
        reasons=(),
        plan=None,
        origin=origin,
        notes=tuple(notes),
    )
    plan = Plan(
        base_image=base_image,
        os=os_name,
        python=spec.python,
        torch=torch_plan,
        flash_attn=fa_plan,
        triton=triton,
        triton_version=triton_version,
        triton_reason=triton_why,
        dtype=want_dtype,
        attn_implementation=attn,
        torch_cuda_arch_list=arch_list_str,
        min_driver=min_driver,
        min_driver_reason=driver_why,
        stack=stack,
        tags=(),
        labels={},
    )
    return replace(cell, plan=plan)


def _min_driver(kb: Knowledge, cuda_version: str, sm: int, coverage: str | None) -> tuple[str, str]:
    cuda = kb.cuda[cuda_version]
    major = kb.cuda_majors[cuda_version.split(".")[0]]
    arch = kb.arch(sm)
    if coverage == "ptx":
        floor, why = (
            cuda.toolkit_driver,
            (f"sm_{sm} runs the wheel's PTX through the JIT, which needs CUDA {cuda_version}'s own driver"),
        )
    else:
        floor, why = major.floor, f"CUDA {major.major}.x minor-version compatibility floor"
    if arch.min_driver and Version(arch.min_driver) > Version(floor):
        floor, why = (
            arch.min_driver,
            f"{arch.family} (sm_{sm}) needs an R{arch.min_driver.split('.')[0]}+ driver",
        )
    return floor, why


def _variant_name(variant: str) -> str:
    return "cpu" if variant == "cpu" else "cu" + variant.replace(".", "")


def _invalid(spec: CellSpec, sm: int | None, dtype: str, origin: str, *reasons: Reason) -> Cell:
    return Cell(spec=spec, sm=sm, dtype=dtype, valid=False, reasons=tuple(reasons), plan=None, origin=origin)


# ----------------------------------------------------------------------------- tags & labels


def finish(cell: Cell, *, image: str, recommended: bool) -> Cell:
    """Attach tags and OCI labels once we know whether the cell is its target's recommended one."""
    base = cell.plan
    assert base is not None
    cell = replace(cell, recommended=recommended)
    tags = (cell.alias, cell.pinned) if recommended else (cell.pinned,)
    for tag in tags:
        names.check_tag(tag, f"targets.{cell.spec.target}")
    plan = replace(base, tags=tuple(f"{image}:{t}" for t in tags))
    return replace(cell, plan=replace(plan, labels=labels(cell, plan)))


def labels(cell: Cell, plan: Plan) -> dict[str, str]:
    p = LABEL_PREFIX
    spec = {
        "target": cell.spec.target,
        "sm": cell.sm,
        "cuda": cell.spec.cuda,
        "torch": plan.torch.requirement,
        "python": plan.python,
        "flash_attn": asdict(plan.flash_attn),
        "triton": plan.triton,
        "dtype": plan.dtype,
        "attn_implementation": plan.attn_implementation,
        "min_driver": plan.min_driver,
        "base_image": plan.base_image,
        "stack": dict(plan.stack),
    }
    return {
        "org.opencontainers.image.title": f"qwen-ft {cell.id}",
        "org.opencontainers.image.description": (
            f"Qwen fine-tuning image for {cell.spec.target} ({plan.dtype}, {plan.attn_implementation})"
        ),
        "org.opencontainers.image.base.name": plan.base_image,
        f"{p}.target": cell.spec.target,
        f"{p}.sm": "none" if cell.sm is None else str(cell.sm),
        f"{p}.alias": cell.alias,
        f"{p}.pinned": cell.pinned,
        f"{p}.dtype": plan.dtype,
        f"{p}.attn": plan.attn_implementation,
        f"{p}.torch": plan.torch.version,
        f"{p}.cuda": cell.spec.cuda,
        f"{p}.python": plan.python,
        f"{p}.flash-attn": plan.flash_attn.version or "none",
        f"{p}.triton": plan.triton,
        f"{p}.min-driver": plan.min_driver or "none",
        f"{p}.spec": json.dumps(spec, sort_keys=True, separators=(",", ":")),
    }


# ----------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Resolution:
    config: MatrixConfig
    cells: tuple[Cell, ...]  # valid, recommended first per target, in target order
    excluded: tuple[Cell, ...]

    def recommended(self, target: str) -> Cell:
        return next(c for c in self.cells if c.spec.target == target and c.recommended)


def _matches(rule: Mapping[str, str], spec: CellSpec) -> bool:
    values = {
        "target": spec.target,
        "cuda": spec.cuda,
        "torch": spec.torch,
        "python": spec.python,
        "flash_attn": spec.flash_attn,
    }
    return all(fnmatch.fnmatchcase(values[k], pattern) for k, pattern in rule.items())


def preference(kb: Knowledge, cell: Cell) -> tuple[object, ...]:
    """Higher is better. The order is the policy documented in README 'How a cell is picked'."""
    assert cell.plan is not None
    plan = cell.plan
    release = kb.torch[cell.spec.torch]
    strategy_rank = {"wheel": 2, "source": 1, "none": 0}[plan.flash_attn.strategy]
    variant = "cpu" if cell.sm is None else cell.spec.cuda
    return (
        strategy_rank,  # 1. flash-attn from a prebuilt wheel beats compiling it, which beats none
        Version(cell.spec.torch),  # 2. the newest torch
        variant == release.pypi_default,  # 3. the CUDA variant PyPI serves
        Version(cell.spec.cuda) if cell.spec.cuda != "none" else Version("0"),  # 4. newer CUDA
        Version(cell.spec.python),  # 5. newer Python
        Version(cell.spec.flash_attn) if cell.spec.flash_attn != "none" else Version("0"),
    )


def resolve(config: MatrixConfig, kb: Knowledge) -> Resolution:
    valid: list[Cell] = []
    excluded: list[Cell] = []
    for name, target in config.targets.items():
        ax = target.axes
        candidates: list[Cell] = []
        for cuda, torch, python, fa in itertools.product(ax.cuda, ax.torch, ax.python, ax.flash_attn):
            spec = CellSpec(target=name, cuda=cuda, torch=torch, python=python, flash_attn=fa)
            if any(_matches(rule, spec) for rule in config.exclude):
                continue
            cell = check_and_plan(kb, target, spec, dtype=None, origin="axes")
            (candidates if cell.valid else excluded).append(cell)
        best: Cell | None = None
        if target.recommended is not None:
            pin = check_and_plan(kb, target, target.recommended, dtype=None, origin="pin")
            if not pin.valid:
                why = "; ".join(r.message for r in pin.reasons)
                raise ConfigError(f"{config.path}: targets.{name}.recommended is invalid: {why}")
            best = pin
            candidates = [c for c in candidates if c.spec.key() != pin.spec.key()]
        elif candidates:
            best = max(candidates, key=lambda c: preference(kb, c))
            candidates = [c for c in candidates if c is not best]
        if best is None:
            first = (
                excluded[-1].reasons[0].message
                if excluded and excluded[-1].spec.target == name
                else "no candidates"
            )
            raise ConfigError(
                f"{config.path}: targets.{name}: every cell is invalid (e.g. {first}); "
                f"run `qwen-ft-images matrix --all` to see each reason"
            )
        valid.append(finish(best, image=config.image, recommended=True))
        for i, inc in enumerate(config.include):
            if inc.target != name:
                continue
            if inc.key() == best.spec.key():
                continue
            cell = check_and_plan(kb, target, inc, dtype=None, origin="include")
            if not cell.valid:  # an image asked for by name never vanishes silently
                why = "; ".join(r.message for r in cell.reasons)
                raise ConfigError(
                    f"{config.path}: include[{i}] ({cell.pinned}) is invalid: {why}; "
                    f"fix or remove it (`qwen-ft-images explain {name} ...` shows why)"
                )
            valid.append(finish(cell, image=config.image, recommended=False))
        # Other valid axis cells are candidates, not images: they appear in `matrix --all`.
        excluded.extend(replace(c, origin="candidate") for c in candidates)
    return Resolution(config=config, cells=tuple(valid), excluded=tuple(excluded))


def explain(
    config: MatrixConfig,
    kb: Knowledge,
    target_name: str,
    *,
    overrides: Mapping[str, str | None],
    dtype: str | None,
) -> Cell:
    """Verdict and plan for any cell of a target, including ones not in matrix.yaml."""
    target = find_target(config, target_name)
    base = resolve(config, kb).recommended(target.name).spec
    changes = {k: v for k, v in overrides.items() if v is not None}
    spec = replace(base, **changes)
    cell = check_and_plan(kb, target, spec, dtype=dtype, origin="explain")
    if not cell.valid:
        return cell
    is_rec = spec == base and (dtype is None or dtype == cell.dtype)
    return finish(cell, image=config.image, recommended=is_rec)


def find_target(config: MatrixConfig, name: str) -> TargetConfig:
    if name in config.targets:
        return config.targets[name]
    import difflib

    close = difflib.get_close_matches(name, list(config.targets), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown target '{name}'{hint} (targets: {', '.join(config.targets)})")


def _names(cell: Cell) -> tuple[str, ...]:
    """What a selector can match: the alias only names its target's recommended image."""
    alias = (cell.alias,) if cell.recommended else ()
    return (cell.spec.target, *alias, cell.id, cell.pinned)


def select(resolution: Resolution, selectors: Iterable[str]) -> tuple[Cell, ...]:
    """Cells whose target, alias, id or pinned tag matches any selector (globs allowed)."""
    selectors = list(selectors)
    if not selectors:
        return resolution.cells
    chosen: list[Cell] = []
    for sel in selectors:
        hits = [c for c in resolution.cells if any(fnmatch.fnmatchcase(n, sel) for n in _names(c))]
        if not hits:
            names = sorted({c.spec.target for c in resolution.cells} | {c.id for c in resolution.cells})
            raise ConfigError(f"selector '{sel}' matches no image; valid: {', '.join(names)}")
        chosen.extend(c for c in hits if c not in chosen)
    return tuple(c for c in resolution.cells if c in chosen)
