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

from builder.errors import ConfigError

if TYPE_CHECKING:
    from builder.project import Project

_SKIP_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
_SKIP_SUFFIXES = {".pyc", ".pyo"}


def context_files(root: Path) -> Iterator[Path]:
    """The build context's files in a stable order, without caches: regular files only.

    A symbolic link (to ~/.ssh, to /dev/zero, to anything) or a device/FIFO is refused, not
    followed: what goes into an image is exactly the project's own files, and the hash is
    taken over the same bytes that are staged.
    """
    if root.is_symlink():
        raise ConfigError(
            f"{root}: is a symbolic link; the build context takes only real folders of the project"
        )
    for path in sorted(root.rglob("*")):  # rglob lists links but does not descend into them
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.is_symlink():
            raise ConfigError(
                f"{path}: is a symbolic link (to {path.readlink()}); the build context takes only "
                "regular files from inside the project: replace the link with the file itself"
            )
        if path.is_dir():
            continue
        if not path.is_file():
            raise ConfigError(f"{path}: is not a regular file (a FIFO, socket or device); remove it")
        if path.suffix not in _SKIP_SUFFIXES:
            yield path


def content_hash(dockerfile: str, context: Path, build_args: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    h.update(b"dockerfile\0" + dockerfile.encode())
    _hash_files(h, context)
    for key in sorted(build_args):
        h.update(f"\0arg\0{key}={build_args[key]}".encode())
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """The hash of a context folder's files alone (the runtime's content hash)."""
    h = hashlib.sha256()
    _hash_files(h, root)
    return h.hexdigest()


def _hash_files(h: hashlib._Hash, root: Path) -> None:
    for path in context_files(root):
        h.update(b"\0file\0" + path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes())


def hash_tag(target: str, digest: str) -> str:
    """The immutable content tag, e.g. `v100-3f2a9c1d0b7e`."""
    return f"{target}-{digest[:12]}"


def stage_context(project: Project, wheelhouse: Path | None) -> Path:
    """build/context/: runtime/ plus wheelhouse/ (bind-mounted by the Dockerfiles, never copied in).

    runtime/ gets exactly `context_files` (what the content hash covered). Both staged folders
    are replaced on every run, so they must never be the user's own: a link there is removed
    (never followed) and a wheelhouse inside build/context/ is refused by `check_wheelhouse`.
    """
    ctx = project.context
    runtime = ctx / "runtime"
    wheels = ctx / "wheelhouse"
    files = list(context_files(project.runtime))  # refuse links before touching anything
    for staged in (runtime, wheels):
        _remove(staged)
    for src in files:
        dst = runtime / src.relative_to(project.runtime)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
    wheels.mkdir(parents=True)
    if wheelhouse is not None:
        for entry in sorted(wheelhouse.iterdir()):
            src = entry.resolve()  # the user's own folder: a link to a wheel elsewhere is fine
            if src.is_file():
                dst = wheels / entry.name
                try:
                    os.link(src, dst)  # no copy of multi-GB wheels when on the same filesystem
                except OSError:
                    shutil.copy2(src, dst)
    return ctx


def check_wheelhouse(project: Project, wheelhouse: Path) -> None:
    """build/context/ is rebuilt on every run: a wheelhouse inside it would be deleted."""
    ctx = project.context.resolve()
    house = wheelhouse.resolve()
    if house == ctx or ctx in house.parents:
        raise ConfigError(
            f"--wheelhouse {wheelhouse}: is inside {project.context}, which every build replaces; "
            "keep your wheels in a folder of their own"
        )


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
