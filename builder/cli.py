"""The command line: parse, call one core function, map FatalError to a one-line message.

Imports of heavy modules (docker, rich, jinja2, torch) stay inside the commands
that need them: `explain --json` must start in well under 300 ms.
"""

from __future__ import annotations

import json
import sys
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
        click.echo(f"wrote {path.relative_to(project.root)}")
    click.echo(f"{len(files)} files rendered, {len(changed)} changed")


@cli.command("schema")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="Write to a file.")
def schema_cmd(output: Path | None) -> None:
    """Print the JSON Schema of matrix.yaml (for editor autocompletion)."""
    from builder.config import schema_json

    text = schema_json()
    if output:
        output.write_text(text, encoding="utf-8")
    else:
        click.echo(text, nl=False)


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
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
