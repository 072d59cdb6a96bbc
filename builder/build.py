"""Build, tag and push the selected images: plan (pure), then run against an Engine.

Safety rules this module keeps:
- an image is tagged only after its build succeeded, so a failed or interrupted
  build never replaces the previous good tag;
- one failing image does not stop the others (unless --fail-fast);
- pinned and content-hash tags are immutable in a registry; only the alias moves.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from builder import names
from builder.content import HASH_LABEL, content_hash, hash_tag
from builder.engine import BuildRequest, DockerEngine, Engine
from builder.errors import ConfigError, RegistryError
from builder.fsio import write_atomic
from builder.knowledge import Knowledge
from builder.render import Project, dockerfile, environment
from builder.resolve import Cell, Resolution

CA_SECRET_ID = "ca_bundle"


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    jobs: int = 1
    fail_fast: bool = False
    push: bool = False
    registry: str | None = None
    force: bool = False
    base_map: tuple[tuple[str, str], ...] = ()
    wheelhouse: Path | None = None
    ca_bundle: Path | None = None
    http_proxy: str | None = None
    https_proxy: str | None = None
    no_proxy: str | None = None
    network: str | None = None
    dry_run: bool = False


@dataclass(frozen=True)
class BuildJob:
    cell: Cell
    dockerfile: Path
    build_args: Mapping[str, str]
    digest: str
    tags: tuple[str, ...]  # alias (if recommended), pinned, content-hash tag
    labels: Mapping[str, str]

    @property
    def name(self) -> str:
        return self.cell.id

    @property
    def hash_ref(self) -> str:
        return self.tags[-1]


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


# ----------------------------------------------------------------------------- planning


def parse_base_map(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    rules = []
    for item in items:
        pattern, sep, target = item.partition("=")
        if not sep or not pattern or not target:
            raise ConfigError(
                f"--base-map {item!r}: expected PATTERN=REPLACEMENT, "
                "e.g. 'nvidia/cuda:*=mirror.local/nvidia/cuda:*'"
            )
        rule = (pattern.strip(), target.strip())
        names.check_base_rule(*rule, f"--base-map {names.shown(item)}")
        rules.append(rule)
    return tuple(rules)


def map_base(ref: str, rules: Sequence[tuple[str, str]]) -> str:
    """The first matching rule wins; a trailing '*' in both sides carries the rest over."""
    for pattern, target in rules:
        if pattern.endswith("*") and target.endswith("*"):
            stem = pattern[:-1]
            if ref.startswith(stem):
                return target[:-1] + ref[len(stem) :]
        elif fnmatch.fnmatchcase(ref, pattern):
            return target
    return ref


def build_args(cell: Cell, rules: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Build args that change what gets built, after base mapping; part of the content hash."""
    assert cell.plan is not None
    plan = cell.plan
    args = {"BASE_IMAGE": map_base(plan.base_image, rules), "TORCH_INDEX_URL": plan.torch.index_url or ""}
    if plan.flash_attn.builder_image:
        args["BUILDER_IMAGE"] = map_base(plan.flash_attn.builder_image, rules)
    for name in ("BASE_IMAGE", "BUILDER_IMAGE"):
        if name in args:  # a rule's '*' can still splice into something that is no reference
            names.check_reference(args[name], f"{cell.id}: {name} after --base-map/base_map")
    return args


def plan_jobs(
    project: Project,
    resolution: Resolution,
    kb: Knowledge,
    cells: Sequence[Cell],
    options: BuildOptions,
) -> list[BuildJob]:
    """Pure: what each selected image's build would be, from the in-memory render.

    Only the selected images are rendered: a no-op rebuild of one image should not pay
    for templating the whole matrix.
    """
    env = environment(project.templates)
    rules = options.base_map + resolution.config.base_map
    jobs = []
    for cell in cells:
        assert cell.plan is not None
        path = project.dockerfile(cell)
        text = dockerfile(env, kb, cell, resolution.config.image)
        args = build_args(cell, rules)
        digest = content_hash(text, project.runtime, args)
        image = resolution.config.image
        tags = (*cell.plan.tags, f"{image}:{hash_tag(cell.spec.target, digest)}")
        jobs.append(BuildJob(cell, path, args, digest, tags, {HASH_LABEL: digest}))
    return jobs


