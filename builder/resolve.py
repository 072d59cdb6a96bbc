"""Resolve matrix cells against the knowledge base: pure functions, no I/O.

Each rule is a small function `(kb, query) -> reasons`; `check` runs them in stages and
returns a `Cell` with its build plan, or a `Rejected` with every reason (each names its
rule, says what to do, and cites the fact's source). `search` finds the best valid cell
among candidates by the documented preference order; `resolve` expands targets x axes,
applies include/exclude and picks each target's recommended cell with it, and `doctor`
and `explain` use the same search with their own predicates.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

from packaging.version import Version

from builder import contract, names
from builder.config import CellSpec, MatrixConfig, TargetConfig
from builder.errors import ConfigError
from builder.knowledge import Distro, FlashAttnRelease, Knowledge, Mislabelled, TorchRelease
from builder.knowledge import platforms as platform_facts
from builder.knowledge.platforms import AARCH64

DEFAULT_PLATFORM = "linux/amd64"


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
class DeepSpeedPlan:
    """DeepSpeed in the image: its release and the ops prebuilt for the target's SM only."""

    version: str
    ops: tuple[str, ...]  # DeepSpeed op names, prebuilt (empty: pure Python, nothing to compile)
    arch_list: str | None  # TORCH_CUDA_ARCH_LIST for the CUDA ops ("7.0"); None when none are built
    build_env: Mapping[str, str]  # DS_ACCELERATOR, DS_BUILD_*, TORCH_CUDA_ARCH_LIST for `pip wheel`
    sdist_sha256: str
    march: str | None  # the portable -march the host (C++) ops are built with, when any are
    simd: str | None  # the SIMD define that goes with it (__AVX256__)
    builder_image: str | None  # the devel image that compiles the ops; None when there are none
    source: str
    libraries: tuple[str, ...] = ()  # each op's compiled module as a path in the wheel

    @property
    def ops_env(self) -> str:
        return ",".join(self.ops) or "none"


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
    env: Mapping[str, str]  # the image's ENV: the runtime's plan names (builder.contract), then extras
    tags: tuple[str, ...]
    labels: Mapping[str, str]
    deepspeed: DeepSpeedPlan
    # "triton==X" when torch requires a triton range (`~=`) and the image keeps Triton: pip
    # would otherwise pick whatever matches on build day, not what was planned.
    triton_pin: str | None = None

    @property
    def builder_image(self) -> str | None:
        """The devel image every compile stage (flash-attn, DeepSpeed's ops) starts from."""
        return self.flash_attn.builder_image or self.deepspeed.builder_image


@dataclass(frozen=True)
class _Verdict:
    spec: CellSpec
    sm: int | None
    dtype: str
    origin: str  # axes | include | pin | explain | candidate | doctor | search
    notes: tuple[Reason, ...] = field(default=(), kw_only=True)
    filled: tuple[str, ...] = field(default=(), kw_only=True)  # axes `explain` chose, not the user
    blocking: tuple[str, ...] = field(default=(), kw_only=True)  # given axes no completion can keep
    # The platforms this image is built for (a Cell) or was checked for (a Rejected); the
    # target's other platforms are in `platform_reasons` with why they got another image or none.
    platforms: tuple[str, ...] = field(default=(DEFAULT_PLATFORM,), kw_only=True)
    platform_reasons: tuple[tuple[str, tuple[Reason, ...]], ...] = field(default=(), kw_only=True)

    @property
    def suffix(self) -> str:
        """'' for an image that includes linux/amd64, else '-arm64': images and ids stay distinct
        when a platform's recommended image is another stack (same alias, another cell)."""
        if DEFAULT_PLATFORM in self.platforms:
            return ""
        return "-" + "-".join(p.split("/", 1)[1] for p in self.platforms)

    @property
    def alias(self) -> str:
        return f"{self.spec.target}-{self.dtype}"

    @property
    def pinned(self) -> str:
        s = self.spec
        cuda = "" if s.cuda == "none" else "-cu" + s.cuda.replace(".", "")
        fa = "" if s.flash_attn == "none" else f"-fa{s.flash_attn}"
        return f"{s.target}-{self.dtype}{cuda}-torch{s.torch}-py{s.python}{fa}"


@dataclass(frozen=True)
class Cell(_Verdict):
    """A valid cell: it always has a plan."""

    plan: Plan = field(kw_only=True)
    recommended: bool = field(default=False, kw_only=True)
    valid: ClassVar[bool] = True
    reasons: ClassVar[tuple[Reason, ...]] = ()

    @property
    def id(self) -> str:
        """Stable, readable id; also the folder name under images/."""
        return (self.alias if self.recommended else self.pinned) + self.suffix

    @property
    def local_ref(self) -> str:
        """The local tag of this image's first platform (builder.jobs.local_suffix): what smoke
        and audit run. A registry has the plain tag, as a manifest list."""
        return self.plan.tags[0] + self.suffix


@dataclass(frozen=True)
class Rejected(_Verdict):
    """An invalid cell, with every reason it is invalid."""

    reasons: tuple[Reason, ...] = field(kw_only=True)
    valid: ClassVar[bool] = False
    recommended: ClassVar[bool] = False
    plan: ClassVar[None] = None

    @property
    def id(self) -> str:
        return self.pinned + self.suffix


Verdict = Cell | Rejected


@dataclass(frozen=True)
class Query:
    """One cell to check: the target, its axis values, and the dtype asked for (resolved)."""

    target: TargetConfig
    spec: CellSpec
    dtype: str
    hints: bool = True  # whether reasons may propose other values (each one is checked first)
    platform: str = DEFAULT_PLATFORM

    @property
    def sm(self) -> int | None:
        return self.target.sm

    @property
    def arm64(self) -> bool:
        return self.platform == AARCH64

    @property
    def variant(self) -> str:
        return "cpu" if self.target.is_cpu else self.spec.cuda


# ----------------------------------------------------------------------------- rules


def default_dtype(kb: Knowledge, sm: int | None) -> str:
    if sm is None:
        return "fp32"
    return "bf16" if kb.arch(sm).bf16 else "fp16"


def _covered(sm: int, sass: Iterable[int], ptx: Iterable[int]) -> str | None:
    """How a GPU of compute capability `sm` runs the wheel: 'sass', 'ptx' or None."""
    if any(contract.runs_on(c, sm) for c in sass):
        return "sass"
    if any(p <= sm for p in ptx):
        return "ptx"
    return None


def _coverage(kb: Knowledge, q: Query) -> str | None:
    """How the released wheel runs on the GPU: the row's PTX only counts if no release strip removed it."""
    arch_list = kb.arch_list(q.spec.torch, q.variant)
    if q.sm is None or arch_list is None:
        return None
    ptx = () if kb.ptx_strip(q.spec.torch, q.variant) else arch_list.ptx
    return _covered(q.sm, arch_list.sm, ptx)


