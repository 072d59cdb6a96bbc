"""doctor: host probing from recorded nvidia-smi output, driver advice, log signatures, bad input.

No GPU is needed: every probe goes through an injected runner or NVML loader.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder import cli, config, doctor, hostprobe, knowledge, resolve
from builder.config import MatrixConfig
from builder.errors import ConfigError
from builder.hostprobe import CmdResult, GpuInfo
from builder.knowledge import Knowledge

ROOT = Path(__file__).resolve().parent.parent
SMI = ROOT / "tests" / "fixtures" / "nvidia-smi"
LOGS = ROOT / "tests" / "fixtures" / "logs"


# ----------------------------------------------------------------------------- fakes


class FakeHost:
    """A command runner answering from a table; programs not in it are 'not installed'."""

    def __init__(self, answers: Mapping[str, CmdResult]) -> None:
        self.answers = dict(answers)
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> CmdResult | None:
        self.calls.append(list(argv))
        key = " ".join(argv)
        for prefix, result in self.answers.items():
            if key.startswith(prefix):
                return result
        return None


def smi_host(fixture: str, *, docker: str | None = "27.3.1", nvidia_runtime: bool = True) -> FakeHost:
    answers = {"nvidia-smi": CmdResult(0, (SMI / fixture).read_text(), "")}
    if docker:
        answers["docker version"] = CmdResult(0, docker + "\n", "")
        runtimes = '{"nvidia":{"path":"nvidia-container-runtime"},"runc":{"path":"runc"}}'
        answers["docker info"] = CmdResult(0, runtimes if nvidia_runtime else '{"runc":{}}', "")
    return FakeHost(answers)


def no_nvml() -> Any:
    raise ImportError("No module named 'pynvml'")


def never(_: str) -> str | None:
    return None


def x86() -> str:
    return "x86_64"


@pytest.fixture(scope="module")
def res(matrix: MatrixConfig, kb: Knowledge) -> resolve.Resolution:
    return resolve.resolve(matrix, kb)


def report_for(
    kb: Knowledge,
    res: resolve.Resolution,
    runner: Callable[[Sequence[str]], CmdResult | None],
    **kw: Any,
) -> doctor.Report:
    return doctor.run(kb, res, res.cells, runner=runner, nvml_loader=no_nvml, which=never, machine=x86, **kw)


# ----------------------------------------------------------------------------- nvidia-smi parsing


@pytest.mark.parametrize(
    ("fixture", "names", "sm", "driver", "memory"),
    [
        ("v100.csv", ["Tesla V100-SXM2-32GB"] * 4, 70, "535.104.05", 32768),
        ("t4.csv", ["Tesla T4"], 75, "535.104.05", 15360),
        ("a100.csv", ["NVIDIA A100-SXM4-80GB"] * 2, 80, "550.54.15", 81920),
        ("h100.csv", ["NVIDIA H100 80GB HBM3"], 90, "570.86.15", 81559),
    ],
)
def test_parse_recorded_nvidia_smi(fixture: str, names: list[str], sm: int, driver: str, memory: int) -> None:
    gpus, bad = hostprobe.parse_nvidia_smi((SMI / fixture).read_text())
    assert bad == []
    assert [g.name for g in gpus] == names
    assert [g.index for g in gpus] == list(range(len(names)))
    assert {g.sm for g in gpus} == {sm}
    assert {g.driver for g in gpus} == {driver}
    assert {g.memory_mib for g in gpus} == {memory}


@pytest.mark.parametrize(
    ("text", "sm"), [("7.0", 70), ("8.9", 89), ("10.0", 100), ("12.1", 121), ("[N/A]", None)]
)
def test_compute_cap(text: str, sm: int | None) -> None:
    assert hostprobe.parse_compute_cap(text) == sm


def test_unreadable_lines_are_reported_not_fatal() -> None:
    gpus, bad = hostprobe.parse_nvidia_smi("0, Tesla T4, 7.5, 535.104.05, 15360 MiB\ngarbage\n")
    assert [g.name for g in gpus] == ["Tesla T4"]
    assert bad == ["garbage"]


def test_old_driver_without_compute_cap_falls_back_to_names(kb: Knowledge, res: resolve.Resolution) -> None:
    host = FakeHost(
        {
            "nvidia-smi --query-gpu=index,name,compute_cap": CmdResult(
                2, 'Field "compute_cap" is not a valid field to query.\n', ""
            ),
            "nvidia-smi --query-gpu=index,name,driver_version": CmdResult(
                0, (SMI / "v100-r470-no-compute-cap.csv").read_text(), ""
            ),
        }
    )
    report = report_for(kb, res, host)
    (gpu,) = report.gpus
    assert gpu.gpu.sm is None and gpu.target == "v100"
    assert any("from the name" in n for n in gpu.notes)
    assert any("compute_cap" in n for n in report.host.notes)
    # R470 is below CUDA 12's floor (525.60.13): the fallback is a CUDA 11.8 cell.
    assert gpu.driver_ok is False
    assert gpu.fallback is not None and gpu.fallback.cell.spec.cuda == "11.8"
    assert gpu.fallback.min_driver == "450.80.02"


def test_nvidia_smi_failing_means_no_gpu(kb: Knowledge, res: resolve.Resolution) -> None:
    msg = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure ..."
    report = report_for(kb, res, FakeHost({"nvidia-smi": CmdResult(9, msg + "\n", "")}))
    assert report.host.source == "none" and report.gpus == ()
    assert report.host.problem is not None and "couldn't communicate" in report.host.problem
    assert report.cpu is not None and report.cpu.image == "cpu-fp32"


# ----------------------------------------------------------------------------- NVML


class FakeNVMLError(Exception):
    pass


def fake_pynvml(gpus: list[tuple[str, tuple[int, int], int]], driver: str = "570.86.15") -> types.ModuleType:
    nv = types.ModuleType("pynvml")
    nv.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    calls: dict[str, int] = {"init": 0, "shutdown": 0}
    nv.calls = calls  # type: ignore[attr-defined]

    def init() -> None:
        calls["init"] += 1

    def shutdown() -> None:
        calls["shutdown"] += 1

    nv.nvmlInit = init  # type: ignore[attr-defined]
    nv.nvmlShutdown = shutdown  # type: ignore[attr-defined]
    nv.nvmlSystemGetDriverVersion = lambda: driver.encode()  # type: ignore[attr-defined]  # old API: bytes
    nv.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    nv.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nv.nvmlDeviceGetName = lambda h: gpus[h][0]  # type: ignore[attr-defined]
    nv.nvmlDeviceGetCudaComputeCapability = lambda h: gpus[h][1]  # type: ignore[attr-defined]
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=gpus[h][2] * 2**20)  # type: ignore[attr-defined]
    return nv


def test_nvml_is_preferred_and_shut_down() -> None:
    nv = fake_pynvml([("NVIDIA H100 80GB HBM3", (9, 0), 81559), ("NVIDIA L4", (8, 9), 23034)])
    host = FakeHost({})
    probe = hostprobe.probe_gpus(host, lambda: nv)
    assert probe.source == "nvml"
    assert [(g.name, g.sm, g.driver, g.memory_mib) for g in probe.gpus] == [
        ("NVIDIA H100 80GB HBM3", 90, "570.86.15", 81559),
        ("NVIDIA L4", 89, "570.86.15", 23034),
    ]
    assert nv.calls == {"init": 1, "shutdown": 1}
    assert host.calls == []  # nvidia-smi is not needed


def test_nvml_error_falls_back_to_nvidia_smi() -> None:
    nv = fake_pynvml([])

    def broken() -> None:
        raise FakeNVMLError("Driver Not Loaded")

    nv.nvmlInit = broken  # type: ignore[attr-defined]
    probe = hostprobe.probe_gpus(smi_host("t4.csv"), lambda: nv)
    assert probe.source == "nvidia-smi" and probe.gpus[0].name == "Tesla T4"


def test_no_driver_at_all_says_why() -> None:
    probe = hostprobe.probe_gpus(FakeHost({}), no_nvml)
    assert probe.source == "none"
    assert probe.problem == "nvidia-smi is not installed (no NVIDIA driver on this machine)"


# ----------------------------------------------------------------------------- docker probing


def test_docker_and_runtime_probe() -> None:
    version, runtime, notes = hostprobe.probe_docker(smi_host("t4.csv"), never)
    assert version == "27.3.1" and runtime == "docker info lists the nvidia runtime" and notes == []
    version, runtime, _ = hostprobe.probe_docker(smi_host("t4.csv", nvidia_runtime=False), never)
    assert runtime is None
    _, runtime, _ = hostprobe.probe_docker(
        smi_host("t4.csv", nvidia_runtime=False),
        lambda t: "/usr/bin/nvidia-ctk" if t == "nvidia-ctk" else None,
    )
    assert runtime == "nvidia-ctk is on PATH"
    version, runtime, notes = hostprobe.probe_docker(FakeHost({}), never)
    assert version is None and runtime is None and "not installed" in notes[0]
    down = FakeHost(
        {
            "docker version": CmdResult(
                1, "", "Cannot connect to the Docker daemon at unix:///var/run/docker.sock"
            )
        }
    )
    version, _, notes = hostprobe.probe_docker(down, never)
    assert version is None and "Cannot connect" in notes[0]


# ----------------------------------------------------------------------------- advice per GPU


@pytest.mark.parametrize(
    ("fixture", "target", "image", "tag"),
    [
        ("v100.csv", "v100", "v100-fp16", "qwen-ft:v100-fp16"),
        ("a100.csv", "a100", "a100-bf16", "qwen-ft:a100-bf16"),
        ("h100.csv", "h100", "h100-bf16", "qwen-ft:h100-bf16"),
    ],
)
def test_recorded_hosts_get_their_image(
    kb: Knowledge, res: resolve.Resolution, fixture: str, target: str, image: str, tag: str
) -> None:
    report = report_for(kb, res, smi_host(fixture))
    assert report.host.source == "nvidia-smi" and report.ok
    for gpu in report.gpus:
        assert (gpu.target, gpu.driver_ok, gpu.fallback) == (target, True, None)
        assert gpu.image is not None and (gpu.image.image, gpu.image.tag) == (image, tag)
        assert gpu.run_command == (
            f"docker run --gpus '\"device={gpu.gpu.index}\"' --rm -it {tag} qwen-ft-runtime smoke"
        )


def test_t4_on_535_falls_back_to_a_cuda12_cell(kb: Knowledge, res: resolve.Resolution) -> None:
    """t4's recommended image is cu130 (driver >= 580); R535 needs a CUDA 12 cell."""
    report = report_for(kb, res, smi_host("t4.csv"))
    (gpu,) = report.gpus
    assert gpu.image is not None and gpu.image.tag == "qwen-ft:t4-fp16"
    assert gpu.image.min_driver == "580.65.06" and gpu.driver_ok is False
    fb = gpu.fallback
    assert fb is not None and fb.cell.spec.cuda.startswith("12.") and fb.min_driver == "525.60.13"
    assert fb.built is False  # not in matrix.yaml: doctor says how to add it
    assert fb.explain_command().startswith("qwen-ft-images explain t4 --cuda 12.")
    cell = resolve.check(kb, res.config.targets["t4"], fb.cell.spec, dtype=None, origin="test")
    assert cell.valid  # the proposal is a cell `explain` accepts
    assert gpu.run_command is not None and fb.tag in gpu.run_command and report.ok
    assert any("include:" in n for n in gpu.notes)


