#!/usr/bin/env python3
"""Build speed on a real Docker engine: no-op rebuilds, cold vs warm builds, disk shared by images.

All work happens in temporary copies of the project whose matrix.yaml names another image
repository (qwen-ft-bench, qwen-ft-bench-cold), so the project's qwen-ft:* tags are never
touched; every qwen-ft-bench* tag is removed at the end (BuildKit's cache is left alone).

  noop   (a) `qwen-ft-images build cpu` when the image is up to date (n=7) against
             `docker image inspect` of its 3 tags (n=7): target <= 2x. And the same check in
             process (jobplan.plan_jobs + build.run with a connected DockerEngine) against the
             SDK's inspect of the 3 tags, since interpreter start-up dominates the CLI figure.
  cold   (b) cold builds of the cpu image (n=1 each) vs warm rebuilds where only a file under
             runtime/qwen_ft_runtime/ changed, i.e. only the final COPY layer (n=5). "Cold"
             means every layer rebuilt: an ENV with a fresh nonce goes right after FROM, so
             no layer cache applies. Once with cache mounts of its own (empty: apt and pip
             download everything again, torch still comes from the wheelhouse), once with the
             usual shared cache mounts. Nothing is pruned: other builds on this engine keep
             their cache. The cold builds leave ~1.5 GB of build cache behind
             (`docker builder prune` reclaims it).
  disk   (c) the cpu image plus a second cpu target that differs only in its last layers:
             `docker system df -v` shared/unique bytes, and the pair's distinct layer bytes
             against the sum of the two image sizes.

    QWEN_FT_DOCKER=/usr/bin/docker python benchmarks/build_speed.py [noop] [cold] [disk]
        [--base-map debian:bookworm-slim=qwen-ft-local/debian:bookworm] [--wheelhouse /tmp/wh]
        [--ca-bundle /etc/ssl/certs/ca-certificates.crt] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (
    Sample,
    copy_project,
    footer,
    header,
    real_console_script,
    table,
    time_call,
    time_command,
)

from builder import build, config, content, knowledge, resolve
from builder import jobs as jobplan
from builder.engine import DockerEngine
from builder.project import Project

BENCH_IMAGE = "qwen-ft-bench"
COLD_IMAGE = "qwen-ft-bench-cold"
DEFAULT_BASE_MAP = "debian:bookworm-slim=qwen-ft-local/debian:bookworm"
BUILD_IMPORTS = (
    "builder.cli",
    "builder.build",
    "builder.engine",
    "builder.console",
    "docker",
    "jinja2",
    "rich.live",
)
TORCH_WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"


def downloads(log: str) -> dict[str, int]:
    """How much a build log fetched: apt `Get:` lines, pip `Downloading` and `Using cached` lines."""
    return {
        "apt": len(re.findall(r"^#\d+ [\d.]+ Get:\d+ ", log, re.M)),
        "pip": len(re.findall(r"^#\d+ [\d.]+ +Downloading ", log, re.M)),
        "cached": len(re.findall(r"^#\d+ [\d.]+ +Using cached ", log, re.M)),
    }


def steps_of(log: str) -> tuple[list[str], int]:
    """(the Dockerfile steps a build ran, short; how many were CACHED) from a --progress=plain log."""
    steps = dict(re.findall(r"^#(\d+) (\[(?:stage-\d+ )?\d+/\d+\] \S+)", log, re.M))
    cached = set(re.findall(r"^#(\d+) CACHED", log, re.M))
    ran = [text for sid, text in steps.items() if sid not in cached and not text.endswith("FROM")]
    return ran, len(cached & set(steps))


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.docker = args.docker
        self.script = real_console_script()
        if self.script is None:
            raise SystemExit("qwen-ft-images is not installed (pip install -e .)")
        self.env = {**os.environ, "QWEN_FT_DOCKER": self.docker}
        self.env.pop("QWEN_FT_MATRIX", None)

    # -- helpers ------------------------------------------------------------------------
    def build_argv(self, project: Path, *selectors: str) -> list[str]:
        argv = [self.script or "", "--matrix", str(project / "matrix.yaml"), "build", *selectors]
        argv += ["--docker", self.docker]
        for rule in self.args.base_map:
            argv += ["--base-map", rule]
        argv += ["--wheelhouse", str(self.args.wheelhouse)]
        if self.args.ca_bundle:
            argv += ["--ca-bundle", str(self.args.ca_bundle)]
        return argv

    def cli(self, project: Path, *args: str) -> None:
        argv = [self.script or "", "--matrix", str(project / "matrix.yaml"), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")

    def build(self, project: Path, *selectors: str) -> tuple[float, list[dict[str, object]]]:
        """One CLI build; (wall seconds, the report's images)."""
        start = time.perf_counter()
        proc = subprocess.run(
            self.build_argv(project, *selectors), capture_output=True, text=True, env=self.env, check=False
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            what = " ".join(selectors)
            raise SystemExit(f"build {what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        report = json.loads((project / "build" / "report.json").read_text())
        return wall, list(report["images"])

    def project(self, name: str, image: str, *, extra_targets: str = "") -> Path:
        path = copy_project(self.tmp / name, image=image, with_images=False)
        if extra_targets:
            matrix = path / "matrix.yaml"
            text = matrix.read_text(encoding="utf-8")
            anchor = "\ninclude:\n"
            assert anchor in text, "matrix.yaml has no top-level include: to insert targets before"
            matrix.write_text(text.replace(anchor, extra_targets + anchor, 1), encoding="utf-8")
        self.cli(path, "render")  # `build` uses images/<id>/Dockerfile from disk
        return path

    def docker_json(self, *args: str) -> object:
        proc = subprocess.run([self.docker, *args], capture_output=True, text=True, check=True)
        return json.loads(proc.stdout)

    # -- (a) no-op rebuild ----------------------------------------------------------------
    def noop(self) -> str:
        head = header("Build (a): no-op rebuild of the cpu image")
        n = self.args.n_noop
        project = self.project("noop", BENCH_IMAGE)
        _, images = self.build(project, "cpu")  # first: builds (from cache) or finds it up to date
        _, images = self.build(project, "cpu")
        cpu = images[0]
        assert cpu["status"] == "up-to-date", f"second build was not a no-op: {cpu['status']}"
        tags = [str(t) for t in cpu["tags"]]  # type: ignore[union-attr]

        def cli_noop() -> None:
            _, imgs = self.build(project, "cpu")
            assert all(i["status"] == "up-to-date" for i in imgs), imgs

        cli_build = time_call("CLI `build cpu` (up to date)", cli_noop, n)
        inspect = time_command(
            f"`docker image inspect` {len(tags)} tags", [self.docker, "image", "inspect", *tags], n
        )
        inspect1 = time_command("`docker image inspect` 1 tag", [self.docker, "image", "inspect", tags[0]], n)
        # Where the CLI's time goes before it does any work: the interpreter, then the imports
        # `build` needs (the docker SDK, Jinja, rich), then connecting to the engine.
        python = time_command("`python -c pass`", [sys.executable, "-c", "pass"], n)
        imports = time_command(
            "`python -c 'import <modules build uses>'`",
            [sys.executable, "-c", f"import {', '.join(BUILD_IMPORTS)}"],
            n,
        )

        # In process: what `build` does after start-up, against the SDK's own inspect.
        proj = Project.at(project)
        cfg = config.load(proj.matrix)
        kb = knowledge.load()
        res = resolve.resolve(cfg, kb)
        cells = resolve.select(res, ["cpu"])
        options = jobplan.BuildOptions(
            base_map=jobplan.parse_base_map(self.args.base_map),
            wheelhouse=self.args.wheelhouse,
            ca_bundle=self.args.ca_bundle,
        )
        engine = DockerEngine(self.docker)
        engine.check()
        jobs = jobplan.plan_jobs(proj, res, kb, cells, options)
        assert [j.tags for j in jobs] == [tuple(tags)], "in-process plan disagrees with the CLI's tags"

        def plan() -> None:
            jobplan.plan_jobs(proj, res, kb, cells, options)

        def noop_run() -> None:
            results = build.run(proj, jobs, engine, options)
            assert all(r.status == "up-to-date" for r in results), results

        def plan_and_run() -> None:
            plan = jobplan.plan_jobs(proj, res, kb, cells, options)
            results = build.run(proj, plan, engine, options)
            assert all(r.status == "up-to-date" for r in results), results

        def fresh_engine() -> None:
            DockerEngine(self.docker).check()

        api = engine.client.api
        in_proc = [
            time_call("plan_jobs (render + content hash)", plan, n),
            time_call(
                "stage_context (build/context/)", lambda: content.stage_context(proj, options.wheelhouse), n
            ),
            time_call("run() on an up-to-date plan", noop_run, n),
            time_call("plan_jobs + run() (the in-process no-op)", plan_and_run, n),
            time_call("DockerEngine() + check() (connect, version, BuildKit probe)", fresh_engine, n),
        ]
        sdk3 = time_call(
            f"SDK inspect_image x {len(tags)} tags", lambda: [api.inspect_image(t) for t in tags], n
        )
        sdk1 = time_call("SDK inspect_image x 1", lambda: api.inspect_image(tags[0]), n)
        lines = [
            head,
            f"- image: `{tags[0]}` ({len(tags)} tags: {', '.join(f'`{t}`' for t in tags)})",
            "",
            "End to end, each a fresh process:",
            "",
            table([inspect, inspect1, python, imports, cli_build], baseline=inspect, ratio_label="x floor"),
            "",
            f"(`<modules build uses>`: {', '.join(BUILD_IMPORTS)}.)",
            "",
            "In process (one connected DockerEngine, knowledge and matrix loaded once):",
            "",
            table([sdk3, sdk1, *in_proc], baseline=sdk3, ratio_label="x floor"),
            "",
            f"CLI no-op / `docker image inspect` of the {len(tags)} tags: "
            f"{cli_build.median / inspect.median:.2f}x (target <= 2x); in-process no-op / SDK inspect of "
            f"the {len(tags)} tags: {in_proc[3].median / sdk3.median:.2f}x.",
            "",
            footer(),
        ]
        return "\n".join(lines)

    # -- (b) cold vs warm ---------------------------------------------------------------------
    def cold_project(self, name: str, nonce: str, *, fresh_mounts: bool) -> Path:
        """A project copy whose cpu Dockerfile shares no layer with any earlier build."""
        project = copy_project(self.tmp / name, image=COLD_IMAGE, with_images=False)
        template = project / "templates" / "Dockerfile.j2"
        text = template.read_text(encoding="utf-8")
        anchor = "FROM ${BASE_IMAGE}\nARG DEBIAN_FRONTEND=noninteractive\n"
        assert anchor in text, "templates/Dockerfile.j2 changed: update the cache-busting anchor"
        # A new value in the environment of every RUN after FROM: no layer cache applies.
        text = text.replace(anchor, anchor + f"ENV QWEN_FT_BENCH_NONCE={nonce}\n", 1)
        if fresh_mounts:
            # Cache mounts of its own (empty), so apt and pip download everything again,
            # without pruning the cache every other build on this engine uses.
            def own_id(m: re.Match[str]) -> str:
                return f"--mount=type=cache,id=qwen-ft-bench-{nonce}{m.group(1).replace('/', '-')},target="

            text, count = re.subn(r"--mount=type=cache,target=(?=(/[^,\s\\]+))", own_id, text)
            assert count, "templates/Dockerfile.j2 has no cache mounts to rename"
        template.write_text(text, encoding="utf-8")
        self.cli(project, "render")
        return project

    def cold(self) -> str:
        head = header("Build (b): cold vs warm build of the cpu image")
        nonce = uuid.uuid4().hex[:12]
        fresh = self.cold_project("cold-fresh", nonce + "a", fresh_mounts=True)
        wall, images = self.build(fresh, "cpu")
        assert images[0]["status"] == "built", images[0]
        fetched = {
            "empty": downloads((fresh / "build" / "logs" / "cpu-fp32.log").read_text(errors="replace"))
        }
        cold = ("cold: every layer, empty apt/pip caches", wall, float(images[0]["seconds"]))  # type: ignore[arg-type]
        shared = self.cold_project("cold-shared", nonce + "b", fresh_mounts=False)
        wall, images = self.build(shared, "cpu")
        assert images[0]["status"] == "built", images[0]
        fetched["warm"] = downloads((shared / "build" / "logs" / "cpu-fp32.log").read_text(errors="replace"))
        cold_shared = ("cold: every layer, warm apt/pip caches", wall, float(images[0]["seconds"]))  # type: ignore[arg-type]
        marker = fresh / "runtime" / "qwen_ft_runtime" / "__init__.py"
        original = marker.read_text(encoding="utf-8")
        walls: list[float] = []
        engine_s: list[float] = []
        for i in range(self.args.n_warm):
            marker.write_text(original + f"# benchmark edit {nonce}-{i}\n", encoding="utf-8")
            wall, images = self.build(fresh, "cpu")
            assert images[0]["status"] == "built", images[0]
            walls.append(wall)
            engine_s.append(float(images[0]["seconds"]))  # type: ignore[arg-type]
        ran, cached = steps_of((fresh / "build" / "logs" / "cpu-fp32.log").read_text(errors="replace"))
        warm_name = "warm: runtime/ edited"
        warm = Sample(warm_name, tuple(walls))
        warm_engine = Sample(warm_name, tuple(engine_s))
        cli_rows = [Sample(c[0], (c[1],)) for c in (cold, cold_shared)]
        step_rows = [Sample(c[0], (c[2],)) for c in (cold, cold_shared)]
        lines = [
            head,
            "- cold: a project copy whose template has a fresh `ENV` right after `FROM`, so no layer "
            "cache applies (n=1 each). *Empty caches*: its cache mounts get ids of their own, so apt "
            "and pip download everything (torch comes from the wheelhouse, as in every build here); "
            "*warm caches*: the usual cache mounts, already filled by earlier builds on this engine",
            "- what the cold logs fetched (apt `Get:` lines, pip `Downloading` lines, pip `Using cached` "
            "lines): "
            + "; ".join(
                f"{k} caches: apt {v['apt']}, pip downloads {v['pip']}, pip from cache {v['cached']}"
                for k, v in fetched.items()
            ),
            "- warm: one line appended to runtime/qwen_ft_runtime/__init__.py before each build; "
            f"the last warm build ran {', '.join(f'`{r}`' for r in ran) or 'nothing'} and found "
            f"{cached} steps CACHED",
            "",
            "CLI wall time (interpreter start-up, engine check, staging and tagging included):",
            "",
            table([*cli_rows, warm], baseline=warm, ratio_label="x warm"),
            "",
            "Build step alone (`seconds` in build/report.json):",
            "",
            table([*step_rows, warm_engine], baseline=warm_engine, ratio_label="x warm"),
            "",
            f"cold (empty caches) / warm, CLI medians: {cli_rows[0].median / warm.median:.0f}x; "
            f"cold (warm caches) / warm: {cli_rows[1].median / warm.median:.0f}x.",
            "",
            footer(),
        ]
        return "\n".join(lines)

    # -- (c) disk --------------------------------------------------------------------------
    def disk(self) -> str:
        head = header("Build (c): disk shared between images")
        import docker

        variant = (
            "  cpub:\n"
            "    sm: null\n"
            "    # benchmark variant: the cpu image again under another target name\n"
            "    axes:\n"
            '      torch: ["2.13.0"]\n'
            '      python: ["3.11"]\n'
        )
        project = self.project("disk", BENCH_IMAGE, extra_targets=variant)
        _, images = self.build(project, "cpu", "cpub")
        refs = {str(i["image"]): str(i["tags"][0]) for i in images}  # type: ignore[index]
        ids = {name: str(i["image_id"]) for name, i in zip(refs, images, strict=True)}
        client = docker.from_env()
        df = client.df()
        by_id = {row["Id"]: row for row in df["Images"]}
        layers = {name: list(client.api.inspect_image(ref)["RootFS"]["Layers"]) for name, ref in refs.items()}
        (a, b) = refs  # the cpu image, then the variant
        common = 0
        for x, y in zip(layers[a], layers[b], strict=False):
            if x != y:
                break
            common += 1
        cli_rows = subprocess.run(
            [self.docker, "system", "df", "-v", "--format", "{{json .}}"],
            capture_output=True,
            text=True,
            check=True,
        )
        human = {r["ID"]: r for r in json.loads(cli_rows.stdout)["Images"]}
        size = {n: int(by_id[ids[n]]["Size"]) for n in refs}
        engine_shared = {n: int(by_id[ids[n]]["SharedSize"]) for n in refs}
        # The variant's layers are either the cpu image's (the common chain) or its own, and its
        # own exist in no other image: docker's unique size for it is exactly its own bytes.
        own_b = size[b] - engine_shared[b]
        shared = size[b] - own_b
        own_a = size[a] - shared
        total = size[a] + size[b]
        distinct = shared + own_a + own_b
        lines = [
            head,
            f"- images: `{refs[a]}` and `{refs[b]}`, a second cpu target whose Dockerfile differs from "
            "the cpu one from the `ENV QWEN_FT_*` block on (target name in ENV and labels); "
            f"they share the first {common} of {len(layers[a])} / {len(layers[b])} layers (RootFS chain)",
            f"- engine: all image layers {df['LayersSize'] / 1e9:.3f} GB, build cache "
            f"{int(df.get('BuilderSize') or 0) / 1e9:.3f} GB",
            "",
            "`docker system df -v`, the two images (shared: bytes in layers some other image on this "
            "engine also uses, here the project's own qwen-ft:cpu images too):",
            "",
            "| image | size | shared size | unique size |",
            "|---|---|---|---|",
        ]
        for name, ref in refs.items():
            r = human.get(ids[name], {})
            cols = [r.get(k, "?") for k in ("Size", "SharedSize", "UniqueSize")]
            lines.append(f"| `{ref}` | " + " | ".join(cols) + " |")
        lines += [
            "",
            "Between the two images (bytes from the engine's /system/df):",
            "",
            "| bytes | value |",
            "|---|---|",
            f"| sum of the two image sizes | {total:,} ({total / 1e9:.3f} GB) |",
            f"| in layers both use (stored once) | {shared:,} ({shared / 1e9:.3f} GB) |",
            f"| only in `{refs[a]}` | {own_a:,} ({own_a / 1e3:.1f} kB) |",
            f"| only in `{refs[b]}` | {own_b:,} ({own_b / 1e3:.1f} kB) |",
            f"| distinct bytes the pair holds | {distinct:,} ({distinct / 1e9:.3f} GB) |",
            "",
            f"distinct / sum of sizes: {distinct / total:.3f}; the variant costs {own_b / 1e3:.1f} kB "
            f"of disk, not {size[b] / 1e9:.2f} GB.",
            "",
            footer(),
        ]
        return "\n".join(lines)

    # -- cleanup -----------------------------------------------------------------------------
    def cleanup(self) -> list[str]:
        proc = subprocess.run(
            [self.docker, "images", "--format", "{{.Repository}}:{{.Tag}}"],
            capture_output=True,
            text=True,
            check=True,
        )
        refs = [r for r in proc.stdout.split() if r.split(":")[0] in (BENCH_IMAGE, COLD_IMAGE)]
        if refs:
            subprocess.run([self.docker, "rmi", *refs], capture_output=True, check=False)
        return refs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="{noop,cold,disk}", help="default: all three")
    default_docker = os.environ.get("QWEN_FT_DOCKER") or shutil.which("docker") or "docker"
    parser.add_argument("--docker", default=default_docker)
    parser.add_argument("--base-map", action="append", default=None, help=f"default: {DEFAULT_BASE_MAP}")
    parser.add_argument("--wheelhouse", type=Path, default=Path("/tmp/wh"))
    parser.add_argument("--ca-bundle", type=Path, default=Path("/etc/ssl/certs/ca-certificates.crt"))
    parser.add_argument("--n-noop", type=int, default=7, help="runs of each no-op case (default 7)")
    parser.add_argument("--n-warm", type=int, default=5, help="warm builds (default 5)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary projects and images")
    args = parser.parse_args(argv)
    args.base_map = args.base_map or [DEFAULT_BASE_MAP]
    parts = args.parts or ["noop", "cold", "disk"]
    unknown = [p for p in parts if p not in ("noop", "cold", "disk")]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}: choose from noop, cold, disk")
    if not args.wheelhouse.is_dir() or not list(args.wheelhouse.glob("torch-*.whl")):
        src = Path("/opt/wheels") / TORCH_WHEEL
        if args.wheelhouse == Path("/tmp/wh") and src.is_file():
            args.wheelhouse.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, args.wheelhouse / TORCH_WHEEL)
            except OSError:
                shutil.copy2(src, args.wheelhouse / TORCH_WHEEL)
        else:
            raise SystemExit(f"--wheelhouse {args.wheelhouse} holds no torch wheel")
    if args.ca_bundle and not args.ca_bundle.is_file():
        args.ca_bundle = None

    tmp = Path(tempfile.mkdtemp(prefix="qwen-ft-build-speed-"))
    bench = Bench(args, tmp)
    try:
        for part in parts:
            print(getattr(bench, part)(), flush=True)
            print()
    finally:
        if args.keep:
            print(f"kept {tmp} and the {BENCH_IMAGE}* images", file=sys.stderr)
        else:
            removed = bench.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"removed {len(removed)} {BENCH_IMAGE}* tags and {tmp}", file=sys.stderr)


if __name__ == "__main__":
    main()
