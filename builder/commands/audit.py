"""`qwen-ft-images audit`: which SASS and PTX every CUDA binary in an image carries, and a verdict.

The work is in builder/audit.py (`audit_image`, also called by `smoke`); this module is the
command line: select images, run the audit on each, print a table, write
build/reports/audit.json, exit 9 when a binary has no code the target GPU can run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from builder.commands.common import Context, interruptible, option, stderr_console
from builder.errors import ConfigError

if TYPE_CHECKING:
    from builder.audit import AuditResult


@click.command("audit")
@click.argument("selectors", nargs=-1)
@click.option(
    "--image",
    "refs",
    multiple=True,
    metavar="REF",
    help="Also audit this image reference (e.g. a content-hash tag); repeatable.",
)
@click.option("--sm", help="Judge against this SM (70, sm_70 or 7.0) instead of the image's SM label.")
@option("as_json", help="Print the report (audit.json) on stdout.")
@option("cuobjdump_wheelhouse")
@option("cuobjdump", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--timeout",
    type=float,
    default=900.0,
    show_default=True,
    help="Seconds per image; then the container is killed and removed.",
)
@click.option("--all-binaries", is_flag=True, help="List every binary, not only failures, in the table.")
@option("docker")
@click.pass_obj
@interruptible("interrupted: the audit container was removed; no audit report written")
def command(
    obj: Context,
    /,
    selectors: tuple[str, ...],
    refs: tuple[str, ...],
    sm: str | None,
    timeout: float,
    all_binaries: bool,
    **cli: Any,
) -> None:
    """Audit the kernels of the selected built images (none selected: all; --image adds refs).

    For each binary with device code (torch's libraries, the nvidia-* wheels, flash-attn's
    extension, ...) lists its SASS and PTX with NVIDIA's cuobjdump, run in a throwaway
    container of the image, and fails the binary if the image's target GPU can neither run
    its SASS nor JIT its PTX. Exits 9 when a binary fails, 2 for an image this tool did not
    build (without --sm) or when cuobjdump cannot be had.
    """
    from builder import audit, resolve

    if timeout <= 0:
        raise ConfigError("--timeout must be positive")
    if sm is not None:
        audit.parse_sm(sm)  # a bad --sm fails before anything starts
    settings = obj.settings(cli)
    targets: list[tuple[str, str]] = []  # (name, ref)
    project = obj.project
    if selectors or not refs:
        _, _, res = obj.load()
        targets += [(cell.id, cell.plan.tags[0]) for cell in resolve.select(res, selectors)]
    targets += [(ref, ref) for ref in refs]
    console = stderr_console()

    def on_image(name: str, ref: str, result: AuditResult | None) -> None:
        if result is None:
            console.print(f"{name}: auditing {ref} …", markup=False)
        else:
            console.print(summary_line(result), markup=False)

    results, report = audit.execute(
        project,
        targets,
        sm,
        docker=settings["docker"],
        wheelhouse=settings["cuobjdump_wheelhouse"],
        cuobjdump=settings["cuobjdump"],
        timeout=timeout,
        on_image=on_image,
    )
    path = audit.write_report(project.build, report)
    for result in results:
        if result.binaries and (all_binaries or not result.ok):
            console.print(table(result, only_failures=not all_binaries))
    console.print(f"report: {_rel(path, project.root)}", markup=False)
    if settings["as_json"]:
        click.echo(json.dumps(report, indent=2))
    audit.raise_for_failures(results)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def summary_line(result: AuditResult) -> str:
    if result.sm is None:
        return f"{result.image}: skipped ({result.note})"
    verdict = "ok" if result.ok else f"FAILED ({len(result.failures)} binaries)"
    waived = sum(1 for b in result.binaries if b.status == "waived")
    extra = f", {waived} waived" if waived else ""
    return (
        f"{result.image}: sm_{result.sm} ({result.sm_source}) {verdict}: {len(result.binaries)} binaries "
        f"with device code of {result.shared_objects} shared objects{extra}; {result.seconds:.1f} s"
    )


def table(result: AuditResult, *, only_failures: bool) -> Any:
    from rich.markup import escape
    from rich.table import Table

    from builder.audit import arch_summary

    rows = result.failures if only_failures else list(result.binaries)
    t = Table(title=f"{result.image} against sm_{result.sm}", header_style="bold")
    for col in ("binary", "package", "SASS", "PTX", "verdict"):
        t.add_column(col, overflow="fold")
    for b in rows:
        style = {"ok": "green", "waived": "yellow"}.get(b.status, "bold red")
        verdict = b.via if b.status == "ok" and b.via else b.detail
        if b.status == "waived":  # the full reason and source are in audit.json
            verdict = f"{b.waiver}: {b.detail.split('waived (', 1)[-1].split('. ')[0]}"
        t.add_row(
            escape(b.short_path),
            escape(b.dist or "-"),
            arch_summary(b.listing.sass),
            arch_summary(b.listing.ptx, ptx=True),
            f"[{style}]{escape(b.status)}[/]: {escape(verdict or '')}",
        )
    return t