def test_t4_on_r580_keeps_the_recommended_image(kb: Knowledge, res: resolve.Resolution) -> None:
    report = report_for(kb, res, FakeHost({}), assume_gpus=["T4"], assume_driver="580.95.05")
    (gpu,) = report.gpus
    assert gpu.driver_ok is True and gpu.fallback is None
    assert gpu.run_command is not None and "qwen-ft:t4-fp16 " in gpu.run_command


def test_built_pinned_image_is_preferred_over_a_new_cell(kb: Knowledge) -> None:
    """An older driver that fits an image already in the matrix gets that image (built=True)."""
    data = yaml.safe_load((ROOT / "matrix.yaml").read_text())
    data["include"].append(
        {"target": "t4", "cuda": "12.6", "torch": "2.8.0", "python": "3.10", "flash_attn": "none"}
    )
    cfg = config.parse(yaml.safe_dump(data), ROOT / "matrix.yaml")
    res2 = resolve.resolve(cfg, kb)
    report = report_for(kb, res2, FakeHost({}), assume_gpus=["T4"], assume_driver="535.104.05")
    fb = report.gpus[0].fallback
    assert fb is not None and fb.built and fb.image == "t4-fp16-cu126-torch2.8.0-py3.10"


def test_mixed_host_gets_an_answer_per_gpu(kb: Knowledge, res: resolve.Resolution) -> None:
    report = report_for(kb, res, smi_host("mixed.csv"))
    assert [(g.gpu.index, g.target) for g in report.gpus] == [(0, "v100"), (1, "a100")]
    v100, a100 = report.gpus
    assert v100.run_command is not None and "device=0" in v100.run_command and "v100-fp16" in v100.run_command
    assert a100.run_command is not None and "device=1" in a100.run_command and "a100-bf16" in a100.run_command


