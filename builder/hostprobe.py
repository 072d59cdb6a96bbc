"""Host probing for `doctor`: GPUs, driver, CPU architecture, Docker and the NVIDIA runtime.

Every external command goes through an injectable `Runner`, and NVML through an
injectable loader, so tests feed recorded `nvidia-smi` output and fake NVML modules
without a GPU.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from packaging.version import InvalidVersion, Version

SOURCES = ("nvml", "nvidia-smi", "assumed", "none")  # HostInfo.source
NVIDIA_SMI_FIELDS = ("index", "name", "compute_cap", "driver_version", "memory.total")
# Drivers before ~R510 do not know `compute_cap` (huggingface/candle#733,
# NVIDIA/TensorRT-LLM#735); without it the SM comes from the GPU name.
NVIDIA_SMI_FIELDS_OLD = ("index", "name", "driver_version", "memory.total")


@dataclass(frozen=True)
class CmdResult:
    returncode: int
    stdout: str
    stderr: str

    def first_line(self) -> str:
        for text in (self.stderr, self.stdout):
            for line in text.splitlines():
                if line.strip():
                    return line.strip()
        return f"exit status {self.returncode}"


# A runner returns None when the program is not installed, so callers can tell
# "absent" from "present but failing" without catching exceptions.
Runner = Callable[[Sequence[str]], CmdResult | None]


def system_runner(argv: Sequence[str], timeout: float = 15.0) -> CmdResult | None:
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return CmdResult(124, "", f"{argv[0]} did not answer within {timeout:.0f} s")
    except OSError as exc:
        return CmdResult(126, "", f"{argv[0]}: {exc.strerror}")
    return CmdResult(done.returncode, done.stdout, done.stderr)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    sm: int | None
    driver: str | None
    memory_mib: int | None = None


@dataclass(frozen=True)
class GpuProbe:
    source: str  # nvml | nvidia-smi | assumed | none
    gpus: tuple[GpuInfo, ...]
    problem: str | None = None  # why no GPU was found
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class HostInfo:
    cpu_arch: str
    docker: str | None
    nvidia_runtime: str | None  # what shows the runtime is there, or None
    driver: str | None
    source: str
    gpus: tuple[GpuInfo, ...]
    problem: str | None = None
    notes: tuple[str, ...] = ()


def parse_compute_cap(text: str) -> int | None:
    """'7.0' -> 70, '10.0' -> 100, '12.1' -> 121; '[N/A]' -> None."""
    m = re.fullmatch(r"\s*(\d+)\.(\d)\s*", text)
    return int(m.group(1)) * 10 + int(m.group(2)) if m else None


def _memory_mib(text: str) -> int | None:
    m = re.fullmatch(r"\s*(\d+)\s*MiB\s*", text)
    return int(m.group(1)) if m else None


def parse_nvidia_smi(text: str, fields: Sequence[str] = NVIDIA_SMI_FIELDS) -> tuple[list[GpuInfo], list[str]]:
    """Parse `--format=csv,noheader` output. Returns the GPUs and the lines it could not read."""
    gpus: list[GpuInfo] = []
    bad: list[str] = []
    rows = csv.reader((line for line in text.splitlines() if line.strip()), skipinitialspace=True)
    for row in rows:
        values = dict(zip(fields, (v.strip() for v in row), strict=False))
        if len(row) != len(fields) or not values["index"].isdigit() or not values["name"]:
            bad.append(", ".join(row))
            continue
        driver = values["driver_version"]
        gpus.append(
            GpuInfo(
                index=int(values["index"]),
                name=values["name"],
                sm=parse_compute_cap(values.get("compute_cap", "")),
                driver=driver if driver_version(driver) else None,
                memory_mib=_memory_mib(values["memory.total"]),
            )
        )
    return gpus, bad


def _nvidia_smi_argv(fields: Sequence[str]) -> list[str]:
    return ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"]


def probe_nvidia_smi(run: Runner) -> GpuProbe:
    res = run(_nvidia_smi_argv(NVIDIA_SMI_FIELDS))
    if res is None:
        return GpuProbe("none", (), "nvidia-smi is not installed (no NVIDIA driver on this machine)")
    fields: Sequence[str] = NVIDIA_SMI_FIELDS
    notes: list[str] = []
    if res.returncode != 0 and "compute_cap" in (res.stdout + res.stderr):
        fields = NVIDIA_SMI_FIELDS_OLD
        res = run(_nvidia_smi_argv(fields)) or res
        notes.append("this driver's nvidia-smi cannot report compute_cap; SMs come from the GPU names")
    if res.returncode != 0:
        # e.g. "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver"
        return GpuProbe("none", (), f"nvidia-smi failed: {res.first_line()}")
    gpus, bad = parse_nvidia_smi(res.stdout, fields)
    notes += [f"could not read nvidia-smi line {line!r}" for line in bad]
    if not gpus:
        return GpuProbe("none", (), "nvidia-smi lists no GPU", tuple(notes))
    return GpuProbe("nvidia-smi", tuple(gpus), None, tuple(notes))


def _text(value: Any) -> str:
    # Older nvidia-ml-py releases return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else str(value)


def import_pynvml() -> Any:
    """nvidia-ml-py's module, imported only when doctor runs (it is an optional dependency)."""
    return importlib.import_module("pynvml")


