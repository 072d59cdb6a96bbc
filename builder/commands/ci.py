"""`ci-matrix` and `bake`: the same jobs as `build`, handed to GitHub Actions or buildx bake."""

from __future__ import annotations

import json
from pathlib import Path

import click

from builder.commands.common import Context, emit_json, option


@click.command("ci-matrix")
@click.argument("selectors", nargs=-1)
@option("as_json", help='{"include": [...]} on one line, for $GITHUB_OUTPUT.')
@option("registry")
@click.option(
    "--lists", "as_lists", is_flag=True, help="The publish job's matrix: manifest lists to assemble."
)
@click.pass_obj
def ci_matrix(obj: Context, /, selectors: tuple[str, ...], as_lists: bool, **cli: object) -> None:
    """The GitHub Actions build/smoke matrix: one entry per selected image and platform."""
    from builder import ci, images, resolve

    cfg, kb, res = obj.load()
    settings = obj.settings(cli, cfg=cfg)
    facts = images.facts(obj.project, res, kb, resolve.select(res, selectors), registry=settings["registry"])
    if as_lists:
        emit_json(ci.lists(facts, settings["registry"]), compact=True)
        return
    if settings["as_json"]:
        emit_json(ci.include(facts), compact=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(facts)} CI matrix entries", header_style="bold")
    for h in ci.HEADERS:
        table.add_column(h, overflow="fold")
    for f in facts:
        table.add_row(*ci.row(f))
    Console().print(table)


@click.command("bake")
@click.argument("selectors", nargs=-1)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("docker-bake.json"),
    show_default=True,
    help="Where to write the bake file ('-' for stdout).",
)
@option("registry")
@option("base_map")
@option("wheelhouse")
@option("ca_bundle")
@option("platform")
@click.pass_obj
def bake(obj: Context, /, selectors: tuple[str, ...], output: Path, **cli: object) -> None:
    """Write a `docker buildx bake` file for the selected images and stage build/context/.

    Run `docker buildx bake -f docker-bake.json [--push]` from the project root.
    """
    from builder import bake as baking
    from builder import content, images, jobs, resolve

    cfg, kb, res = obj.load()
    settings = obj.settings(cli, cfg=cfg)
    ca_bundle = settings["ca_bundle"]
    from builder.options import parse_platforms

    options = jobs.BuildOptions(
        platforms=parse_platforms(settings["platform"]),
        base_map=jobs.parse_base_map(settings["base_map"]),
        wheelhouse=settings["wheelhouse"],
        ca_bundle=ca_bundle,
    )
    project = obj.project
    jobs.check_inputs(project, options)
    registry = settings["registry"]
    facts = images.facts(project, res, kb, resolve.select(res, selectors), registry=registry, options=options)
    data = baking.bake_file(
        project, facts, registry=registry, ca_bundle=ca_bundle.resolve() if ca_bundle else None
    )
    from builder.lock import project_lock

    with project_lock(project, "bake"):
        content.stage_context(project, options.wheelhouse)
    text = json.dumps(data, indent=2) + "\n"
    if str(output) == "-":
        click.echo(text, nl=False)
        return
    from builder.fsio import write_atomic

    write_atomic(output, text, parents=False)
    click.echo(f"wrote {output} ({len(facts)} targets); staged {project.context}", err=True)
    if not registry:
        click.echo("note: no registry, so no registry cache; pass --registry to share the cache", err=True)