def test_blackwell_below_r570_has_no_image(kb: Knowledge, res: resolve.Resolution) -> None:
    report = report_for(kb, res, FakeHost({}), assume_gpus=["B200"], assume_driver="560.35.05")
    (gpu,) = report.gpus
    assert gpu.driver_ok is False and gpu.fallback is None and not gpu.usable and not report.ok
    assert any("upgrade the driver to >= 570.133.20" in n for n in gpu.notes)


def test_driver_unknown_is_not_a_failure(kb: Knowledge, res: resolve.Resolution) -> None:
    report = report_for(kb, res, FakeHost({}), assume_gpus=["sm_70"])
    (gpu,) = report.gpus
    assert gpu.driver_ok is None and gpu.usable and any("--assume-driver" in n for n in gpu.notes)


SMALL = """
targets:
  a10: {sm: 86}
  a100: {sm: 80}
  t4: {sm: 75}
  b200: {sm: 100}
  cpu: {sm: null, axes: {torch: ["2.13.0"], python: ["3.11"]}}
axes:
  cuda: ["12.6", "12.8", "13.0"]
  torch: ["2.8.0", "2.13.0"]
  python: ["3.10", "3.12"]
  flash_attn: ["2.8.3", "none"]
"""


@pytest.mark.parametrize(
    ("sm", "target"),
    [
        (89, "a10"),
        (86, "a10"),
        (87, "a10"),
        (80, "a100"),
        (75, "t4"),
        (103, "b200"),
        (90, None),
        (120, None),
        (70, None),
    ],
)
def test_binary_compatibility_mapping(sm: int, target: str | None) -> None:
    cfg = config.parse(SMALL, Path("matrix.yaml"))
    got, why = doctor.target_for_sm(cfg, sm)
    assert (got.name if got else None) == target
    if target and sm != cfg.targets[target].sm:
        assert "binary compatibility" in why