def rule_torch_known(kb: Knowledge, q: Query) -> list[Reason]:
    if q.spec.torch in kb.torch:
        return []
    return [
        Reason(
            "torch-unknown",
            f"torch {q.spec.torch} is not in the knowledge base (known: {', '.join(kb.torch)}); "
            "add it to builder/knowledge/torch.yaml with its sources",
            "builder/knowledge/torch.yaml",
        )
    ]


def rule_torch_python(kb: Knowledge, q: Query) -> list[Reason]:
    release = kb.torch[q.spec.torch]
    if q.spec.python in release.python:
        return []
    return [
        Reason(
            "torch-python",
            f"torch {q.spec.torch} publishes wheels for Python {', '.join(release.python)}, "
            f"not {q.spec.python}",
            release.source,
        )
    ]


def rule_cuda_kind(kb: Knowledge, q: Query) -> list[Reason]:
    if q.target.is_cpu and q.spec.cuda != "none":
        return [Reason("cpu-cuda", "the cpu target takes cuda: none", "matrix.yaml")]
    if not q.target.is_cpu and q.spec.cuda == "none":
        return [Reason("gpu-no-cuda", f"{q.target.name} is a GPU target; pick a CUDA variant", "matrix.yaml")]
    return []


def rule_torch_variant(kb: Knowledge, q: Query) -> list[Reason]:
    release = kb.torch[q.spec.torch]
    if q.variant in release.variants:
        return []
    return [
        Reason(
            "torch-variant",
            f"torch {q.spec.torch} has no {_variant_name(q.variant)} wheels "
            f"(published: {', '.join(_variant_name(v) for v in release.variants)})",
            release.source,
        )
    ]


def rule_cuda_known(kb: Knowledge, q: Query) -> list[Reason]:
    if q.target.is_cpu or q.spec.cuda in kb.cuda:
        return []
    return [
        Reason(
            "cuda-unknown",
            f"CUDA {q.spec.cuda} is not in builder/knowledge/cuda.yaml (known: {', '.join(kb.cuda)})",
            "builder/knowledge/cuda.yaml",
        )
    ]


def rule_cuda_drops_sm(kb: Knowledge, q: Query) -> list[Reason]:
    if q.sm is None or q.sm not in kb.cuda[q.spec.cuda].no_sm:
        return []
    return [
        Reason(
            "cuda-drops-sm",
            f"CUDA {q.spec.cuda} cannot target sm_{q.sm} ({q.target.name}); use a CUDA 12.x variant",
            kb.cuda[q.spec.cuda].source,
        )
    ]


def rule_torch_arch(kb: Knowledge, q: Query) -> list[Reason]:
    if q.sm is None or q.variant not in kb.torch[q.spec.torch].variants:
        return []
    arch_list = kb.arch_list(q.spec.torch, q.variant)
    name = _variant_name(q.variant)
    if arch_list is None:
        return [
            Reason(
                "torch-arch-unknown",
                f"no compiled arch list is recorded for torch {q.spec.torch} {name}",
                "builder/knowledge/torch.yaml arch_lists",
            )
        ]
    if _covered(q.sm, arch_list.sm, arch_list.ptx) is not None:
        return []
    have = ", ".join(f"sm_{s}" for s in arch_list.sm)
    return [
        Reason(
            "torch-arch",
            f"torch {q.spec.torch} {name} wheels carry {have} but not "
            f"sm_{q.sm} ({q.target.name}): 'no kernel image is available'. "
            "Use a variant that lists it (cu126 keeps sm_70 on every release so far)",
            arch_list.source,
        )
    ]


def rule_torch_ptx_strip(kb: Knowledge, q: Query) -> list[Reason]:
    """A GPU that only the build script's "+PTX" would cover: the release wheel has no PTX."""
    if q.sm is None or q.variant not in kb.torch[q.spec.torch].variants:
        return []
    arch_list = kb.arch_list(q.spec.torch, q.variant)
    strip = kb.ptx_strip(q.spec.torch, q.variant)
    if arch_list is None or strip is None or _covered(q.sm, arch_list.sm, arch_list.ptx) != "ptx":
        return []
    ptx = ", ".join(f"compute_{p}" for p in arch_list.ptx)
    return [
        Reason(
            "torch-ptx-stripped",
            f"torch {q.spec.torch} {_variant_name(q.variant)} would reach sm_{q.sm} ({q.target.name}) only "
            f"through {ptx} PTX, and the release build strips +PTX ({strip.pr}): "
            "'no kernel image is available'. Use a variant that compiles the SM",
            strip.source,
        )
    ]


def rule_dtype(kb: Knowledge, q: Query) -> list[Reason]:
    if q.sm is None:
        if q.dtype == "fp32":
            return []
        why = f"the cpu image trains in fp32, not {q.dtype}"
        return [Reason("cpu-dtype", why, "runtime precision policy")]
    arch = kb.arch(q.sm)
    if q.dtype != "bf16" or arch.bf16:
        return []
    return [
        Reason(
            "bf16-sm",
            f"{q.target.name} (sm_{q.sm}, {arch.family}) has no native bf16; use dtype fp16 "
            "(torch.cuda.is_bf16_supported() says True there, but bf16 kernels fail)",
            arch.source,
        )
    ]


def rule_base_os(kb: Knowledge, q: Query) -> list[Reason]:
    _, problem = _distro_for(kb, q.target, q.spec)
    if problem is None:
        return []
    if not q.hints:
        return [problem]
    # Offer only the Pythons that make this very cell valid, not just the base OS.
    works = [
        p
        for p in _distro_pythons(kb, q.target, q.spec)
        if isinstance(
            check(kb, q.target, replace(q.spec, python=p), dtype=q.dtype, origin="hint", hints=False), Cell
        )
    ]
    where = "the cpu target" if q.target.is_cpu else f"nvidia/cuda:{q.spec.cuda}"
    offer = f"use Python {', '.join(works)}" if works else "no other Python makes this cell valid either"
    return [
        Reason(
            "python-base-os",
            f"no {where} base image ships Python {q.spec.python} as its system python; {offer}",
            problem.source,
        )
    ]


def _distro_pythons(kb: Knowledge, target: TargetConfig, spec: CellSpec) -> list[str]:
    if target.is_cpu:
        found = {d.python for d in kb.distros if d.os == "debian" and d.image}
    else:
        ubuntu = kb.cuda[spec.cuda].ubuntu if spec.cuda in kb.cuda else ()
        found = {d.python for d in kb.distros if d.os == "ubuntu" and d.version in ubuntu}
    return sorted(found, key=Version)


def rule_triton(kb: Knowledge, q: Query) -> list[Reason]:
    problem = _triton_decision(kb, q.target, q.spec, kb.torch[q.spec.torch])[3]
    return [problem] if problem else []


