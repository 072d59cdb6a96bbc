"""`ci-matrix`: the GitHub Actions matrix, one entry per image, computed from the resolution.

The workflow (.github/workflows/images.yml) feeds `{"include": [...]}` straight into
`strategy.matrix` with `fromJSON`, so the set of images CI builds is exactly what
`qwen-ft-images matrix` shows; nothing is listed by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from builder.contract import qualify
from builder.errors import ConfigError
from builder.images import CONTEXT_DIR, ImageFacts
from builder.jobs import manifest_lists

# GitHub's hosted arm64 runner: native builds, no QEMU (an emulated torch install takes hours).
ARM64_RUNNER = "ubuntu-24.04-arm"


def entry(f: ImageFacts) -> dict[str, Any]:
    """One `include` entry. Field names are part of the workflow's contract: keep them."""
    for key, value in f.args.items():
        # build_args is line-separated below: a line break would smuggle in another arg.
        if "\n" in value or "\r" in value:
            raise ConfigError(f"{f.id}: build arg {key} holds a line break; it cannot go into the CI matrix")
    cell = f.cell
    return {
        "id": f.id,
        "alias": cell.alias if cell.recommended else None,  # only recommended images get it
        "target": cell.spec.target,
        "recommended": cell.recommended,
        "family": f.family,
        "dockerfile": f.dockerfile,
        "context": f"build/{CONTEXT_DIR}",
        "platform": f.platform,
        # the image's id for `build`/`smoke` selectors (id above is per platform)
        "image": f.cell.id,
        # arm64 builds run on a native arm64 runner; the smoke job's GPU runner must be arm64 too
        "build_runner": ARM64_RUNNER if f.platform == "linux/arm64" else "ubuntu-latest",
        "tags": list(f.tags),
        # The unqualified name `qwen-ft-images smoke` runs; CI pulls hash_tag and tags it so.
        "local_tag": f.job.tags[0],
        "hash_tag": f.hash_tag,
        "content_hash": f.digest,
        # Newline-separated because build-push-action reads build-args line by line and
        # values may contain commas; JSON carries the newlines through $GITHUB_OUTPUT.
        "build_args": "\n".join(f"{k}={v}" for k, v in f.args.items()),
        "cache_ref": f.cache_ref,
        "runner_labels": _runner_labels(f),
    }


def _runner_labels(f: ImageFacts) -> list[str]:
    labels = list(f.runner_labels)
    if f.platform != "linux/arm64":
        return labels
    if labels == ["ubuntu-latest"]:
        return [ARM64_RUNNER]
    return [*labels, "ARM64"]  # a self-hosted runner's default architecture label


def lists(images: Sequence[ImageFacts], registry: str) -> dict[str, list[dict[str, Any]]]:
    """The `publish` job's matrix: each alias/pinned tag and the per-platform content tags its
    manifest list gathers (`docker buildx imagetools create -t TAG SOURCES...`)."""
    by_name = {f.job.name: f for f in images}
    return {
        "include": [
            {
                "tag": qualify(tag, registry),
                "sources": " ".join(by_name[j.name].hash_tag for j in jobs),
                # only a recommended image's alias moves; pinned lists never change once pushed
                "immutable": not any(j.cell.recommended and tag == j.published[0] for j in jobs),
            }
            for tag, jobs in manifest_lists([f.job for f in images]).items()
        ]
    }


def include(images: Sequence[ImageFacts]) -> dict[str, list[dict[str, Any]]]:
    return {"include": [entry(f) for f in images]}


HEADERS = ["id", "family", "runner labels", "hash tag"]


def row(f: ImageFacts) -> list[str]:
    return [f.id, f.family, ", ".join(f.runner_labels), f.hash_tag]
