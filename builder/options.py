"""Every command-line option, declared once: flag, environment variable, matrix.yaml key,
default and help. One function applies the one precedence, CLI > env > matrix.yaml > default,
and returns a frozen record of the values and where each came from (`--dry-run` prints it).

Pure data and a pure function: the shell (builder/commands/common.py) turns these rows into
click options, so a flag cannot mean two things in two commands.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from builder import MATRIX_ENV, MATRIX_FILE, MATRIX_FLAGS
from builder.errors import ConfigError

if TYPE_CHECKING:
    from builder.project import Project

Kind = Literal["str", "path", "int", "float", "flag", "multi"]


@dataclass(frozen=True)
class Option:
    name: str  # the field name in Settings
    flags: tuple[str, ...]
    help: str
    kind: Kind = "str"
    env: str | None = None
    matrix_key: str | None = None  # a top-level key of matrix.yaml
    default: Any = None
    metavar: str | None = None
    secret: bool = False  # may carry credentials: shown redacted (builder/proxy.py)


OPTIONS: tuple[Option, ...] = (
    Option(  # also read before the CLI exists, by the no-op path (builder.uptodate.locate)
        "matrix",
        MATRIX_FLAGS,
        "The matrix file; templates/, images/, runtime/ and build/ are found beside it.",
        kind="path",
        env=MATRIX_ENV,
        default=Path(MATRIX_FILE),
    ),
    Option("docker", ("--docker",), "The docker executable.", env="QWEN_FT_DOCKER", default="docker"),
    Option(
        "registry",
        ("--registry",),
        'HOST[:PORT]/NAMESPACE for tags and pushes; "" means none.',
        env="QWEN_FT_REGISTRY",
        matrix_key="registry",
        default="",
    ),
    Option(
        "base_map",
        ("--base-map",),
        "PATTERN=REPLACEMENT for base images, e.g. 'nvidia/cuda:*=mirror/cuda:*' (repeatable; "
        "tried before matrix.yaml's base_map).",
        kind="multi",
        default=(),
    ),
    Option(
        "wheelhouse",
        ("--wheelhouse",),
        "A folder of wheels pip tries first during the build (bind-mounted, never copied into a layer).",
        kind="path",
        env="QWEN_FT_WHEELHOUSE",
    ),
    Option(
        "ca_bundle",
        ("--ca-bundle",),
        "A PEM bundle pip/apt/curl trust during the build only (a BuildKit secret).",
        kind="path",
        env="QWEN_FT_CA_BUNDLE",
    ),
    # A flag's value shows in `ps`: a proxy with credentials belongs in the env variable.
    Option(
        "http_proxy",
        ("--http-proxy",),
        "Proxy for the build only (never in the image); give one with credentials via the env variable.",
        env="QWEN_FT_HTTP_PROXY",
        secret=True,
    ),
    Option(
        "https_proxy",
        ("--https-proxy",),
        "Proxy for the build only (never in the image); give one with credentials via the env variable.",
        env="QWEN_FT_HTTPS_PROXY",
        secret=True,
    ),
    Option("no_proxy", ("--no-proxy",), "Hosts that bypass the proxies.", env="QWEN_FT_NO_PROXY"),
    Option("network", ("--network",), "Build network mode, e.g. host."),
    Option(
        "platform",
        ("--platform",),
        "Platforms to build, comma-separated (linux/amd64,linux/arm64); each selected image is "
        "built for those of its own platforms. Default: every platform of each image.",
        env="QWEN_FT_PLATFORM",
        metavar="OS/ARCH[,OS/ARCH]",
    ),
    Option("jobs", ("-j", "--jobs"), "Images to build in parallel.", kind="int", default=1),
    Option("fail_fast", ("--fail-fast",), "Stop starting new builds after the first failure.", kind="flag"),
    Option("push", ("--push",), "Push to --registry, then pull back to verify digests.", kind="flag"),
    Option(
        "no_lists",
        ("--no-lists",),
        "With --push: push only each platform's content-hash tag; a later step assembles the "
        "alias/pinned manifest lists (CI builds each platform on its own runner).",
        kind="flag",
    ),
    Option("force", ("--force",), "Allow overwriting an existing pinned or content tag.", kind="flag"),
    Option("dry_run", ("--dry-run",), "Print the plan and the exact commands; run nothing.", kind="flag"),
    Option("as_json", ("--json",), "Print JSON on stdout instead of a table.", kind="flag"),
    Option(
        "cuobjdump_wheelhouse",
        ("--cuobjdump-wheelhouse",),
        "A folder holding the cuobjdump wheel, for offline kernel audits.",
        kind="path",
        env="QWEN_FT_CUOBJDUMP_WHEELHOUSE",
    ),
    Option("cuobjdump", ("--cuobjdump",), "A cuobjdump binary to use for the kernel audit.", kind="path"),
)

BY_NAME: Mapping[str, Option] = MappingProxyType({o.name: o for o in OPTIONS})


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    jobs: int = 1
    fail_fast: bool = False
    push: bool = False
    registry: str | None = None
    force: bool = False
    base_map: tuple[tuple[str, str], ...] = ()
    wheelhouse: Path | None = None
    ca_bundle: Path | None = None
    http_proxy: str | None = None
    https_proxy: str | None = None
    no_proxy: str | None = None
    network: str | None = None
    dry_run: bool = False
    platforms: tuple[str, ...] = ()  # () means every platform of each image
    lists: bool = True  # with push: publish alias/pinned tags as manifest lists

    def check(self, project: Project) -> None:
        _check(self, project)


def _check(options: BuildOptions, project: Project) -> None:
    """Bad build inputs, in one line each, before anything runs."""
    from builder import names, proxy
    from builder.content import check_wheelhouse

    if options.registry:
        names.check_registry(options.registry, "--registry")
    proxy.check("--http-proxy", options.http_proxy)
    proxy.check("--https-proxy", options.https_proxy)
    if project.build.exists() and not project.build.is_dir():
        raise ConfigError(f"{project.build}: is a file, but build output goes here; move the file away")
    if options.wheelhouse is not None and not options.wheelhouse.is_dir():
        raise ConfigError(f"--wheelhouse {options.wheelhouse}: no such folder; create it or drop the option")
    if options.wheelhouse is not None:
        check_wheelhouse(project, options.wheelhouse)
    if options.ca_bundle is not None and not options.ca_bundle.is_file():
        raise ConfigError(f"--ca-bundle {options.ca_bundle}: no such file; pass a PEM bundle")
    if not project.runtime.is_dir():
        raise ConfigError(f"{project.runtime}: runtime/ folder missing; run from the project root")
    if options.jobs < 1:
        raise ConfigError("--jobs must be at least 1")


def options_from(settings: Settings) -> BuildOptions:
    """BuildOptions from resolved settings (builder/options.py); --registry "" means none."""
    return BuildOptions(
        jobs=settings["jobs"],
        fail_fast=settings["fail_fast"],
        push=settings["push"],
        registry=settings["registry"] or None,
        force=settings["force"],
        base_map=parse_base_map(settings["base_map"]),
        wheelhouse=settings["wheelhouse"],
        ca_bundle=settings["ca_bundle"],
        http_proxy=settings["http_proxy"],
        https_proxy=settings["https_proxy"],
        no_proxy=settings["no_proxy"],
        network=settings["network"],
        dry_run=settings["dry_run"],
        platforms=parse_platforms(settings.values.get("platform")),
        lists=not settings.values.get("no_lists", False),
    )


def parse_platforms(text: str | None) -> tuple[str, ...]:
    """'linux/amd64,linux/arm64' -> a tuple; a name outside contract.PLATFORMS is one clear error."""
    from builder.contract import PLATFORMS

    if not text:
        return ()
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        if name not in PLATFORMS:
            import difflib

            close = difflib.get_close_matches(name, PLATFORMS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"--platform {name!r} is not a platform{hint} (known: {', '.join(PLATFORMS)})")
    if not names:
        raise ConfigError("--platform is empty; give e.g. linux/amd64,linux/arm64")
    return names


def parse_base_map(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    rules = []
    for item in items:
        pattern, sep, target = item.partition("=")
        if not sep or not pattern or not target:
            raise ConfigError(
                f"--base-map {item!r}: expected PATTERN=REPLACEMENT, "
                "e.g. 'nvidia/cuda:*=mirror.local/nvidia/cuda:*'"
            )
        rule = (pattern.strip(), target.strip())
        from builder import names  # its reference grammar compiles at import: not on the no-op path

        names.check_base_rule(*rule, f"--base-map {names.shown(item)}")
        rules.append(rule)
    return tuple(rules)


@dataclass(frozen=True)
class Settings:
    """Resolved option values, and for each the layer it came from (cli, env, matrix.yaml, default)."""

    values: Mapping[str, Any]
    sources: Mapping[str, str]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def lines(self) -> list[str]:
        """`name = value (source)` per option, for --dry-run."""
        from builder.proxy import redact

        def shown(name: str) -> Any:
            value = self.values[name]
            return (
                redact(value)
                if name in BY_NAME and BY_NAME[name].secret and isinstance(value, str)
                else value
            )

        return [f"{name} = {shown(name)!r} ({self.sources[name]})" for name in sorted(self.values)]


def _convert(option: Option, text: str) -> Any:
    if option.kind == "path":
        return Path(text)
    if option.kind == "int":
        return int(text)
    if option.kind == "float":
        return float(text)
    if option.kind == "flag":
        return text.strip().lower() in ("1", "true", "yes", "on")
    return text


def _given(option: Option, value: Any) -> bool:
    """Whether the command line set this option (click passes None, False or () when not)."""
    if option.kind == "flag":
        return bool(value)
    if option.kind == "multi":
        return bool(value)
    return value is not None


def resolve(
    names: Iterable[str],
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
    matrix: Mapping[str, Any] | None = None,
) -> Settings:
    """CLI > env > matrix.yaml > default, for each named option. An empty CLI string counts as given."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in names:
        option = BY_NAME[name]
        cli_value = cli.get(name)
        if _given(option, cli_value):
            values[name], sources[name] = (
                tuple(cli_value or ()) if option.kind == "multi" else cli_value,
                "command line",
            )
        elif option.env and environ.get(option.env) is not None:
            values[name], sources[name] = _convert(option, environ[option.env]), f"${option.env}"
        elif option.matrix_key and matrix is not None and matrix.get(option.matrix_key) is not None:
            values[name], sources[name] = matrix[option.matrix_key], f"matrix.yaml {option.matrix_key}"
        else:
            default = bool(option.default) if option.kind == "flag" else option.default
            values[name], sources[name] = default, "default"
    return Settings(MappingProxyType(values), MappingProxyType(sources))
