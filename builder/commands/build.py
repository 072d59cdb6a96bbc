"""`build` and `prune`: build, tag and push the images; remove superseded content tags."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import click

from builder.commands.common import Context, option

if TYPE_CHECKING:
    from builder.options import BuildOptions

BUILD_OPTIONS = (
    "jobs",
    "fail_fast",
    "push",
    "registry",
    "force",
    "base_map",
    "wheelhouse",
    "ca_bundle",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "network",
    "platform",
    "no_lists",
    "docker",
    "dry_run",
)


@click.command("build")
@click.argument("selectors", nargs=-1)
@option("jobs")
@option("fail_fast")
@option("push")
@option("registry")
@option("force")
@option("base_map")
@option("wheelhouse")
@option("ca_bundle")
@option("http_proxy")
@option("https_proxy")
@option("no_proxy")
@option("network")
@option("platform")
@option("no_lists")
@option("docker")
@option("dry_run")
@click.pass_obj
def build(obj: Context, /, selectors: tuple[str, ...], **cli: object) -> None:
    """Build (and tag, and optionally push) the selected images; none selected means all."""
    from builder import build as building
    from builder import jobs, record, resolve, uptodate
    from builder import options as opts
    from builder.engine import CommandLog, DockerEngine
    from builder.errors import ConfigError

    started = time.time()
    stamps = obj.stamp_inputs()  # before anything is read: an edit during the run is a change
    cfg, kb, res = obj.load()
    settings = obj.settings(cli, BUILD_OPTIONS, cfg)
    options = opts.options_from(settings)
    if options.push and not options.registry:
        raise ConfigError("--push needs --registry HOST[:PORT]/NAMESPACE (or registry: in matrix.yaml)")
    project = obj.project
    jobs.check_inputs(project, options)
    plan = obj.jobs(res, kb, resolve.select(res, selectors), options)
    # The no-op: every image already built and tagged (builder.uptodate, which answers the
    # next identical call before any of the above is even imported).
    answer = None if options.dry_run or options.push else record.up_to_date_answer(project, plan, options)
    if answer is not None and uptodate.answer(answer, started):
        _keep(obj, stamps, answer, options)
        return
    if options.dry_run:
        for line in settings.lines():
            click.echo(f"# {line}")
        for line in building.dry_run_lines(project, plan, DockerEngine(settings["docker"]), options):
            click.echo(line)
        return
    from builder.commands.console import BuildProgress, summary
    from builder.lock import project_lock

    with project_lock(project, "build"):  # build/ is this run's alone until it ends
        engine = DockerEngine(settings["docker"], CommandLog(project.logs / "commands.sh"))
        with BuildProgress([j.name for j in plan]) as progress:
            done = building.execute(project, plan, engine, options, on_change=progress.update)
    if answer is not None and all(r.ok for r in done.results):
        _keep(obj, stamps, answer, options)
    summary(done.results)
    click.echo(f"report: {done.record.relative_to(project.root)}", err=True)
    building.raise_for_failures(done.results)


def _keep(obj: Context, stamps: Any, answer: Mapping[str, Any], options: BuildOptions) -> None:
    """Keep the answer for the next identical `build`, which the wheelhouse and CA bundle it
    checked must still exist for; never one whose invocation holds a proxy password."""
    from builder import proxy

    if any(proxy.redact(url) != url for url in (options.http_proxy, options.https_proxy)):
        return  # the answer is kept under the invocation as given: no password goes to disk
    exists = [
        (str(path), kind) for path, kind in ((options.wheelhouse, "dir"), (options.ca_bundle, "file")) if path
    ]
    obj.keep_answer(stamps, answer, exists)


@click.command("prune")
@option("dry_run", help="List the tags that would be removed; remove nothing.")
@option("docker")
@click.pass_obj
def prune(obj: Context, /, **cli: object) -> None:
    """Remove local content-hash tags of superseded images, so their layers can be freed.

    Alias and pinned tags, the current content tags, and any image an alias or pinned tag
    still names are kept. Registries are never touched.
    """
    from builder import jobs
    from builder.engine import CommandLog, DockerEngine

    settings = obj.settings(cli)
    dry_run = settings["dry_run"]
    cfg, kb, res = obj.load()
    project = obj.project
    planned = jobs.plan_jobs(project, res, kb, res.cells, jobs.BuildOptions())
    engine = DockerEngine(settings["docker"], CommandLog(None if dry_run else project.logs / "commands.sh"))
    engine.check()
    stale = jobs.stale_tags(planned, engine.local_tags(cfg.image))
    for ref in stale:
        if not dry_run:
            engine.remove_image(ref)
        click.echo(("would remove " if dry_run else "removed ") + ref)
    click.echo(f"{len(stale)} stale content tag(s) {'found' if dry_run else 'removed'}", err=True)
