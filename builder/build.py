"""Build, tag and push the planned jobs (builder/jobs.py) against an Engine, and record the run.

Safety rules this module keeps:
- an image is tagged only after its build succeeded, so a failed or interrupted
  build never replaces the previous good tag;
- one failing image does not stop the others (unless --fail-fast);
- pinned and content-hash tags are immutable in a registry; only the alias moves.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from builder import contract
from builder.content import stage_context
from builder.contract import qualify
from builder.engine import BuildRequest, DockerEngine, Engine, Snapshot
from builder.errors import RegistryError
from builder.fsio import write_atomic
from builder.jobs import CA_SECRET_ID, BuildJob, BuildOptions
from builder.project import Project
from builder.proxy import redact


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


# ----------------------------------------------------------------------------- preparing


def proxies(options: BuildOptions) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in (
        ("HTTP_PROXY", options.http_proxy),
        ("HTTPS_PROXY", options.https_proxy),
        ("NO_PROXY", options.no_proxy),
    ):
        if value:
            out[name] = value
            out[name.lower()] = value
    return out


def request_for(job: BuildJob, context: Path, options: BuildOptions) -> BuildRequest:
    return BuildRequest(
        name=job.name,
        dockerfile=job.dockerfile,
        context=context,
        build_args=job.build_args,
        labels=job.labels,
        secrets={CA_SECRET_ID: options.ca_bundle} if options.ca_bundle else {},
        proxies=proxies(options),
        network=options.network,
    )


def dry_run_lines(
    project: Project, jobs: Sequence[BuildJob], engine: DockerEngine, options: BuildOptions
) -> Iterator[str]:
    """The plan and the exact commands a build would run; nothing is run."""
    context = project.context
    for job in jobs:
        argv, env = engine.build_argv(request_for(job, context, options), project.logs / f"{job.name}.iid")
        yield f"# {job.name}: content hash {job.digest[:12]}; tags {', '.join(job.tags)}"
        yield " ".join([*(f"{k}={v}" for k, v in env.items()), shlex.join(argv)])
        for ref in job.tags:
            yield shlex.join([engine.exe, "tag", "<image-id>", ref])
        if options.push and options.registry:
            for ref in job.tags:
                yield shlex.join([engine.exe, "push", qualify(ref, options.registry)])


# ----------------------------------------------------------------------------- running


Listener = Callable[[ImageResult], None]


def run(
    project: Project,
    jobs: Sequence[BuildJob],
    engine: Engine,
    options: BuildOptions,
    on_change: Listener = lambda r: None,
    cancel: threading.Event | None = None,
) -> list[ImageResult]:
    """Build what changed, in parallel; tag on success; push if asked. Never raises for one image."""
    cancel = cancel or threading.Event()
    logs = project.logs
    context = stage_context(project, options.wheelhouse)
    results = {job.name: ImageResult(image=job.name, log=str(logs / f"{job.name}.log")) for job in jobs}
    lock = threading.Lock()

    def update(name: str, **changes: Any) -> None:
        with lock:
            r = results[name]
            for key, value in changes.items():
                setattr(r, key, value)
        on_change(r)

    def one(job: BuildJob) -> None:
        if cancel.is_set():
            update(job.name, status="skipped", error="not started (stopped earlier)")
            return
        start = time.monotonic()
        update(job.name, status="building", started=start)
        labels = engine.image_labels(job.hash_ref)
        if labels is not None and labels.get(contract.CONTENT_HASH) == job.digest:
            image_id = engine.image_id(job.hash_ref)
            assert image_id is not None
            status = "up-to-date"
        else:
            outcome = engine.build(
                request_for(job, context, options),
                logs / f"{job.name}.log",
                lambda step: update(job.name, step=step),
            )
            if not outcome.ok or outcome.image_id is None:
                status = "interrupted" if cancel.is_set() else "failed"
                update(
                    job.name,
                    status=status,
                    seconds=time.monotonic() - start,
                    failed_step=outcome.failed_step,
                    error=outcome.error,
                    failed_in="build",
                )
                if options.fail_fast:
                    cancel.set()
                return
            image_id = outcome.image_id
            status = "built"
        for ref in job.tags:
            if engine.image_id(ref) != image_id:
                engine.tag(image_id, ref)
        pushed: dict[str, str] = {}
        if options.push and options.registry:
            try:
                pushed = push_image(engine, job, image_id, options.registry, force=options.force)
            except RegistryError as exc:
                update(
                    job.name,
                    status="failed",
                    error=exc.message,
                    failed_in="push",
                    seconds=time.monotonic() - start,
                )
                return
        update(
            job.name,
            status=status,
            step="",
            seconds=time.monotonic() - start,
            image_id=image_id,
            size=engine.image_size(image_id),
            tags=list(job.tags),
            pushed=pushed,
        )

    with ThreadPoolExecutor(max_workers=options.jobs) as pool:
        futures: list[Future[None]] = [pool.submit(one, job) for job in jobs]
        try:
            for future in futures:
                while True:
                    try:
                        future.result(timeout=0.2)
                        break
                    except TimeoutError:
                        continue
        except KeyboardInterrupt:
            cancel.set()
            for future in futures:
                future.cancel()
            cancel_builds(engine)
            for future in futures:
                if not future.cancelled():
                    future.exception()
            for r in results.values():
                if r.status in ("queued", "building"):
                    r.status = "interrupted"
            raise
    return [results[job.name] for job in jobs]


def cancel_builds(engine: Engine) -> None:
    stop = getattr(engine, "cancel_all", None)
    if callable(stop):
        stop()


def push_image(engine: Engine, job: BuildJob, image_id: str, registry: str, *, force: bool) -> dict[str, str]:
    """Push alias (moves), pinned and content tags (immutable), then pull each back to verify."""
    alias_refs = set(job.tags[:1]) if job.cell.recommended else set()
    pushed: dict[str, str] = {}
    for ref in job.tags:
        target = qualify(ref, registry)
        if ref not in alias_refs:
            existing = engine.remote_digest(target)
            if existing is not None:
                repo = target.rsplit(":", 1)[0]
                same = f"{repo}@{existing}" in engine.repo_digests(image_id)
                if same:
                    pushed[target] = existing
                    continue
                if not force:
                    raise RegistryError(
                        f"{target} already exists with digest {existing[:19]}… and is immutable; "
                        "bump the matrix (new pinned tag) or pass --force"
                    )
        engine.tag(image_id, target)
        pushed[target] = engine.push(target)
    for target, digest in pushed.items():
        engine.pull(target)
        repo = target.rsplit(":", 1)[0]
        if f"{repo}@{digest}" not in engine.repo_digests(target):
            raise RegistryError(f"{target}: pulled image does not carry the pushed digest {digest}")
    return pushed


# ----------------------------------------------------------------------------- the no-op path


def up_to_date(jobs: Sequence[BuildJob], snapshot: Snapshot | None) -> list[ImageResult] | None:
    """Every job's result when each is already built with every tag in place, else None.

    One Engine API snapshot answers for all images: an up-to-date `build` then costs no
    docker SDK, no CLI process and no build; anything else takes the full path.
    """
    if snapshot is None:
        return None
    results = []
    for job in jobs:
        image = snapshot.tags.get(job.hash_ref)
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


# ----------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class BuildRun:
    results: list[ImageResult]
    record: Path  # build/report.json


def preflight(engine: Engine, jobs: Sequence[BuildJob], options: BuildOptions) -> str:
    """The engine's version; fails before any build if the engine or the registry is unusable."""
    version = engine.check()
    if options.push and options.registry and jobs:
        engine.remote_digest(qualify(jobs[0].tags[0], options.registry))
    return version


def execute(
    project: Project,
    jobs: Sequence[BuildJob],
    engine: Engine,
    options: BuildOptions,
    on_change: Listener = lambda r: None,
) -> BuildRun:
    """preflight -> run -> record. Ctrl-C cancels the running builds and moves no tag."""
    engine_version = preflight(engine, jobs, options)
    started = time.time()
    try:
        results = run(project, jobs, engine, options, on_change=on_change)
    except KeyboardInterrupt:
        from builder.errors import Interrupted

        raise Interrupted("interrupted: running builds were cancelled; no tag was moved") from None
    return BuildRun(results, record(project, results, options, engine_version, started))


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


def raise_for_failures(results: Sequence[ImageResult]) -> None:
    """Exit 7 when every failure is the registry's (every image built), else 6."""
    failed = [r for r in results if not r.ok]
    if not failed:
        return
    if all(r.failed_in == "push" for r in failed):
        raise RegistryError(failed[0].error or "push failed")
    from builder.errors import BuildFailed

    raise BuildFailed(
        f"{len(failed)} of {len(results)} images failed: "
        + "; ".join(f"{r.image} ({r.error}; log {r.log})" for r in failed)
    )


# ----------------------------------------------------------------------------- the build record


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
