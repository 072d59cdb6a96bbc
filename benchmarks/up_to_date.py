#!/usr/bin/env python3
"""What an up-to-date `make images` costs: the no-op build and the cached smoke (issue #15).

In a temporary copy of the project whose matrix.yaml names the repository `qwen-ft-bench`
and adds a second cpu target (`cpu2`, the same stack), so that "every image built here" is
two real images:

  noop    `qwen-ft-images build cpu` and `build cpu cpu2` when up to date (n runs each), against
          a warm `docker build` of the same Dockerfiles with the same arguments (every layer
          cached; the commands are the ones `build --dry-run` prints), against
          `docker image inspect` of the same tags, and against the CLI's start-up alone.
  make    `make images SELECT=cpu` in that copy: its first run (render, build from BuildKit's
          cache, a real smoke) against the up-to-date runs that follow (n runs).

Goals: one image's no-op build >= 3x faster than its warm `docker build`; N images' no-op
build <= start-up + one inspect per image; an up-to-date `make images SELECT=cpu` < 2 s.

    QWEN_FT_DOCKER=/usr/bin/docker DOCKER_BUILDKIT=1 python benchmarks/up_to_date.py [noop] [make]
        [--wheelhouse DIR] [--n 9] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, Sample, copy_project, footer, header, real_console_script, table, time_command

IMAGE = "qwen-ft-bench"
BASE_MAP = "debian:bookworm-slim=qwen-ft-local/debian:bookworm"
CA = "/etc/ssl/certs/ca-certificates.crt"
CPU2 = """  cpu2:
    sm: null
    gpus: []
    dtype: fp32
    triton: auto
    axes: {cuda: ["none"], python: ["3.11"], torch: ["2.13.0"], flash_attn: ["none"]}
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("parts", nargs="*", help="noop and/or make (default: both)")
    parser.add_argument("--wheelhouse", type=Path, default=Path("/opt/wheels"))
    parser.add_argument("--n", type=int, default=9)
    parser.add_argument("--keep", action="store_true", help="Keep the temporary project and its images.")
    args = parser.parse_args()
    args.parts = args.parts or ["noop", "make"]
    if set(args.parts) - {"noop", "make"}:
        parser.error(f"unknown parts {sorted(set(args.parts) - {'noop', 'make'})}; choose noop, make")
    docker = os.environ.get("QWEN_FT_DOCKER", "docker")
    script = real_console_script()
    if script is None:
        raise SystemExit("qwen-ft-images is not installed (pip install -e .)")
    tmp = Path(tempfile.mkdtemp(prefix="qwen-ft-bench-"))
    env = {**os.environ, "QWEN_FT_DOCKER": docker, "DOCKER_BUILDKIT": "1"}
    env.pop("QWEN_FT_MATRIX", None)
    project = copy_project(tmp / "project", image=IMAGE, with_images=False)
    matrix = project / "matrix.yaml"
    text = matrix.read_text(encoding="utf-8")
    matrix.write_text(text.replace("\ninclude:\n", "\n" + CPU2 + "include:\n", 1), encoding="utf-8")
    # amd64 only: the cpu target also lists linux/arm64, whose emulated build is not the point here.
    build_args = [
        "--platform",
        "linux/amd64",
        "--base-map",
        BASE_MAP,
        "--wheelhouse",
        str(args.wheelhouse),
        "--ca-bundle",
        CA,
    ]

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [script, "-f", str(matrix), *argv], capture_output=True, text=True, env=env, check=False
        )
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc

    remove_images(docker)  # left by a --keep run: the first build must stage build/context/
    try:
        cli("render")
        out = [header("Up to date: the no-op build and the cached smoke")]
        if "noop" in args.parts:
            out.append(noop(cli, project, docker, env, build_args, args.n))
        if "make" in args.parts:
            out.append(make_images(project, env, build_args, args.n))
        out.append(footer())
        print("\n\n".join(out))
    finally:
        if not args.keep:
            remove_images(docker)
            shutil.rmtree(tmp, ignore_errors=True)


