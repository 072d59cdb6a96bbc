"""Kernel-audit waivers (kernels.yaml): binaries whose missing SASS/PTX is known and harmless."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from functools import cache

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from builder.errors import KnowledgeError
from builder.knowledge import read_yaml


@dataclass(frozen=True)
class Waiver:
    id: str
    dist: str
    file: str
    sm: SpecifierSet | None
    reason: str
    source: str

    def applies(self, dist: str | None, path: str, target: int) -> bool:
        name = path.rsplit("/", 1)[-1]
        if not fnmatch.fnmatchcase(name, self.file) or not fnmatch.fnmatchcase(dist or "", self.dist):
            return False
        return self.sm is None or Version(str(target)) in self.sm


@cache
def load_waivers() -> tuple[Waiver, ...]:
    data = read_yaml("kernels.yaml")
    out = []
    try:
        for w in data["waivers"]:
            out.append(
                Waiver(
                    id=str(w["id"]),
                    dist=str(w["dist"]),
                    file=str(w["file"]),
                    sm=SpecifierSet(str(w["sm"])) if w.get("sm") else None,
                    reason=" ".join(str(w["reason"]).split()),
                    source=" ".join(str(w["source"]).split()),
                )
            )
    except (KeyError, TypeError, InvalidSpecifier) as exc:
        raise KnowledgeError(f"builder/knowledge/kernels.yaml is malformed: {exc!r}") from exc
    return tuple(out)
