"""End to end: the real V100 image from plain PyPI, built through the CLI, then checked.

`v100-fp16-cu128-torch2.8.0-py3.10`: torch 2.8.0's PyPI wheel is the cu128 build and still
carries sm_70 cubins, so this image needs nothing but PyPI. The nvidia/cuda images cannot be
pulled here, so both are mapped with --base-map, through the very template a real build uses:
`*-base-*` to a local Debian trixie base and `*-devel-*` to that base + Debian's
nvidia-cuda-toolkit (nvcc 12.4, which still targets sm_70), both made by
ci/make-devel-image.sh. Trixie's python3 is 3.13 (pip picks cp313 wheels, DeepSpeed's ops are
built for it), which the report records as "python (in image)".

Steps, in order: build (several GB of torch + nvidia-* wheels, DeepSpeed's fused_adam and
cpu_adam compiled for sm_70 in the ds-build stage), `contract` (DeepSpeed at the planned
release, both ops installed for CUDA, no compiler needed), no nvcc and no CUDA headers in the
image, the CPU LoRA smoke step (one process, then 2 ranks under ZeRO-2), the `smoke` command,
`audit` (passes for sm_70 with sm_70 SASS in DeepSpeed's op library; fails for sm_60, which
torch 2.8's cu128 build and the sm_70-only ops lack), the report page. Wall time, the
ds-build stage's time, image size, the size DeepSpeed adds and disk use go to
build/e2e/metrics.json. The image's tags are removed at the end; the BuildKit cache (pip
wheels) is kept unless QWEN_FT_E2E_PRUNE=1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from docker_support import CA_BUNDLE, ROOT, cli, copy_project, docker, require_engine

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

CELL = "v100-fp16-cu128-torch2.8.0-py3.10"
IMAGE = os.environ.get("QWEN_FT_E2E_IMAGE", "qwen-ft-e2e")
REF = f"{IMAGE}:{CELL}"
# The stand-ins for nvidia/cuda *-base-* and *-devel-* (ci/make-devel-image.sh; ci/common.sh names).
TRIXIE_IMAGE = os.environ.get("QWEN_FT_TRIXIE_IMAGE", "qwen-ft-local/debian:trixie")
DEVEL_IMAGE = os.environ.get("QWEN_FT_DEVEL_IMAGE", "qwen-ft-local/debian:trixie-devel")
METRICS = ROOT / "build" / "e2e" / "metrics.json"
BUILD_TIMEOUT_S = 2400


@dataclass
class E2E:
    project: Path
    ref: str
    started: float
    metrics: dict[str, Any] = field(default_factory=dict)

    def run_json(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
        """`docker run --rm [-e K=V] REF ARGS`; (exit code, last JSON line, stderr tail)."""
        flags = [x for k, v in (env or {}).items() for x in ("-e", f"{k}={v}")]
        proc = docker("run", "--rm", *flags, self.ref, *args, check=False, timeout=900)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        return proc.returncode, json.loads(lines[-1]) if lines else {}, proc.stderr[-2000:]


def docker_root() -> Path:
    return Path(docker("info", "--format", "{{.DockerRootDir}}").stdout.strip() or "/var/lib/docker")


def disk_used(path: Path) -> int:
    return shutil.disk_usage(path).used if path.exists() else 0


def system_df() -> list[dict[str, Any]]:
    out = docker("system", "df", "--format", "{{json .}}").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def stage_seconds(log: str) -> dict[str, float]:
    """Seconds per build stage from BuildKit's plain progress log (`#N [stage k/n] ...`, `#N DONE 1.2s`);
    `ds-build@critical` counts the ds-build steps from its COPY of the stack on, which cannot
    overlap the stack stage, plus the image's DeepSpeed install."""
    names: dict[str, str] = {}
    done: dict[str, float] = {}
    for line in log.splitlines():
        m = re.match(r"#(\d+) \[([\w-]+) (\d+)/\d+\] (.*)", line)
        if m:
            names.setdefault(m.group(1), f"{m.group(2)}|{m.group(3)}|{m.group(4)[:400]}")
        m = re.match(r"#(\d+) DONE (\d+(?:\.\d+)?)s", line)
        if m:
            done[m.group(1)] = float(m.group(2))
    out: dict[str, float] = {}
    critical = 0.0
    after_copy = False
    for step, name in sorted(names.items(), key=lambda kv: int(kv[0])):
        stage, _, what = name.split("|", 2)
        seconds = done.get(step, 0.0)
        out[stage] = round(out.get(stage, 0.0) + seconds, 1)
        if stage == "ds-build" and what.startswith("COPY --from=stack"):
            after_copy = True
        if (stage == "ds-build" and after_copy) or (stage.startswith("stage-") and "from=ds-build" in what):
            critical += seconds
    out["ds-build@critical"] = round(critical, 1)
    return out


