"""matrix.yaml: load, validate against one JSON Schema, and freeze into typed records.

The JSON Schema below is the single source of truth: the validator walks it (so
the published `matrix.schema.json` can never disagree with what is accepted), and
unknown keys get a "did you mean" with their YAML path.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from packaging.version import InvalidVersion, Version

from builder import names
from builder.contract import PLATFORMS
from builder.errors import ConfigError

try:
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

AXES = ("cuda", "torch", "python", "flash_attn")
DTYPES = ("bf16", "fp16", "fp32")
# OCI platforms (contract.PLATFORMS); the knowledge base says what each can run
# (builder/knowledge/platforms.yaml). linux/amd64 alone is the default: the axis is opt-in.
DEFAULT_PLATFORMS = ("linux/amd64",)

_VERSION = {"type": "string", "pattern": r"^\d+(\.\d+)*([.-]?post\d+)?$", "x-version": True}
_CUDA = {"type": "string", "pattern": r"^(\d+\.\d+|none)$", "x-version": True}
_PYTHON = {"type": "string", "pattern": r"^3\.\d+$", "x-version": True}
_FA = {"type": "string", "pattern": r"^(\d+(\.\d+)*(\.post\d+)?|none)$", "x-version": True}
_PLATFORM = {"enum": list(PLATFORMS), "description": "An OCI platform: linux/amd64 or linux/arm64 (Grace)."}


def _grammar(pattern: str, what: str, example: str, max_length: int | None = None) -> dict[str, Any]:
    """A string in one of builder.names' grammars; `x-what`/`x-example` make the message."""
    out: dict[str, Any] = {
        "type": "string",
        "pattern": f"^(?:{pattern})$",
        "x-what": what,
        "x-example": example,
    }
    if max_length is not None:
        out["maxLength"] = max_length
    return out


_TARGET_NAME = _grammar(
    names.TARGET, "target name (lower-case letters, digits, '.', '_', '-')", "a100", names.MAX_NAME
)


def _list_of(item: dict[str, Any], description: str) -> dict[str, Any]:
    return {"type": "array", "items": item, "minItems": 1, "description": description}


_AXES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "Candidate values searched for each target. Quote versions: 12.10 would be read as 12.1.",
    "properties": {
        "cuda": _list_of(_CUDA, 'CUDA variants of the torch wheels, e.g. "12.6"; "none" for CPU.'),
        "torch": _list_of(_VERSION, 'torch releases, e.g. "2.8.0".'),
        "python": _list_of(_PYTHON, 'Python versions, e.g. "3.10". Each maps to a base OS.'),
        "flash_attn": _list_of(_FA, 'flash-attn releases, or "none".'),
        "platform": {
            **_list_of(
                _PLATFORM, "Platforms to build, e.g. [linux/amd64, linux/arm64]; default [linux/amd64]."
            ),
            "uniqueItems": True,
        },
    },
}

_CELL_PROPS: dict[str, Any] = {
    "cuda": _CUDA,
    "torch": _VERSION,
    "python": _PYTHON,
    "flash_attn": _FA,
}

_CELL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["cuda", "torch", "python", "flash_attn"],
    "properties": dict(_CELL_PROPS),
}

