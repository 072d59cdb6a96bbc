"""Per-image build facts for `ci-matrix` and `bake`, taken from the build engine's own plan.

`builder.jobs.plan_jobs` decides an image's build args (after base mapping), content
hash and tags; this module only qualifies them with a registry and adds what CI and
bake need on top (GPU family, runner labels, cache ref), so the CI matrix, the bake
file and `qwen-ft-images build` cannot disagree about what an image is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from builder import names
from builder.contract import qualify
from builder.jobs import BuildJob, BuildOptions, check_committed, plan_jobs
from builder.knowledge import Knowledge
from builder.project import Project
from builder.resolve import Cell, Resolution

CONTEXT_DIR = "context"  # build/context/, staged by builder.content.stage_context


def family(kb: Knowledge, cell: Cell) -> str:
    """The GPU family group name: volta, turing, ampere, ada, hopper, blackwell, or cpu."""
    if cell.sm is None:
        return "cpu"
    # "Blackwell Ultra" and "Blackwell (consumer)" are Blackwell for grouping purposes.
    return kb.arch(cell.sm).family.split()[0].lower()


@dataclass(frozen=True)
class ImageFacts:
    """Everything a builder needs for one image, with tags already registry-qualified."""

    job: BuildJob
    dockerfile: str  # relative to the project root, posix
    hash_tag: str  # e.g. ghcr.io/acme/qwen-ft:v100-3f2a9c1d0b7e
    tags: tuple[str, ...]  # plan.tags + the content-hash tag, qualified
    labels: Mapping[str, str]  # plan.labels + the content-hash label
    family: str
    runner_labels: tuple[str, ...]

    @property
    def cell(self) -> Cell:
        return self.job.cell

    @property
    def id(self) -> str:
        """Unique per build: an image built for two platforms is two builds."""
        return self.job.name

    @property
    def platform(self) -> str:
        return self.job.platform

    @property
    def digest(self) -> str:
        return self.job.digest

    @property
    def args(self) -> Mapping[str, str]:
        return self.job.build_args

    @property
    def cache_ref(self) -> str:
        """Where this image's registry build cache lives: beside the image, one tag per image."""
        repo = self.hash_tag.rsplit(":", 1)[0]
        return f"{repo}:buildcache-{self.id}"


def facts(
    project: Project,
    resolution: Resolution,
    kb: Knowledge,
    cells: Sequence[Cell],
    *,
    registry: str,
    options: BuildOptions | None = None,
) -> list[ImageFacts]:
    """Build facts for `cells`, tags qualified with `registry` (resolved by builder.options; "" = none)."""
    jobs = plan_jobs(project, resolution, kb, cells, options or BuildOptions())
    check_committed(project, jobs)
    config = resolution.config
    if registry:
        names.check_registry(registry, "--registry", config.image)
    out = []
    for job in jobs:
        plan = job.cell.plan
        tags = tuple(qualify(t, registry) for t in job.tags)
        out.append(
            ImageFacts(
                job=job,
                dockerfile=job.dockerfile.relative_to(project.root).as_posix(),
                hash_tag=tags[-1],
                tags=tags,
                labels={**plan.labels, **job.labels},
                family=family(kb, job.cell),
                runner_labels=config.targets[job.cell.spec.target].runner_labels,
            )
        )
    return out
