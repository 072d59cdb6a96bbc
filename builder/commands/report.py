"""`report`: one publishable page (Markdown + HTML) for this run's images.

Joins build/report.json, build/reports/smoke.json and build/reports/audit.json (see
builder/publish.py); any of them may be missing. Needs no Docker.
"""

from __future__ import annotations

from typing import Any

import click

from builder.commands.common import Context


def plans_of(obj: Context) -> dict[str, dict[str, Any]]:
    from builder import cellview

    _, _, res = obj.load()
    return {c.id: cellview.cell_json(c).get("plan") or {} for c in res.cells}


@click.command("report")
@click.pass_obj
def command(obj: Context) -> None:
    """Write this run's image report: an image x check table, versions, sizes, digests, a chart."""
    from builder.publish import publish

    md_path, html_path, rows = publish(obj.project, plans_of(obj))
    failing = [r.image for r in rows if not r.ok]
    click.echo(f"{md_path}\n{html_path}")
    summary = f"{len(rows)} images, {len(rows) - len(failing)} pass every check that ran"
    click.echo(summary + (f"; failing: {', '.join(failing)}" if failing else ""), err=True)