def test_unknown_gpu_name_maps_by_reported_sm(kb: Knowledge, res: resolve.Resolution) -> None:
    text = "0, NVIDIA Fancy Future GPU, 8.9, 570.86.15, 49152 MiB\n"
    report = report_for(kb, res, FakeHost({"nvidia-smi": CmdResult(0, text, "")}))
    (gpu,) = report.gpus
    assert gpu.target == "l4" and any("not in gpus.yaml" in n for n in gpu.notes)


def test_unknown_gpu_without_sm_is_reported(kb: Knowledge, res: resolve.Resolution) -> None:
    text = "0, Mystery Accelerator, [N/A], 570.86.15, 1024 MiB\n"
    report = report_for(kb, res, FakeHost({"nvidia-smi": CmdResult(0, text, "")}))
    (gpu,) = report.gpus
    assert gpu.target is None and not gpu.usable and "--assume-gpu" in gpu.notes[0]


@pytest.mark.parametrize(
    ("text", "sm"),
    [
        ("V100", 70),
        ("v100", 70),
        ("sm_70", 70),
        ("70", 70),
        ("8.6", 86),
        ("A10G", 86),
        ("RTX 4090", 89),
        ("A100", 80),
    ],
)
def test_assume_gpu_forms(kb: Knowledge, matrix: MatrixConfig, text: str, sm: int) -> None:
    assert doctor.parse_assumed_gpu(kb, matrix, text, 0, None).sm == sm


