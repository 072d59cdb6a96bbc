"""`bake`: a `docker buildx bake` JSON file with one target per image.

Bake builds every selected image in one BuildKit session (locally or on a remote /
Kubernetes builder), sharing base layers, with the same tags, labels, build args and
content hash as `ci-matrix` and `qwen-ft-images build`, since all three read
`builder.images`. Bake has no `exclude`: it gets only the cells the resolver kept.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from builder.images import BUILD_PLATFORM, CONTEXT_DIR, ImageFacts
from builder.project import Project

# buildx validates target and group names against this (bake/bake.go validTargetNameChars),
# while cell ids carry dots (torch2.8.0, py3.10).
_INVALID_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")
FAMILY_ORDER = ("volta", "turing", "ampere", "ada", "hopper", "blackwell", "cpu")


def target_name(image_id: str) -> str:
    """`v100-fp16-cu126-torch2.8.0-py3.10` -> `v100-fp16-cu126-torch2_8_0-py3_10`."""
    return _INVALID_NAME_CHARS.sub("_", image_id)


def _cache(f: ImageFacts, registry: str) -> tuple[list[str], list[str]]:
    # Without a registry there is nowhere shared to keep the cache: BuildKit's own
    # local cache still applies, so emit none rather than a path nobody else can read.
    if not registry:
        return [], []
    return [f"type=registry,ref={f.cache_ref}"], [f"type=registry,ref={f.cache_ref},mode=max"]


def bake_file(
    project: Project,
    images: Sequence[ImageFacts],
    *,
    registry: str,
    ca_bundle: Path | None = None,
) -> dict[str, Any]:
    """The bake definition. Paths are relative to the project root: run bake from there."""
    context = project.build / CONTEXT_DIR
    context_rel = context.relative_to(project.root).as_posix()
    targets: dict[str, Any] = {}
    groups: dict[str, list[str]] = {}
    for f in images:
        name = target_name(f.id)
        cache_from, cache_to = _cache(f, registry)
        # bake resolves a relative `dockerfile` against the target's context, not the cwd.
        dockerfile = Path(os.path.relpath(project.root / f.dockerfile, context)).as_posix()
        target: dict[str, Any] = {
            "context": context_rel,
            "dockerfile": dockerfile,
            "tags": list(f.tags),
            "labels": dict(f.labels),
            "args": dict(f.args),
            "platforms": [BUILD_PLATFORM],
        }
        if cache_from:
            target["cache-from"] = cache_from
            target["cache-to"] = cache_to
        if ca_bundle is not None:
            # Used only inside RUN (templates/Dockerfile.j2); never stored in a layer.
            target["secret"] = [f"id=ca_bundle,src={ca_bundle}"]
        targets[name] = target
        groups.setdefault(f.family, []).append(name)
    ordered = sorted(groups, key=lambda g: (FAMILY_ORDER.index(g) if g in FAMILY_ORDER else 99, g))
    group = {g: {"targets": groups[g]} for g in ordered}
    group["default"] = {"targets": list(targets)}
    return {"group": group, "target": targets}
