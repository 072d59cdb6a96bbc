"""What each selected image's build would be, without running anything.

`plan_jobs` renders each selected image once and derives its build args (after base
mapping), content hash and tags. `build`, `ci-matrix`, `bake` and `prune` all start from
these jobs, so they cannot disagree about what an image is; only `builder.build` runs them.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder import contract, names, proxy
from builder.content import check_wheelhouse, content_hash, hash_tag
from builder.errors import ConfigError, RenderCheckError
from builder.knowledge import Knowledge
from builder.options import Settings
from builder.project import Project
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
    text: str  # the rendered Dockerfile: hashed here, compared with the committed file, built
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


def options_from(settings: Settings) -> BuildOptions:
    """BuildOptions from resolved settings (builder/options.py); --registry "" means none."""
    return BuildOptions(
        jobs=settings["jobs"],
        fail_fast=settings["fail_fast"],
        push=settings["push"],
        registry=settings["registry"] or None,
        force=settings["force"],
        base_map=parse_base_map(settings["base_map"]),
        wheelhouse=settings["wheelhouse"],
        ca_bundle=settings["ca_bundle"],
        http_proxy=settings["http_proxy"],
        https_proxy=settings["https_proxy"],
        no_proxy=settings["no_proxy"],
        network=settings["network"],
        dry_run=settings["dry_run"],
    )


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
    """Each selected image's job. Only the selected images are rendered, once each."""
    # Imported here: a memoized no-op build (builder.memo) never needs Jinja.
    from builder.render import dockerfile, environment

    env = environment(project.templates)
    rules = options.base_map + resolution.config.base_map
    image = resolution.config.image
    jobs = []
    for cell in cells:
        text = dockerfile(env, kb, cell, image)
        args = build_args(cell, rules)
        digest = content_hash(text, project.runtime, args)
        tags = (*cell.plan.tags, f"{image}:{hash_tag(cell.spec.target, digest)}")
        jobs.append(
            BuildJob(
                cell, project.dockerfile(cell.id), text, args, digest, tags, {contract.CONTENT_HASH: digest}
            )
        )
    return jobs


def check_committed(project: Project, jobs: Sequence[BuildJob]) -> None:
    """Refuse when a job's committed Dockerfile differs from its render.

    The content hash is taken over the rendered text, while CI builds the committed
    file: publishing a stale file under that hash tag would make the tag lie.
    """
    stale = []
    for job in jobs:
        rel = job.dockerfile.relative_to(project.root)
        if not job.dockerfile.exists():
            stale.append(f"{rel} (missing)")
        elif job.dockerfile.read_text(encoding="utf-8") != job.text:
            stale.append(f"{rel} (differs)")
    if stale:
        raise RenderCheckError(
            f"images/ is out of date: {', '.join(stale)}; run `qwen-ft-images render` and commit"
        )


def check_inputs(project: Project, options: BuildOptions) -> None:
    if options.registry:
        names.check_registry(options.registry, "--registry")
    proxy.check("--http-proxy", options.http_proxy)
    proxy.check("--https-proxy", options.https_proxy)
    if project.build.exists() and not project.build.is_dir():
        raise ConfigError(f"{project.build}: is a file, but build output goes here; move the file away")
    if options.wheelhouse is not None and not options.wheelhouse.is_dir():
        raise ConfigError(f"--wheelhouse {options.wheelhouse}: no such folder; create it or drop the option")
    if options.wheelhouse is not None:
        check_wheelhouse(project, options.wheelhouse)
    if options.ca_bundle is not None and not options.ca_bundle.is_file():
        raise ConfigError(f"--ca-bundle {options.ca_bundle}: no such file; pass a PEM bundle")
    if not project.runtime.is_dir():
        raise ConfigError(f"{project.runtime}: runtime/ folder missing; run from the project root")
    if options.jobs < 1:
        raise ConfigError("--jobs must be at least 1")


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
