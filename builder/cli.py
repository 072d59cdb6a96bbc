"""The command line: the group, one lazy registry of every command, and errors -> exit codes.

Each command lives in builder/commands/ and is imported only when it runs, so `explain
--json` never pays for docker, rich, jinja2 or torch imports.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

import click

from builder import __version__
from builder import options as opts
from builder.commands.common import Context, option
from builder.errors import FatalError

# command name -> (module, attribute)
COMMANDS: dict[str, tuple[str, str]] = {
    "matrix": ("builder.commands.matrix", "matrix"),
    "explain": ("builder.commands.matrix", "explain"),
    "schema": ("builder.commands.matrix", "schema"),
    "render": ("builder.commands.render", "render"),
    "build": ("builder.commands.build", "build"),
    "prune": ("builder.commands.build", "prune"),
    "doctor": ("builder.commands.doctor", "doctor"),
    "ci-matrix": ("builder.commands.ci", "ci_matrix"),
    "bake": ("builder.commands.ci", "bake"),
    "smoke": ("builder.commands.smoke", "command"),
    "audit": ("builder.commands.audit", "command"),
    "compare": ("builder.commands.compare", "command"),
    "report": ("builder.commands.report", "command"),
    "knowledge": ("builder.commands.knowledge", "command"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attribute = COMMANDS[cmd_name]
        command: click.Command = getattr(importlib.import_module(module), attribute)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@option("matrix", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(__version__, prog_name="qwen-ft-images")
@click.pass_context
def cli(ctx: click.Context, matrix: Path | None, debug: bool) -> None:
    """Per-GPU Docker images for fine-tuning Qwen, from one YAML matrix."""
    path = opts.resolve(["matrix"], {"matrix": matrix}, os.environ)["matrix"]
    # main() hands in the raw arguments: `build` keeps its up-to-date answer under them.
    argv = tuple(ctx.obj) if isinstance(ctx.obj, list) else None
    ctx.obj = Context(matrix_path=path, debug=debug, argv=argv)


def _fail(exc: FatalError, debug: bool) -> NoReturn:
    if debug:
        import traceback

        traceback.print_exception(exc)
    click.echo(f"error: {exc.message}", err=True)
    sys.exit(exc.exit_code)


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM (a CI runner cancelling, `kill`) takes the Ctrl-C path: builds and pushes are
    # cancelled, the record says what was already pushed, and no tag moves half-way.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=args, prog_name="qwen-ft-images", standalone_mode=False, obj=args)
    except FatalError as exc:
        _fail(exc, debug)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors too: one `error:` line, like every other
        from builder.errors import one_line

        ctx = exc.ctx if isinstance(exc, click.UsageError) else None
        hint = f"; see `{ctx.command_path} --help`" if ctx else ""
        click.echo(f"error: {one_line(exc.format_message()).rstrip('.')}{hint}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:  # a file-system problem no stage anticipated: still one line
        from builder.errors import ConfigError
        from builder.fsio import problem

        _fail(ConfigError(problem(exc, Path(exc.filename or "?"))), debug)