def rule_flash_attn(kb: Knowledge, q: Query) -> list[Reason]:
    if q.spec.flash_attn == "none":
        return []
    fa = kb.flash_attn.get(q.spec.flash_attn)
    if fa is None:
        return [
            Reason(
                "flash-attn-unknown",
                f"flash-attn {q.spec.flash_attn} is not in the knowledge base "
                f"(known: {', '.join(kb.flash_attn)}); add it to builder/knowledge/flash_attn.yaml",
                "builder/knowledge/flash_attn.yaml",
            )
        ]
    triton, triton_version, _, _ = _triton_decision(kb, q.target, q.spec, kb.torch[q.spec.torch])
    return _fa_rules(kb, q.target, q.spec, fa, triton, triton_version)


def rule_flash_attn_runtime_sm(kb: Knowledge, q: Query) -> list[Reason]:
    """flash_api.cpp's own capability check: before 2.7 it accepts sm_8x and sm_90 only."""
    fa = kb.flash_attn.get(q.spec.flash_attn)
    if fa is None or q.sm is None or q.sm < fa.min_sm or fa.runs_on(q.sm):
        return []
    accepted = ", ".join(f"sm_{lo}-sm_{hi}" if hi != lo else f"sm_{lo}" for lo, hi in fa.runtime_sm if hi)
    return [
        Reason(
            "flash-attn-runtime-sm",
            f"flash-attn {fa.version} accepts only {accepted} at run time (flash_api.cpp TORCH_CHECK), so "
            f"{q.target.name} (sm_{q.sm}) fails at the first attention call whether the wheel or a "
            "source build is used; use flash-attn 2.7.4.post1 or newer",
            fa.source,
        )
    ]


def rule_flash_attn_compiled_sm(kb: Knowledge, q: Query) -> list[Reason]:
    """The flash-attn binary the plan would install must carry cubins this GPU can run."""
    fa = kb.flash_attn.get(q.spec.flash_attn)
    if fa is None or q.sm is None or q.sm < fa.min_sm or not fa.runs_on(q.sm) or q.spec.cuda not in kb.cuda:
        return []
    if q.variant not in kb.torch[q.spec.torch].variants:
        return []  # rule_torch_variant already refuses it; there is no wheel ABI to read
    strategy, _, _ = _fa_choice(kb, q, fa)
    if strategy == "wheel":
        nvcc, how = fa.wheels.nvcc or "", "its prebuilt wheels were built with nvcc"
    else:
        patch = kb.cuda[q.spec.cuda].latest_patch
        if patch is None:
            return []  # no devel image to build with: _fa_plan refuses it with its own reason
        nvcc, how = patch, "a source build here uses the devel image's nvcc"
    compiled = fa.compiled_for(nvcc)
    if any(contract.runs_on(c, q.sm) for c in compiled):
        return []
    have = ", ".join(f"sm_{c}" for c in compiled) or "nothing"
    fix = (
        "use flash-attn 2.8.3 or newer (wheels built with nvcc 12.9.1)"
        if strategy == "wheel"
        else "use a CUDA variant whose nvcc targets it (sm_100/sm_120 need 12.8+)"
    )
    return [
        Reason(
            f"flash-attn-{strategy}-sm",
            f"flash-attn {fa.version}: {how} {nvcc}, which compiles {have} and not sm_{q.sm} "
            f"({q.target.name}): 'no kernel image is available'; {fix}",
            fa.source,
        )
    ]


def rule_stack(kb: Knowledge, q: Query) -> list[Reason]:
    return [
        Reason(
            "stack",
            f"no {package} release in builder/knowledge/stack.yaml supports Python "
            f"{q.spec.python} with torch {q.spec.torch}",
            "builder/knowledge/stack.yaml",
        )
        for package in kb.stack
        if kb.stack_pin(package, q.spec.python, q.spec.torch) is None
    ]


def _ds_ops(kb: Knowledge, target: TargetConfig) -> tuple[str, ...]:
    """The ops the target asks for (matrix.yaml deepspeed_ops), else what its kind plans."""
    if target.deepspeed_ops is not None:
        return target.deepspeed_ops
    return kb.deepspeed.cpu_ops if target.is_cpu else kb.deepspeed.gpu_ops


def rule_deepspeed_release(kb: Knowledge, q: Query) -> list[Reason]:
    if q.spec.python not in kb.torch[q.spec.torch].python:
        return []  # rule_torch_python refuses the cell already: no torch to pair DeepSpeed with
    if kb.deepspeed.choose(q.spec.torch, q.spec.python) is not None:
        return []
    return [
        Reason(
            "deepspeed-release",
            f"no DeepSpeed release in builder/knowledge/deepspeed.yaml declares torch {q.spec.torch} "
            f"and Python {q.spec.python}; add one with its sources, or pick another torch/Python",
            "builder/knowledge/deepspeed.yaml releases",
        )
    ]


def rule_deepspeed_ops(kb: Knowledge, q: Query) -> list[Reason]:
    """Each op the target asks for must be known, checkable by `contract`, and run on its SM."""
    ds = kb.deepspeed
    found: list[Reason] = []
    for op in _ds_ops(kb, q.target):
        if op not in ds.ops:
            found.append(
                Reason(
                    "deepspeed-op-unknown",
                    f"targets.{q.target.name}.deepspeed_ops: unknown DeepSpeed op {op!r} "
                    f"(known: {', '.join(ds.ops)})",
                    "builder/knowledge/deepspeed.yaml ops",
                )
            )
            continue
        described = ds.op(op)
        if q.target.is_cpu:
            found.append(
                Reason(
                    "deepspeed-op-cpu",
                    f"the cpu image prebuilds no DeepSpeed op ({op}): it has no compiler and its ranks "
                    "use torch's AdamW over gloo; set deepspeed_ops: [] for the cpu target",
                    ds.image_plan_source,
                )
            )
            continue
        assert q.sm is not None
        problem = ds.sm_problem(op, q.sm)
        if problem is not None:
            found.append(
                Reason(
                    "deepspeed-op-sm",
                    f"{q.target.name} (sm_{q.sm}) cannot run DeepSpeed op {op}: it needs "
                    f"sm_{described.min_sm}+; drop it from targets.{q.target.name}.deepspeed_ops",
                    described.source,
                )
            )
        elif described.module is None:
            found.append(
                Reason(
                    "deepspeed-op-unchecked",
                    f"DeepSpeed op {op} has no library module recorded, so `contract` could not "
                    "check it was prebuilt; record its module in deepspeed.yaml first",
                    described.source,
                )
            )
    return found