_PATTERN_CELL = {"type": "string", "description": 'A value or a glob (fnmatch), e.g. "12.*".'}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://github.com/qwen-ft-images/qwen-ft-images/matrix.schema.json",
    "title": "qwen-ft-images matrix.yaml",
    "type": "object",
    "additionalProperties": False,
    "required": ["targets"],
    "properties": {
        "image": {
            **_grammar(names.IMAGE, "image repository name (lower case, Docker's grammar)", "qwen-ft", 200),
            "description": "Image repository name, e.g. qwen-ft.",
        },
        "registry": {
            **_grammar(
                f"|{names.REGISTRY}",
                "registry prefix HOST[:PORT]/NAMESPACE",
                "ghcr.io/acme",
                names.MAX_REPOSITORY,
            ),
            "description": "Registry prefix for pushed tags, e.g. ghcr.io/acme or 127.0.0.1:5000/ml.",
        },
        "base_map": {
            "type": "object",
            "propertyNames": _grammar(names.BASE_PATTERN, "base image pattern", "'nvidia/cuda:*'", 255),
            "additionalProperties": _grammar(
                rf"{names.REFERENCE}|[A-Za-z0-9._:/@\[\]-]+\*",
                "image reference, optionally ending in *",
                "'mirror.local/nvidia/cuda:*'",
                255,
            ),
            "description": "Redirect base images: 'nvidia/cuda:*' -> 'mirror.local/nvidia/cuda:*'. "
            "A trailing * carries the rest of the reference over.",
        },
        "axes": _AXES_SCHEMA,
        "targets": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": _TARGET_NAME,
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "sm": {
                        "type": ["integer", "null"],
                        "description": "Compute capability x10 (V100 = 70). null for the CPU target.",
                    },
                    "gpus": {
                        "type": "array",
                        "items": _grammar(names.GPU_NAME, "GPU name", "'RTX 3090'", names.MAX_NAME),
                        "description": "GPU names this target serves (documentation, doctor).",
                    },
                    "dtype": {"enum": ["auto", *DTYPES], "description": "Default precision."},
                    "triton": {
                        "enum": ["auto", "keep", "remove"],
                        "description": "auto removes Triton where the GPU is below its minimum SM.",
                    },
                    "axes": _AXES_SCHEMA,
                    "deepspeed_ops": {
                        "type": "array",
                        "uniqueItems": True,
                        "items": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,39}$"},
                        "description": "DeepSpeed ops to prebuild for the target's SM (default: Qwen's "
                        "recipe, fused_adam and cpu_adam; [] for none). An op the SM cannot run "
                        "makes the cell invalid.",
                    },
                    "recommended": {
                        **_CELL_SCHEMA,
                        "description": "Pin the recommended cell instead of letting the policy pick.",
                    },
                    "runner_labels": {
                        "type": "array",
                        "items": _grammar(names.RUNNER_LABEL, "runner label", "self-hosted", names.MAX_NAME),
                        "description": "GitHub Actions runner labels for this target's GPU smoke job.",
                    },
                },
            },
        },
        "include": {
            "type": "array",
            "description": "Extra pinned cells, built next to the recommended images.",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["target", "cuda", "torch", "python", "flash_attn"],
                "properties": {"target": _TARGET_NAME, **_CELL_PROPS},
            },
        },
        "exclude": {
            "type": "array",
            "description": "Drop candidate cells: every given key must match (globs allowed).",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "minProperties": 1,
                "properties": dict.fromkeys(("target", *AXES), _PATTERN_CELL),
            },
        },
    },
}


def schema_json() -> str:
    """The published JSON Schema, without our private `x-` keywords."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if not k.startswith("x-")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return json.dumps(strip(SCHEMA), indent=2, sort_keys=True) + "\n"


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True, kw_only=True)
class Axes:
    cuda: tuple[str, ...]
    torch: tuple[str, ...]
    python: tuple[str, ...]
    flash_attn: tuple[str, ...]
    platform: tuple[str, ...] = DEFAULT_PLATFORMS


@dataclass(frozen=True, kw_only=True)
class CellSpec:
    """One point of the matrix, before resolution."""

    target: str
    cuda: str
    torch: str
    python: str
    flash_attn: str

    def key(self) -> tuple[str, str, str, str, str]:
        return (self.target, self.cuda, self.torch, self.python, self.flash_attn)


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    name: str
    sm: int | None
    gpus: tuple[str, ...]
    dtype: str
    triton: str
    axes: Axes
    recommended: CellSpec | None
    runner_labels: tuple[str, ...]
    # DeepSpeed ops to prebuild; None = what the knowledge base plans for the target's kind.
    deepspeed_ops: tuple[str, ...] | None = None

    @property
    def is_cpu(self) -> bool:
        return self.sm is None


@dataclass(frozen=True, kw_only=True)
class MatrixConfig:
    path: Path
    image: str
    registry: str
    base_map: tuple[tuple[str, str], ...]
    axes: Axes
    targets: Mapping[str, TargetConfig]
    include: tuple[CellSpec, ...]
    exclude: tuple[Mapping[str, str], ...]


DEFAULT_AXES = Axes(
    cuda=("12.6", "12.8", "13.0"),
    torch=("2.8.0", "2.13.0"),
    python=("3.10", "3.12"),
    flash_attn=("2.8.3", "none"),
    platform=DEFAULT_PLATFORMS,
)

# ----------------------------------------------------------------------------- loading


def load(path: Path) -> MatrixConfig:
    """Read, validate and freeze a matrix file. Every problem is a one-line ConfigError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; pass --matrix PATH or run from the folder holding matrix.yaml"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse(decode(raw, path), path)


