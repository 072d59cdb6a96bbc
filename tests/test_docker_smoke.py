"""Docker tier: `qwen-ft-images smoke` runs contract + smoke in the real cpu image, and cleans up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from docker_support import DOCKER, Built, cli, docker

pytestmark = pytest.mark.docker

IMAGE = "qwen-ft:cpu-fp32"


def leftovers(project: Path, *filters: str) -> list[str]:
    """Containers any smoke run of this project left behind (running or not)."""
    label = ("--filter", f"label=io.qwen-ft.smoke-project={project}")
    return docker("ps", "-a", "-q", *label, *filters).stdout.split()


def report(project: Path) -> dict[str, object]:
    data = json.loads((project / "build" / "reports" / "smoke.json").read_text())
    assert isinstance(data, dict)
    return data


def only_image(project: Path) -> dict[str, object]:
    images = report(project)["images"]
    assert isinstance(images, list) and len(images) == 1
    row = images[0]
    assert isinstance(row, dict)
    return row


def test_smoke_passes_on_the_cpu_image(built_cpu: Built) -> None:
    project = built_cpu.project
    proc = cli(project, "smoke", "cpu", "--steps", "4", "--json", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout) == report(project), "--json prints what smoke.json holds"
    row = only_image(project)
    assert row["ref"] == IMAGE and row["ok"] is True and row["failed_check"] is None
    steps = row["steps"]
    assert isinstance(steps, dict)
    assert steps["contract"]["ok"] and steps["contract"]["exit_code"] == 0
    checks = row["checks"]
    assert isinstance(checks, list)
    contract = {c["name"]: c["ok"] for c in checks if c["step"] == "contract"}
    assert {"torch_version", "torch_cuda", "triton", "flash_attn", "transformers", "peft"} <= set(contract)
    assert contract["deepspeed_version"], "the cpu image carries DeepSpeed (no ops) as planned"
    assert all(contract.values())
    runs = row["runs"]
    assert isinstance(runs, list)
    assert [r["model"] for r in runs] == ["qwen2-tiny", "qwen3-tiny"]
    for run in runs:
        assert len(run["losses"]) == 4
        assert run["loss_last"] < run["loss_first"], run
        assert run["tokens_per_s"] > 0
    smoke_checks = {c["name"]: c["ok"] for c in checks if c["step"] == "smoke"}
    assert smoke_checks["qwen2-tiny:loss_decreases"] and smoke_checks["qwen3-tiny:loss_decreases"]
    assert row["dtype"] == "fp32" and row["attention"] == "sdpa"
    assert row["device"]["kind"] == "cpu"
    assert row["note"] == "cpu step only: no GPU on this host"
    md = (project / "build" / "reports" / "smoke.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith(f"| `{IMAGE}` |"))
    assert "| pass | cpu" in line and "| fp32 | sdpa |" in line and "cpu step only" in line
    assert "smoke summary" in proc.stderr
    assert (project / "build" / "logs" / "smoke" / "cpu-fp32.smoke.log").is_file()
    assert leftovers(project) == []


def test_plain_docker_run_prints_one_json_line(docker_engine: str, built_cpu: Built) -> None:
    proc = docker(
        "run", "--rm", IMAGE, "qwen-ft-runtime", "smoke", "--steps", "2", "--tiny", "qwen2-tiny", timeout=300
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    payload = json.loads(lines[0])
    assert payload["entry"] == "smoke" and payload["ok"] is True
    assert payload["dtype"] == "fp32" and payload["attn_implementation"] == "sdpa"
    assert payload["device"]["type"] == "cpu"
    assert [r["model"] for r in payload["runs"]] == ["qwen2-tiny"]
    assert payload["import_to_first_step_s"] > 0


def _rank_payload(*extra: str) -> dict[str, object]:
    proc = docker(
        "run", "--rm", IMAGE, "qwen-ft-runtime", "smoke", "--nproc", "2", "--steps", "2",
        "--tiny", "qwen2-tiny", *extra, timeout=600,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stdout + proc.stderr[-3000:]
    payload = json.loads(lines[0])
    assert isinstance(payload, dict)
    return payload


def test_two_cpu_ranks_in_the_cpu_image(docker_engine: str, built_cpu: Built) -> None:
    """`docker run --rm qwen-ft:cpu-fp32 qwen-ft-runtime smoke --nproc 2`: torchrun, gloo, DDP."""
    payload = _rank_payload()
    assert payload["ok"] is True and payload["world_size"] == 2
    assert payload["backend"] == "gloo" and payload["launcher"] == "torchrun"
    (run,) = payload["runs"]
    assert [r["rank"] for r in run["ranks"]] == [0, 1]
    assert all(r["step_time_s"] > 0 for r in run["ranks"])


def test_zero2_on_two_cpu_ranks_in_the_cpu_image(docker_engine: str, built_cpu: Built) -> None:
    """The cpu image carries DeepSpeed without ops: ZeRO-2 runs over gloo with torch's AdamW."""
    payload = _rank_payload("--deepspeed", "zero2")
    assert payload["ok"] is True and payload["world_size"] == 2 and payload["backend"] == "gloo"
    (run,) = payload["runs"]
    engine = run["deepspeed"]
    assert engine["stage"] == 2 and engine["accelerator"] == "cpu", engine
    assert run["losses"][-1] < run["losses"][0]


