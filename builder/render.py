"""Render resolved cells into Dockerfiles and the images/ index: pure text in, text out."""

from __future__ import annotations

from pathlib import Path

import jinja2

from builder.errors import ConfigError, RenderCheckError
from builder.knowledge import Knowledge
from builder.project import Project
from builder.resolve import Cell, Resolution


def _dq(value: object) -> str:
    """A double-quoted Dockerfile string: Docker unescapes only backslash and quote."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def environment(templates: Path) -> jinja2.Environment:
    if not templates.is_dir():
        raise ConfigError(f"{templates}: templates folder not found; run from the project root")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["tojson"] = _dq
    return env


def apt_packages(cell: Cell, kb: Knowledge) -> list[str]:
    packages = ["ca-certificates", "python3", "python3-venv"]
    if cell.plan.triton == "keep":
        packages += ["gcc", "libc6-dev", "python3-dev"]
    if cell.sm is not None:  # multi-node NCCL over InfiniBand/RoCE (deepspeed.yaml nccl_ib)
        packages += kb.deepspeed.ib_packages
    return sorted(packages)


def _render(env: jinja2.Environment, name: str, **context: object) -> str:
    try:
        return env.get_template(name).render(**context)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"templates/{name}:{exc.lineno}: template syntax error: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise ConfigError(f"templates/{name}: {exc.message or exc}; fix the template") from None


def dockerfile(env: jinja2.Environment, kb: Knowledge, cell: Cell, image: str) -> str:
    return _render(
        env,
        "Dockerfile.j2",
        cell=cell,
        plan=cell.plan,
        image=image,
        apt_packages=apt_packages(cell, kb),
        fa_gb_per_job=kb.fa_build_gb_per_job,
        einops=kb.fa_einops,
    )


def render_all(project: Project, resolution: Resolution, kb: Knowledge) -> dict[Path, str]:
    """Every file under images/ that the matrix implies, keyed by path."""
    env = environment(project.templates)
    image = resolution.config.image
    files = {project.dockerfile(c.id): dockerfile(env, kb, c, image) for c in resolution.cells}
    files[project.images_readme] = _render(
        env,
        "images-README.md.j2",
        cells=resolution.cells,
        image=image,
        excluded_count=len(resolution.excluded),
    )
    return files


def write(project: Project, files: dict[Path, str]) -> list[Path]:
    """Write changed files and delete image folders the matrix no longer has. Returns what changed."""
    from builder import fsio

    _refuse_links(project)
    changed: list[Path] = []
    for path, text in sorted(files.items()):
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        fsio.write_atomic(path, text)  # a reader never sees half a Dockerfile
        changed.append(path)
    for stale in _stale(project, files):
        try:
            stale.unlink()
            if not any(stale.parent.iterdir()):
                stale.parent.rmdir()
        except OSError as exc:
            raise ConfigError(fsio.problem(exc, stale)) from None
        changed.append(stale)
    return changed


def _refuse_links(project: Project) -> None:
    """images/ and its folders are real folders inside the project: never write or delete through a link.

    A symlinked images/<id> would make `render` write, or delete a stale Dockerfile, outside
    the project.
    """
    images = project.images
    suspects = [images, *(images.iterdir() if images.is_dir() and not images.is_symlink() else ())]
    for path in suspects:
        if path.is_symlink():
            raise ConfigError(
                f"{path}: is a symbolic link; render writes only real folders inside the project: "
                "remove the link and run render again"
            )


def _stale(project: Project, files: dict[Path, str]) -> list[Path]:
    if not project.images.is_dir():
        return []
    return sorted(
        p
        for p in project.images.glob("*/Dockerfile")
        if p not in files and not p.parent.is_symlink() and not p.is_symlink()
    )


def check(project: Project, files: dict[Path, str]) -> None:
    """Raise naming every file whose committed text differs from the render."""
    problems: list[str] = []
    for path, text in sorted(files.items()):
        rel = path.relative_to(project.root)
        if not path.exists():
            problems.append(f"{rel} (missing)")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{rel} (differs)")
    problems += [f"{p.relative_to(project.root)} (stale)" for p in _stale(project, files)]
    if problems:
        raise RenderCheckError(
            f"images/ is out of date: {', '.join(problems)}; run `qwen-ft-images render` and commit"
        )