def note_arch_conflict(kb: Knowledge, q: Query) -> list[Reason]:
    if q.sm is None:
        return []
    arch_list = kb.arch_list(q.spec.torch, q.variant)
    if arch_list is None or not arch_list.conflict:
        return []
    return [Reason("torch-arch-conflict", arch_list.conflict, arch_list.source)]


def note_fa_without_triton(kb: Knowledge, q: Query) -> list[Reason]:
    fa = kb.flash_attn.get(q.spec.flash_attn)
    if fa is None or q.sm is None or q.sm < fa.min_sm:
        return []
    if _triton_decision(kb, q.target, q.spec, kb.torch[q.spec.torch])[0] != "remove":
        return []
    return [
        Reason(
            "flash-attn-without-triton",
            f"flash-attn's Triton ops ({', '.join(m.module for m in kb.fa_triton_modules)}) "
            "are unavailable in this image; its CUDA attention kernels still work",
            kb.fa_triton_modules[0].source,
        )
    ]


def note_fa_wheel_abi(kb: Knowledge, q: Query) -> list[Reason]:
    fa = kb.flash_attn.get(q.spec.flash_attn)
    if fa is None or q.sm is None:
        return []
    _, _, mislabel = _fa_choice(kb, q, fa)  # notes run on valid cells only: the variant exists
    if mislabel is None:
        return []
    return [
        Reason(
            "flash-attn-wheel-abi",
            f"flash-attn {fa.version} is built from source: its cxx11abi{str(mislabel.abi).upper()} wheel "
            f"for torch {mislabel.torch} is mislabelled ({mislabel.why}). flash-attn 2.7.4.post1 has a "
            "correctly built wheel for this torch",
            mislabel.source,
        )
    ]


def note_fa_wheels_unknown(kb: Knowledge, q: Query) -> list[Reason]:
    fa = kb.flash_attn.get(q.spec.flash_attn)
    if fa is None or q.sm is None or fa.wheels.known:
        return []
    return [
        Reason(
            "flash-attn-wheels-unknown",
            f"flash-attn {fa.version} is built from source: its published wheel matrix could not be read",
            fa.conflict or fa.source,
        )
    ]


def _aarch64_torch(q: Query) -> tuple[str | None, str]:
    """(PyPI's aarch64 build of the cell's torch: 'cpu', a CUDA version or None, its source)."""
    facts = platform_facts.load()
    row = facts.aarch64_build(q.spec.torch)
    return (row.build, row.source) if row else (None, "builder/knowledge/platforms.yaml torch_aarch64")


def rule_platform_torch(kb: Knowledge, q: Query) -> list[Reason]:
    """On linux/arm64 the torch wheel must exist for aarch64 in the cell's variant. Only PyPI's
    aarch64 builds are verified; the torch index's aarch64 files could not be read."""
    if not q.arm64:
        return []
    facts = platform_facts.load()
    build, source = _aarch64_torch(q)
    want = "cpu" if q.target.is_cpu else q.spec.cuda
    if build == want:
        return []
    if build is None:
        have = "no aarch64 build of it is recorded"
    else:
        have = f"PyPI's aarch64 wheel of it is a {'CPU' if build == 'cpu' else 'CUDA ' + build} build"
    cpu_rows = [r for r in facts.aarch64_pypi if r.build == "cpu"]
    if q.target.is_cpu and cpu_rows:
        fix = f"use a torch in {cpu_rows[-1].torch} for a CPU image on arm64"
    elif build and build != "cpu" and not q.target.is_cpu:
        fix = f"use cuda {build} on arm64"
    else:
        fix = "use a torch release whose PyPI aarch64 build matches"
    index = "" if facts.aarch64_index_verified else " (the torch index's aarch64 files are not verified)"
    return [
        Reason(
            "platform-torch-wheel",
            f"linux/arm64: torch {q.spec.torch} {_variant_name(q.variant)} has no verified aarch64 wheel: "
            f"{have}{index}; {fix}",
            source,
        )
    ]


def rule_platform_sm(kb: Knowledge, q: Query) -> list[Reason]:
    """The aarch64 CUDA wheel carries its own arch list (sm_80 and up), not the x86_64 one."""
    if not q.arm64 or q.sm is None:
        return []
    facts = platform_facts.load()
    row = facts.aarch64_build(q.spec.torch)
    if row is None or row.build != q.spec.cuda or any(contract.runs_on(c, q.sm) for c in row.sm):
        return []
    have = ", ".join(f"sm_{c}" for c in row.sm)
    return [
        Reason(
            "platform-torch-arch",
            f"linux/arm64: torch {q.spec.torch}'s aarch64 wheel carries {have}, nothing that runs on "
            f"sm_{q.sm} ({q.target.name}); build this target for linux/amd64 only",
            row.source,
        )
    ]


def rule_platform_triton(kb: Knowledge, q: Query) -> list[Reason]:
    """Triton publishes aarch64 wheels only from 3.5.0: an older pin cannot be installed there."""
    if not q.arm64 or q.sm is None:
        return []
    facts = platform_facts.load()
    triton, version, _, _ = _triton_decision(kb, q.target, q.spec, kb.torch[q.spec.torch])
    if triton != "keep" or version is None or Version(version) >= Version(facts.triton_aarch64_min):
        return []
    return [
        Reason(
            "platform-triton",
            f"linux/arm64: triton {version} has no aarch64 wheel (first: {facts.triton_aarch64_min}); "
            "set triton: remove or use a newer torch",
            facts.triton_aarch64_source,
        )
    ]


def rule_platform_base(kb: Knowledge, q: Query) -> list[Reason]:
    if not q.arm64 or q.sm is None:
        return []
    facts = platform_facts.load()
    if facts.cuda_images_arm64:
        return []
    return [Reason("platform-base", "linux/arm64: no nvidia/cuda arm64 tag", facts.cuda_images_source)]


Rule = Callable[[Knowledge, Query], list[Reason]]

# Stages run in order; a stage whose reasons include a gate rule ends the check, since
# later rules read facts (the torch release, the CUDA release) that do not exist then.
STAGES: tuple[tuple[Rule, ...], ...] = (
    (rule_torch_known,),
    (rule_torch_python, rule_cuda_kind),
    (rule_torch_variant, rule_cuda_known),
    (
        rule_cuda_drops_sm,
        rule_torch_arch,
        rule_torch_ptx_strip,
        rule_dtype,
        rule_base_os,
        rule_triton,
        rule_flash_attn,
        rule_flash_attn_runtime_sm,
        rule_flash_attn_compiled_sm,
        rule_stack,
        rule_platform_torch,
        rule_platform_sm,
        rule_platform_triton,
        rule_platform_base,
        rule_deepspeed_release,
        rule_deepspeed_ops,
    ),
)
GATES = frozenset({"torch-unknown", "gpu-no-cuda", "cuda-unknown"})


