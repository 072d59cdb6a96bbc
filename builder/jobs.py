"""What each selected image's build would be, without running anything.

`plan_jobs` renders each selected image once and derives its build args (after base
mapping), content hash and tags. `build`, `ci-matrix`, `bake` and `prune` all start from
these jobs, so they cannot disagree about what an image is; only `builder.build` runs them.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder import contract, names
from builder.content import content_hash, hash_tag
from builder.errors import RenderCheckError

__all__ = ["BuildJob", "BuildOptions", "options_from", "parse_base_map", "plan_jobs"]
from builder.knowledge import Knowledge
from builder.options import BuildOptions, options_from, parse_base_map
from builder.project import Project
from builder.resolve import DEFAULT_PLATFORM, Cell, Resolution

CA_SECRET_ID = "ca_bundle"


@dataclass(frozen=True)
class BuildJob:
    cell: Cell
    dockerfile: Path
    text: str  # the rendered Dockerfile: hashed here, compared with the committed file, built
    build_args: Mapping[str, str]
    digest: str
    tags: tuple[str, ...]  # local tags: alias (if recommended), pinned, content-hash tag
    labels: Mapping[str, str]
    platform: str = DEFAULT_PLATFORM
    # What the registry gets: each of these is a manifest list of every platform's image
    # (alias and pinned, without the local per-platform suffix).
    published: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.cell.id if len(self.cell.platforms) == 1 else self.cell.id + local_suffix(self.platform)

    @property
    def hash_ref(self) -> str:
        return self.tags[-1]


def local_suffix(platform: str) -> str:
    """A classic (non-containerd) image store holds one image per tag, so a local tag of a
    non-amd64 image carries its architecture: qwen-ft:cpu-fp32-arm64. Registries get the plain
    tag, as a manifest list."""
    return "" if platform == DEFAULT_PLATFORM else "-" + platform.split("/", 1)[1]


def map_base(ref: str, rules: Sequence[tuple[str, str]], platform: str = DEFAULT_PLATFORM) -> str:
    """The first matching rule wins; a trailing '*' in both sides carries the rest over. A
    pattern ending in '@linux/arm64' applies to that platform's builds only (a local base image
    holds one platform: CI maps debian:bookworm-slim to a debootstrapped image per platform)."""
    for pattern, target in rules:
        pattern, at, only = pattern.partition("@")
        if at and only != platform:
            continue
        if pattern.endswith("*") and target.endswith("*"):
            stem = pattern[:-1]
            if ref.startswith(stem):
                return target[:-1] + ref[len(stem) :]
        elif fnmatch.fnmatchcase(ref, pattern):
            return target
    return ref


def build_args(
    cell: Cell, rules: Sequence[tuple[str, str]], platform: str = DEFAULT_PLATFORM
) -> dict[str, str]:
    """Build args that change what gets built, after base mapping; part of the content hash."""
    plan = cell.plan
    args = {
        "BASE_IMAGE": map_base(plan.base_image, rules, platform),
        "TORCH_INDEX_URL": plan.torch.index_url or "",
    }
    if plan.builder_image:
        args["BUILDER_IMAGE"] = map_base(plan.builder_image, rules, platform)
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
        for platform in cell.platforms:
            if options.platforms and platform not in options.platforms:
                continue
            args = build_args(cell, rules, platform)
            # The platform is part of what gets built, so of the hash; linux/amd64 hashes as it
            # did before platforms existed, so its published content tags stay valid.
            hashed = args if platform == DEFAULT_PLATFORM else {**args, "TARGETPLATFORM": platform}
            digest = content_hash(text, project.runtime, hashed)
            suffix = local_suffix(platform)
            tags = (*(t + suffix for t in cell.plan.tags), f"{image}:{hash_tag(cell.spec.target, digest)}")
            jobs.append(
                BuildJob(
                    cell,
                    project.dockerfile(cell.id),
                    text,
                    args,
                    digest,
                    tags,
                    {contract.CONTENT_HASH: digest},
                    platform=platform,
                    published=cell.plan.tags,
                )
            )
    return jobs


def manifest_lists(jobs: Sequence[BuildJob]) -> dict[str, list[BuildJob]]:
    """Each published tag (alias, pinned) and the per-platform jobs its manifest list holds.

    An alias can gather several images: each platform's recommended image of the target (the
    same stack where it can be, README 'Platforms'); a pinned tag is one stack on each platform.
    """
    lists: dict[str, list[BuildJob]] = {}
    for job in jobs:
        for tag in job.published:
            entries = lists.setdefault(tag, [])
            if all(j.platform != job.platform for j in entries):
                entries.append(job)
    return lists


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
    options.check(project)


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
