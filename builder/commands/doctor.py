"""`doctor`: which image this machine (or another) should run, and why a run failed."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from builder.commands.common import Context, emit_json, option
from builder.errors import FatalError


@click.command("doctor")
@click.argument("selectors", nargs=-1)
@option("as_json", help="One JSON object (fields in docs/doctor.md).")
@click.option(
    "--assume-gpu",
    "assume_gpus",
    multiple=True,
    metavar="NAME_OR_SM",
    help="Plan for this GPU instead of probing (repeatable): V100, A10G, sm_70, 70, 8.6.",
)
@click.option("--assume-driver", metavar="VERSION", help="Plan for this NVIDIA driver, e.g. 535.104.05.")
@click.option("--log", "log_file", type=click.Path(path_type=Path), help="Diagnose a failed run's log.")
@click.pass_obj
def doctor(
    obj: Context,
    selectors: tuple[str, ...],
    as_json: bool,
    assume_gpus: tuple[str, ...],
    assume_driver: str | None,
    log_file: Path | None,
) -> None:
    """Which image this machine should run (GPU, driver, Docker), and why a run failed.

    Exits 0 when every GPU has an image that runs with its driver (or there is no GPU
    and the CPU image applies), 1 when a GPU has none or --log matched no known
    failure, 2 for bad input.
    """
    from builder import doctor as advice
    from builder import resolve
    from builder.knowledge.signatures import load_signatures

    log_text = advice.read_log(log_file) if log_file is not None else None
    _, kb, res = obj.load()
    cells = resolve.select(res, selectors)
    report = advice.run(
        kb, res, cells, assume_gpus=assume_gpus, assume_driver=assume_driver, log_text=log_text
    )
    if as_json:
        emit_json(advice.report_json(report))
    else:
        click.echo(advice.render_text(report, log_name=str(log_file) if log_file else None), nl=False)
    if log_text is not None and not report.diagnoses:
        names = ", ".join(s.id for s in load_signatures())
        raise FatalError(
            f"{log_file}: no known failure signature found (checked: {names}); "
            "add new ones to builder/knowledge/signatures.yaml"
        )
    if not report.ok:
        sys.exit(1)
