"""Per-image build facts for `ci-matrix` and `bake`, taken from the build engine's own plan.

`builder.build.plan_jobs` decides an image's build args (after base mapping), content
hash and tags; this module only qualifies them with a registry and adds what CI and
bake need on top (GPU family, runner labels, cache ref), so the CI matrix, the bake
file and `qwen-ft-images build` cannot disagree about what an image is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from builder import names
from builder.build import BuildJob, BuildOptions, plan_jobs, remote
from builder.errors import RenderCheckError
from builder.knowledge import Knowledge
from builder.render import Project
from builder.resolve import Cell, Resolution

# The images are built for x86_64 only: the torch CUDA wheels, flash-attn's prebuilt
# wheels and the nvidia/cuda tags the knowledge base records are all x86_64.
BUILD_PLATFORM = "linux/amd64"
CONTEXT_DIR = "context"  # build/context/, staged by builder.build.stage_context


def qualify(ref: str, registry: str | None) -> str:
    """`qwen-ft:v100-fp16` -> `ghcr.io/acme/qwen-ft:v100-fp16` (unchanged without a registry)."""
    registry = (registry or "").strip()
    return remote(ref, registry) if registry else ref


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
        return self.job.cell.id

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


def check_committed(project: Project, resolution: Resolution, kb: Knowledge, cells: Sequence[Cell]) -> None:
    """Refuse when a selected image's committed Dockerfile differs from the render.

    The content hash is taken over the rendered text, while CI builds the committed
    file: publishing a stale file under that hash tag would make the tag lie.
    """
    from builder.render import render_all

    rendered = render_all(project, resolution, kb)
    stale = []
    for cell in cells:
        path = project.dockerfile(cell)
        if not path.exists():
            stale.append(f"{path.relative_to(project.root)} (missing)")
        elif path.read_text(encoding="utf-8") != rendered[path]:
            stale.append(f"{path.relative_to(project.root)} (differs)")
    if stale:
        raise RenderCheckError(
            f"images/ is out of date: {', '.join(stale)}; run `qwen-ft-images render` and commit"
        )


def facts(
    project: Project,
    resolution: Resolution,
    kb: Knowledge,
    cells: Sequence[Cell],
    *,
    registry: str | None = None,
    options: BuildOptions | None = None,
) -> list[ImageFacts]:
    """Build facts for `cells` (registry: the argument, else matrix.yaml's `registry`)."""
    check_committed(project, resolution, kb, cells)
    config = resolution.config
    reg = config.registry if registry is None else registry
    if reg:
        names.check_registry(reg, "--registry", config.image)
    out = []
    for job in plan_jobs(project, resolution, kb, cells, options or BuildOptions()):
        plan = job.cell.plan
        assert plan is not None
        tags = tuple(qualify(t, reg) for t in job.tags)
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
