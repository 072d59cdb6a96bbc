#!/usr/bin/env python3
"""Render at scale: resolve + render of a synthetic matrix with ~1,000 valid `include` cells.

A temporary copy of the project (templates/, runtime/) gets a generated matrix.yaml: one
target per compute capability the knowledge base knows (more, renamed, if needed), each
with valid include cells picked by builder.resolve.check from every torch x CUDA
x Python x flash-attn version the knowledge base lists. Then it times, in process (n=5
after one warm-up), config.load, resolve, render_all (in memory) and render.write, and the
CLI end to end (`render` writing every file into an empty images/, `render` with images/
up to date, `render --check`), against the project's own matrix as the reference.
Target: resolve + render of 1,000 cells under 2 s.

    python benchmarks/render_scale.py [--cells 1000] [-n 5] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (
    ROOT,
    Sample,
    copy_project,
    fmt_seconds,
    footer,
    header,
    real_console_script,
    table,
    time_call,
)

from builder import config, knowledge, render, resolve
from builder.config import CellSpec
from builder.project import Project

TARGET_S = 2.0


def synthetic_matrix(kb: knowledge.Knowledge, cells: int) -> tuple[dict[str, object], int]:
    """A matrix.yaml (as data) with `cells` valid include cells spread over GPU targets, and a cpu one."""
    base = config.load(ROOT / "matrix.yaml")
    pythons = sorted({d.python for d in kb.distros})
    combos = list(itertools.product(kb.cuda, kb.torch, pythons, [*kb.flash_attn, "none"]))
    sms = sorted(kb.archs)
    per_sm: dict[int, list[dict[str, str]]] = {}
    probe_axes = config.Axes(cuda=("12.6",), torch=("2.8.0",), python=("3.10",), flash_attn=("none",))
    for sm in sms:
        target = config.TargetConfig(
            name=f"sm{sm}",
            sm=sm,
            gpus=(),
            dtype="auto",
            triton="auto",
            axes=probe_axes,
            recommended=None,
            runner_labels=(),
        )
        valid = []
        for cuda, torch, python, fa in combos:
            spec = CellSpec(target=target.name, cuda=cuda, torch=torch, python=python, flash_attn=fa)
            cell = resolve.check(kb, target, spec, dtype=None, origin="include")
            if cell.valid:
                valid.append({"cuda": cuda, "torch": torch, "python": python, "flash_attn": fa})
        if valid:
            per_sm[sm] = valid
    total_valid = sum(len(v) for v in per_sm.values())
    copies = -(-cells // total_valid)  # ceil: clone targets under new names when one set is not enough
    targets: dict[str, object] = {}
    pools: list[tuple[str, list[dict[str, str]]]] = []
    for k in range(copies):
        for sm, valid in per_sm.items():
            name = f"sm{sm}" if k == 0 else f"sm{sm}-{k}"
            # Axes: the first valid combo, so each target's own search stays small and valid;
            # the include cells are what scale.
            first = valid[0]
            targets[name] = {
                "sm": sm,
                "gpus": [f"GPU{sm}-{k}"],
                "axes": {key: [first[key]] for key in ("cuda", "torch", "python", "flash_attn")},
            }
            pools.append((name, valid[1:]))
    targets["cpu"] = {"sm": None, "axes": {"torch": ["2.13.0"], "python": ["3.11"]}}
    include: list[dict[str, str]] = []
    # Round-robin over the targets, so every target gets a share.
    for row in itertools.zip_longest(*[[(n, c) for c in pool] for n, pool in pools]):
        for item in row:
            if item is not None and len(include) < cells:
                name, combo = item
                include.append({"target": name, **combo})
    data: dict[str, object] = {
        "image": base.image,
        "registry": "",
        "base_map": {},
        "axes": {"cuda": ["12.6"], "torch": ["2.8.0"], "python": ["3.10"], "flash_attn": ["none"]},
        "targets": targets,
        "include": include,
        "exclude": [],
    }
    return data, len(include)


def in_process(matrix: Path, kb: knowledge.Knowledge, n: int, label: str) -> tuple[list[Sample], int]:
    project = Project.at(matrix.parent)
    cfg = config.load(matrix)
    res = resolve.resolve(cfg, kb)
    files = render.render_all(project, res, kb)
    samples = [
        time_call(f"{label}: config.load", lambda: config.load(matrix), n),
        time_call(f"{label}: resolve", lambda: resolve.resolve(cfg, kb), n),
        time_call(f"{label}: render_all (in memory)", lambda: render.render_all(project, res, kb), n),
        time_call(
            f"{label}: load + resolve + render_all",
            lambda: render.render_all(project, resolve.resolve(config.load(matrix), kb), kb),
            n,
        ),
    ]
    images = project.images

    def empty() -> None:
        shutil.rmtree(images, ignore_errors=True)
        os.sync()  # the removal's writeback must not land in the timed write

    samples.append(
        time_call(f"{label}: write (empty images/)", lambda: render.write(project, files), n, setup=empty)
    )
    floor = images.parent / "fs-floor"

    def raw_create() -> None:
        # The filesystem's floor for the same tree: mkdir + one plain write per file, no
        # compare, no temp file + rename.
        for path, text in files.items():
            target = floor / path.relative_to(images)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")

    samples.append(
        time_call(
            f"{label}: fs floor (mkdir + write, no rename)",
            raw_create,
            n,
            setup=lambda: (shutil.rmtree(floor, ignore_errors=True), os.sync()),
        )
    )
    shutil.rmtree(floor, ignore_errors=True)
    samples.append(time_call(f"{label}: write (up to date)", lambda: render.write(project, files), n))
    return samples, len(files)


def cli_times(matrix: Path, n: int, label: str) -> list[Sample]:
    script = real_console_script()
    assert script is not None, "qwen-ft-images is not installed"
    base = [script, "--matrix", str(matrix)]
    images = matrix.parent / "images"

    def run(*args: str) -> None:
        proc = subprocess.run([*base, *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed: {proc.stderr[-2000:]}")

    return [
        time_call(
            f"{label}: CLI render (empty images/)",
            lambda: run("render"),
            n,
            setup=lambda: (shutil.rmtree(images, ignore_errors=True), os.sync()),
        ),
        time_call(f"{label}: CLI render (up to date)", lambda: run("render"), n),
        time_call(f"{label}: CLI render --check", lambda: run("render", "--check"), n),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cells", type=int, default=1000, help="include cells to generate (default 1000)")
    parser.add_argument("-n", type=int, default=5, help="timed runs per case (default 5)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of resolve+render")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project and print its path")
    args = parser.parse_args()

    kb = knowledge.load()
    tmp = Path(tempfile.mkdtemp(prefix="qwen-ft-render-scale-"))
    try:
        ref = copy_project(tmp / "reference", with_images=False)
        big = copy_project(tmp / "synthetic", with_images=False)
        t0 = time.perf_counter()
        data, count = synthetic_matrix(kb, args.cells)
        gen_s = time.perf_counter() - t0
        (big / "matrix.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

        ref_samples, ref_files = in_process(ref / "matrix.yaml", kb, args.n, "project")
        big_samples, big_files = in_process(big / "matrix.yaml", kb, args.n, f"{count} includes")
        cli_ref = cli_times(ref / "matrix.yaml", args.n, "project")
        cli_big = cli_times(big / "matrix.yaml", args.n, f"{count} includes")

        res = resolve.resolve(config.load(big / "matrix.yaml"), kb)
        print(header(f"Render at scale ({count} include cells)"))
        print(
            f"- synthetic matrix: {len(data['targets'])} targets, {count} include cells; "  # type: ignore[arg-type]
            f"resolves to {len(res.cells)} images and {len(res.excluded)} excluded/candidate cells, "
            f"{big_files} rendered files (generated in {gen_s:.1f} s, untimed)"
        )
        print(f"- reference: the project's matrix.yaml ({ref_files} rendered files)")
        print()
        print("In process (knowledge base loaded once, as a CLI run does):")
        print()
        print(table(ref_samples + big_samples))
        print()
        print("CLI end to end (`qwen-ft-images --matrix M render`), interpreter start-up included:")
        print()
        print(table(cli_ref + cli_big, baseline=cli_ref[1], ratio_label="x project"))
        print()
        core = big_samples[3]
        ratio = core.median / ref_samples[3].median
        per_image = core.median / max(len(res.cells), 1)
        verdict = "met" if core.median < TARGET_S else "MISSED"
        print(
            f"load + resolve + render_all of {count} includes: median {fmt_seconds(core.median)} "
            f"({fmt_seconds(per_image)} per image, {ratio:.0f}x the project matrix) against a "
            f"{fmt_seconds(TARGET_S)} target: {verdict}; the CLI end to end (up to date) "
            f"{fmt_seconds(cli_big[1].median)}."
        )
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            render.render_all(Project.at(big), resolve.resolve(config.load(big / "matrix.yaml"), kb), kb)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
            print("\n```\n" + out.getvalue().strip() + "\n```")
        print()
        print(footer())
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
