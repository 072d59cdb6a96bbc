"""What every command shares: the context object, options made from builder/options.py's
table, JSON output, and turning Ctrl-C into one line."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

from builder import options as opts
from builder.project import Project

if TYPE_CHECKING:
    from builder.config import MatrixConfig
    from builder.jobs import BuildJob, BuildOptions
    from builder.knowledge import Knowledge
    from builder.resolve import Cell, Resolution

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Context:
    matrix_path: Path
    debug: bool
    argv: tuple[str, ...] | None = None  # the raw arguments, when run as the console script

    @property
    def project(self) -> Project:
        return Project(self.matrix_path.resolve())

    def load(self) -> tuple[MatrixConfig, Knowledge, Resolution]:
        """The matrix, the knowledge base and the resolution, memoized on what determines them."""
        from builder import config, knowledge, memo, resolve

        def compute() -> tuple[MatrixConfig, Knowledge, Resolution]:
            cfg = config.load(self.matrix_path)
            kb = knowledge.load()
            return cfg, kb, resolve.resolve(cfg, kb)

        key = self._load_key()
        return compute() if key is None else memo.cached(self.project.memo, key, compute)

    def _load_key(self) -> str | None:
        from builder import memo

        try:
            text = self.matrix_path.read_bytes()
        except OSError:
            return None  # config.load says what is wrong
        return memo.digest(["load", memo.builder_stamp(), str(self.matrix_path.resolve()), text])

    def jobs(
        self, res: Resolution, kb: Knowledge, cells: Sequence[Cell], options: BuildOptions
    ) -> list[BuildJob]:
        """`jobs.plan_jobs`, memoized on the resolution, templates/, runtime/ and the options."""
        from builder import jobs, memo

        project = self.project
        key = self._load_key()

        def compute() -> list[BuildJob]:
            return jobs.plan_jobs(project, res, kb, cells, options)

        if key is None or not project.runtime.is_dir():
            return compute()
        parts = [
            key,
            memo.tree_stamp(project.templates),
            memo.tree_stamp(project.runtime),
            repr(options),  # every option, over-keyed on purpose: plan_jobs reads several
            *(c.id for c in cells),
        ]
        return memo.cached(project.memo, memo.digest(["jobs", *parts]), compute)

    def stamp_inputs(self, *outputs: Path) -> list[list[Any]] | None:
        """Stamps of what a replayable answer (builder.uptodate) depends on: the matrix,
        templates/, runtime/, the builder's sources and any outputs it must find unchanged.
        None when there is no invocation to keep an answer under (not the console script)."""
        if self.argv is None:
            return None
        from builder import uptodate

        project = self.project
        return uptodate.stamps(str(p) for p in (project.matrix, project.templates, project.runtime, *outputs))

    def keep_answer(
        self,
        stamps: list[list[Any]] | None,
        answer: Mapping[str, Any],
        exists: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Keep an up-to-date answer for builder.uptodate.replay of this same invocation: its
        raw arguments, working directory and the environment variables the options read."""
        if self.argv is None or stamps is None:
            return
        from builder import uptodate

        names = [row.env for row in opts.OPTIONS if row.env]
        uptodate.store(str(self.matrix_path), self.argv, os.environ, names, stamps, exists, answer)

    def settings(
        self, cli: Mapping[str, Any], names: Iterable[str] | None = None, cfg: MatrixConfig | None = None
    ) -> opts.Settings:
        """The named options (default: every one in `cli`) under the one precedence."""
        matrix = {"registry": cfg.registry or None} if cfg is not None else None
        return opts.resolve(list(names if names is not None else cli), cli, os.environ, matrix)


def option(name: str, **overrides: Any) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A click option made from its row in builder/options.py.

    No click default and no envvar: `Context.settings` applies env, matrix.yaml and
    defaults, so an unset flag reaches it as None (or False / ()).
    """
    row = opts.BY_NAME[name]
    kwargs: dict[str, Any] = {"help": row.help, "metavar": row.metavar}
    if row.kind == "flag":
        kwargs["is_flag"] = True
    elif row.kind == "multi":
        kwargs["multiple"] = True
    elif row.kind == "path":
        kwargs["type"] = click.Path(path_type=Path)
    elif row.kind == "int":
        kwargs["type"] = int
    elif row.kind == "float":
        kwargs["type"] = float
    if row.env:
        kwargs["help"] = f"{row.help} [env: {row.env}]"
    if row.default not in (None, (), False):
        kwargs["help"] = f"{kwargs['help']} [default: {row.default}]"
    kwargs.update(overrides)
    return click.option(*row.flags, row.name, **kwargs)


def emit_json(data: Any, *, compact: bool = False) -> None:
    if compact:
        click.echo(json.dumps(data, separators=(",", ":")))
    else:
        click.echo(json.dumps(data, indent=2, sort_keys=False))


@contextlib.contextmanager
def interrupt_as(message: str) -> Iterator[None]:
    """Ctrl-C inside the block becomes `Interrupted(message)`: one line, exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        from builder.errors import Interrupted

        raise Interrupted(message) from None


def interruptible(message: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """`interrupt_as` around a whole command."""

    def wrap(func: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(func)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            with interrupt_as(message):
                return func(*args, **kwargs)

        return inner

    return wrap


def stderr_console() -> Any:
    """A rich console on stderr; in CI logs (no terminal) wide enough for the summary tables."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=True, highlight=False, width=150)
    return console


def host_platform() -> str:
    """This machine's OCI platform (linux/amd64 when its CPU is not one the images know)."""
    import platform

    from builder.knowledge import platforms

    found = platforms.load().by_machine(platform.machine())
    return found.name if found else "linux/amd64"
