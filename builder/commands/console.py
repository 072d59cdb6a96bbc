"""Live progress and end-of-run summaries (rich). Diagnostics go to stderr, artefacts to files."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from builder.build import ImageResult

_STYLE = {
    "queued": "dim",
    "building": "cyan",
    "built": "green",
    "up-to-date": "green",
    "failed": "bold red",
    "skipped": "yellow",
    "interrupted": "yellow",
}


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit in ("B", "KB") else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


class BuildProgress:
    """One line per image: state, current step, elapsed. Plain lines when not on a terminal."""

    def __init__(self, names: Sequence[str], console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.rows: dict[str, ImageResult] = {n: ImageResult(image=n) for n in names}
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._last_status: dict[str, str] = {}

    def __enter__(self) -> BuildProgress:
        if self.console.is_terminal:
            self._live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(exc_type, exc, tb)

    def update(self, result: ImageResult) -> None:
        with self._lock:
            self.rows[result.image] = result
            if self._live is not None:
                self._live.update(self._table())
                return
            if self._last_status.get(result.image) != result.status:
                self._last_status[result.image] = result.status
                self.console.print(f"{result.image}: {result.status}", highlight=False, markup=False)

    def _table(self) -> Table:
        table = Table(show_header=True, header_style="bold", expand=False)
        table.add_column("image")
        table.add_column("state")
        table.add_column("elapsed", justify="right")
        table.add_column("step", overflow="ellipsis", no_wrap=True, max_width=80)
        now = time.monotonic()
        for r in self.rows.values():
            elapsed = r.seconds or (now - r.started if r.started else 0.0)
            table.add_row(
                escape(r.image),
                f"[{_STYLE.get(r.status, '')}]{r.status}[/]",
                f"{elapsed:5.0f}s" if elapsed else "",
                escape(r.step or (r.failed_step or "")),
            )
        return table


def summary(results: Sequence[ImageResult], console: Console | None = None) -> None:
    console = console or Console(stderr=True)
    table = Table(title="build summary", header_style="bold")
    for col in ("image", "result", "time", "size", "digest / failure"):
        table.add_column(col, overflow="fold")
    for r in results:
        if r.ok:
            detail = next(iter(r.pushed.values()), None) or (r.image_id or "")[:19]
        else:
            where = f" at {r.failed_step}" if r.failed_step else ""
            detail = f"{r.error or r.status}{where}; log: {r.log}"
        table.add_row(
            escape(r.image),
            f"[{_STYLE.get(r.status, '')}]{r.status}[/]",
            f"{r.seconds:.1f}s",
            human_size(r.size) if r.size else "",
            escape(detail),
        )
    console.print(table)
