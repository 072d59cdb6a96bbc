#!/usr/bin/env python3
"""CLI start-up: wall time of `qwen-ft-images explain v100 --json`, interpreter start-up included.

Each case runs as a fresh subprocess (n=20 after 2 warm-ups; the page cache is warm), with
`python -c pass` on the same interpreter as the floor. Target: explain --json under 300 ms.
The top imports by cumulative `-X importtime` (median of 5 runs) show where the rest goes.

    python benchmarks/cli_startup.py [-n 20]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, Sample, fmt_seconds, footer, header, real_console_script, table, time_command

TARGET_S = 0.300


def importtime(argv: list[str], runs: int) -> list[tuple[str, float, float]]:
    """(top-level module, median cumulative µs, median self µs) of the imports argv triggers."""
    cumulative: dict[str, list[int]] = defaultdict(list)
    own: dict[str, list[int]] = defaultdict(list)
    line = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)$")
    for _ in range(runs):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            check=False,
        )
        for raw in proc.stderr.splitlines():
            m = line.match(raw)
            if m and not m.group(3):  # top level: imported by the script, a command body or site
                cumulative[m.group(4)].append(int(m.group(2)))
                own[m.group(4)].append(int(m.group(1)))
    rows = [(mod, statistics.median(v), statistics.median(own[mod])) for mod, v in cumulative.items()]
    return sorted(rows, key=lambda r: r[1], reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("-n", type=int, default=20, help="timed runs per case (default 20)")
    parser.add_argument("--top", type=int, default=10, help="import offenders to list (default 10)")
    args = parser.parse_args()

    script = real_console_script()
    if script is None:
        raise SystemExit("qwen-ft-images is not installed (pip install -e .)")
    on_path = shutil.which("qwen-ft-images")
    env = {**os.environ}
    env.pop("QWEN_FT_MATRIX", None)

    def cmd(name: str, argv: list[str], ok: tuple[int, ...] = (0,)) -> Sample:
        return time_command(name, argv, args.n, warmup=2, env=env, cwd=ROOT, ok_codes=ok)

    floor = cmd("python -c pass", [sys.executable, "-c", "pass"])
    samples = [
        floor,
        cmd("python -c 'import builder.cli'", [sys.executable, "-c", "import builder.cli"]),
        cmd("explain v100 --json", [script, "explain", "v100", "--json"]),
        cmd("matrix --json", [script, "matrix", "--json"]),
        cmd("--help", [script, "--help"]),
    ]
    # `pyenv exec` puts the real bin/ first on PATH, so look for a pyenv shim explicitly.
    pyenv_shim = Path(os.environ.get("PYENV_ROOT", "~/.pyenv")).expanduser() / "shims" / "qwen-ft-images"
    if pyenv_shim.is_file():
        on_path = str(pyenv_shim)
    shim = on_path is not None and Path(on_path).resolve() != Path(script).resolve()
    if shim:
        assert on_path is not None
        samples.append(cmd("explain v100 --json (via PATH shim)", [on_path, "explain", "v100", "--json"]))

    print(header("CLI start-up (`qwen-ft-images explain v100 --json`)"))
    print(f"- console script: `{script}`")
    if shim:
        print(f"- on PATH: `{on_path}` (a wrapper, e.g. a pyenv shim; timed separately)")
    print()
    print(table(samples, baseline=floor, ratio_label="x floor"))
    print()
    explain = samples[2]
    verdict = "met" if explain.median < TARGET_S else "MISSED"
    print(
        f"explain --json median {fmt_seconds(explain.median)} against a {fmt_seconds(TARGET_S)} target: "
        f"{verdict}; {fmt_seconds(explain.median - floor.median)} above the bare interpreter."
    )
    print()
    rows = importtime([script, "explain", "v100", "--json"], runs=5)
    print(f"Top {args.top} imports of `explain v100 --json` by cumulative `-X importtime` (median of 5):")
    print()
    print("| module | cumulative | self |")
    print("|---|---|---|")
    for mod, cum, own in rows[: args.top]:
        print(f"| `{mod}` | {cum / 1000:.1f} ms | {own / 1000:.1f} ms |")
    print()
    print(footer())


if __name__ == "__main__":
    main()