def remove_images(docker: str) -> None:
    tags = subprocess.run(
        [docker, "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", IMAGE],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if tags:
        subprocess.run([docker, "image", "rm", *tags], capture_output=True, check=False)


def noop(  # type: ignore[no-untyped-def]
    cli, project: Path, docker: str, env: dict[str, str], build_args: list[str], n: int
) -> str:
    cli("build", "cpu", "cpu2", *build_args)  # builds (from BuildKit's cache) or finds them up to date
    samples: list[Sample] = []
    python = time_command("Python start-up (`python -c pass`, the floor)", [sys.executable, "-c", "pass"], n)
    starts = time_command(
        "CLI start-up (`qwen-ft-images --version`)", [real_console_script() or "", "--version"], n
    )
    for selectors in (["cpu"], ["cpu", "cpu2"]):
        name = " ".join(selectors)
        argv = [
            real_console_script() or "",
            "-f",
            str(project / "matrix.yaml"),
            "build",
            *selectors,
            *build_args,
        ]
        samples.append(time_command(f"no-op `build {name}`", argv, n, env=env))
        dry = cli("build", *selectors, *build_args, "--dry-run").stdout.splitlines()
        builds = [line for line in dry if " build " in line and not line.startswith("#")]
        tags = [shlex.split(line)[-1] for line in dry if line.split()[1:2] == ["tag"]]
        script = project / f"warm-{'-'.join(selectors)}.sh"
        # The exact build commands `build` would run, from the project root, every layer cached.
        script.write_text("set -e\ncd " + shlex.quote(str(project)) + "\n" + "\n".join(builds) + "\n")
        samples.append(
            time_command(f"warm `docker build` ({len(builds)} image(s))", ["bash", str(script)], n, env=env)
        )
        samples.append(
            time_command(
                f"`docker image inspect` {len(tags)} tags", [docker, "image", "inspect", *tags], n, env=env
            )
        )
    lines = [
        "#### No-op build vs warm `docker build` and `docker image inspect`",
        "",
        table([python, starts, *samples]),
    ]
    one, warm1, inspect1 = samples[0], samples[1], samples[2]
    two, warm2, inspect2 = samples[3], samples[4], samples[5]
    lines += [
        "",
        f"- one image: warm `docker build` / no-op build = **{warm1.median / one.median:.1f}x** (goal >= 3x)",
        f"- two images: warm `docker build` / no-op build = **{warm2.median / two.median:.1f}x**",
        f"- two images: no-op build - (start-up + inspect of their tags) = "
        f"**{(two.median - starts.median - inspect2.median) * 1000:+.0f} ms** (goal <= 0: one "
        "Engine API inspect per image, before the CLI is imported)",
        f"- one image: no-op build / `docker image inspect` of its tags = "
        f"{one.median / inspect1.median:.2f}x",
    ]
    return "\n".join(lines)


def make_images(project: Path, env: dict[str, str], build_args: list[str], n: int) -> str:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, project / name)
    (project / "build").mkdir(exist_ok=True)
    # The builder is already installed: mark its deps as present, as after any first `make`.
    for stamp in (".deps", ".deps-dev"):
        (project / "build" / stamp).touch()
    shutil.rmtree(project / "build" / "cache", ignore_errors=True)
    argv = [
        "make",
        "-s",
        "-C",
        str(project),
        "images",
        "SELECT=cpu",
        f"PY={sys.executable}",
        "BUILD_ARGS=" + " ".join(shlex.quote(a) for a in build_args),
    ]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    first = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"make images failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    again = time_command("up-to-date `make images SELECT=cpu`", argv, n, env=env, warmup=0)
    first_sample = Sample("first `make images SELECT=cpu` (render, build from cache, real smoke)", (first,))
    lines = ["#### `make images SELECT=cpu`", "", table([first_sample, again], baseline=first_sample)]
    lines += [
        "",
        f"- up to date: **{fmt(again.median)}** (goal < 2 s), "
        f"{first / again.median:.0f}x faster than the first run",
    ]
    return "\n".join(lines)


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


if __name__ == "__main__":
    main()
