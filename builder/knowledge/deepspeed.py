"""Typed view of builder/knowledge/deepspeed.yaml: releases, ops, the recipe's ops, build ENV,
what an image plans and the portable host ISA of C++ ops. `knowledge.load()` carries it as
`Knowledge.deepspeed`; the resolver plans each cell's DeepSpeed from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from builder.errors import KnowledgeError

from . import _strs, read_yaml


@dataclass(frozen=True)
class DsRelease:
    version: str
    torch: str  # a PEP 440 specifier, or "any"
    python_classifiers: tuple[str, ...]
    verified_python: tuple[str, ...]
    sdist_sha256: str
    source: str

    def supports_torch(self, torch_version: str) -> bool:
        if self.torch == "any":
            return True
        return Version(torch_version.split("+", 1)[0]) in SpecifierSet(self.torch)

    def supports_python(self, python: str) -> bool:
        """Classifiers, or built and run here: setup.py sets no python_requires to enforce."""
        return python in self.python_classifiers or python in self.verified_python


@dataclass(frozen=True)
class DsOp:
    name: str
    build_var: str
    module: str | None
    host: bool  # a C++ op: no nvcc, no SM
    min_sm: int | None
    source: str


@dataclass(frozen=True)
class RecipeOp:
    when: str
    role: str  # optimizer | offload_optimizer | zero3 | cpu_comm
    op: str | None
    source: str


@dataclass(frozen=True)
class BuildVar:
    name: str
    value: str
    why: str
    source: str


@dataclass(frozen=True)
class HostIsa:
    machine: str  # uname -m
    march: str
    simd: str  # the define simd_width() would pick, e.g. __AVX256__
    why: str
    source: str


@dataclass(frozen=True)
class RunFlag:
    flag: str  # a `docker run` flag a multi-GPU training container needs
    why: str
    source: str


@dataclass(frozen=True)
class DeepSpeedKnowledge:
    releases: tuple[DsRelease, ...]
    ops: dict[str, DsOp]
    recipe_ops: tuple[RecipeOp, ...]
    build_env: tuple[BuildVar, ...]
    install_record: str
    load_rule: str
    gpu_ops: tuple[str, ...]  # what a GPU image prebuilds by default
    cpu_ops: tuple[str, ...]  # what the cpu image prebuilds (none: no compiler there)
    image_plan_source: str
    host_isa: dict[str, HostIsa]
    run_flags: tuple[RunFlag, ...] = ()
    ib_packages: tuple[str, ...] = ()  # apt packages NCCL's InfiniBand transport needs
    ib_source: str = ""

    def release(self, version: str) -> DsRelease | None:
        return next((r for r in self.releases if r.version == version), None)

    def isa_for(self, machine: str) -> HostIsa:
        """The portable host ISA C++ ops are built with on `machine` (uname -m)."""
        try:
            return self.host_isa[machine]
        except KeyError:
            known = ", ".join(self.host_isa)
            raise KnowledgeError(f"deepspeed.yaml host_isa has no {machine!r} (known: {known})") from None

    def choose(self, torch_version: str, python: str) -> DsRelease | None:
        """The newest release that declares this torch and supports this Python."""
        fits = [r for r in self.releases if r.supports_torch(torch_version) and r.supports_python(python)]
        return max(fits, key=lambda r: Version(r.version), default=None)

    def op(self, name: str) -> DsOp:
        try:
            return self.ops[name]
        except KeyError:
            raise KnowledgeError(f"unknown DeepSpeed op {name!r}; known: {', '.join(self.ops)}") from None

    def recipe(self, *, offload_optimizer: bool) -> tuple[str, ...]:
        """Ops Qwen's recipe loads on a GPU: the optimizer's (FusedAdam for AdamW), plus
        CPUAdam when ZeRO-Offload is offered; ZeRO-3 itself adds none."""
        roles = {"optimizer", "zero3"} | ({"offload_optimizer"} if offload_optimizer else set())
        return tuple(r.op for r in self.recipe_ops if r.role in roles and r.op is not None)

    def sm_problem(self, op: str, sm: int) -> str | None:
        """Why `op` cannot run on `sm` (e.g. 70), or None."""
        found = self.op(op)
        if found.host or found.min_sm is None or sm >= found.min_sm:
            return None
        return f"DeepSpeed op {op} needs SM>={found.min_sm}, target is sm_{sm} ({found.source})"

    def build_env_for(self, ops: tuple[str, ...], sm: int) -> dict[str, str]:
        """ENV for `pip install --no-build-isolation deepspeed` that prebuilds `ops` for `sm` only."""
        env = {"DS_ACCELERATOR": "cuda", "DS_BUILD_OPS": "0", "TORCH_CUDA_ARCH_LIST": f"{sm // 10}.{sm % 10}"}
        for op in ops:
            env[self.op(op).build_var] = "1"
        return env


def _source(entry: dict[str, Any], where: str) -> str:
    source = entry.get("source")
    if not isinstance(source, str) or not source.strip():
        raise KnowledgeError(f"deepspeed.yaml: {where} has no source")
    return source


@cache
def load_deepspeed() -> DeepSpeedKnowledge:
    try:
        return _build(read_yaml("deepspeed.yaml"))
    except (KeyError, TypeError, ValueError) as exc:
        raise KnowledgeError(f"builder/knowledge/deepspeed.yaml is malformed: {exc!r}") from exc


def _build(data: dict[str, Any]) -> DeepSpeedKnowledge:
    releases = []
    for r in data["releases"]:
        version = str(r["version"])
        sha = str(r["sdist_sha256"])
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise KnowledgeError(f"deepspeed.yaml: release {version} sdist_sha256 is not a sha256")
        torch = str(r["torch"])
        if torch != "any":
            SpecifierSet(torch)  # raises on a malformed specifier
        releases.append(
            DsRelease(
                version=version,
                torch=torch,
                python_classifiers=_strs(r["python_classifiers"]),
                verified_python=_strs(r["verified_python"]),
                sdist_sha256=sha,
                source=_source(r, f"release {version}"),
            )
        )
    ops = {
        str(o["name"]): DsOp(
            name=str(o["name"]),
            build_var=str(o["build_var"]),
            module=None if o["module"] is None else str(o["module"]),
            host=bool(o["host"]),
            min_sm=None if o["min_sm"] is None else int(o["min_sm"]),
            source=_source(o, f"op {o['name']}"),
        )
        for o in data["ops"]
    }
    recipe = tuple(
        RecipeOp(
            when=str(r["when"]),
            role=str(r["role"]),
            op=None if r["op"] is None else str(r["op"]),
            source=_source(r, "recipe op"),
        )
        for r in data["recipe_ops"]
    )
    build_env = tuple(
        BuildVar(
            name=str(b["name"]), value=str(b["value"]), why=str(b["why"]), source=_source(b, f"{b['name']}")
        )
        for b in data["build_env"]
    )
    image_plan = data["image_plan"]
    if image_plan["gpu_ops"] != "recipe_with_offload":
        raise KnowledgeError("deepspeed.yaml: image_plan.gpu_ops must be recipe_with_offload")
    knowledge = DeepSpeedKnowledge(
        releases=tuple(releases),
        ops=ops,
        recipe_ops=recipe,
        build_env=build_env,
        install_record=str(data["install_record"]["file"]),
        load_rule=str(data["load_rule"]["rule"]),
        gpu_ops=(),
        cpu_ops=_strs(image_plan["cpu_ops"]),
        image_plan_source=_source(image_plan, "image_plan"),
        host_isa={
            str(machine): HostIsa(
                machine=str(machine),
                march=str(isa["march"]),
                simd=str(isa["simd"]),
                why=str(isa["why"]),
                source=_source(isa, f"host_isa.{machine}"),
            )
            for machine, isa in data["host_isa"].items()
        },
        run_flags=tuple(
            RunFlag(flag=str(f["flag"]), why=str(f["why"]), source=_source(f, f"container_run {f['flag']}"))
            for f in data["container_run"]
        ),
        ib_packages=_strs(data["nccl_ib"]["apt"]),
        ib_source=_source(data["nccl_ib"], "nccl_ib"),
    )
    knowledge = replace(knowledge, gpu_ops=knowledge.recipe(offload_optimizer=True))
    _source(data["install_record"], "install_record")
    _source(data["load_rule"], "load_rule")
    for op in (*knowledge.gpu_ops, *knowledge.cpu_ops):
        knowledge.op(op)  # the planned ops must be described
    return knowledge