def test_host_smoke_passes_nproc_through(built_cpu: Built) -> None:
    project = built_cpu.project
    proc = cli(project, "smoke", "cpu", "--nproc", "2", "--steps", "2", "--rerun", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = only_image(project)
    assert row["world_size"] == 2 and row["backend"] == "gloo" and row["launcher"] == "torchrun"
    ranks = row["ranks"]
    assert isinstance(ranks, list) and {r["rank"] for r in ranks} == {0, 1}
    md = (project / "build" / "reports" / "smoke.md").read_text()
    assert "| 2 x gloo (torchrun): qwen2-tiny: r0 " in md  # ranks column: world size, backend, per-rank times
    bad = cli(project, "smoke", "cpu", "--nproc", "0", timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --nproc '0'")


def test_a_broken_contract_fails_with_exit_8_naming_the_check(built_cpu: Built) -> None:
    project = built_cpu.project
    # The image removes triton; an ENV that says to keep it breaks the contract.
    proc = cli(project, "smoke", "cpu", "--steps", "2", "--env", "QWEN_FT_TRITON=keep", timeout=600)
    assert proc.returncode == 8, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 1 images failed smoke: cpu-fp32 (contract:triton)"), last
    assert "Traceback" not in proc.stderr
    row = only_image(project)
    assert row["ok"] is False and row["failed_check"] == "contract:triton"
    assert row["failed_checks"] == ["contract:triton"], "the smoke step itself still passed"
    md = (project / "build" / "reports" / "smoke.md").read_text()
    assert "**FAIL**" in md and "contract:triton: **FAILED**" in md
    assert leftovers(project) == []


def test_timeout_kills_and_removes_the_container(built_cpu: Built) -> None:
    project = built_cpu.project
    proc = cli(project, "smoke", "cpu", "--timeout", "1", timeout=300)
    assert proc.returncode == 8, proc.stdout + proc.stderr
    row = only_image(project)
    assert row["failed_checks"] == ["contract:timeout", "smoke:timeout"]
    steps = row["steps"]
    assert isinstance(steps, dict)
    assert steps["smoke"]["timed_out"] and steps["smoke"]["error"] == "timed out after 1 s; killed"
    assert leftovers(project) == []


def test_model_is_mounted_read_only(tmp_path: Path, built_cpu: Built) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    make = (
        "from qwen_ft_runtime.model import build_tiny; from qwen_ft_runtime.data import build_tokenizer; "
        "build_tiny('qwen2-tiny', 'sdpa', 'fp32', seed=0).save_pretrained('/out'); "
        "build_tokenizer().save_pretrained('/out')"
    )
    docker("run", "--rm", "-v", f"{ckpt}:/out", IMAGE, "python", "-c", make, timeout=300)
    assert (ckpt / "config.json").is_file()
    before = sorted(p.name for p in ckpt.iterdir())
    project = built_cpu.project
    proc = cli(project, "smoke", "cpu", "--steps", "3", "--model", str(ckpt), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = only_image(project)["runs"]
    assert isinstance(runs, list)
    assert [r["model"] for r in runs] == ["/model"] and len(runs[0]["losses"]) == 3
    assert sorted(p.name for p in ckpt.iterdir()) == before
    commands = (project / "build" / "logs" / "commands.sh").read_text()
    assert f"-v {ckpt}:/model:ro" in commands
    assert leftovers(project) == []


def test_ctrl_c_removes_the_container_and_exits_130(built_cpu: Built) -> None:
    project = built_cpu.project
    env = {**os.environ, "QWEN_FT_DOCKER": DOCKER}
    argv = [sys.executable, "-m", "builder", "--matrix", str(project / "matrix.yaml"), "smoke", "cpu"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not leftovers(project, "--filter", "status=running"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no smoke container started"
            time.sleep(0.2)
        time.sleep(0.5)  # the CLI is now blocked in wait() on the running contract step
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: interrupted: the running container was removed"), lines
    assert "Traceback" not in stderr and stdout == ""
    assert leftovers(project) == []