def check_inputs(project: Project, options: BuildOptions) -> None:
    if options.registry:
        names.check_registry(options.registry, "--registry")
    if options.wheelhouse is not None and not options.wheelhouse.is_dir():
        raise ConfigError(f"--wheelhouse {options.wheelhouse}: no such folder; create it or drop the option")
    if options.ca_bundle is not None and not options.ca_bundle.is_file():
        raise ConfigError(f"--ca-bundle {options.ca_bundle}: no such file; pass a PEM bundle")
    if not project.runtime.is_dir():
        raise ConfigError(f"{project.runtime}: runtime/ folder missing; run from the project root")
    if project.build.exists() and not project.build.is_dir():
        raise ConfigError(
            f"{project.build}: is a file, but build output goes in this folder; move the file away"
        )
    if options.jobs < 1:
        raise ConfigError("--jobs must be at least 1")


def stage_context(project: Project, options: BuildOptions) -> Path:
    """build/context/: runtime/ plus wheelhouse/ (bind-mounted by the Dockerfiles, never copied in)."""
    ctx = project.build / "context"
    runtime = ctx / "runtime"
    if runtime.exists():
        shutil.rmtree(runtime)
    shutil.copytree(
        project.runtime, runtime, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    )
    wheels = ctx / "wheelhouse"
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    if options.wheelhouse is not None:
        for src in sorted(options.wheelhouse.iterdir()):
            if src.is_file():
                dst = wheels / src.name
                try:
                    os.link(src, dst)  # no copy of multi-GB wheels when on the same filesystem
                except OSError:
                    shutil.copy2(src, dst)
    return ctx


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


def remote(ref: str, registry: str) -> str:
    return f"{registry.rstrip('/')}/{ref}"


def dry_run_lines(
    project: Project, jobs: Sequence[BuildJob], engine: DockerEngine, options: BuildOptions
) -> Iterator[str]:
    """The plan and the exact commands a build would run; nothing is run."""
    context = project.build / "context"
    for job in jobs:
        argv, env = engine.build_argv(
            request_for(job, context, options), project.build / "logs" / f"{job.name}.iid"
        )
        yield f"# {job.name}: content hash {job.digest[:12]}; tags {', '.join(job.tags)}"
        yield " ".join([*(f"{k}={v}" for k, v in env.items()), shlex.join(argv)])
        for ref in job.tags:
            yield shlex.join([engine.exe, "tag", "<image-id>", ref])
        if options.push and options.registry:
            for ref in job.tags:
                yield shlex.join([engine.exe, "push", remote(ref, options.registry)])


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
    logs = project.build / "logs"
    context = stage_context(project, options)
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
        if labels is not None and labels.get(HASH_LABEL) == job.digest:
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
        target = remote(ref, registry)
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


# ----------------------------------------------------------------------------- pruning

_HASH_TAG = re.compile(r"^(?P<target>[A-Za-z0-9_.-]+)-(?P<digest>[0-9a-f]{12})$")


def stale_tags(jobs: Sequence[BuildJob], local: Mapping[str, str]) -> list[str]:
    """Content-hash tags that no current image has and that name no alias/pinned image.

    Old content tags keep superseded images alive (they are immutable on purpose);
    removing them lets the engine free the layers. A tag whose image is still what an
    alias or pinned tag points at is kept.
    """
    current = {job.hash_ref for job in jobs}
    named = {tag for job in jobs for tag in job.tags[:-1]}
    live_ids = {local[t] for t in named if t in local}
    targets = {job.cell.spec.target for job in jobs}
    stale = []
    for ref, image_id in sorted(local.items()):
        m = _HASH_TAG.match(ref.rsplit(":", 1)[1])
        if m is None or m.group("target") not in targets or ref in current or image_id in live_ids:
            continue
        stale.append(ref)
    return stale


# ----------------------------------------------------------------------------- reports


def write_report(project: Project, results: Sequence[ImageResult], meta: Mapping[str, Any]) -> Path:
    path = project.build / "report.json"
    data = {**meta, "images": [_public(asdict(r)) for r in results]}
    write_atomic(path, json.dumps(data, indent=2) + "\n")
    return path


def _public(d: dict[str, Any]) -> dict[str, Any]:
    d.pop("started", None)
    d.pop("step", None)
    d["seconds"] = round(float(d["seconds"]), 2)
    return d


def redact(url: str | None) -> str | None:
    """Proxy URLs may carry credentials: keep them out of reports."""
    if not url or "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
