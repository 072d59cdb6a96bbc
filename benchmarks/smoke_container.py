"""How long the CPU smoke step takes in a container, from `docker run` to its JSON line.

    python benchmarks/smoke_container.py [--image qwen-ft:cpu-fp32] [--runs 5] [--importtime]

Runs exactly the command `qwen-ft-images smoke` runs on a host without a GPU
(`qwen-ft-runtime smoke --device cpu --dtype fp32 --attn sdpa`: both tiny models, 8 LoRA
steps each), through the plain docker CLI, and times each run with time.perf_counter:

* to JSON: from starting `docker run --rm` to the JSON line arriving on stdout;
* to exit: until `docker run --rm` has exited (container stopped and removed);
* import→1st step: the runtime's own `import_to_first_step_s` (from importing the runtime
  package, torch/transformers/peft imports included, to the end of the first optimizer step).

Prints a Markdown table. `--importtime` adds one run under `python -X importtime` and lists
the slowest top-level imports, to show where start-up time goes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from typing import Any

TARGET_S = 30.0
SMOKE = ["qwen-ft-runtime", "smoke", "--device", "cpu", "--dtype", "fp32", "--attn", "sdpa"]


def docker_exe() -> str:
    return os.environ.get("QWEN_FT_DOCKER") or shutil.which("docker") or "docker"


def one_run(docker: str, image: str) -> dict[str, Any]:
    start = time.perf_counter()
    proc = subprocess.Popen(
        [docker, "run", "--rm", image, *SMOKE],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    to_json = None
    payload: dict[str, Any] = {}
    for line in proc.stdout:
        if line.startswith("{"):
            to_json = time.perf_counter() - start
            payload = json.loads(line)
    code = proc.wait()
    to_exit = time.perf_counter() - start
    if code != 0 or to_json is None:
        raise SystemExit(f"smoke failed in {image} (exit {code}); run it by hand to see why")
    runs = payload.get("runs") or []
    return {
        "to_json": to_json,
        "to_exit": to_exit,
        "import": payload.get("import_to_first_step_s"),
        "process": payload.get("process_start_to_first_step_s"),
        "tokens": [r.get("tokens_per_s") for r in runs],
        "ok": payload.get("ok"),
    }


def importtime(docker: str, image: str, top: int = 12) -> list[tuple[float, str]]:
    """Cumulative import time (s) of each top-level package under `python -X importtime`."""
    proc = subprocess.run(
        [docker, "run", "--rm", image, "python", "-X", "importtime", "-m", "qwen_ft_runtime", *SMOKE[1:]],
        capture_output=True,
        text=True,
        check=False,
    )
    totals: dict[str, float] = {}
    pattern = re.compile(r"^import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)")
    for line in proc.stderr.splitlines():
        m = pattern.match(line)
        if m and len(m.group(2)) <= 1:  # top level only (nested imports are counted inside)
            name = m.group(3)
            totals[name] = max(totals.get(name, 0.0), int(m.group(1)) / 1e6)
    return sorted(((s, n) for n, s in totals.items()), reverse=True)[:top]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo").read().splitlines():  # noqa: PTH123, SIM115
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image", default="qwen-ft:cpu-fp32")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--importtime", action="store_true", help="also profile imports once")
    args = parser.parse_args()
    docker = docker_exe()
    results = [one_run(docker, args.image) for _ in range(args.runs)]

    def med(key: str) -> float:
        return statistics.median(float(r[key]) for r in results if r[key] is not None)

    def span(key: str) -> str:
        values = [float(r[key]) for r in results if r[key] is not None]
        return f"{statistics.median(values):.1f} s (min {min(values):.1f}, max {max(values):.1f})"

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"`{args.image}`, {args.runs} runs of `docker run --rm IMAGE {' '.join(SMOKE)}` "
        f"on {os.cpu_count()} CPU cores ({cpu_model()}), "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"1-min load average {load:.1f} at the end.\n"
    )
    print(
        "| run | to JSON line | to exit (--rm) | import→1st step | process→1st step "
        "| tokens/s (qwen2, qwen3) |"
    )
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(results, 1):
        tokens = ", ".join(f"{t:.0f}" for t in r["tokens"] if t is not None)
        process = f"{r['process']:.2f} s" if r["process"] is not None else "-"
        cells = [f"{r['to_json']:.1f} s", f"{r['to_exit']:.1f} s", f"{r['import']:.2f} s", process, tokens]
        print(f"| {i} | " + " | ".join(cells) + " |")
    print()
    verdict = "met" if med("to_json") < TARGET_S else "NOT met"
    print(f"- docker run → JSON line: median {span('to_json')}; target < {TARGET_S:.0f} s: {verdict}")
    print(f"- docker run → exit: median {span('to_exit')}")
    print(f"- import_to_first_step_s: median {med('import'):.2f} s")
    if args.importtime:
        print("\nSlowest top-level imports (`python -X importtime`, cumulative):\n")
        print("| module | seconds |")
        print("|---|---|")
        for seconds, name in importtime(docker, args.image):
            print(f"| `{name}` | {seconds:.2f} |")


if __name__ == "__main__":
    main()