def probe_nvml(load: Callable[[], Any]) -> GpuProbe | str:
    """GPUs through NVML, or a string saying why NVML is not usable."""
    try:
        nv = load()
    except ImportError:
        return "pynvml (nvidia-ml-py) is not installed"
    error: type[BaseException] = getattr(nv, "NVMLError", Exception)
    try:
        nv.nvmlInit()
    except error as exc:  # no libnvidia-ml.so, or the driver is not loaded
        return f"NVML: {exc}"
    try:
        driver = _text(nv.nvmlSystemGetDriverVersion())
        gpus = []
        for i in range(int(nv.nvmlDeviceGetCount())):
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            major, minor = nv.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(
                GpuInfo(
                    index=i,
                    name=_text(nv.nvmlDeviceGetName(handle)),
                    sm=int(major) * 10 + int(minor),
                    driver=driver,
                    memory_mib=int(nv.nvmlDeviceGetMemoryInfo(handle).total) // 2**20,
                )
            )
    except error as exc:
        return f"NVML: {exc}"
    finally:
        with contextlib.suppress(error):
            nv.nvmlShutdown()
    if not gpus:
        return "NVML lists no GPU"
    return GpuProbe("nvml", tuple(gpus))


def probe_gpus(run: Runner, nvml_loader: Callable[[], Any] = import_pynvml) -> GpuProbe:
    """NVML first (no subprocess, exact SM), then nvidia-smi."""
    nvml = probe_nvml(nvml_loader)
    if isinstance(nvml, GpuProbe):
        return nvml
    smi = probe_nvidia_smi(run)
    if smi.source == "none" and nvml != "pynvml (nvidia-ml-py) is not installed":
        return replace(smi, problem=f"{smi.problem}; {nvml}")
    return smi


def probe_docker(run: Runner, which: Callable[[str], str | None]) -> tuple[str | None, str | None, list[str]]:
    """(server version, NVIDIA runtime evidence, notes)."""
    notes: list[str] = []
    version = None
    res = run(["docker", "version", "--format", "{{.Server.Version}}"])
    if res is None:
        notes.append("docker is not installed: install Docker Engine to run the images")
    elif res.returncode != 0 or not res.stdout.strip():
        notes.append(f"the Docker daemon did not answer: {res.first_line()}")
    else:
        version = res.stdout.strip()
    runtime = None
    if version is not None:
        info = run(["docker", "info", "--format", "{{json .Runtimes}}"])
        if info is not None and info.returncode == 0 and '"nvidia' in info.stdout:
            runtime = "docker info lists the nvidia runtime"
    if runtime is None:
        # `--gpus` works through the toolkit's hook even without a registered runtime.
        for tool in ("nvidia-ctk", "nvidia-container-toolkit", "nvidia-container-runtime-hook"):
            if which(tool):
                runtime = f"{tool} is on PATH"
                break
    return version, runtime, notes


def probe_host(
    run: Runner = system_runner,
    *,
    nvml_loader: Callable[[], Any] = import_pynvml,
    which: Callable[[str], str | None] = shutil.which,
    machine: Callable[[], str] = platform.machine,
    probe_gpu: bool = True,
) -> HostInfo:
    gpus = probe_gpus(run, nvml_loader) if probe_gpu else GpuProbe("assumed", ())
    docker, runtime, notes = probe_docker(run, which)
    drivers = sorted({g.driver for g in gpus.gpus if g.driver})
    return HostInfo(
        cpu_arch=machine() or "unknown",
        docker=docker,
        nvidia_runtime=runtime,
        driver=drivers[0] if drivers else None,
        source=gpus.source,
        gpus=gpus.gpus,
        problem=gpus.problem,
        notes=gpus.notes + tuple(notes),
    )


def driver_version(text: str) -> Version | None:
    if not re.fullmatch(r"\d+(\.\d+){0,2}", text.strip()):
        return None
    try:
        return Version(text.strip())
    except InvalidVersion:  # pragma: no cover - the regex admits only valid versions
        return None
