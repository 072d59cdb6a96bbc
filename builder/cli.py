"""The command line: parse, call one core function, map FatalError to a one-line message.

Imports of heavy modules (docker, rich, jinja2, torch) stay inside the commands
that need them: `explain --json` must start in well under 300 ms.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from builder import __version__
from builder.errors import FatalError

if TYPE_CHECKING:
    from builder.config import MatrixConfig
    from builder.knowledge import Knowledge
    from builder.render import Project
    from builder.resolve import Resolution


@dataclass(frozen=True)
class Context:
    matrix_path: Path
    debug: bool

    @property
    def project(self) -> Project:
        from builder.render import Project

        return Project(self.matrix_path.resolve().parent)

    def load(self) -> tuple[MatrixConfig, Knowledge, Resolution]:
        from builder import config, knowledge, resolve

        cfg = config.load(self.matrix_path)
        kb = knowledge.load()
        return cfg, kb, resolve.resolve(cfg, kb)


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


# Commands that live in their own modules (builder/commands/), imported only when run,
# so `explain` and `matrix` never pay for torch, docker or plotting imports.
LAZY_COMMANDS = {
    "smoke": "builder.commands.smoke",
    "compare": "builder.commands.compare",
    "audit": "builder.commands.audit",
    "report": "builder.commands.report",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            import importlib

            try:
                module = importlib.import_module(LAZY_COMMANDS[cmd_name])
            except ModuleNotFoundError as exc:
                if exc.name != LAZY_COMMANDS[cmd_name]:
                    raise
                return None
            command: click.Command = module.command
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-f",
    "--matrix",
    "matrix_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("matrix.yaml"),
    envvar="QWEN_FT_MATRIX",
    show_default=True,
    help="The matrix file; templates/, images/ and build/ are found beside it.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(__version__, prog_name="qwen-ft-images")
@click.pass_context
def cli(ctx: click.Context, matrix_path: Path, debug: bool) -> None:
    """Per-GPU Docker images for fine-tuning Qwen, from one YAML matrix."""
    ctx.obj = Context(matrix_path=matrix_path, debug=debug)


@cli.command("matrix")
@click.option("--json", "as_json", is_flag=True, help="Print the cells as a JSON list.")
@click.option("--all", "show_all", is_flag=True, help="Also list excluded cells with their reasons.")
@click.argument("selectors", nargs=-1)
@click.pass_obj
def matrix_cmd(obj: Context, as_json: bool, show_all: bool, selectors: tuple[str, ...]) -> None:
    """Show the resolved images (and, with --all, every excluded cell and why)."""
    from builder import report, resolve

    _, _, res = obj.load()
    cells = resolve.select(res, selectors)
    excluded = [c for c in res.excluded if not selectors or c.spec.target in {x.spec.target for x in cells}]
    if as_json:
        out = [report.cell_json(c) for c in cells]
        if show_all:
            out += [report.cell_json(c) for c in excluded]
        _emit_json(out)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{len(cells)} images", header_style="bold")
    for h in report.HEADERS:
        table.add_column(h, overflow="fold")
    for c in cells:
        table.add_row(*report.cell_row(c))
    console.print(table)
    if show_all:
        ex = Table(title=f"{len(excluded)} cells not built", header_style="bold")
        for h in report.HEADERS:
            ex.add_column(h, overflow="fold")
        for c in excluded:
            ex.add_row(*report.cell_row(c))
        console.print(ex)
    else:
        click.echo(f"{len(excluded)} other cells not built; --all shows each with its reason", err=True)


@cli.command("explain")
@click.argument("target")
@click.option("--torch", "torch_v", help="torch version, e.g. 2.8.0")
@click.option("--cuda", help='CUDA variant, e.g. 12.6 ("none" for cpu)')
@click.option("--python", "python_v", help="Python version, e.g. 3.10")
@click.option("--flash-attn", "flash_attn", help='flash-attn version or "none"')
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Precision to ask for.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (stable field names).")
@click.pass_obj
def explain_cmd(
    obj: Context,
    target: str,
    torch_v: str | None,
    cuda: str | None,
    python_v: str | None,
    flash_attn: str | None,
    dtype: str | None,
    as_json: bool,
) -> None:
    """Verdict and plan for any cell of TARGET, in matrix.yaml or not.

    Exits 0 for a valid cell and 1 for an invalid one, so scripts can branch on it.
    """
    from builder import config, knowledge, report, resolve
    from builder.errors import ConfigError

    for name, value in (
        ("--torch", torch_v),
        ("--cuda", cuda),
        ("--python", python_v),
        ("--flash-attn", flash_attn),
    ):
        if value is not None and not _valid_version(value, allow_none=name in ("--cuda", "--flash-attn")):
            raise ConfigError(f"{name} {value!r} is not a version (e.g. --torch 2.8.0 --cuda 12.6)")
    cfg = config.load(obj.matrix_path)
    kb = knowledge.load()
    cell = resolve.explain(
        cfg,
        kb,
        target,
        overrides={"torch": torch_v, "cuda": cuda, "python": python_v, "flash_attn": flash_attn},
        dtype=dtype,
    )
    data = report.cell_json(cell)
    if as_json:
        _emit_json(data)
    else:
        _print_explain(data)
    if not cell.valid:
        sys.exit(1)


def _valid_version(value: str, *, allow_none: bool) -> bool:
    from packaging.version import InvalidVersion, Version

    if allow_none and value == "none":
        return True
    try:
        Version(value)
    except InvalidVersion:
        return False
    return True


def _print_explain(d: dict[str, Any]) -> None:
    cell = d["cell"]
    head = f"{d['target']} (sm_{d['sm']})" if d["sm"] else d["target"]
    click.echo(
        f"{head}: cuda {cell['cuda']}, torch {cell['torch']}, python {cell['python']}, "
        f"flash-attn {cell['flash_attn']}, {cell['dtype']}"
    )
    if not d["valid"]:
        click.echo("INVALID")
        for r in d["reasons"]:
            click.echo(f"  [{r['rule']}] {r['message']}\n      source: {r['source']}")
        return
    p = d["plan"]
    click.echo(f"VALID: {d['id']}")
    rows = [
        ("base image", p["base_image"]),
        ("builder image", p["builder_image"] or "-"),
        ("torch", f"{p['torch']['requirement']} from {p['torch']['index_url'] or 'PyPI'}"),
        ("flash-attn", f"{p['flash_attn']['strategy']} {p['flash_attn']['version'] or ''}".strip()),
        ("", p["flash_attn"]["wheel_url"] or ""),
        ("triton", f"{p['triton']} ({p['triton_reason']})"),
        ("dtype / attention", f"{p['dtype']} / {p['attn_implementation']}"),
        ("TORCH_CUDA_ARCH_LIST", p["torch_cuda_arch_list"] or "-"),
        ("min driver", f"{p['min_driver'] or 'none'} ({p['min_driver_reason']})"),
        ("stack", ", ".join(f"{k}=={v}" for k, v in p["stack"].items())),
        ("tags", ", ".join(p["tags"])),
    ]
    for k, v in rows:
        if v:
            click.echo(f"  {k:<21} {v}")
    for n in d["notes"]:
        click.echo(f"  note: {n['message']}")


@cli.command("render")
@click.option("--check", is_flag=True, help="Exit non-zero, naming each file, if images/ is out of date.")
@click.pass_obj
def render_cmd(obj: Context, check: bool) -> None:
    """Write images/<image>/Dockerfile for every image, and images/README.md."""
    from builder import render

    _, kb, res = obj.load()
    project = obj.project
    files = render.render_all(project, res, kb)
    if check:
        render.check(project, files)
        click.echo(f"images/ is up to date ({len(files)} files)")
        return
    changed = render.write(project, files)
    for path in changed:
        verb = "wrote" if path.exists() else "removed"
        click.echo(f"{verb} {path.relative_to(project.root)}")
    click.echo(f"{len(files)} files rendered, {len(changed)} changed")


@cli.command("schema")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="Write to a file.")
def schema_cmd(output: Path | None) -> None:
    """Print the JSON Schema of matrix.yaml (for editor autocompletion)."""
    from builder.config import schema_json

    text = schema_json()
    if output:
        from builder.fsio import write_atomic

        write_atomic(output, text, parents=False)
    else:
        click.echo(text, nl=False)


@cli.command("build")
@click.argument("selectors", nargs=-1)
@click.option("-j", "--jobs", default=1, show_default=True, help="Images to build in parallel.")
@click.option("--fail-fast", is_flag=True, help="Stop starting new builds after the first failure.")
@click.option("--push", is_flag=True, help="Push to --registry, then pull back to verify digests.")
@click.option("--registry", help="HOST[:PORT]/NAMESPACE to push to (default: matrix.yaml registry).")
@click.option("--force", is_flag=True, help="Allow overwriting an existing pinned or content tag.")
@click.option(
    "--base-map", "base_map", multiple=True, help="PATTERN=REPLACEMENT, e.g. 'nvidia/cuda:*=mirror/cuda:*'."
)
@click.option("--wheelhouse", type=click.Path(path_type=Path), help="Folder of wheels pip tries first.")
@click.option(
    "--ca-bundle",
    type=click.Path(path_type=Path),
    help="PEM bundle trusted by pip/apt/curl during the build only.",
)
@click.option("--http-proxy", help="Proxy for the build only (never stored in the image).")
@click.option("--https-proxy", help="Proxy for the build only (never stored in the image).")
@click.option("--no-proxy", help="Hosts that bypass the proxies.")
@click.option("--network", help="Build network mode, e.g. host.")
@click.option("--docker", "docker_exe", envvar="QWEN_FT_DOCKER", help="docker executable (default: docker).")
@click.option("--dry-run", is_flag=True, help="Print the plan and the exact commands; run nothing.")
@click.pass_obj
def build_cmd(
    obj: Context,
    selectors: tuple[str, ...],
    jobs: int,
    fail_fast: bool,
    push: bool,
    registry: str | None,
    force: bool,
    base_map: tuple[str, ...],
    wheelhouse: Path | None,
    ca_bundle: Path | None,
    http_proxy: str | None,
    https_proxy: str | None,
    no_proxy: str | None,
    network: str | None,
    docker_exe: str | None,
    dry_run: bool,
) -> None:
    """Build (and tag, and optionally push) the selected images; none selected means all."""
    from builder import build, resolve
    from builder.errors import BuildFailed, ConfigError

    cfg, kb, res = obj.load()
    cells = resolve.select(res, selectors)
    registry = registry or cfg.registry or None
    if push and not registry:
        raise ConfigError("--push needs --registry HOST[:PORT]/NAMESPACE (or registry: in matrix.yaml)")
    options = build.BuildOptions(
        jobs=jobs,
        fail_fast=fail_fast,
        push=push,
        registry=registry,
        force=force,
        base_map=build.parse_base_map(base_map),
        wheelhouse=wheelhouse,
        ca_bundle=ca_bundle,
        http_proxy=http_proxy,
        https_proxy=https_proxy,
        no_proxy=no_proxy,
        network=network,
        dry_run=dry_run,
    )
    project = obj.project
    build.check_inputs(project, options)
    plan = build.plan_jobs(project, res, kb, cells, options)
    from builder.engine import CommandLog, DockerEngine

    if dry_run:
        for line in build.dry_run_lines(project, plan, DockerEngine(docker_exe), options):
            click.echo(line)
        return
    from builder.console import BuildProgress, summary

    engine = DockerEngine(docker_exe, CommandLog(project.build / "logs" / "commands.sh"))
    engine_version = engine.check()
    if push and registry and plan:
        engine.remote_digest(build.remote(plan[0].tags[0], registry))  # fails fast if unreachable
    started = time.time()
    with BuildProgress([j.name for j in plan]) as progress:
        try:
            results = build.run(project, plan, engine, options, on_change=progress.update)
        except KeyboardInterrupt:
            from builder.errors import Interrupted

            raise Interrupted("interrupted: running builds were cancelled; no tag was moved") from None
    summary(results)
    meta = {
        "command": "build",
        "started": started,
        "seconds": round(time.time() - started, 2),
        "engine": engine_version,
        "options": {
            "jobs": jobs,
            "push": push,
            "registry": registry,
            "base_map": [f"{a}={b}" for a, b in options.base_map],
            "wheelhouse": str(wheelhouse) if wheelhouse else None,
            "ca_bundle": bool(ca_bundle),
            "http_proxy": build.redact(http_proxy),
            "https_proxy": build.redact(https_proxy),
        },
    }
    report = build.write_report(project, results, meta)
    click.echo(f"report: {report.relative_to(project.root)}", err=True)
    failed = [r for r in results if not r.ok]
    if failed:
        if all(r.failed_in == "push" for r in failed):  # every image built; only the registry said no
            from builder.errors import RegistryError

            raise RegistryError(failed[0].error or "push failed")
        raise BuildFailed(
            f"{len(failed)} of {len(results)} images failed: "
            + "; ".join(f"{r.image} ({r.error}; log {r.log})" for r in failed)
        )


@cli.command("prune")
@click.option("--dry-run", is_flag=True, help="List the tags that would be removed; remove nothing.")
@click.option("--docker", "docker_exe", envvar="QWEN_FT_DOCKER", help="docker executable (default: docker).")
@click.pass_obj
def prune_cmd(obj: Context, dry_run: bool, docker_exe: str | None) -> None:
    """Remove local content-hash tags of superseded images, so their layers can be freed.

    Alias and pinned tags, the current content tags, and any image an alias or pinned tag
    still names are kept. Registries are never touched.
    """
    from builder import build
    from builder.engine import CommandLog, DockerEngine

    cfg, kb, res = obj.load()
    project = obj.project
    jobs = build.plan_jobs(project, res, kb, res.cells, build.BuildOptions())
    engine = DockerEngine(docker_exe, CommandLog(None if dry_run else project.build / "logs" / "commands.sh"))
    engine.check()
    stale = build.stale_tags(jobs, engine.local_tags(cfg.image))
    for ref in stale:
        if not dry_run:
            engine.remove_image(ref)
        click.echo(("would remove " if dry_run else "removed ") + ref)
    click.echo(f"{len(stale)} stale content tag(s) {'found' if dry_run else 'removed'}", err=True)


@cli.command("doctor")
@click.argument("selectors", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (fields in docs/doctor.md).")
@click.option(
    "--assume-gpu",
    "assume_gpus",
    multiple=True,
    metavar="NAME_OR_SM",
    help="Plan for this GPU instead of probing (repeatable): V100, A10G, sm_70, 70, 8.6.",
)
@click.option("--assume-driver", metavar="VERSION", help="Plan for this NVIDIA driver, e.g. 535.104.05.")
@click.option("--log", "log_file", type=click.Path(path_type=Path), help="Diagnose a failed run's log.")
@click.pass_obj
def doctor_cmd(
    obj: Context,
    selectors: tuple[str, ...],
    as_json: bool,
    assume_gpus: tuple[str, ...],
    assume_driver: str | None,
    log_file: Path | None,
) -> None:
    """Which image this machine should run (GPU, driver, Docker), and why a run failed.

    Exits 0 when every GPU has an image that runs with its driver (or there is no GPU
    and the CPU image applies), 1 when a GPU has none or --log matched no known
    failure, 2 for bad input.
    """
    from builder import doctor, resolve

    log_text = doctor.read_log(log_file) if log_file is not None else None
    _, kb, res = obj.load()
    cells = resolve.select(res, selectors)
    report = doctor.run(
        kb, res, cells, assume_gpus=assume_gpus, assume_driver=assume_driver, log_text=log_text
    )
    if as_json:
        click.echo(json.dumps(doctor.report_json(report), indent=2))
    else:
        click.echo(doctor.render_text(report, log_name=str(log_file) if log_file else None), nl=False)
    if log_text is not None and not report.diagnoses:
        names = ", ".join(s.id for s in doctor.load_signatures())
        raise FatalError(
            f"{log_file}: no known failure signature found (checked: {names}); "
            "add new ones to builder/knowledge/signatures.yaml"
        )
    if not report.ok:
        sys.exit(1)


@cli.command("ci-matrix")
@click.argument("selectors", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help='{"include": [...]} on one line, for $GITHUB_OUTPUT.')
@click.option("--registry", help="Registry prefix for the tags (default: matrix.yaml registry).")
@click.pass_obj
def ci_matrix_cmd(obj: Context, selectors: tuple[str, ...], as_json: bool, registry: str | None) -> None:
    """The GitHub Actions build/smoke matrix: one entry per selected image."""
    from builder import ci, images, resolve

    _, kb, res = obj.load()
    cells = resolve.select(res, selectors)
    facts = images.facts(obj.project, res, kb, cells, registry=registry)
    if as_json:
        click.echo(json.dumps(ci.include(facts), separators=(",", ":")))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(facts)} CI matrix entries", header_style="bold")
    for h in ci.HEADERS:
        table.add_column(h, overflow="fold")
    for f in facts:
        table.add_row(*ci.row(f))
    Console().print(table)


@cli.command("bake")
@click.argument("selectors", nargs=-1)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("docker-bake.json"),
    show_default=True,
    help="Where to write the bake file ('-' for stdout).",
)
@click.option("--registry", help="Registry prefix for tags and cache (default: matrix.yaml registry).")
@click.option(
    "--base-map", "base_map", multiple=True, help="PATTERN=REPLACEMENT, e.g. 'nvidia/cuda:*=mirror/cuda:*'."
)
@click.option(
    "--wheelhouse", type=click.Path(path_type=Path), help="Folder of wheels staged into the context."
)
@click.option(
    "--ca-bundle", type=click.Path(path_type=Path), help="PEM bundle passed as the ca_bundle secret."
)
@click.pass_obj
def bake_cmd(
    obj: Context,
    selectors: tuple[str, ...],
    output: Path,
    registry: str | None,
    base_map: tuple[str, ...],
    wheelhouse: Path | None,
    ca_bundle: Path | None,
) -> None:
    """Write a `docker buildx bake` file for the selected images and stage build/context/.

    Run `docker buildx bake -f docker-bake.json [--push]` from the project root.
    """
    from builder import bake, build, images, resolve

    cfg, kb, res = obj.load()
    cells = resolve.select(res, selectors)
    options = build.BuildOptions(
        base_map=build.parse_base_map(base_map), wheelhouse=wheelhouse, ca_bundle=ca_bundle
    )
    project = obj.project
    build.check_inputs(project, options)
    facts = images.facts(project, res, kb, cells, registry=registry, options=options)
    reg = cfg.registry if registry is None else registry
    data = bake.bake_file(project, facts, registry=reg, ca_bundle=ca_bundle.resolve() if ca_bundle else None)
    build.stage_context(project, options)
    text = json.dumps(data, indent=2) + "\n"
    if str(output) == "-":
        click.echo(text, nl=False)
        return
    from builder.fsio import write_atomic

    write_atomic(output, text, parents=False)
    click.echo(f"wrote {output} ({len(facts)} targets); staged {project.build / 'context'}", err=True)
    if not reg:
        click.echo("note: no registry, so no registry cache; pass --registry to share the cache", err=True)


def _fail(exc: FatalError, debug: bool) -> NoReturn:
    if debug:
        import traceback

        traceback.print_exception(exc)
    click.echo(f"error: {exc.message}", err=True)
    sys.exit(exc.exit_code)


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        cli.main(standalone_mode=False)
    except FatalError as exc:
        _fail(exc, debug)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors too: one `error:` line, like every other
        from builder.errors import one_line

        hint = (
            f"; see `{exc.ctx.command_path} --help`" if isinstance(exc, click.UsageError) and exc.ctx else ""
        )
        click.echo(f"error: {one_line(exc.format_message()).rstrip('.')}{hint}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:  # a file-system problem no stage anticipated: still one line
        from builder.errors import ConfigError
        from builder.fsio import problem

        _fail(ConfigError(problem(exc, Path(exc.filename or "?"))), debug)
