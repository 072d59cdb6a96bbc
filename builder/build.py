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
from builder.jobs import CA_SECRET_ID, BuildJob, BuildOptions, manifest_lists
from builder.lock import push_lock
from builder.project import Project
from builder.record import ImageResult, record
from builder.resolve import DEFAULT_PLATFORM

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
        platform=None if job.platform == DEFAULT_PLATFORM else job.platform,
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
            yield shlex.join([engine.exe, "push", qualify(job.hash_ref, options.registry)])
    if options.push and options.registry:
        for tag, entries in manifest_lists(jobs).items():
            sources = [qualify(job.hash_ref, options.registry) for job in entries]
            yield shlex.join([engine.exe, "manifest", "create", qualify(tag, options.registry), *sources])


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

    try:
        _run_pool(jobs, one, options, engine, cancel, results)
    except KeyboardInterrupt:
        raise
    if options.push and options.registry and options.lists:
        publish(engine, jobs, results, options.registry, force=options.force)
    return [results[job.name] for job in jobs]


def _run_pool(
    jobs: Sequence[BuildJob],
    one: Callable[[BuildJob], None],
    options: BuildOptions,
    engine: Engine,
    cancel: threading.Event,
    results: dict[str, ImageResult],
) -> None:
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
    """Push this platform's image under its content-hash tag (immutable), then prove the registry
    holds this run's image under it. Alias and pinned tags are manifest lists (`publish`).

    1. Every immutable tag is checked before any tag is pushed, so a refusal moves nothing.
    2. Each tag is pushed under a host-wide lock for that remote name: `docker push` pushes
       whatever the shared local name points at, and a concurrent run could retag it.
    3. Each pushed digest is pulled back by digest, and the pulled image must be the one
       this run built (same image ID), or the push is reported as failed.

    `pushed` is filled as tags land, so an interrupted run can say what it already pushed.
    """
    pushed = {} if pushed is None else pushed
    targets = [qualify(job.hash_ref, registry)]
    moving: set[str] = set()
    ours: dict[str, str] = {}
    if not force:
        for tag in _immutable_lists(job):
            _check_list(engine, qualify(tag, registry), job.platform, image_id)
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


def _immutable_lists(job: BuildJob) -> tuple[str, ...]:
    """The job's published tags that never move: all but a recommended image's alias."""
    return job.published[1:] if job.cell.recommended else job.published


def _check_list(engine: Engine, target: str, platform: str, image_id: str) -> None:
    """Refuse (before anything is pushed) an immutable tag that already names another image for
    this platform, or a plain single-platform image. A list lacking this platform may gain it."""
    existing = engine.manifest_platforms(target)
    if existing is None:
        return
    repo = target.rsplit(":", 1)[0]
    theirs = existing.get(platform)
    if existing and (theirs is None or f"{repo}@{theirs}" in engine.repo_digests(image_id)):
        return
    what = f"{platform} as {theirs[:19]}…" if theirs else "another image (not a manifest list)"
    raise RegistryError(
        f"{target} already exists ({what}) and is immutable; "
        "bump the matrix (new pinned tag) or pass --force; nothing was pushed"
    )


def publish(
    engine: Engine, jobs: Sequence[BuildJob], results: dict[str, ImageResult], registry: str, *, force: bool
) -> None:
    """One manifest list per published tag, of every platform's pushed image; then each platform
    is pulled back by its digest and must be the platform the list says. Even a one-platform
    image gets a list: a host of another platform then gets 'no matching manifest', never an
    image it cannot run."""
    for tag, entries in manifest_lists(jobs).items():
        target = qualify(tag, registry)
        repo = target.rsplit(":", 1)[0]
        pushed = {
            job.platform: results[job.name].pushed.get(qualify(job.hash_ref, registry)) for job in entries
        }
        if not all(pushed.values()):
            continue  # a platform's image failed: its result says why; no partial list is published
        want = {platform: str(digest) for platform, digest in pushed.items()}
        alias = any(job.cell.recommended and tag == job.published[0] for job in entries)
        try:
            existing = None if alias else engine.manifest_platforms(target)
            if existing and not force:
                if any(existing.get(p, d) != d for p, d in want.items()):
                    raise RegistryError(
                        f"{target} already exists as another image and is immutable; "
                        "bump the matrix (new pinned tag) or pass --force"
                    )
                # a platform built in another run stays in the list (CI: one runner per platform)
                want = {**existing, **want}
            if existing == want:
                digest = "unchanged"
            elif existing is not None and not existing and not force:
                raise RegistryError(
                    f"{target} already exists as a plain image (not a manifest list) and is immutable; "
                    "bump the matrix (new pinned tag) or pass --force"
                )
            else:
                with push_lock(target):
                    digest = engine.create_manifest_list(target, [f"{repo}@{d}" for d in want.values()])
            got = engine.manifest_platforms(target)
            if got != want:
                raise RegistryError(f"{target}: the registry's list {got} is not the pushed images {want}")
            for platform, d in want.items():
                ref = f"{repo}@{d}"
                engine.pull_ref(ref)
                have = engine.image_platform(ref)
                if have != platform:
                    raise RegistryError(f"{ref}: pulled back as {have}, not {platform}")
        except RegistryError as exc:
            for job in entries:
                r = results[job.name]
                r.status, r.error, r.failed_in = "failed", exc.message, "push"
            continue
        for job in entries:
            results[job.name].pushed[target] = digest if digest != "unchanged" else want[job.platform]


# ----------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class BuildRun:
    results: list[ImageResult]
    record: Path  # build/report.json
    engine_version: str


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
    return BuildRun(results, record(project, results, options, engine_version, started), engine_version)


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