def write_metrics(metrics: dict[str, Any]) -> None:
    METRICS.parent.mkdir(parents=True, exist_ok=True)
    METRICS.write_text(json.dumps(metrics, indent=2) + "\n")


@pytest.fixture(scope="module")
def v100(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    require_engine()
    for stand_in in (TRIXIE_IMAGE, DEVEL_IMAGE):
        if docker("image", "inspect", stand_in, check=False).returncode != 0:
            pytest.fail(f"{stand_in} missing: run ci/make-devel-image.sh (as root) first")
    started = time.monotonic()
    root = docker_root()
    state = E2E(copy_project(tmp_path_factory.mktemp("e2e") / "project", image=IMAGE), REF, started)
    state.metrics.update(
        cell=CELL,
        ref=REF,
        base_image=TRIXIE_IMAGE,
        builder_image=DEVEL_IMAGE,
        disk_used_before=disk_used(root),
        system_df_before=system_df(),
    )
    try:
        t0 = time.monotonic()
        proc = cli(
            state.project,
            "build",
            CELL,
            "--base-map",
            f"nvidia/cuda:*-base-*={TRIXIE_IMAGE}",
            "--base-map",
            f"nvidia/cuda:*-devel-*={DEVEL_IMAGE}",
            "--ca-bundle",
            str(CA_BUNDLE),
            timeout=BUILD_TIMEOUT_S,
        )
        state.metrics["build_s"] = round(time.monotonic() - t0, 1)
        log = state.project / "build" / "logs" / f"{CELL}.log"
        if log.is_file():
            state.metrics["stage_s"] = stage_seconds(log.read_text(errors="replace"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        state.metrics["disk_used_after_build"] = disk_used(root)
        state.metrics["system_df_after_build"] = system_df()
        yield state
    finally:
        t0 = time.monotonic()
        report = state.project / "build" / "report.json"
        tags = [REF]
        if report.is_file():
            for image in json.loads(report.read_text()).get("images") or []:
                tags += list(image.get("tags") or [])
        for tag in dict.fromkeys(tags):
            docker("rmi", tag, check=False)
        if os.environ.get("QWEN_FT_E2E_PRUNE") == "1":
            docker("builder", "prune", "--all", "--force", check=False, timeout=900)
        state.metrics["cleanup_s"] = round(time.monotonic() - t0, 1)
        state.metrics["disk_used_after_cleanup"] = disk_used(root)
        state.metrics["system_df_after_cleanup"] = system_df()
        state.metrics["wall_s"] = round(time.monotonic() - started, 1)
        write_metrics(state.metrics)


def test_build_report(v100: E2E) -> None:
    report = json.loads((v100.project / "build" / "report.json").read_text())
    (image,) = report["images"]
    assert image["status"] in ("built", "up-to-date"), image
    assert image["tags"][0] == REF
    assert image["size"] > 3_000_000_000  # torch + the nvidia-* wheels: several GB
    inspect = json.loads(docker("image", "inspect", REF).stdout)[0]
    labels = inspect["Config"]["Labels"]
    assert labels["io.qwen-ft.sm"] == "70" and labels["io.qwen-ft.cuda"] == "12.8"
    assert labels["io.qwen-ft.deepspeed"] == "0.19.8"
    assert labels["io.qwen-ft.deepspeed-ops"] == "fused_adam,cpu_adam"
    history = docker("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", REF).stdout
    v100.metrics.update(
        image_size=image["size"],
        image_id=image["image_id"],
        layers=[line.split("\t", 1)[0] for line in history.splitlines()],
    )


def test_contract(v100: E2E) -> None:
    code, report, stderr = v100.run_json("qwen-ft-runtime", "contract")
    failed = [c for c in report.get("checks", []) if not c["ok"]]
    assert code == 0 and report.get("ok") is True, (failed, stderr)
    checks = {c["name"]: c for c in report["checks"]}
    versions = report["versions"]
    assert versions["torch"].startswith("2.8.0") and versions["torch_cuda"] == "12.8"
    assert checks["arch_list"]["detail"] == "sm_70 in arch list"
    assert versions["triton"] is None and versions["flash_attn"] is None
    assert report["plan"]["dtype"] == "fp16" and report["plan"]["attn"] == "sdpa"
    assert report["plan"]["deepspeed"] == "0.19.8" and report["plan"]["ds_ops"] == "fused_adam,cpu_adam"
    assert versions["deepspeed"].startswith("0.19.8")
    assert checks["deepspeed_version"]["ok"]
    assert checks["deepspeed_ops"]["ok"] and checks["deepspeed_ops"]["detail"] == (
        "installed for cuda: fused_adam, cpu_adam"
    )
    assert checks["deepspeed_no_compiler"]["ok"]
    assert "deepspeed_ops_load" not in checks  # only with a GPU
    flags = docker(
        "run", "--rm", v100.ref, "python", "-c", "import torch; print(torch._C._cuda_getArchFlags())"
    )
    assert "sm_70" in flags.stdout.split()
    v100.metrics.update(
        python_in_image=versions["python"], arch_flags=flags.stdout.strip(), versions=versions
    )


def test_no_compiler_and_no_cuda_headers(v100: E2E) -> None:
    """nvcc and the toolkit's headers stay in the ds-build stage; the ops load without them."""
    probe = (
        "command -v nvcc || true; ls -d /usr/local/cuda*/include /usr/local/cuda*/bin/nvcc 2>/dev/null || true; "
        "ls /usr/include/cuda.h /usr/include/cuda_runtime.h /usr/include/crt 2>/dev/null || true"
    )
    proc = docker("run", "--rm", v100.ref, "bash", "-c", probe)
    assert proc.stdout.strip() == "", proc.stdout


def test_cpu_lora_smoke_step(v100: E2E) -> None:
    # A CUDA build of torch trains on the CPU; QWEN_FT_SM unset skips the "is the GPU here" check.
    t0 = time.monotonic()
    code, report, stderr = v100.run_json(
        "qwen-ft-runtime",
        "smoke",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--attn",
        "sdpa",
        env={"QWEN_FT_SM": ""},
    )
    assert code == 0 and report.get("ok") is True, (report.get("failed_check"), stderr)
    assert {r["model"] for r in report["runs"]} == {"qwen2-tiny", "qwen3-tiny"}
    for run in report["runs"]:
        assert run["losses"][-1] < run["losses"][0]
    v100.metrics["smoke_cpu"] = {
        "seconds": round(time.monotonic() - t0, 1),
        "tokens_per_s": {r["model"]: r["tokens_per_s"] for r in report["runs"]},
    }


def test_zero2_on_two_cpu_ranks(v100: E2E) -> None:
    """The GPU image's DeepSpeed also runs ZeRO-2 on CPU ranks (gloo, torch's AdamW), offline."""
    t0 = time.monotonic()
    code, report, stderr = v100.run_json(
        "qwen-ft-runtime", "smoke", "--device", "cpu", "--dtype", "fp32", "--attn", "sdpa",
        "--nproc", "2", "--deepspeed", "zero2", "--tiny", "qwen2-tiny", "--steps", "2",
        env={"QWEN_FT_SM": ""},
    )  # fmt: skip
    assert code == 0 and report.get("ok") is True, (report.get("failed_check"), stderr)
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    v100.metrics["smoke_cpu_zero2_2ranks_s"] = round(time.monotonic() - t0, 1)


def test_smoke_command(v100: E2E) -> None:
    if importlib.util.find_spec("builder.commands.smoke") is None:
        pytest.skip("the smoke command is not in this tree")
    proc = cli(v100.project, "smoke", CELL, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((v100.project / "build" / "reports" / "smoke.json").read_text())
    assert report["images"][0]["ok"] is True


def test_audit_passes_for_v100(v100: E2E) -> None:
    t0 = time.monotonic()
    proc = cli(v100.project, "audit", CELL, "--json", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (image,) = json.loads(proc.stdout)["images"]
    assert image["sm"] == 70 and image["sm_source"] == "label" and image["ok"] is True
    rows = {b["path"].rsplit("site-packages/", 1)[-1]: b for b in image["binaries"]}
    torch_row = rows["torch/lib/libtorch_cuda.so"]
    assert torch_row["status"] == "ok" and torch_row["via"] == "sm_70 SASS"
    assert torch_row["sass"]["sm_70"] > 100 and torch_row["ptx"] == {}
    # DeepSpeed's FusedAdam: compiled in the ds-build stage for sm_70 only (TORCH_CUDA_ARCH_LIST=7.0)
    (op_path,) = [p for p in rows if p.startswith("deepspeed/ops/adam/fused_adam_op")]
    op_row = rows[op_path]
    assert op_row["status"] == "ok" and op_row["via"] == "sm_70 SASS", op_row
    assert set(op_row["sass"]) == {"sm_70"}, op_row
    assert len(rows) >= 15  # torch's two CUDA libraries and the nvidia-* wheels' ones
    v100.metrics["audit_sm70"] = {
        "seconds": round(time.monotonic() - t0, 1),
        "shared_objects": image["shared_objects"],
        "binaries_with_device_code": len(rows),
        "counts": image["counts"],
        "cuobjdump": image["cuobjdump"],
        "deepspeed_fused_adam": {"path": op_path, "sass": op_row["sass"], "ptx": op_row["ptx"]},
    }


def test_audit_fails_for_pascal_with_one_clear_row(v100: E2E) -> None:
    # torch 2.8's cu128 wheel has no sm_6x cubins and no PTX: libtorch_cuda.so cannot run on a
    # P100 although the nvidia-* libraries still could. sm_120 would pass (it has sm_120 SASS).
    proc = cli(v100.project, "audit", CELL, "--sm", "60", "--json", timeout=1800)
    assert proc.returncode == 9, proc.stderr[-3000:]
    (image,) = json.loads(proc.stdout)["images"]
    failed = sorted(p.rsplit("site-packages/", 1)[-1] for p in image["failed"])
    assert len(failed) == 2 and failed[1] == "torch/lib/libtorch_cuda.so", failed
    assert failed[0].startswith("deepspeed/ops/adam/fused_adam_op"), failed  # sm_70 only, as planned
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert "torch/lib/libtorch_cuda.so" in error[0] and "fused_adam_op" in error[0]
    assert "sm_60 needs SASS sm_60 or PTX compute_60 or lower" in error[0]
    v100.metrics["audit_sm60_failed"] = image["failed"]


def test_report_page(v100: E2E) -> None:
    from builder.commands.common import Context
    from builder.commands.report import plans_of
    from builder.publish import publish as report

    context = Context(matrix_path=v100.project / "matrix.yaml", debug=False)
    md_path, html_path, rows = report(context.project, plans_of(context))
    (row,) = [r for r in rows if r.image == CELL]
    assert row.contract in ("pass", "—") and row.audit == "pass"  # contract comes from smoke.json
    assert row.versions["python (plan)"] == "3.10" and row.versions["python (in image)"].startswith("3.")
    page = html_path.read_text()
    assert REF in page and "<svg" in page
    assert "| build | contract | audit |" in md_path.read_text()
    out = ROOT / "build" / "e2e"
    out.mkdir(parents=True, exist_ok=True)
    for path in (md_path, html_path):
        shutil.copy2(path, out / f"report{path.suffix}")


def test_sizes(v100: E2E) -> None:
    """What the image is made of, for docs/benchmarks.md (End-to-end): the wheels dominate."""
    script = (
        "import json, pathlib, site; sp = pathlib.Path(site.getsitepackages()[0]); "
        "size = lambda p: sum(f.stat().st_size for f in p.rglob('*') if f.is_file() and not f.is_symlink()); "
        "ops = sorted((sp / 'deepspeed' / 'ops').rglob('*_op*.so')); "
        "print(json.dumps({'site_packages': size(sp), 'torch': size(sp / 'torch'), 'nvidia': size(sp / 'nvidia'), "
        "'deepspeed': size(sp / 'deepspeed'), 'deepspeed_ops': {p.name: p.stat().st_size for p in ops}}))"
    )
    proc = docker("run", "--rm", v100.ref, "python", "-c", script)
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sizes["nvidia"] > 1_000_000_000
    assert len(sizes["deepspeed_ops"]) == 2, sizes["deepspeed_ops"]  # fused_adam_op, cpu_adam_op
    history = docker("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", v100.ref).stdout
    sizes["deepspeed_layer"] = next(
        (line.split("\t", 1)[0] for line in history.splitlines() if "deepspeed-0.19.8-" in line), None
    )
    v100.metrics["content_bytes"] = sizes
