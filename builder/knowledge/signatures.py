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
                )
            )
    except (KeyError, TypeError, re.error) as exc:
        raise KnowledgeError(f"builder/knowledge/signatures.yaml is malformed: {exc!r}") from exc
    return tuple(out)
