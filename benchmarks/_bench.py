"""Shared helpers for the benchmark scripts: timing, statistics, the Markdown table, the header.

Each benchmark is a standalone script (`python benchmarks/<name>.py`); this module sits
beside them, so it is importable without installing anything. Figures go into
docs/benchmarks.md: report medians and ratios from one run, never single absolute times.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sample:
    """n wall-clock timings of one case, in seconds."""

    name: str
    times: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)


def time_call(
    name: str,
    fn: Callable[[], object],
    n: int,
    *,
    warmup: int = 1,
    setup: Callable[[], object] | None = None,
) -> Sample:
    """Time fn() n times (after `warmup` untimed calls); setup(), if given, runs untimed before each."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(n):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Sample(name, tuple(times))


def time_command(
    name: str,
    argv: Sequence[str],
    n: int,
    *,
    warmup: int = 1,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    ok_codes: Sequence[int] = (0,),
) -> Sample:
    """Wall time of a subprocess, interpreter start-up included; stdout/stderr discarded."""

    def once() -> None:
        proc = subprocess.run(
            list(argv),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            check=False,
        )
        if proc.returncode not in ok_codes:
            raise SystemExit(
                f"benchmark command failed ({proc.returncode}): {' '.join(argv)}\n"
                + proc.stderr.decode(errors="replace")[-2000:]
            )

    return time_call(name, once, n, warmup=warmup)


def fmt_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def table(samples: Sequence[Sample], *, baseline: Sample | None = None, ratio_label: str = "ratio") -> str:
    """A Markdown table of the samples; with a baseline, a column of median / baseline median."""
    head = ["case", "n", "median", "min", "max"]
    if baseline is not None:
        head.append(f"{ratio_label} (median / {baseline.name})")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in samples:
        row = [s.name, str(s.n), fmt_seconds(s.median), fmt_seconds(s.min), fmt_seconds(s.max)]
        if baseline is not None:
            row.append(f"{s.median / baseline.median:.2f}x")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def load() -> str:
    """`uptime` as printed (the load average says whether other jobs shared the machine)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        one, five, fifteen = os.getloadavg()
        return f"load average: {one:.2f}, {five:.2f}, {fifteen:.2f}"


def header(title: str) -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"### {title}",
            "",
            f"- date: {when}",
            f"- machine: {platform.machine()}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, "
            f"Python {platform.python_version()} ({sys.executable})",
            f"- uptime: `{load()}`",
        ]
    )


def footer() -> str:
    return f"- uptime after: `{load()}`"


def real_console_script(name: str = "qwen-ft-images") -> str | None:
    """The console script pip installed next to this interpreter (not a pyenv/asdf shim)."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    return shutil.which(name)


def copy_project(dest: Path, *, image: str | None = None, with_images: bool = True) -> Path:
    """A throwaway copy of the project (matrix.yaml, templates/, runtime/, images/)."""
    dest.mkdir(parents=True, exist_ok=True)
    names = ["matrix.yaml", "templates", "runtime"] + (["images"] if with_images else [])
    for name in names:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    if image is not None:
        matrix = dest / "matrix.yaml"
        text = matrix.read_text(encoding="utf-8")
        if "image: qwen-ft\n" not in text:
            raise SystemExit("matrix.yaml has no 'image: qwen-ft' line to rename")
        matrix.write_text(text.replace("image: qwen-ft\n", f"image: {image}\n"), encoding="utf-8")
    return dest
