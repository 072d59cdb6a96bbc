"""`build` and `prune`: build, tag and push the images; remove superseded content tags."""

from __future__ import annotations

import time

import click

from builder.commands.common import Context, option

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
    from builder import options as opts

    started = time.time()
    noop_key = None if cli.get("dry_run") or cli.get("push") else obj.noop_key("build", selectors, cli)
    if noop_key is not None and _already_built(obj, noop_key, cli, started):
        return
    from builder import build as building
    from builder import jobs, resolve
    from builder.engine import CommandLog, DockerEngine
    from builder.errors import ConfigError

    cfg, kb, res = obj.load()
    settings = obj.settings(cli, BUILD_OPTIONS, cfg)
    options = opts.options_from(settings)
    if options.push and not options.registry:
        raise ConfigError("--push needs --registry HOST[:PORT]/NAMESPACE (or registry: in matrix.yaml)")
    project = obj.project
    jobs.check_inputs(project, options)
    plan = obj.jobs(res, kb, resolve.select(res, selectors), options)
    known = {"image": cfg.image, "registry": cfg.registry, "jobs": [j.planned.as_json() for j in plan]}
    if noop_key is not None:
        obj.remember(noop_key, known)
        if _already_built(obj, noop_key, cli, started):
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
    if noop_key is not None:  # the engine's version, so the no-op path need not ask for it
        obj.remember(noop_key, {**known, "engine": done.engine_version})
    summary(done.results)
    click.echo(f"report: {done.record.relative_to(project.root)}", err=True)
    building.raise_for_failures(done.results)


def _already_built(obj: Context, key: str, cli: dict[str, object], started: float) -> bool:
    """The no-op path: the jobs of an earlier identical call, checked against one Engine API
    snapshot. True (and the build record written) when every image is built and tagged."""
    from builder import options as opts
    from builder import record
    from builder.engine import local_snapshot

    known = obj.recall(key)
    if known is None:
        return False
    snapshot = local_snapshot(str(known["image"]), version=known.get("engine"))
    fresh = record.up_to_date([record.Planned.from_json(j) for j in known["jobs"]], snapshot)
    if fresh is None or snapshot is None:
        return False
    if "engine" not in known:
        obj.remember(key, {**known, "engine": snapshot.engine_version})
    settings = opts.resolve(BUILD_OPTIONS, cli, obj.environ, {"registry": known["registry"] or None})
    project = obj.project
    options = opts.options_from(settings)
    options.check(project)
    for r in fresh:
        click.echo(f"{r.image}: up-to-date ({(r.image_id or '')[:19]}, {r.tags[-1]})", err=True)
    path = record.record(project, fresh, options, snapshot.engine_version, started)
    click.echo(f"report: {path.relative_to(project.root)}", err=True)
    return True


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