def test_assume_gpu_unknown_lists_known_names(kb: Knowledge, matrix: MatrixConfig) -> None:
    with pytest.raises(ConfigError, match=r"known GPUs: .*V100"):
        doctor.parse_assumed_gpu(kb, matrix, "Foo", 0, None)


@pytest.mark.parametrize(
    ("text", "problem"),
    [("abc", "not an NVIDIA driver"), ("535.x", "not an NVIDIA"), ("12.4", "CUDA version")],
)
def test_bad_driver(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        doctor.parse_driver(text)


def test_json_shape_is_stable(kb: Knowledge, res: resolve.Resolution) -> None:
    data = doctor.report_json(report_for(kb, res, smi_host("t4.csv")))
    assert set(data) == {"schema", "ok", "host", "gpus", "train", "cpu", "diagnoses"}
    assert set(data["host"]) == {
        "cpu_arch",
        "docker",
        "nvidia_runtime",
        "build",
        "driver",
        "source",
        "problem",
        "notes",
    }
    assert set(data["gpus"][0]) == {
        "index", "name", "sm", "memory_mib", "driver", "target", "mapping", "image", "tag",
        "driver_ok", "needs_driver", "fallback", "run_command", "usable", "notes",
    }  # fmt: skip
    assert set(data["gpus"][0]["fallback"]) == {"image", "tag", "min_driver", "built", "cell", "explain"}
    assert set(data["cpu"]) == {"image", "tag", "run_command"}
    assert data["host"]["source"] in hostprobe.SOURCES
    json.dumps(data)  # serialisable as is


def test_build_path_is_reported(
    kb: Knowledge, res: resolve.Resolution, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QWEN_FT_DOCKER", "/opt/fake/docker")
    monkeypatch.setenv("PATH", "/nonexistent")
    host = smi_host("t4.csv")
    host.answers["/opt/fake/docker buildx version"] = CmdResult(
        0, "github.com/docker/buildx v0.13.1 abc\n", ""
    )
    report = report_for(kb, res, host)
    assert report.build == "docker buildx build --load (/opt/fake/docker, buildx v0.13.1)"
    assert doctor.report_json(report)["host"]["build"] == report.build
    assert "build    docker buildx build --load (/opt/fake/docker, buildx v0.13.1)\n" in doctor.render_text(
        report
    )
    old = smi_host("t4.csv")
    old.answers["/opt/fake/docker version --format"] = CmdResult(0, "20.10.24+dfsg1\n", "")
    old.answers["/opt/fake/docker buildx"] = CmdResult(1, "", "docker: 'buildx' is not a docker command.")
    assert report_for(kb, res, old).build == (
        "DOCKER_BUILDKIT=1 docker build (/opt/fake/docker 20.10.24+dfsg1, built-in BuildKit)"
    )
    new = smi_host("t4.csv")
    new.answers["/opt/fake/docker version --format"] = CmdResult(0, "28.2.2\n", "")
    new.answers["/opt/fake/docker buildx"] = CmdResult(1, "", "docker: 'buildx' is not a docker command.")
    line = report_for(kb, res, new).build
    assert line is not None and line.startswith("none: /opt/fake/docker (28.2.2) has no buildx plugin")
    assert report_for(kb, res, FakeHost({})).build is None, "no docker client: no build line"


# ----------------------------------------------------------------------------- log signatures


def _fixtures() -> list[Path]:
    return sorted(LOGS.glob("*.log"))


def test_every_signature_has_a_fixture() -> None:
    ids = {s.id for s in doctor.load_signatures()}
    covered = {p.stem.split("--")[0] for p in _fixtures() if not p.name.startswith("_")}
    assert ids == covered


@pytest.mark.parametrize("path", [p for p in _fixtures() if not p.name.startswith("_")], ids=lambda p: p.stem)
def test_fixture_is_diagnosed(kb: Knowledge, res: resolve.Resolution, path: Path) -> None:
    text = path.read_text()
    assert re.match(r"# source: \S", text), "first line cites where the error text comes from"
    found = doctor.diagnose(text, kb, res.config, res.cells)
    assert [d.signature.id for d in found] == [path.stem.split("--")[0]]
    d = found[0]
    assert d.signature.cause and d.signature.fix and d.signature.source and d.line > 1


def test_clean_log_has_no_signature(kb: Knowledge, res: resolve.Resolution) -> None:
    assert doctor.diagnose((LOGS / "_clean-smoke-run.log").read_text(), kb, res.config, res.cells) == []


def test_diagnoses_name_images(kb: Knowledge, res: resolve.Resolution) -> None:
    def one(name: str) -> doctor.Diagnosis:
        (d,) = doctor.diagnose((LOGS / name).read_text(), kb, res.config, res.cells)
        return d

    assert set(one("flash-attn-pre-ampere.log").images) == {
        "qwen-ft:v100-fp16",
        "qwen-ft:v100-fp16-cu128-torch2.8.0-py3.10",
        "qwen-ft:t4-fp16",
    }
    assert "qwen-ft:t4-fp16" in one("bf16-pre-ampere--trainer.log").images
    kernel = one("no-kernel-image.log")
    assert kernel.groups["sm"] == "70" and "use qwen-ft:v100-fp16" in kernel.notes[0]
    container = one("driver-too-old--container.log")
    assert container.groups["cuda"] == "12.8" and "570.124.06" in container.notes[0]
    assert "CUDA 12.2" in one("driver-too-old--torch.log").notes[0]
    assert one("no-container-toolkit.log").images == ("qwen-ft:cpu-fp32",)
    assert all(i.endswith("bf16") for i in one("flash-attn-abi.log").images)


# ----------------------------------------------------------------------------- the command line


def run_cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *args: str,
    runner: Callable[[Sequence[str]], CmdResult | None] | None = None,
) -> tuple[int, str, str]:
    """`qwen-ft-images ARGS` in-process through main(), with the host probes faked."""
    monkeypatch.setattr(hostprobe, "system_runner", runner or FakeHost({}))
    monkeypatch.setattr(hostprobe, "import_pynvml", no_nvml)
    monkeypatch.setattr("shutil.which", never)
    monkeypatch.setattr(sys, "argv", ["qwen-ft-images", "-f", str(ROOT / "matrix.yaml"), *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_no_gpu_recommends_cpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "doctor")
    assert code == 0 and err == ""
    assert "none found: nvidia-smi is not installed (no NVIDIA driver on this machine)" in out
    assert "docker run --rm -it qwen-ft:cpu-fp32 qwen-ft-runtime smoke" in out


def test_cli_json_mixed_host(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(monkeypatch, capsys, "doctor", "--json", runner=smi_host("mixed.csv"))
    data = json.loads(out)
    assert code == 0 and data["ok"] and data["host"]["source"] == "nvidia-smi"
    assert [g["tag"] for g in data["gpus"]] == ["qwen-ft:v100-fp16", "qwen-ft:a100-bf16"]
    assert data["host"]["nvidia_runtime"] == "docker info lists the nvidia runtime"


def test_cli_log_diagnosis(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    log = LOGS / "triton-launcher-gcc.log"
    code, out, err = run_cli(monkeypatch, capsys, "doctor", "--log", str(log), "--assume-gpu", "V100")
    assert code == 0 and err == ""
    assert "diagnosis [triton-launcher-gcc]" in out and "QwenLM/Qwen#1199" in out


def test_cli_selectors_restrict_images(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        monkeypatch, capsys, "doctor", "--json", "--assume-gpu", "V100", "--assume-driver", "535.104.05",
        "v100-fp16-cu128-torch2.8.0-py3.10",
    )  # fmt: skip
    assert code == 0 and json.loads(out)["gpus"][0]["image"] == "v100-fp16-cu128-torch2.8.0-py3.10"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--assume-gpu", "Foo"), 2, "is neither a known GPU nor an SM"),
        (("--assume-gpu", "T4", "--assume-driver", "latest"), 2, "is not an NVIDIA driver version"),
        (("--assume-driver", "535.104.05"), 2, "needs a GPU to plan for"),
        (("--log", str(LOGS / "_clean-smoke-run.log")), 1, "no known failure signature found"),
        (("--log", str(LOGS / "missing.log")), 2, "no such file"),
        (("no-such-image",), 2, "matches no image"),
        (("--assume-gpu", "B200", "--assume-driver", "560.35.05"), 1, None),
    ],
)
def test_cli_bad_input_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    code: int,
    message: str | None,
) -> None:
    got, _, err = run_cli(monkeypatch, capsys, "doctor", *args)
    assert got == code
    if message is None:
        assert err == ""  # a GPU without a usable image: reported on stdout, exit 1
    else:
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err
        assert "Traceback" not in err


def test_doctor_is_fast(kb: Knowledge, res: resolve.Resolution) -> None:
    """The fallback search runs resolve.check over hundreds of cells; keep it interactive."""
    import time

    started = time.perf_counter()
    report_for(kb, res, FakeHost({}), assume_gpus=["T4", "V100", "B200"], assume_driver="470.82.01")
    assert time.perf_counter() - started < 5.0


def test_gpu_info_defaults() -> None:
    assert GpuInfo(0, "x", None, None).memory_mib is None


def test_assume_driver_overrides_the_detected_one(kb: Knowledge, res: resolve.Resolution) -> None:
    report = report_for(kb, res, smi_host("t4.csv"), assume_driver="580.95.05")
    assert report.gpus[0].driver_ok is True and report.host.source == "nvidia-smi"
    assert "driver assumed 580.95.05 (detected 535.104.05)" in report.host.notes


def test_gpu_without_target_says_how_to_add_one(kb: Knowledge, res: resolve.Resolution) -> None:
    report = report_for(kb, res, FakeHost({}), assume_gpus=["RTX 5090"], assume_driver="575.57.08")
    (gpu,) = report.gpus
    assert gpu.target is None and not gpu.usable and not report.ok
    assert any("`rtx5090: {sm: 120}`" in n for n in gpu.notes)


def test_images_disable_the_base_images_driver_requirement() -> None:
    """nvidia/cuda bases ask the container runtime for their toolkit's driver; the wheels need less."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    assert "ENV NVIDIA_DISABLE_REQUIRE=1" in (root / "images" / "a10-bf16" / "Dockerfile").read_text()
    assert "NVIDIA_DISABLE_REQUIRE" not in (root / "images" / "cpu-fp32" / "Dockerfile").read_text()


# ----------------------------------------------------------------------------- platforms (#12)


@pytest.mark.parametrize(
    ("arch", "gpu", "image", "platform_flag", "note"),
    [
        ("aarch64", "NVIDIA GH200 480GB", "h100-bf16-arm64", "--platform linux/arm64", None),
        ("aarch64", "NVIDIA GB200", "b200-bf16-arm64", "--platform linux/arm64", None),
        ("x86_64", "NVIDIA GH200 480GB", "h100-bf16", "", "is a Grace (aarch64) host"),
        ("x86_64", "H100", "h100-bf16", "", None),
    ],
)
def test_the_cpu_architecture_picks_the_platform(
    arch: str, gpu: str, image: str, platform_flag: str, note: str | None
) -> None:
    kb = knowledge.load()
    res = resolve.resolve(config.load(ROOT / "matrix.yaml"), kb)
    report = doctor.run(
        kb,
        res,
        res.cells,
        assume_gpus=[gpu],
        assume_arch=arch,
        runner=lambda argv: None,
        machine=lambda: "x86_64",
    )
    (g,) = report.gpus
    assert g.image is not None and g.image.image == image
    assert g.run_command is not None and platform_flag in g.run_command
    assert g.run_command.endswith("qwen-ft:" + image.removesuffix("-arm64") + " qwen-ft-runtime smoke")
    if note:
        assert any(note in n for n in g.notes)
    if arch == "aarch64":
        assert any("this host is x86_64" in n for n in report.host.notes)
        assert report.cpu is not None and report.cpu.image == "cpu-fp32-arm64"


def test_a_target_without_the_platform_is_a_clear_refusal() -> None:
    kb = knowledge.load()
    res = resolve.resolve(config.load(ROOT / "matrix.yaml"), kb)
    report = doctor.run(
        kb, res, res.cells, assume_gpus=["A100"], assume_arch="aarch64", runner=lambda argv: None
    )
    (g,) = report.gpus
    assert not g.usable and g.run_command is None
    assert any("has no linux/arm64 image" in n and "--platform linux/arm64" in n for n in g.notes)


def test_bad_arch_is_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "builder", "doctor", "--assume-arch", "sparc"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --assume-arch 'sparc' is not a CPU architecture; use one of x86_64, aarch64"
    ]


# ----------------------------------------------------------------------------- finding 8: --log input


def _one_line_cli(*args: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(
        [sys.executable, "-m", "builder", "doctor", "--assume-gpu", "V100", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda tmp: Path("/dev/zero"), "not a regular file"),
        (lambda tmp: tmp, "directory"),
        (lambda tmp: (os.mkfifo(tmp / "fifo"), tmp / "fifo")[1], "FIFO"),
    ],
    ids=["dev-zero", "directory", "fifo"],
)
def test_log_that_is_not_a_regular_file_is_refused_at_once(
    tmp_path: Path, make: Callable[[Path], Path], fragment: str
) -> None:
    path = make(tmp_path)
    proc = _one_line_cli("--log", str(path))  # the 60 s timeout is the "hangs forever" check
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: --log {path}: ") and fragment in lines[0], lines[0]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig", "utf-32"])
def test_utf16_log_with_bom_is_diagnosed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], encoding: str
) -> None:
    text = (LOGS / "triton-launcher-gcc.log").read_text(encoding="utf-8")
    log = tmp_path / "powershell.log"
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data
    log.write_bytes(data)
    code, out, err = run_cli(monkeypatch, capsys, "doctor", "--log", str(log), "--assume-gpu", "V100")
    assert code == 0 and err == "", err
    assert "diagnosis [triton-launcher-gcc]" in out


def test_big_log_is_read_from_its_tail(tmp_path: Path) -> None:
    from builder import doctor

    log = tmp_path / "big.log"
    log.write_bytes(
        b"\xff\xfe" + ("x" * 1000 + "\n").encode("utf-16-le") * 50 + "the end\n".encode("utf-16-le")
    )
    text = doctor.read_log(log, limit=1001)
    assert len(text) <= 501 and text.endswith("the end\n")


# ----------------------------------------------------------------------------- the training line


def test_training_line_uses_every_gpu_with_the_container_flags(
    kb: Knowledge, res: resolve.Resolution
) -> None:
    report = report_for(kb, res, smi_host("v100.csv"))
    (train,) = report.train
    assert train.gpus == (0, 1, 2, 3) and train.tag == "qwen-ft:v100-fp16"
    cmd = train.command
    assert cmd.startswith("docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 ")
    assert '-v "$MODEL_DIR":/model:ro -v "$DATA_DIR":/data:ro -v "$OUTPUT_DIR":/output ' in cmd
    assert cmd.endswith(
        "qwen-ft:v100-fp16 qwen-ft-runtime train --model /model --data /data/train.jsonl "
        "--output /output --nproc all --deepspeed zero2"
    )
    assert {f.flag for f in kb.deepspeed.run_flags} <= set(cmd.split(" ")) | {
        "--ulimit memlock=-1",
        "--ulimit stack=67108864",
    }
    assert all(f.source for f in kb.deepspeed.run_flags)
    text = doctor.render_text(report)
    assert "train    LoRA across GPUs 0,1,2,3 (4 ranks, DeepSpeed ZeRO-2) with qwen-ft:v100-fp16:" in text
    assert doctor.report_json(report)["train"] == [
        {"gpus": [0, 1, 2, 3], "tag": "qwen-ft:v100-fp16", "command": cmd}
    ]


def test_mixed_gpus_get_one_training_line_per_image(kb: Knowledge, res: resolve.Resolution) -> None:
    report = report_for(kb, res, smi_host("mixed.csv"))
    assert [(t.gpus, t.tag) for t in report.train] == [
        ((0,), "qwen-ft:v100-fp16"),
        ((1,), "qwen-ft:a100-bf16"),
    ]
    assert report.train[0].command.startswith("docker run --gpus '\"device=0\"' --ipc=host ")


def test_no_gpu_no_training_line(kb: Knowledge, res: resolve.Resolution) -> None:
    report = report_for(kb, res, lambda argv: None)
    assert report.train == () and "train    " not in doctor.render_text(report)
