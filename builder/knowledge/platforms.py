"""Platform facts (builder/knowledge/platforms.yaml): what linux/amd64 and linux/arm64 can run.

Typed records over the YAML, read through `read_yaml` like every other knowledge file; the
resolver's platform rules (builder/resolve.py) are pure functions over these.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from builder.errors import KnowledgeError

__all__ = ["AARCH64", "Platform", "PlatformFacts", "PypiBuild", "load"]

AARCH64 = "linux/arm64"


@dataclass(frozen=True)
class Platform:
    name: str  # linux/amd64
    machine: str  # x86_64: what uname -m says on such a host
    arch: str  # amd64: Docker's name, the suffix of local per-platform tags
    wheel_tag: str  # x86_64: the platform part of a manylinux wheel tag
    hosts: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class PypiBuild:
    """What the package index serves for linux aarch64 for a range of torch releases."""

    torch: SpecifierSet
    build: str  # "cpu" or a CUDA version ("13.0")
    sm: tuple[int, ...]
    source: str


@dataclass(frozen=True)
class PlatformFacts:
    platforms: dict[str, Platform]
    aarch64_pypi: tuple[PypiBuild, ...]
    aarch64_index_verified: bool
    aarch64_index_source: str
    triton_aarch64_min: str
    triton_aarch64_source: str
    fa_aarch64_wheels: bool
    fa_aarch64_strategy: str
    fa_aarch64_source: str
    cuda_images_arm64: bool
    cuda_images_source: str

    def platform(self, name: str) -> Platform:
        return self.platforms[name]

    def by_machine(self, machine: str) -> Platform | None:
        """The platform of a host whose `uname -m` is `machine` (arm64 is macOS's name for aarch64)."""
        m = {"arm64": "aarch64", "amd64": "x86_64"}.get(machine.lower(), machine.lower())
        return next((p for p in self.platforms.values() if p.machine == m), None)

    def aarch64_build(self, torch_version: str) -> PypiBuild | None:
        """The build PyPI serves on linux aarch64 for this torch release, if recorded."""
        v = Version(Version(torch_version).base_version)
        return next((b for b in self.aarch64_pypi if v in b.torch), None)


def _strs(items: Any) -> tuple[str, ...]:
    return tuple(str(i) for i in items)


def build(data: dict[str, Any]) -> PlatformFacts:
    platforms = {
        str(name): Platform(
            name=str(name),
            machine=str(p["machine"]),
            arch=str(p["arch"]),
            wheel_tag=str(p["wheel_tag"]),
            hosts=_strs(p.get("hosts", [])),
            source=str(p["source"]),
        )
        for name, p in data["platforms"].items()
    }
    pypi = tuple(
        PypiBuild(
            torch=SpecifierSet(str(r["torch"])),
            build=str(r["build"]),
            sm=tuple(int(s) for s in r.get("sm", [])),
            source=str(r["source"]),
        )
        for r in data["torch_aarch64"]["pypi"]
    )
    for row in pypi:
        if (row.build == "cpu") != (not row.sm):
            raise KnowledgeError(
                f"platforms.yaml torch_aarch64 {row.torch}: a CUDA build lists its SMs, a cpu build none"
            )
    fa = data["flash_attn_aarch64"]
    if not fa["wheels"] and fa["strategy"] not in ("source", "none"):
        raise KnowledgeError(
            "platforms.yaml flash_attn_aarch64: without wheels the strategy is source or none"
        )
    return PlatformFacts(
        platforms=platforms,
        aarch64_pypi=pypi,
        aarch64_index_verified=bool(data["torch_aarch64"]["index"]["verified"]),
        aarch64_index_source=str(data["torch_aarch64"]["index"]["source"]),
        triton_aarch64_min=str(Version(str(data["triton_aarch64"]["min_version"]))),
        triton_aarch64_source=str(data["triton_aarch64"]["source"]),
        fa_aarch64_wheels=bool(fa["wheels"]),
        fa_aarch64_strategy=str(fa["strategy"]),
        fa_aarch64_source=str(fa["source"]),
        cuda_images_arm64=bool(data["cuda_images"]["arm64"]),
        cuda_images_source=str(data["cuda_images"]["source"]),
    )


@cache
def load() -> PlatformFacts:
    from builder.knowledge import read_yaml

    try:
        return build(read_yaml("platforms.yaml"))
    except (KeyError, TypeError, ValueError) as exc:
        raise KnowledgeError(f"builder/knowledge/platforms.yaml is malformed: {exc!r}") from exc
