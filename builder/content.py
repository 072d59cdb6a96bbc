"""The build context: what is staged for the Dockerfiles, and the content hash that decides
whether an image must be rebuilt.

The hash covers exactly what determines the image's bytes: the rendered
Dockerfile, every file of the build context (the runtime package), and the build
args that change what is built (the base images after --base-map, the torch
index). Proxies, the CA bundle and the wheelhouse location are deliberately left
out: they change how bytes are fetched, not which bytes end up in the image.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from builder.project import Project

_SKIP_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
_SKIP_SUFFIXES = {".pyc", ".pyo"}


def context_files(root: Path) -> Iterator[Path]:
    """The build context's files in a stable order, without caches."""
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.is_file() and path.suffix not in _SKIP_SUFFIXES:
            yield path


def content_hash(dockerfile: str, context: Path, build_args: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    h.update(b"dockerfile\0" + dockerfile.encode())
    for path in context_files(context):
        h.update(b"\0file\0" + path.relative_to(context).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    for key in sorted(build_args):
        h.update(f"\0arg\0{key}={build_args[key]}".encode())
    return h.hexdigest()


def hash_tag(target: str, digest: str) -> str:
    """The immutable content tag, e.g. `v100-3f2a9c1d0b7e`."""
    return f"{target}-{digest[:12]}"


def stage_context(project: Project, wheelhouse: Path | None) -> Path:
    """build/context/: runtime/ plus wheelhouse/ (bind-mounted by the Dockerfiles, never copied in)."""
    ctx = project.context
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
    if wheelhouse is not None:
        for src in sorted(wheelhouse.iterdir()):
            if src.is_file():
                dst = wheels / src.name
                try:
                    os.link(src, dst)  # no copy of multi-GB wheels when on the same filesystem
                except OSError:
                    shutil.copy2(src, dst)
    return ctx
