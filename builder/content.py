"""Content addressing: the hash that decides whether an image must be rebuilt.

The hash covers exactly what determines the image's bytes: the rendered
Dockerfile, every file of the build context (the runtime package), and the build
args that change what is built (the base images after --base-map, the torch
index). Proxies, the CA bundle and the wheelhouse location are deliberately left
out: they change how bytes are fetched, not which bytes end up in the image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path

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
