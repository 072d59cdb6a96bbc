"""Known failure signatures (signatures.yaml): what `doctor --log` matches a log against."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from builder.errors import KnowledgeError
from builder.knowledge import read_yaml


@dataclass(frozen=True)
class Signature:
    id: str
    title: str
    patterns: tuple[re.Pattern[str], ...]
    cause: str
    fix: str
    source: str
    images: Mapping[str, Any]
    # Each must match some line of the log too (e.g. a DeepSpeed frame for its no-kernel-image).
    requires: tuple[re.Pattern[str], ...] = ()
    # Signatures this one explains more precisely: dropped when this one is found.
    supersedes: tuple[str, ...] = ()


FILTER_KEYS = {"sm_below", "sm_at_least", "attn_implementation", "triton", "dtype", "recommended", "cpu"}


@cache
def load_signatures() -> tuple[Signature, ...]:
    data = read_yaml("signatures.yaml")
    out = []
    try:
        for s in data["signatures"]:
            images = dict(s.get("images") or {})
            unknown = set(images) - FILTER_KEYS
            if unknown:
                raise KnowledgeError(f"signatures.yaml {s['id']}: unknown image filter {sorted(unknown)}")
            out.append(
                Signature(
                    id=str(s["id"]),
                    title=str(s["title"]),
                    patterns=tuple(re.compile(str(p)) for p in s["patterns"]),
                    cause=" ".join(str(s["cause"]).split()),
                    fix=" ".join(str(s["fix"]).split()),
                    source=" ".join(str(s["source"]).split()),
                    images=images,
                    requires=tuple(re.compile(str(p)) for p in s.get("requires") or ()),
                    supersedes=tuple(str(i) for i in s.get("supersedes") or ()),
                )
            )
    except (KeyError, TypeError, re.error) as exc:
        raise KnowledgeError(f"builder/knowledge/signatures.yaml is malformed: {exc!r}") from exc
    ids = {s.id for s in out}
    for s in out:
        unknown = set(s.supersedes) - ids
        if unknown:
            raise KnowledgeError(f"signatures.yaml {s.id}: supersedes unknown {sorted(unknown)}")
    return tuple(out)