def note_fa_platform(kb: Knowledge, q: Query) -> list[Reason]:
    fa = kb.flash_attn.get(q.spec.flash_attn)
    facts = platform_facts.load()
    if fa is None or not q.arm64 or q.sm is None or facts.fa_aarch64_wheels:
        return []
    return [
        Reason(
            "flash-attn-aarch64",
            f"linux/arm64: flash-attn {fa.version} has no aarch64 wheel, so it is compiled from source "
            f"for sm_{q.sm} only, with MAX_JOBS from the builder's memory",
            facts.fa_aarch64_source,
        )
    ]


NOTES: tuple[Rule, ...] = (
    note_fa_platform,
    note_arch_conflict,
    note_fa_without_triton,
    note_fa_wheel_abi,
    note_fa_wheels_unknown,
)


def reasons(kb: Knowledge, q: Query) -> list[Reason]:
    """Every reason the cell is invalid (empty when valid), stage by stage."""
    found: list[Reason] = []
    for stage in STAGES:
        for rule in stage:
            found.extend(rule(kb, q))
        if any(r.rule in GATES for r in found):
            break
    return found


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
            f"torch {release.version} requires triton{pin.requires} only for Python < "
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
    floor = kb.triton_min_version(target.sm)
    if floor is not None and Version(pin.version) < Version(floor[0]):
        why = (
            f"triton {pin.version} (pinned by torch {release.version}) cannot compile for sm_{target.sm}: "
            f"its ptxas does not know the GPU (triton {floor[0]}+ does); removed"
        )
        if target.triton == "keep":
            problem = Reason(
                "triton-too-old-for-sm",
                f"triton {pin.version} cannot compile for sm_{target.sm} ({target.name}); it needs triton "
                f"{floor[0]}+: set triton: auto (removes it), or use a torch that pins a newer triton",
                floor[1],
            )
            return "remove", pin.version, why, problem
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
    platform: str = DEFAULT_PLATFORM,
) -> tuple[FlashAttnPlan | None, Reason | None]:
    assert target.sm is not None
    cuda_major = spec.cuda.split(".")[0]
    strategy, filename, _ = _fa_choice(kb, Query(target, spec, "", platform=platform), fa)
    if strategy == "wheel" and filename:
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
        same_major = [a for a in kb.fa_source_archs if contract.runs_on(a, target.sm)]
        archs = str(max(same_major)) if same_major else None
    builder = _cuda_image(kb, spec.cuda, "devel", distro)
    return FlashAttnPlan("source", fa.version, None, archs, builder), None


def _fa_choice(kb: Knowledge, q: Query, fa: FlashAttnRelease) -> tuple[str, str | None, Mislabelled | None]:
    """("wheel", its filename, None) when a correctly built prebuilt wheel fits the cell, else
    ("source", None, the mislabelled wheel that was passed over or None)."""
    spec = q.spec
    if q.arm64 and not platform_facts.load().fa_aarch64_wheels:
        return "source", None, None
    release = kb.torch[spec.torch]
    tv = Version(spec.torch)
    torch_mm = f"{tv.major}.{tv.minor}"
    abi = release.abi(q.variant)
    token = kb.fa_cuda_token(fa.version, spec.cuda)
    cuda_major = spec.cuda.split(".")[0]
    if not token or not fa.wheels.has(torch_mm=torch_mm, cuda_major=cuda_major, python=spec.python, abi=abi):
        return "source", None, None
    mislabel = fa.wheels.mislabel(torch_mm=torch_mm, abi=abi)
    if mislabel is not None:
        return "source", None, mislabel
    filename = kb.fa_wheel_filename.format(
        version=fa.version,
        cuda_token=token,
        torch_mm=torch_mm,
        abi=str(abi).upper(),
        py=spec.python.replace(".", ""),
    )
    return "wheel", filename, None


def _cuda_image(kb: Knowledge, cuda: str, flavour: str, distro: Distro) -> str:
    patch = kb.cuda[cuda].latest_patch
    tag = kb.cuda_image_tag.format(patch=patch, cudnn="", flavour=flavour, ubuntu=distro.version)
    return f"{kb.cuda_image_repo}:{tag}"


def check(
    kb: Knowledge,
    target: TargetConfig,
    spec: CellSpec,
    *,
    dtype: str | None = None,
    origin: str,
    hints: bool = True,
    platform: str = DEFAULT_PLATFORM,
) -> Verdict:
    """Run every rule on one cell; return it with its plan, or rejected with all its reasons."""
    want = dtype or (target.dtype if target.dtype != "auto" else default_dtype(kb, target.sm))
    q = Query(target, spec, want, hints, platform)
    on = (platform,)
    found = reasons(kb, q)
    if found:
        return Rejected(spec, target.sm, want, origin, reasons=tuple(found), platforms=on)
    plan, problem = _plan(kb, q)
    if problem is not None or plan is None:
        return Rejected(spec, target.sm, want, origin, reasons=(problem,) if problem else (), platforms=on)
    notes = tuple(n for note in NOTES for n in note(kb, q))
    return Cell(spec, target.sm, want, origin, notes=notes, plan=plan, platforms=on)


