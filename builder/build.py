"""Build, tag and push the planned jobs (builder/jobs.py) against an Engine, and record the run.

Safety rules this module keeps:
- an image is tagged only after its build succeeded, so a failed or interrupted
  build never replaces the previous good tag;
- one failing image does not stop the others (unless --fail-fast);
- pinned and content-hash tags are immutable in a registry; only the alias moves.
"""

from __future__ import annotations

import shlex
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder import contract
from builder.content import stage_context
from builder.contract import qualify
from builder.engine import BuildRequest, DockerEngine, Engine
from builder.errors import RegistryError
from builder.jobs import CA_SECRET_ID, BuildJob, BuildOptions
from builder.lock import push_lock
from builder.project import Project
from builder.record import ImageResult, record

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
        pushed = results[job.name].pushed  # filled as tags land: an interrupted run can say what it pushed
        if options.push and options.registry:
            try:
                push_image(engine, job, image_id, options.registry, force=options.force, pushed=pushed)
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
            raise RunInterrupted([results[job.name] for job in jobs]) from None
    return [results[job.name] for job in jobs]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during `run`, with every image's state at that moment."""

    def __init__(self, results: list[ImageResult]) -> None:
        super().__init__()
        self.results = results


def interrupted_message(results: Sequence[ImageResult]) -> str:
    """The truth about an interrupted run: which tags it had already pushed."""
    pushed = [ref for r in results for ref in r.pushed]
    tagged = [r.image for r in results if r.status in ("built", "up-to-date")]
    if pushed:
        return (
            f"interrupted: running builds and pushes were cancelled; already pushed: {', '.join(pushed)}; "
            "see build/report.json"
        )
    if tagged:
        done = ", ".join(tagged)
        return f"interrupted: running builds were cancelled; finished and tagged before that: {done}"
    return "interrupted: running builds were cancelled; no tag was moved"


def cancel_builds(engine: Engine) -> None:
    stop = getattr(engine, "cancel_all", None)
    if callable(stop):
        stop()


def push_image(
    engine: Engine,
    job: BuildJob,
    image_id: str,
    registry: str,
    *,
    force: bool,
    pushed: dict[str, str] | None = None,
) -> dict[str, str]:
    """Push alias (moves), pinned and content tags (immutable), then prove the registry holds
    this run's image under each.

    1. Every immutable tag is checked before any tag is pushed, so a refusal moves nothing.
    2. Each tag is pushed under a host-wide lock for that remote name: `docker push` pushes
       whatever the shared local name points at, and a concurrent run could retag it.
    3. Each pushed digest is pulled back by digest, and the pulled image must be the one
       this run built (same image ID), or the push is reported as failed.

    `pushed` is filled as tags land, so an interrupted run can say what it already pushed.
    """
    pushed = {} if pushed is None else pushed
    targets = [qualify(ref, registry) for ref in job.tags]
    moving = {targets[0]} if job.cell.recommended else set()
    ours: dict[str, str] = {}
    for target in targets:
        if target in moving:
            continue
        existing = engine.remote_digest(target)
        if existing is None:
            continue
        repo = target.rsplit(":", 1)[0]
        if f"{repo}@{existing}" in engine.repo_digests(image_id):
            ours[target] = existing
        elif not force:
            raise RegistryError(
                f"{target} already exists with digest {existing[:19]}… and is immutable; "
                "bump the matrix (new pinned tag) or pass --force; nothing was pushed"
            )
    for target in targets:
        if target in ours:
            pushed[target] = ours[target]
            continue
        with push_lock(target):
            engine.tag(image_id, target)
            pushed[target] = engine.push(target)
    for target, digest in pushed.items():
        repo = target.rsplit(":", 1)[0]
        got = engine.pull(f"{repo}@{digest}")
        if got != image_id:
            raise RegistryError(
                f"{target}: the registry holds {got[:19]}… under the pushed digest, not this run's "
                f"image {image_id[:19]}… (a concurrent push to the same tag?)"
            )
    return pushed


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
    except RunInterrupted as stop:
        from builder.errors import Interrupted

        record(project, stop.results, options, engine_version, started)
        raise Interrupted(interrupted_message(stop.results)) from None
    return BuildRun(results, record(project, results, options, engine_version, started))


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
