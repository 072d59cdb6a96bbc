"""The exact grammar of every name that ends up in a tag, a path or a generated file.

matrix.yaml values become Docker references (registry, image, tags, base images),
folder names under images/, Dockerfile ENV values and entries of the GitHub Actions
matrix. A value outside these grammars is refused where it enters (config loading,
command-line options), so no later stage has to guess how to escape it.

The reference grammar is Docker's (distribution/reference, regexp.go); the tag limit
is its 128 characters, the repository name limit its 255.
"""

from __future__ import annotations

import re

from builder.errors import ConfigError

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_PORT = r":[0-9]{1,5}"
# Docker reads the first component as a registry host only when it has a '.' or a
# ':port', or is `localhost`; anything else is a Docker Hub namespace (lower case).
DOMAIN = (
    rf"(?:(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})+|localhost|\[[a-fA-F0-9:]+\])(?:{_PORT})?"
    rf"|{_DOMAIN_COMPONENT}{_PORT})"
)
REPOSITORY = rf"(?:{DOMAIN}/)?{PATH_COMPONENT}(?:/{PATH_COMPONENT})*"
TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
DIGEST = r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}"
REFERENCE = rf"{REPOSITORY}(?::{TAG})?(?:@{DIGEST})?"
# HOST[:PORT]/NAMESPACE, or a Docker Hub namespace; an image name is appended to it.
REGISTRY = rf"(?:{DOMAIN}|{PATH_COMPONENT})(?:/{PATH_COMPONENT})*"
# A target name is a tag prefix, a folder name under images/ and an ENV value: one
# lower-case path component, so it is also safe on case-insensitive file systems.
TARGET = PATH_COMPONENT
IMAGE = rf"{PATH_COMPONENT}(?:/{PATH_COMPONENT})*"
# base_map keys are globs over references; values are references whose trailing '*'
# stands for the rest of the mapped reference.
BASE_PATTERN = r"[A-Za-z0-9._:/@*?\[\]-]+"
RUNNER_LABEL = r"[A-Za-z0-9][A-Za-z0-9_.:-]*"
# GPU names are free text in docs and tables ("RTX 3090"): printable, no table pipes.
GPU_NAME = r"[A-Za-z0-9][A-Za-z0-9 ._+()-]*"

MAX_REPOSITORY = 255
MAX_TAG = 128
MAX_NAME = 64


def matches(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


def shown(value: str, limit: int = 60) -> str:
    """A value as it may appear inside a one-line message: repr'd, shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "…" + text[-3:]


def check_tag(tag: str, where: str) -> None:
    if not matches(TAG, tag):
        why = (
            f"is {len(tag)} characters (Docker allows {MAX_TAG})"
            if len(tag) > MAX_TAG
            else "is not a Docker tag"
        )
        raise ConfigError(f"{where}: tag {shown(tag)} {why}; use shorter names or versions")


def check_reference(ref: str, where: str) -> None:
    """A full image reference, e.g. the base image a base_map rule produced."""
    if not matches(REFERENCE, ref) or len(ref.split("@")[0].rsplit(":", 1)[0]) > MAX_REPOSITORY:
        raise ConfigError(
            f"{where}: {shown(ref)} is not a Docker image reference "
            "(expected [HOST[:PORT]/]NAME[:TAG][@DIGEST], lower-case name)"
        )


def check_registry(registry: str, where: str, image: str = "") -> None:
    if not matches(REGISTRY, registry):
        raise ConfigError(
            f"{where}: {shown(registry)} is not a registry prefix "
            "(expected HOST[:PORT]/NAMESPACE, e.g. ghcr.io/acme or 127.0.0.1:5000/ml)"
        )
    full = f"{registry}/{image}" if image else registry
    if len(full) > MAX_REPOSITORY:
        raise ConfigError(f"{where}: {full!r} is {len(full)} characters; Docker allows {MAX_REPOSITORY}")


def check_base_rule(pattern: str, replacement: str, where: str) -> None:
    """A base_map rule: a glob over references -> a reference (a trailing '*' carries the rest)."""
    if not matches(BASE_PATTERN, pattern):
        raise ConfigError(f"{where}: pattern {shown(pattern)} may hold only reference characters and * ? [ ]")
    # A trailing '*' stands for the rest of a real reference: check the rule with a sample.
    sample = replacement[:-1] + "x" if replacement.endswith("*") else replacement
    if "*" in replacement[:-1] or not matches(REFERENCE, sample):
        raise ConfigError(
            f"{where}: {shown(replacement)} is not a Docker image reference "
            "(expected [HOST[:PORT]/]NAME[:TAG], optionally ending in *)"
        )


def check_name(kind: str, grammar: str, value: str, where: str, example: str) -> None:
    """A short identifier (target name, runner label, GPU name) in its grammar."""
    if len(value) > MAX_NAME or not matches(grammar, value):
        why = f"is {len(value)} characters (at most {MAX_NAME})" if len(value) > MAX_NAME else "is not valid"
        raise ConfigError(f"{where}: {kind} {shown(value)} {why}; use e.g. {example}")
