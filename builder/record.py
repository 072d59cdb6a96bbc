"""The build record (build/report.json): what `build` leaves behind, and the up-to-date
answer (builder.uptodate) that writes the same record without building.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.fsio import write_atomic
from builder.proxy import redact

if TYPE_CHECKING:
    from builder.jobs import BuildJob
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


# ----------------------------------------------------------------------------- the build record


def record(
    project: Project,
    results: Sequence[ImageResult],
    options: BuildOptions,
    engine_version: str,
    started: float,
) -> Path:
    """build/report.json: this run's images and the options it ran with (credentials redacted)."""
    return write_record(project, results, _meta(options, engine_version, started))


def _meta(options: BuildOptions, engine_version: str, started: float) -> dict[str, Any]:
    return {
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


def up_to_date_answer(project: Project, jobs: Sequence[BuildJob], options: BuildOptions) -> dict[str, Any]:
    """What builder.uptodate needs to say "up to date" for these jobs: each image's content
    hash and tags, and this record as it would be written (the engine fills in each image's
    ID and size, the time and its version)."""
    return {
        "root": str(project.root),
        "jobs": [{"name": j.name, "digest": j.digest, "tags": list(j.tags)} for j in jobs],
        "record": {
            "meta": _meta(options, "", 0.0),
            "images": [
                _public(asdict(ImageResult(image=j.name, status="up-to-date", tags=list(j.tags))))
                for j in jobs
            ],
        },
    }


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