def _plan(kb: Knowledge, q: Query) -> tuple[Plan | None, Reason | None]:
    """The build plan of a cell that passed every rule (a few facts still refuse it here)."""
    target, spec, sm = q.target, q.spec, q.sm
    release = kb.torch[spec.torch]
    distro, _ = _distro_for(kb, target, spec)
    assert distro is not None  # rule_base_os passed
    fa_plan = FlashAttnPlan("none", None, None, None, None)
    fa = kb.flash_attn.get(spec.flash_attn)
    if fa is not None:
        planned, problem = _fa_plan(kb, target, spec, fa, release, distro, q.platform)
        if problem or planned is None:
            return None, problem
        fa_plan = planned
    if target.is_cpu:
        base_image = distro.image or f"debian:{distro.codename}-slim"
        os_name = f"debian{distro.version}"
        min_driver, driver_why = None, "CPU image: no driver needed"
        arch_list_str = ""
    else:
        assert sm is not None
        cuda = kb.cuda[spec.cuda]
        if cuda.latest_patch is None:
            return None, Reason(
                "cuda-image", f"no nvidia/cuda image tag is recorded for CUDA {spec.cuda}", cuda.source
            )
        base_image = _cuda_image(kb, spec.cuda, "base", distro)
        os_name = f"ubuntu{distro.version}"
        min_driver, driver_why = _min_driver(kb, spec.cuda, sm, _coverage(kb, q))
        arch_list_str = f"{sm // 10}.{sm % 10}"
    triton, triton_version, triton_why, _ = _triton_decision(kb, target, spec, release)
    triton_pin = f"triton=={triton_version}" if triton == "keep" and release.triton.is_range else None
    # What plain `pip install torch==X` gets on this platform: PyPI's build of the release.
    pypi_build = (_aarch64_torch(q)[0] if q.arm64 else None) or release.pypi_default
    is_default = q.variant == pypi_build
    name = _variant_name(q.variant)
    torch_plan = TorchPlan(
        version=spec.torch,
        cuda=None if target.is_cpu else spec.cuda,
        index_url=None if is_default else kb.torch_index_url.format(variant=name),
        requirement=f"torch=={spec.torch}" if is_default else f"torch=={spec.torch}+{name}",
        cxx11_abi=release.abi(q.variant),
    )
    attn = "flash_attention_2" if fa_plan.strategy != "none" else "sdpa"
    ds_plan = _deepspeed_plan(kb, q, distro)
    env = contract.plan_env(
        {
            "target": spec.target,
            "alias": f"{spec.target}-{q.dtype}",
            "sm": "none" if sm is None else str(sm),
            "dtype": q.dtype,
            "attn": attn,
            "torch": spec.torch,
            "cuda": torch_plan.cuda or "none",
            "flash_attn": fa_plan.version or "none",
            "triton": triton,
            "deepspeed": ds_plan.version,
            "ds_ops": ds_plan.ops_env,
        }
    )
    if arch_list_str:
        env["TORCH_CUDA_ARCH_LIST"] = arch_list_str
    stack = {p: pin.version for p in kb.stack if (pin := kb.stack_pin(p, spec.python, spec.torch))}
    plan = Plan(
        base_image=base_image,
        os=os_name,
        python=spec.python,
        torch=torch_plan,
        flash_attn=fa_plan,
        triton=triton,
        triton_version=triton_version,
        triton_reason=triton_why,
        dtype=q.dtype,
        attn_implementation=attn,
        torch_cuda_arch_list=arch_list_str,
        min_driver=min_driver,
        min_driver_reason=driver_why,
        stack=stack,
        env=env,
        tags=(),
        labels={},
        deepspeed=ds_plan,
        triton_pin=triton_pin,
    )
    return plan, None


def _deepspeed_plan(kb: Knowledge, q: Query, distro: Distro) -> DeepSpeedPlan:
    """The release and the ops a cell that passed the DeepSpeed rules prebuilds, for its SM only."""
    ds = kb.deepspeed
    release = ds.choose(q.spec.torch, q.spec.python)
    assert release is not None  # rule_deepspeed_release passed
    ops = _ds_ops(kb, q.target)
    if not ops:
        return DeepSpeedPlan(
            release.version, (), None, {}, release.sdist_sha256, None, None, None, release.source
        )
    assert q.sm is not None  # rule_deepspeed_ops refuses ops on the cpu target
    cuda_ops = [op for op in ops if not ds.op(op).host]
    # Host ops (cpu_adam) are compiled for the platform's portable ISA, not the build machine's.
    machine = platform_facts.load().platform(q.platform).machine
    isa = ds.isa_for(machine) if any(ds.op(op).host for op in ops) else None
    env = ds.build_env_for(ops, q.sm)
    if not cuda_ops:
        del env["TORCH_CUDA_ARCH_LIST"]
    return DeepSpeedPlan(
        version=release.version,
        ops=ops,
        arch_list=env.get("TORCH_CUDA_ARCH_LIST"),
        build_env=env,
        sdist_sha256=release.sdist_sha256,
        march=isa.march if isa else None,
        simd=isa.simd if isa else None,
        builder_image=_cuda_image(kb, q.spec.cuda, "devel", distro),
        source=release.source,
        libraries=tuple(str(ds.op(op).module).replace(".", "/") for op in ops),
    )


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
            f"{arch.family} (sm_{sm}) needs driver {arch.min_driver}+",
        )
    return floor, why


def _variant_name(variant: str) -> str:
    return "cpu" if variant == "cpu" else "cu" + variant.replace(".", "")


# ----------------------------------------------------------------------------- tags & labels


def finish(cell: Cell, *, image: str, recommended: bool) -> Cell:
    """Attach tags and OCI labels once we know whether the cell is its target's recommended one."""
    base = cell.plan
    cell = replace(cell, recommended=recommended)
    tags = (cell.alias, cell.pinned) if recommended else (cell.pinned,)
    for tag in tags:
        names.check_tag(tag, f"targets.{cell.spec.target}")
    plan = replace(base, tags=tuple(f"{image}:{t}" for t in tags))
    return replace(cell, plan=replace(plan, labels=labels(cell, plan)))


def labels(cell: Cell, plan: Plan) -> dict[str, str]:
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
        "deepspeed": {
            "version": plan.deepspeed.version,
            "ops": list(plan.deepspeed.ops),
            "arch_list": plan.deepspeed.arch_list,
            "march": plan.deepspeed.march,
        },
    }
    return {
        "org.opencontainers.image.title": f"qwen-ft {cell.id}",
        "org.opencontainers.image.description": (
            f"Qwen fine-tuning image for {cell.spec.target} ({plan.dtype}, {plan.attn_implementation})"
        ),
        "org.opencontainers.image.base.name": plan.base_image,
        contract.TARGET: cell.spec.target,
        contract.SM: "none" if cell.sm is None else str(cell.sm),
        contract.ALIAS: cell.alias,
        contract.PINNED: cell.pinned,
        contract.DTYPE: plan.dtype,
        contract.ATTN: plan.attn_implementation,
        contract.TORCH: plan.torch.version,
        contract.CUDA: cell.spec.cuda,
        contract.PYTHON: plan.python,
        contract.FLASH_ATTN: plan.flash_attn.version or "none",
        contract.TRITON: plan.triton,
        contract.MIN_DRIVER: plan.min_driver or "none",
        contract.DEEPSPEED: plan.deepspeed.version,
        contract.DS_OPS: plan.deepspeed.ops_env,
        contract.SPEC: json.dumps(spec, sort_keys=True, separators=(",", ":")),
    }


# ----------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Resolution:
    config: MatrixConfig
    cells: tuple[Cell, ...]  # the images: recommended first per target, in target order
    excluded: tuple[Verdict, ...]  # invalid cells, and valid candidates that are not images

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


def best(
    kb: Knowledge, cells: Iterable[Verdict], accept: Callable[[Cell], bool] = lambda c: True
) -> Cell | None:
    """The most preferred valid cell that `accept` takes, or None."""
    chosen: Cell | None = None
    for cell in cells:
        if not isinstance(cell, Cell) or not accept(cell):
            continue
        if chosen is None or preference(kb, cell) > preference(kb, chosen):
            chosen = cell
    return chosen


