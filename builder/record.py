"""The build record (build/report.json) and the no-op check: what `build` leaves behind, and
whether it has anything to do. Light on purpose: an up-to-date `build` imports only this,
the options and the engine's snapshot, never the build runner, the resolver or Jinja.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder import contract
from builder.fsio import write_atomic
from builder.proxy import redact

if TYPE_CHECKING:
    from builder.engine import Snapshot
    from builder.options import BuildOptions
    from builder.project import Project


@dataclass
class ImageResult:
    image: str
    status: str = "queued"  # queued | building | built | up-to-date | failed | skipped | interrupted
    step: str = ""
    seconds: float = 0.0
    size: int = 0
    image_id: str | None = None
    tags: list[str] = field(default_factory=list)
    pushed: dict[str, str] = field(default_factory=dict)  # remote ref -> digest
    failed_step: str | None = None
    error: str | None = None
    failed_in: str | None = None  # build | push
    log: str | None = None
    started: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("built", "up-to-date")


# ----------------------------------------------------------------------------- the no-op check


@dataclass(frozen=True)
class Planned:
    """What the no-op check needs of a build job: plain data, memoized as JSON (builder.memo)."""

    name: str
    digest: str
    tags: tuple[str, ...]  # the last one is the content-hash tag

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "digest": self.digest, "tags": list(self.tags)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Planned:
        return cls(str(data["name"]), str(data["digest"]), tuple(str(t) for t in data["tags"]))


def up_to_date(jobs: Sequence[Planned], snapshot: Snapshot | None) -> list[ImageResult] | None:
    """Every job's result when each is already built with every tag in place, else None.

    One Engine API snapshot answers for all images: an up-to-date `build` then costs no
    docker SDK, no CLI process, no resolution and no build; anything else takes the full path.
    """
    if snapshot is None:
        return None
    results = []
    for job in jobs:
        image = snapshot.tags.get(job.tags[-1])
        if image is None or image.labels.get(contract.CONTENT_HASH) != job.digest:
            return None
        if any(snapshot.tags.get(ref) != image for ref in job.tags):
            return None
        results.append(
            ImageResult(
                image=job.name, status="up-to-date", size=image.size, image_id=image.id, tags=list(job.tags)
            )
        )
    return results


# ----------------------------------------------------------------------------- the build record


def record(
    project: Project,
    results: Sequence[ImageResult],
    options: BuildOptions,
    engine_version: str,
    started: float,
) -> Path:
    """build/report.json: this run's images and the options it ran with (credentials redacted)."""
    meta = {
        "command": "build",
        "started": started,
        "seconds": round(time.time() - started, 2),
        "engine": engine_version,
        "options": {
            "jobs": options.jobs,
            "push": options.push,
            "registry": options.registry,
            "base_map": [f"{a}={b}" for a, b in options.base_map],
            "wheelhouse": str(options.wheelhouse) if options.wheelhouse else None,
            "ca_bundle": bool(options.ca_bundle),
            "http_proxy": redact(options.http_proxy),
            "https_proxy": redact(options.https_proxy),
        },
    }
    return write_record(project, results, meta)


def write_record(project: Project, results: Sequence[ImageResult], meta: Mapping[str, Any]) -> Path:
    path = project.build / "report.json"
    data = {**meta, "images": [_public(asdict(r)) for r in results]}
    write_atomic(path, json.dumps(data, indent=2) + "\n")
    return path


def _public(d: dict[str, Any]) -> dict[str, Any]:
    d.pop("started", None)
    d.pop("step", None)
    d["seconds"] = round(float(d["seconds"]), 2)
    return d