def decode(raw: bytes, path: Path) -> str:
    """matrix.yaml is UTF-8 (a BOM is tolerated); anything else is one line saying so."""
    for bom, name in (
        (b"\xff\xfe\x00\x00", "UTF-32"),
        (b"\x00\x00\xfe\xff", "UTF-32"),
        (b"\xff\xfe", "UTF-16"),
        (b"\xfe\xff", "UTF-16"),
    ):
        if raw.startswith(bom):
            raise ConfigError(f"{path}: the file is {name}; save it as UTF-8")
    if b"\x00" in raw:
        raise ConfigError(f"{path}: the file holds NUL bytes (binary or UTF-16); save it as UTF-8 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: byte 0x{raw[exc.start]:02x} is not UTF-8 (Latin-1?); save the file as UTF-8"
        ) from None


def parse(text: str, path: Path) -> MatrixConfig:
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                _reject_duplicate_keys(node, "", path)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: YAML syntax error: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: the matrix is empty; define at least one target under 'targets:'")
    _validate(data, SCHEMA, "", path)
    return _freeze(data, path)


def _reject_duplicate_keys(
    node: yaml.Node, ypath: str, path: Path, seen_nodes: set[int] | None = None
) -> None:
    """YAML keeps the last of two equal keys; an appended `image:` would silently win."""
    # Aliases share (and may nest) nodes: visit each once, so neither loops nor blows up.
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{ypath}.{key}" if ypath else key
            if isinstance(key_node, yaml.ScalarNode) and key in seen:
                mark = key_node.start_mark
                raise ConfigError(
                    f"{path}:{mark.line + 1}:{mark.column + 1}: {child}: duplicate key; keep only one"
                )
            seen.add(key)
            _reject_duplicate_keys(value_node, child, path, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _reject_duplicate_keys(item, f"{ypath}[{i}]", path, seen_nodes)


def _where(path: Path, ypath: str) -> str:
    return f"{path}: {ypath or '<top level>'}"


def _validate(node: Any, schema: Mapping[str, Any], ypath: str, path: Path) -> None:
    """Walk the subset of JSON Schema that SCHEMA uses; raise on the first problem."""
    if "enum" in schema:
        if node not in schema["enum"]:
            choices = ", ".join(str(c) for c in schema["enum"])
            hint = _did_you_mean(str(node), [str(c) for c in schema["enum"]])
            raise ConfigError(f"{_where(path, ypath)}: {node!r} is not one of {choices}{hint}")
        return
    expected = schema.get("type")
    types = expected if isinstance(expected, list) else [expected] if expected else []
    if types and not any(_is_type(node, t) for t in types):
        raise ConfigError(f"{_where(path, ypath)}: {_type_problem(node, types)}")
    if isinstance(node, str):
        _validate_string(node, schema, ypath, path)
    elif isinstance(node, list):
        if len(node) < schema.get("minItems", 0):
            raise ConfigError(f"{_where(path, ypath)}: the list is empty; give at least one value")
        if schema.get("uniqueItems") and len({json.dumps(i, sort_keys=True) for i in node}) != len(node):
            raise ConfigError(f"{_where(path, ypath)}: lists a value twice; give each value once")
        for i, item in enumerate(node):
            _validate(item, schema.get("items", {}), f"{ypath}[{i}]", path)
    elif isinstance(node, dict):
        _validate_mapping(node, schema, ypath, path)


def _validate_string(node: str, schema: Mapping[str, Any], ypath: str, path: Path) -> None:
    import re

    pattern = schema.get("pattern")
    max_length = schema.get("maxLength")
    if max_length is not None and len(node) > max_length:
        raise ConfigError(
            f"{_where(path, ypath)}: {names.shown(node)} is {len(node)} characters; at most {max_length}"
        )
    # fullmatch, as JSON Schema means it: re.match's `$` would also accept a trailing newline.
    if pattern and not re.fullmatch(pattern, node):
        if "x-what" in schema:
            raise ConfigError(
                f"{_where(path, ypath)}: {names.shown(node)} is not a valid {schema['x-what']}; "
                f"e.g. {schema['x-example']}"
            )
        if schema.get("x-version"):
            raise ConfigError(
                f"{_where(path, ypath)}: {node!r} is not a valid version here "
                f"(expected something like {_example(schema)})"
            )
        raise ConfigError(f"{_where(path, ypath)}: {node!r} does not match {pattern}")
    if schema.get("x-version") and node != "none":
        try:
            Version(node)
        except InvalidVersion:
            raise ConfigError(f"{_where(path, ypath)}: {node!r} is not a valid version") from None


def _validate_mapping(node: dict[Any, Any], schema: Mapping[str, Any], ypath: str, path: Path) -> None:
    props: dict[str, Any] = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key in node:
        if not isinstance(key, str):
            raise ConfigError(f"{_where(path, ypath)}: key {key!r} must be a string; quote it")
    for req in schema.get("required", []):
        if req not in node:
            raise ConfigError(f"{_where(path, ypath)}: missing required key '{req}'")
    if len(node) < schema.get("minProperties", 0):
        raise ConfigError(f"{_where(path, ypath)}: is empty; add at least one entry")
    for key, value in node.items():
        if "propertyNames" in schema:
            _validate(key, schema["propertyNames"], f"{ypath}.{key}" if ypath else key, path)
        child = f"{ypath}.{key}" if ypath else key
        if key in props:
            _validate(value, props[key], child, path)
        elif extra is False:
            hint = _did_you_mean(key, list(props))
            allowed = ", ".join(props)
            raise ConfigError(f"{_where(path, child)}: unknown key{hint} (allowed: {allowed})")
        elif isinstance(extra, dict):
            _validate(value, extra, child, path)


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _is_type(node: Any, t: str) -> bool:
    return {
        "string": isinstance(node, str),
        "integer": isinstance(node, int) and not isinstance(node, bool),
        "array": isinstance(node, list),
        "object": isinstance(node, dict),
        "null": node is None,
    }[t]


def _type_problem(node: Any, types: list[str]) -> str:
    want = " or ".join(types)
    if "string" in types and isinstance(node, (int, float)) and not isinstance(node, bool):
        return (
            f"expected a {want}, got the number {node!r}; quote versions in YAML "
            '(write "12.6", since 12.10 would be read as 12.1)'
        )
    return f"expected a {want}, got {type(node).__name__} {node!r}"


def _example(schema: Mapping[str, Any]) -> str:
    pattern = schema.get("pattern", "")
    if "none" in pattern and "post" in pattern:
        return '"2.8.3" or "none"'
    if "none" in pattern:
        return '"12.6" or "none"'
    if pattern.startswith("^3"):
        return '"3.10"'
    return '"2.8.0"'


# ----------------------------------------------------------------------------- freezing


def _axes(raw: Mapping[str, Any] | None, base: Axes) -> Axes:
    raw = raw or {}
    return Axes(
        cuda=tuple(raw.get("cuda", base.cuda)),
        torch=tuple(raw.get("torch", base.torch)),
        python=tuple(raw.get("python", base.python)),
        flash_attn=tuple(raw.get("flash_attn", base.flash_attn)),
        platform=tuple(raw.get("platform", base.platform)),
    )


# Every candidate cell is checked against every rule; `matrix --all` lists them all. Far past
# any real fleet (8 targets x 4 CUDA x 4 torch x 3 Python x 3 flash-attn is 1,152), a typo'd
# or hostile matrix would otherwise take minutes and gigabytes before saying anything.
MAX_CELLS_PER_TARGET = 2_000
MAX_CELLS = 20_000
MAX_TARGETS = 200


def _check_size(path: Path, targets: Mapping[str, TargetConfig], includes: int) -> None:
    if len(targets) > MAX_TARGETS:
        raise ConfigError(f"{path}: {len(targets)} targets; the limit is {MAX_TARGETS}: split the matrix")
    total = includes
    for name, t in targets.items():
        cells = len(t.axes.cuda) * len(t.axes.torch) * len(t.axes.python) * len(t.axes.flash_attn)
        if cells > MAX_CELLS_PER_TARGET:
            raise ConfigError(
                f"{path}: targets.{name}: its axes make {cells:,} candidate cells; the limit is "
                f"{MAX_CELLS_PER_TARGET:,} per target: list fewer values (or exclude: them)"
            )
        total += cells
    if total > MAX_CELLS:
        raise ConfigError(
            f"{path}: the matrix makes {total:,} candidate cells; the limit is {MAX_CELLS:,}: "
            "list fewer axis values, or split it into several matrix files (-f)"
        )


def _freeze(data: Mapping[str, Any], path: Path) -> MatrixConfig:
    axes = _axes(data.get("axes"), DEFAULT_AXES)
    targets: dict[str, TargetConfig] = {}
    for name, raw in data["targets"].items():
        raw = raw or {}
        if "sm" not in raw and name != "cpu":
            raise ConfigError(
                f"{path}: targets.{name}: missing 'sm' (compute capability x10, e.g. 80); "
                "use sm: null for a CPU target"
            )
        sm = raw.get("sm")
        target_axes = _axes(raw.get("axes"), axes)
        if sm is None:
            # A CPU image has no CUDA and no flash-attn, whatever the global axes say.
            target_axes = Axes(
                cuda=("none",),
                torch=target_axes.torch,
                python=target_axes.python,
                flash_attn=("none",),
                platform=target_axes.platform,
            )
        rec = raw.get("recommended")
        targets[name] = TargetConfig(
            name=name,
            sm=sm,
            gpus=tuple(raw.get("gpus", ())),
            dtype=raw.get("dtype", "auto"),
            triton=raw.get("triton", "auto"),
            axes=target_axes,
            recommended=CellSpec(target=name, **rec) if rec else None,
            runner_labels=tuple(
                raw.get("runner_labels", ("self-hosted", "gpu", f"sm_{sm}") if sm else ("ubuntu-latest",))
            ),
            deepspeed_ops=tuple(raw["deepspeed_ops"]) if "deepspeed_ops" in raw else None,
        )
    _check_size(path, targets, len(data.get("include", [])))
    include = []
    for i, inc in enumerate(data.get("include", [])):
        if inc["target"] not in targets:
            hint = _did_you_mean(inc["target"], list(targets))
            raise ConfigError(
                f"{path}: include[{i}].target: no target named '{inc['target']}'{hint} "
                f"(targets: {', '.join(targets)})"
            )
        include.append(CellSpec(**inc))
    exclude = tuple(dict(e) for e in data.get("exclude", []))
    for i, ex in enumerate(exclude):
        _check_exclude_matches(ex, targets, f"{path}: exclude[{i}]")
    base_map = tuple((str(k), str(v)) for k, v in (data.get("base_map") or {}).items())
    for pattern, replacement in base_map:
        names.check_base_rule(pattern, replacement, f"{path}: base_map[{pattern!r}]")
    image = data.get("image", "qwen-ft")
    registry = data.get("registry", "")
    if registry:
        names.check_registry(registry, f"{path}: registry", image)
    return MatrixConfig(
        path=path,
        image=image,
        registry=registry,
        base_map=base_map,
        axes=axes,
        targets=targets,
        include=tuple(include),
        exclude=exclude,
    )


def _check_exclude_matches(rule: Mapping[str, str], targets: Mapping[str, TargetConfig], where: str) -> None:
    """An exclude rule must drop at least one candidate cell (README: it is rejected otherwise).

    Axes are a product, so a rule matches some cell of a target exactly when each of its
    keys matches some value of that target's axis.
    """
    import fnmatch

    hits = [t for name, t in targets.items() if fnmatch.fnmatchcase(name, rule.get("target", "*"))]
    if not hits:
        raise ConfigError(
            f"{where}.target: {names.shown(rule['target'])} matches no target (targets: {', '.join(targets)})"
        )
    for target in hits:
        if all(
            any(fnmatch.fnmatchcase(v, pattern) for v in getattr(target.axes, key))
            for key, pattern in rule.items()
            if key != "target"
        ):
            return
    keys = ", ".join(f"{k}: {names.shown(v)}" for k, v in rule.items())
    raise ConfigError(
        f"{where}: {{{keys}}} matches no candidate cell; fix or remove it (`matrix --all` lists the cells)"
    )