@dataclass(frozen=True)
class Space:
    """Candidate values per axis; a cell is one value of each."""

    cuda: Sequence[str]
    torch: Sequence[str]
    python: Sequence[str]
    flash_attn: Sequence[str]

    def specs(self, target: str) -> Iterator[CellSpec]:
        for cuda, torch, python, fa in itertools.product(self.cuda, self.torch, self.python, self.flash_attn):
            yield CellSpec(target=target, cuda=cuda, torch=torch, python=python, flash_attn=fa)


def known_space(kb: Knowledge, target: TargetConfig) -> Space:
    """Every value the knowledge base knows for each axis (the target's own first)."""
    if target.is_cpu:
        cuda: Sequence[str] = ["none"]
        pythons = {d.python for d in kb.distros if d.os == "debian"}
        fa: Sequence[str] = ["none"]
    else:
        cuda = sorted(kb.cuda, key=Version)
        pythons = {d.python for d in kb.distros if d.os == "ubuntu"}
        fa = sorted({*target.axes.flash_attn, *kb.flash_attn, "none"})
    return Space(
        cuda=cuda,
        torch=sorted(kb.torch, key=Version),
        python=sorted({*target.axes.python, *pythons}, key=Version),
        flash_attn=fa,
    )


def search(
    kb: Knowledge,
    target: TargetConfig,
    specs: Iterable[CellSpec],
    *,
    accept: Callable[[Cell], bool] = lambda c: True,
    dtype: str | None = None,
    origin: str = "search",
    platform: str = DEFAULT_PLATFORM,
) -> Cell | None:
    """The best valid cell among `specs` that `accept` takes: the one search every caller uses
    (recommended cells, doctor's driver fallback, explain's completion of unspecified axes)."""
    # Only valid cells come back, so rejected ones need no hints (each hint is a check).
    return best(
        kb,
        (check(kb, target, s, dtype=dtype, origin=origin, hints=False, platform=platform) for s in specs),
        accept,
    )


def _merge(verdicts: Sequence[Cell]) -> list[Cell]:
    """One image per distinct (spec, plan): a stack that is the same on several platforms is one
    image (one Dockerfile, one manifest list); a platform whose plan differs gets its own."""
    merged: list[Cell] = []
    for cell in verdicts:
        for i, have in enumerate(merged):
            if have.spec.key() == cell.spec.key() and have.plan == cell.plan:
                merged[i] = replace(have, platforms=(*have.platforms, *cell.platforms))
                break
        else:
            merged.append(cell)
    return merged


def _platform_reasons(
    image: Cell,
    platforms: Sequence[str],
    chosen: Mapping[str, Cell],
    rejected: Mapping[tuple[str, str], Verdict],
) -> tuple[tuple[str, tuple[Reason, ...]], ...]:
    """For each platform of the target this image is not built for: why (another image there, or
    the reasons this stack is invalid there)."""
    out = []
    for platform in platforms:
        if platform in image.platforms:
            continue
        other = chosen.get(platform)
        why: tuple[Reason, ...]
        if other is not None and other.spec.key() != image.spec.key():
            why = (
                Reason(
                    "platform-other-image",
                    f"{platform} gets {other.pinned} instead (its recommended image, same alias)",
                    "README 'Platforms'",
                ),
            )
        else:
            bad = rejected.get((platform, image.pinned))
            why = bad.reasons if bad is not None else ()
            if not why and other is not None:
                why = (
                    Reason(
                        "platform-plan-differs",
                        f"{platform} builds this stack differently, so it is a separate image ({other.id})",
                        "README 'Platforms'",
                    ),
                )
        if why:
            out.append((platform, why))
    return tuple(out)


def resolve_target(config: MatrixConfig, kb: Knowledge, name: str) -> tuple[list[Cell], list[Verdict]]:
    """One target's images (recommended first) and its excluded cells, for each of its platforms."""
    target = config.targets[name]
    platforms = target.axes.platform
    excluded: list[Verdict] = []
    candidates: dict[str, list[Cell]] = {p: [] for p in platforms}
    rejected: dict[tuple[str, str], Verdict] = {}
    space = Space(target.axes.cuda, target.axes.torch, target.axes.python, target.axes.flash_attn)
    specs = [s for s in space.specs(name) if not any(_matches(rule, s) for rule in config.exclude)]
    for platform in platforms:
        for spec in specs:
            cell = check(kb, target, spec, origin="axes", platform=platform)
            if isinstance(cell, Cell):
                candidates[platform].append(cell)
            else:
                excluded.append(cell)
                rejected[(platform, cell.pinned)] = cell
    chosen: dict[str, Cell] = {}
    for platform in platforms:
        if target.recommended is not None:
            pin = check(kb, target, target.recommended, origin="pin", platform=platform)
            if isinstance(pin, Cell):
                chosen[platform] = pin
            elif platform == platforms[0] or len(platforms) == 1:
                why = "; ".join(r.message for r in pin.reasons)
                raise ConfigError(f"{config.path}: targets.{name}.recommended is invalid: {why}")
            else:
                rejected[(platform, pin.pinned)] = pin
            continue
        found = best(kb, candidates[platform])
        if found is not None:
            chosen[platform] = _note_wheel_policy(kb, name, found, candidates[platform])
    if not chosen:
        first = excluded[-1].reasons[0].message if excluded else "no candidates"
        raise ConfigError(
            f"{config.path}: targets.{name}: every cell is invalid (e.g. {first}); "
            f"run `qwen-ft-images matrix --all` to see each reason"
        )
    images = [
        finish(
            replace(cell, platform_reasons=_platform_reasons(cell, platforms, chosen, rejected)),
            image=config.image,
            recommended=True,
        )
        for cell in _merge([chosen[p] for p in platforms if p in chosen])
    ]
    built = {(p, c.spec.key()) for c in images for p in c.platforms}
    for i, inc in enumerate(config.include):
        if inc.target != name:
            continue
        valid: list[Cell] = []
        invalid: list[Rejected] = []
        for platform in platforms:
            if (platform, inc.key()) in built:
                valid.append(check(kb, target, inc, origin="include", platform=platform))  # type: ignore[arg-type]
                continue
            cell = check(kb, target, inc, origin="include", platform=platform)
            if isinstance(cell, Cell):
                valid.append(cell)
            else:
                invalid.append(cell)
                excluded.append(cell)
                rejected[(platform, cell.pinned)] = cell
        if not valid:  # an image asked for by name never vanishes silently
            why = "; ".join(r.message for bad in invalid for r in bad.reasons)
            raise ConfigError(
                f"{config.path}: include[{i}] ({invalid[0].id}) is invalid: {why}; "
                f"fix or remove it (`qwen-ft-images explain {name} ...` shows why)"
            )
        for cell in _merge([c for c in valid if (c.platforms[0], inc.key()) not in built]):
            cell = replace(cell, platform_reasons=_platform_reasons(cell, platforms, {}, rejected))
            images.append(finish(cell, image=config.image, recommended=False))
    # Other valid axis cells are candidates, not images: they appear in `matrix --all`.
    for platform in platforms:
        excluded.extend(
            replace(c, origin="candidate")
            for c in candidates[platform]
            if (platform, c.spec.key()) not in built
        )
    return images, excluded


