"""`qwen-ft-images report`: one publishable page (Markdown + HTML) for this run's images.

Joins build/report.json, build/reports/smoke.json and build/reports/audit.json (see
builder/publish.py); any of them may be missing. Needs no Docker.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from builder.errors import ConfigError

if TYPE_CHECKING:
    from builder.cli import Context
    from builder.publish import Row
    from builder.render import Project


def report(project: Project, plans: dict[str, dict[str, Any]] | None = None) -> tuple[Path, Path, list[Row]]:
    """Write build/reports/report-<UTC time>.{md,html} (and index.{md,html}); returns both paths.

    `plans` (cell id -> `explain --json` plan) adds the planned versions; without it the page
    shows what the JSON reports say. Raises ConfigError when no report exists yet.
    """
    from builder.publish import write_pages

    reports = project.build / "reports"
    sources = [project.build / "report.json", reports / "smoke.json", reports / "audit.json"]
    if not any(p.is_file() for p in sources):
        raise ConfigError(
            "nothing to report: no build/report.json, build/reports/smoke.json or audit.json; "
            "run qwen-ft-images build, smoke or audit first"
        )
    return write_pages(project.build, plans)


def plans_of(obj: Context) -> dict[str, dict[str, Any]]:
    from builder import report as cell_report

    _, _, res = obj.load()
    return {c.id: cell_report.cell_json(c).get("plan") or {} for c in res.cells}


@click.command("report")
@click.pass_obj
def command(obj: Context) -> None:
    """Write this run's image report: an image x check table, versions, sizes, digests, a chart."""
    md_path, html_path, rows = report(obj.project, plans_of(obj))
    failing = [r.image for r in rows if not r.ok]
    click.echo(f"{md_path}\n{html_path}")
    summary = f"{len(rows)} images, {len(rows) - len(failing)} pass every check that ran"
    click.echo(summary + (f"; failing: {', '.join(failing)}" if failing else ""), err=True)
