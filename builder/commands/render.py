"""`render`: images/<image>/Dockerfile and images/README.md from the matrix."""

from __future__ import annotations

import click

from builder.commands.common import Context


@click.command("render")
@click.option("--check", is_flag=True, help="Exit non-zero, naming each file, if images/ is out of date.")
@click.pass_obj
def render(obj: Context, check: bool) -> None:
    """Write images/<image>/Dockerfile for every image, and images/README.md."""
    from builder import render as rendering

    _, kb, res = obj.load()
    project = obj.project
    files = rendering.render_all(project, res, kb)
    if check:
        rendering.check(project, files)
        click.echo(f"images/ is up to date ({len(files)} files)")
        return
    changed = rendering.write(project, files)
    for path in changed:
        verb = "wrote" if path.exists() else "removed"
        click.echo(f"{verb} {path.relative_to(project.root)}")
    click.echo(f"{len(files)} files rendered, {len(changed)} changed")