def _note_wheel_policy(kb: Knowledge, name: str, chosen: Cell, candidates: Sequence[Cell]) -> Cell:
    """Say so when the prebuilt-wheel preference, not a rule, keeps the image on an older torch."""
    if chosen.plan.flash_attn.strategy != "wheel":
        return chosen
    newer = [c for c in candidates if Version(c.spec.torch) > Version(chosen.spec.torch)]
    if not newer:
        return chosen
    alt = max(newer, key=lambda c: preference(kb, c))
    how = "built from source" if alt.plan.flash_attn.strategy == "source" else "left out"
    note = Reason(
        "flash-attn-wheel-policy",
        f"{name} stays on torch {chosen.spec.torch} only because it is the newest torch in the axes with "
        f"a prebuilt flash-attn wheel; torch {alt.spec.torch} (cuda {alt.spec.cuda}, python "
        f"{alt.spec.python}) is valid too, with flash-attn {how}. Set targets.{name}.recommended to take it",
        "README 'How a cell is picked' (1. a prebuilt flash-attn wheel beats compiling it)",
    )
    return replace(chosen, notes=(*chosen.notes, note))


def resolve(config: MatrixConfig, kb: Knowledge) -> Resolution:
    cells: list[Cell] = []
    excluded: list[Verdict] = []
    for name in config.targets:
        images, rest = resolve_target(config, kb, name)
        cells.extend(images)
        excluded.extend(rest)
    return Resolution(config=config, cells=tuple(cells), excluded=tuple(excluded))


AXES = ("cuda", "torch", "python", "flash_attn")


def explain(
    config: MatrixConfig,
    kb: Knowledge,
    target_name: str,
    *,
    overrides: Mapping[str, str | None],
    dtype: str | None,
    platform: str | None = None,
) -> Verdict:
    """Verdict and plan for any cell of a target, including ones not in matrix.yaml.

    The axes not given are completed by the policy that picks recommended cells
    (`preference`), among the values that make the cell valid: first the target's own
    matrix axes, then every value the knowledge base knows. `filled` names the completed
    axes. The cell is INVALID only when no completion exists; `blocking` then names the
    given axes (or `dtype`) that no completion can keep.
    """
    target = find_target(config, target_name)
    images = resolve_target(config, kb, target.name)[0]
    on = platform or target.axes.platform[0]
    rec = next((c for c in images if c.recommended and on in c.platforms), None)
    given = {k: v for k, v in overrides.items() if v is not None}
    free = tuple(a for a in AXES if a not in given)
    if rec is not None and not given and dtype in (None, rec.dtype):
        return replace(rec, filled=free)
    found = complete(kb, target, given, dtype, on)
    if found is None or rec is None:
        spec = found.spec if found is not None else replace(rec.spec if rec else images[0].spec, **given)
        verdict = check(kb, target, spec, dtype=dtype, origin="explain", platform=on)
        if isinstance(verdict, Cell) and rec is None:
            # valid on this platform, but the target does not build for it
            verdict = Rejected(
                verdict.spec,
                verdict.sm,
                verdict.dtype,
                "explain",
                platforms=(on,),
                reasons=(
                    Reason(
                        "platform-not-built",
                        f"{target.name} is not built for {on}, though {verdict.pinned} would be valid there; "
                        f"add {on} to targets.{target.name}.axes.platform",
                        "matrix.yaml",
                    ),
                ),
            )
        return replace(verdict, filled=free, blocking=_blocking(kb, target, given, dtype, on))
    if found.spec == rec.spec and found.dtype == rec.dtype and found.plan == rec.plan:
        return replace(rec, filled=free)
    cell = replace(finish(found, image=config.image, recommended=False), origin="explain", filled=free)
    if found.dtype != rec.dtype:
        # Every image of this target is built in rec.dtype: no build produces a tag for this one.
        note = Reason(
            "dtype-not-built",
            f"no image of {target.name} is built in {found.dtype} (its images use {rec.dtype}); "
            f"set targets.{target.name}.dtype: {found.dtype} in matrix.yaml to build one",
            "matrix.yaml targets",
        )
        cell = replace(cell, notes=(*cell.notes, note), plan=replace(cell.plan, tags=()))
    return cell


def complete(
    kb: Knowledge,
    target: TargetConfig,
    given: Mapping[str, str],
    dtype: str | None,
    platform: str = DEFAULT_PLATFORM,
) -> Cell | None:
    """The preferred valid cell that keeps `given`: other axes from the matrix first, then from the KB."""
    axes = Space(target.axes.cuda, target.axes.torch, target.axes.python, target.axes.flash_attn)
    for space in (axes, known_space(kb, target)):
        keep = replace(space, **{k: [v] for k, v in given.items()})
        cell = search(kb, target, keep.specs(target.name), dtype=dtype, origin="explain", platform=platform)
        if cell is not None:
            return cell
    return None


def _blocking(
    kb: Knowledge,
    target: TargetConfig,
    given: Mapping[str, str],
    dtype: str | None,
    platform: str = DEFAULT_PLATFORM,
) -> tuple[str, ...]:
    """The given axes that, alone, leave no valid completion; all of them when only the set does."""
    alone = [
        a for a in given if complete(kb, target, {k: v for k, v in given.items() if k != a}, dtype, platform)
    ]
    if dtype is not None and complete(kb, target, given, None, platform) is not None:
        alone.append("dtype")
    return tuple(alone) or (*given, *(("dtype",) if dtype else ()))


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


def on_platform(cells: Iterable[Cell], platform: str, selectors: Iterable[str]) -> tuple[Cell, ...]:
    """The cells to run on a host of `platform`: its own images, plus any other platform's image
    named by its exact id (it then runs under emulation). `smoke cpu` on x86_64 runs cpu-fp32;
    `smoke cpu-fp32-arm64` runs the arm64 one through qemu."""
    named = set(selectors)
    return tuple(c for c in cells if platform in c.platforms or c.id in named)


def select_one(resolution: Resolution, name: str, platform: str = DEFAULT_PLATFORM) -> Cell | None:
    """The one image `name` names (target -> its recommended image on `platform`), or None."""
    try:
        hits = select(resolution, [name])
    except ConfigError:
        return None
    if len(hits) > 1:
        hits = tuple(c for c in hits if c.recommended) or hits
    if len(hits) > 1:
        hits = on_platform(hits, platform, [name]) or hits
    if len(hits) > 1:
        raise ConfigError(
            f"'{name}' names {len(hits)} images ({', '.join(c.id for c in hits)}); name one by its id"
        )
    return hits[0]
