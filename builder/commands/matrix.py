"""`matrix`, `explain` and `schema`: what the matrix resolves to, and why."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from builder.commands.common import Context, emit_json, option

if TYPE_CHECKING:
    from builder.resolve import Verdict


@click.command("matrix")
@option("as_json", help="Print the cells as a JSON list.")
@click.option("--all", "show_all", is_flag=True, help="Also list excluded cells with their reasons.")
@click.argument("selectors", nargs=-1)
@click.pass_obj
def matrix(obj: Context, as_json: bool, show_all: bool, selectors: tuple[str, ...]) -> None:
    """Show the resolved images (and, with --all, every excluded cell and why)."""
    from builder import cellview, resolve

    _, _, res = obj.load()
    cells = resolve.select(res, selectors)
    targets = {c.spec.target for c in cells}
    excluded = [c for c in res.excluded if not selectors or c.spec.target in targets]
    if as_json:
        emit_json([cellview.cell_json(c) for c in [*cells, *(excluded if show_all else [])]])
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    tables: list[tuple[str, Sequence[Verdict]]] = [(f"{len(cells)} images", cells)]
    if show_all:
        tables.append((f"{len(excluded)} cells not built", excluded))
    for title, rows in tables:
        table = Table(title=title, header_style="bold")
        for h in cellview.HEADERS:
            table.add_column(h, overflow="fold")
        for c in rows:
            table.add_row(*cellview.cell_row(c))
        console.print(table)
    if not show_all:
        click.echo(f"{len(excluded)} other cells not built; --all shows each with its reason", err=True)


@click.command("explain")
@click.argument("target")
@click.option("--torch", "torch_v", help="torch version, e.g. 2.8.0")
@click.option("--cuda", help='CUDA variant, e.g. 12.6 ("none" for cpu)')
@click.option("--python", "python_v", help="Python version, e.g. 3.10")
@click.option("--flash-attn", "flash_attn", help='flash-attn version or "none"')
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Precision to ask for.")
@click.option(
    "--platform", help="One platform to explain for, e.g. linux/arm64 (default: the target's first)."
)
@option("as_json", help="One JSON object (stable field names).")
@click.pass_obj
def explain(
    obj: Context,
    target: str,
    torch_v: str | None,
    cuda: str | None,
    python_v: str | None,
    flash_attn: str | None,
    dtype: str | None,
    platform: str | None,
    as_json: bool,
) -> None:
    """Verdict and plan for any cell of TARGET, in matrix.yaml or not.

    Exits 0 for a valid cell and 1 for an invalid one, so scripts can branch on it.
    """
    from builder import cellview, config, knowledge, resolve
    from builder.errors import ConfigError

    for name, value in (
        ("--torch", torch_v),
        ("--cuda", cuda),
        ("--python", python_v),
        ("--flash-attn", flash_attn),
    ):
        if value is not None and not _valid_version(value, allow_none=name in ("--cuda", "--flash-attn")):
            raise ConfigError(f"{name} {value!r} is not a version (e.g. --torch 2.8.0 --cuda 12.6)")
    from builder.options import parse_platforms

    platforms = parse_platforms(platform)
    if len(platforms) > 1:
        raise ConfigError(f"--platform {platform!r}: explain takes one platform, e.g. linux/arm64")
    cfg = config.load(obj.matrix_path)
    kb = knowledge.load()
    cell = resolve.explain(
        cfg,
        kb,
        target,
        overrides={"torch": torch_v, "cuda": cuda, "python": python_v, "flash_attn": flash_attn},
        dtype=dtype,
        platform=platforms[0] if platforms else None,
    )
    data = cellview.cell_json(cell)
    if as_json:
        emit_json(data)
    else:
        click.echo(cellview.explain_text(data), nl=False)
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


@click.command("schema")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="Write to a file.")
def schema(output: Path | None) -> None:
    """Print the JSON Schema of matrix.yaml (for editor autocompletion)."""
    from builder.config import schema_json

    text = schema_json()
    if output:
        from builder.fsio import write_atomic

        write_atomic(output, text, parents=False)
    else:
        click.echo(text, nl=False)
