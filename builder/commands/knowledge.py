"""`qwen-ft-images knowledge check`: is the knowledge base still what upstream publishes?

Exit 0 when it matches, 1 when something is new or different (each finding on a line),
10 when the package index cannot be reached (one `error:` line). Logic lives in
builder/knowledge/drift.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.group("knowledge")
def command() -> None:
    """Check the compatibility knowledge base against upstream."""


@command.command("check")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: drift, findings, unchecked, checked.")
@click.option(
    "--markdown",
    "markdown",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the report as Markdown (the scheduled workflow files it as an issue).",
)
def check_cmd(as_json: bool, markdown: Path | None) -> None:
    """Compare torch, triton, flash-attn and the stack with the package index, download.pytorch.org
    and flash-attn's GitHub releases; exit 1 on drift."""
    from builder.knowledge import drift, load

    report = drift.check(load())
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(report.markdown(), encoding="utf-8")
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        for f in report.findings:
            click.echo(f"{f.kind:<18} {f.message}")
        for u in report.unchecked:
            click.echo(f"not compared: {u}", err=True)
        state = (
            f"{len(report.findings)} differences" if report.drift else "the knowledge base matches upstream"
        )
        click.echo(f"{state} ({len(report.checked)} items compared, index {report.index})", err=True)
    if report.drift:
        sys.exit(1)
