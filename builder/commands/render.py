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

    project = obj.project
    stamps = obj.stamp_inputs(project.images)  # images/ too: the answer holds while it is unchanged
    _, kb, res = obj.load()
    files = rendering.render_all(project, res, kb)
    if check:
        rendering.check(project, files)
        said = f"images/ is up to date ({len(files)} files)"
    else:
        changed = rendering.write(project, files)
        for path in changed:
            verb = "wrote" if path.exists() else "removed"
            click.echo(f"{verb} {path.relative_to(project.root)}")
        said = f"{len(files)} files rendered, {len(changed)} changed"
        if changed:
            stamps = None  # images/ just changed: the next render answers, and keeps that answer
    click.echo(said)
    obj.keep_answer(stamps, {"stdout": said + "\n"})
