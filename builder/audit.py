"""Kernel-coverage audit: can the image's target GPU run every CUDA binary in it?

Three stages, each testable alone:

* tools (`find_cuobjdump`): NVIDIA's cuobjdump from the `nvidia-cuda-cuobjdump` wheel (a
  pinned download, a --wheelhouse, or --cuobjdump PATH), unpacked under build/cache/;
* collecting (`collect`): a throwaway container of the image, with cuobjdump and
  builder/audit_probe.py bind-mounted read-only, lists every binary with device code, so the
  image never grows and its own filesystem is what gets read;
* judging (`parse_listing`, `judge_binary`, pure): NVIDIA's compatibility rules. SASS for
  sm_XY runs on sm_XZ with Z >= Y (same major); arch-specific `sm_XYa` only on sm_XY; PTX
  for compute_XY is JIT-compiled by the driver for any SM at or above XY.

`audit_image` runs all three for one image; `smoke` calls it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from packaging.version import InvalidVersion, Version

from builder import contract
from builder.engine import ContainerEngine, parse_json_lines
from builder.errors import AuditFailed, ConfigError, EngineError
from builder.knowledge.waivers import Waiver, load_waivers

if TYPE_CHECKING:
    from builder.project import Project

MOUNT = "/opt/qwen-ft-audit"
DEFAULT_TIMEOUT_S = 900.0

# cuobjdump ships on PyPI only from CUDA 13.2 on (there is no nvidia-cuda-cuobjdump-cu12).
# 13.x still lists sm_50+ cubins and PTX: listing reads fatbinary headers, it compiles nothing.
CUOBJDUMP_PACKAGE = "nvidia-cuda-cuobjdump"
CUOBJDUMP_VERSION = "13.4.92"
# sha256 of the manylinux2014 wheels as pip downloaded them from PyPI on 2026-11-29.
CUOBJDUMP_SHA256 = {
    "x86_64": "fb72ca80d0cdd8f5e8e232ce17d3c5aa2a37c3153bb8ef4e010010ed4fdef6c5",
    "aarch64": "ed9ffbe59069e7ff94631ab4e279e5af7ee88ddafdf4c23f4a94d187f1470f03",
}
_DOCKER_ARCH = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}
_WHEEL_MEMBER = re.compile(r"^nvidia/cu\d+/bin/cuobjdump$")


class AuditEngine(ContainerEngine, Protocol):
    """What the audit needs from an engine (DockerEngine; tests use a fake)."""

    def image_architecture(self, ref: str) -> str | None: ...


# ----------------------------------------------------------------------------- architectures


@dataclass(frozen=True, order=True)
class Arch:
    """One compile target: sm 70 = 7.0, 120 = 12.0, 103 = 10.3; variant "" / "a" / "f"."""

    sm: int
    variant: str = ""  # "a": this SM only; "f": this family (same major, same or later minor)

    @property
    def major(self) -> int:
        return self.sm // 10

    @property
    def minor(self) -> int:
        return self.sm % 10

    @property
    def sass(self) -> str:
        return f"sm_{self.sm}{self.variant}"

    @property
    def ptx(self) -> str:
        return f"compute_{self.sm}{self.variant}"


def parse_sm(value: str | int) -> int:
    """70, "70", "sm_70", "7.0" and "8.9" -> 70 / 89; 100, "10.0" -> 100; "12.1" -> 121."""
    text = str(value).strip().lower()
    m = re.fullmatch(r"(?:sm_?)?(\d{2,3})", text) or re.fullmatch(r"(\d{1,2})\.(\d)", text)
    if m is None:
        raise ConfigError(f"--sm {value!r}: expected an SM such as 70, sm_70 or 7.0")
    sm = int(m.group(1)) * 10 + int(m.group(2)) if m.lastindex == 2 else int(m.group(1))
    if not 30 <= sm < 1000:
        raise ConfigError(f"--sm {value!r}: expected an SM such as 70, sm_70 or 7.0")
    return sm


def sm_name(sm: int) -> str:
    return f"sm_{sm}"


def sass_runs_on(arch: Arch, target: int) -> bool:
    """Binary compatibility: same major and minor <= target's; sm_XYa only on sm_XY."""
    if arch.variant == "a":
        return arch.sm == target
    return contract.runs_on(arch.sm, target)


def ptx_jits_for(arch: Arch, target: int) -> bool:
    """PTX is forward compatible: compute_XY JIT-compiles for any SM >= XY (not for "a"/"f" ones)."""
    if arch.variant == "a":
        return arch.sm == target
    if arch.variant == "f":
        return sass_runs_on(arch, target)
    return (arch.major, arch.minor) <= (target // 10, target % 10)


# ----------------------------------------------------------------------------- parsing

_LIST_LINE = re.compile(r"^(?P<kind>ELF|PTX) file\s+\d+:\s*(?P<name>\S+)\s*$")
_ARCH_IN_NAME = re.compile(r"\.(?:sm|compute)_(?P<sm>\d+)(?P<variant>[af]?)\.(?:cubin|ptx)$")
NO_DEVICE_CODE = "does not contain device code"


@dataclass(frozen=True)
class Listing:
    """What one binary carries: entries per SASS arch and per PTX arch."""

    sass: Mapping[Arch, int] = field(default_factory=dict)
    ptx: Mapping[Arch, int] = field(default_factory=dict)
    unparsed: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.sass and not self.ptx

    def merged(self, other: Listing) -> Listing:
        sass = dict(self.sass)
        ptx = dict(self.ptx)
        for arch, n in other.sass.items():
            sass[arch] = sass.get(arch, 0) + n
        for arch, n in other.ptx.items():
            ptx[arch] = ptx.get(arch, 0) + n
        return Listing(sass, ptx, self.unparsed + other.unparsed)


def parse_listing(text: str) -> Listing:
    """`cuobjdump --list-elf --list-ptx FILE` stdout -> entries per arch.

    Lines look like `ELF file    1: libtorch_cuda.1.sm_70.cubin` and
    `PTX file    1: libcublas.1.sm_120.ptx` (the PTX's virtual arch is spelled sm_ there).
    """
    sass: dict[Arch, int] = {}
    ptx: dict[Arch, int] = {}
    unparsed: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        m = _LIST_LINE.match(line)
        arch_m = _ARCH_IN_NAME.search(m.group("name")) if m else None
        if m is None or arch_m is None:
            unparsed.append(line)
            continue
        arch = Arch(int(arch_m.group("sm")), arch_m.group("variant"))
        bucket = sass if m.group("kind") == "ELF" else ptx
        bucket[arch] = bucket.get(arch, 0) + 1
    return Listing(sass, ptx, tuple(unparsed))


def parse_embedded(data: Mapping[str, Any] | None) -> Listing:
    """The probe's `embedded` summary ({"entries": [[kind, sm, n], ...]}) as a Listing."""
    sass: dict[Arch, int] = {}
    ptx: dict[Arch, int] = {}
    for kind, sm, n in (data or {}).get("entries") or []:
        bucket = sass if kind == "sass" else ptx
        arch = Arch(int(sm))
        bucket[arch] = bucket.get(arch, 0) + int(n)
    return Listing(sass, ptx)


# ----------------------------------------------------------------------------- judging

OK, FAIL, WAIVED, ERROR = "ok", "fail", "waived", "error"


@dataclass(frozen=True)
class BinaryVerdict:
    path: str
    dist: str | None
    dist_version: str | None
    size: int
    listing: Listing
    embedded_fatbins: int
    status: str  # ok | fail | waived | error
    via: str | None  # what serves the target: "sm_70 SASS", "compute_52 PTX (JIT)"
    detail: str
    waiver: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in (OK, WAIVED)

    @property
    def short_path(self) -> str:
        return short_path(self.path)

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "dist": self.dist,
            "dist_version": self.dist_version,
            "size": self.size,
            "sass": {a.sass: n for a, n in sorted(self.listing.sass.items())},
            "ptx": {a.ptx: n for a, n in sorted(self.listing.ptx.items())},
            "embedded_fatbins": self.embedded_fatbins,
            "status": self.status,
            "via": self.via,
            "detail": self.detail,
            "waiver": self.waiver,
        }


def short_path(path: str) -> str:
    """Drop the interpreter prefix: .../site-packages/torch/lib/x.so -> torch/lib/x.so."""
    return re.sub(r"^.*/(?:site|dist)-packages/", "", path)


def needs(target: int) -> str:
    """What a binary must carry to run on `target`, in words."""
    major, minor = divmod(target, 10)
    sass = sm_name(target) if minor == 0 else f"one of sm_{major}0..sm_{target}"
    return f"SASS {sass} or PTX compute_{target} or lower"


def arch_summary(archs: Iterable[Arch], ptx: bool = False) -> str:
    names = [a.ptx if ptx else a.sass for a in sorted(archs)]
    return " ".join(names) if names else "none"


def judge_binary(
    target: int,
    path: str,
    listing: Listing,
    *,
    dist: str | None = None,
    dist_version: str | None = None,
    size: int = 0,
    embedded_fatbins: int = 0,
    error: str | None = None,
    waivers: Sequence[Waiver] = (),
) -> BinaryVerdict:
    """Pure: does this binary carry code that `target` runs (SASS) or can JIT (PTX)?"""

    def verdict(status: str, via: str | None, detail: str, waiver: str | None = None) -> BinaryVerdict:
        return BinaryVerdict(
            path, dist, dist_version, size, listing, embedded_fatbins, status, via, detail, waiver
        )

    if error is not None and listing.empty:
        return verdict(ERROR, None, error)
    exact = [a for a in listing.sass if a.sm == target]
    if exact:
        arch = max(exact, key=lambda a: listing.sass[a])
        return verdict(OK, f"{arch.sass} SASS", f"{listing.sass[arch]} {arch.sass} entries")
    compatible = [a for a in listing.sass if sass_runs_on(a, target)]
    if compatible:
        arch = max(compatible)
        return verdict(
            OK,
            f"{arch.sass} SASS",
            f"{listing.sass[arch]} {arch.sass} entries, binary compatible with {sm_name(target)}",
        )
    jit = [a for a in listing.ptx if ptx_jits_for(a, target)]
    if jit:
        arch = max(jit)
        return verdict(
            OK,
            f"{arch.ptx} PTX (JIT)",
            f"no SASS for {sm_name(target)}; {listing.ptx[arch]} {arch.ptx} PTX entries, "
            "JIT-compiled by the driver at first use (slow first launch)",
        )
    has = f"has SASS {arch_summary(listing.sass)}; PTX {arch_summary(listing.ptx, ptx=True)}"
    for waiver in waivers:
        if waiver.applies(dist, path, target):
            return verdict(WAIVED, None, f"{has}; waived ({waiver.id}): {waiver.reason}", waiver.id)
    return verdict(FAIL, None, f"{has}; {sm_name(target)} needs {needs(target)}")


def judge_probe(target: int, probe: Mapping[str, Any], waivers: Sequence[Waiver]) -> list[BinaryVerdict]:
    """Pure: the probe's JSON -> one verdict per binary with device code (others are dropped)."""
    out = []
    for b in probe.get("binaries") or []:
        listing = parse_listing(str(b.get("stdout") or ""))
        embedded = b.get("embedded") or None
        listing = listing.merged(parse_embedded(embedded))
        stderr = str(b.get("stderr") or "")
        rc = b.get("rc")
        if listing.empty and embedded is None and NO_DEVICE_CODE in stderr:
            continue  # a fatbinary section without entries: nothing runs on a GPU
        error = None
        if rc not in (None, 0):
            error = f"cuobjdump exit {rc}: {stderr.splitlines()[-1] if stderr else 'no message'}"
        out.append(
            judge_binary(
                target,
                str(b["path"]),
                listing,
                dist=b.get("dist"),
                dist_version=b.get("dist_version"),
                size=int(b.get("size") or 0),
                embedded_fatbins=int((embedded or {}).get("fatbins") or 0),
                error=error,
                waivers=waivers,
            )
        )
    return out


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class AuditResult:
    image: str  # what the user named: a cell id or an image ref
    ref: str
    image_id: str | None
    target: str | None  # the image's target label
    sm: int | None  # None: a CPU image, nothing to audit
    sm_source: str  # "label" | "--sm"
    binaries: tuple[BinaryVerdict, ...] = ()
    shared_objects: int = 0
    cuobjdump: str | None = None
    python: str | None = None
    seconds: float = 0.0
    note: str | None = None

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.binaries)

    @property
    def failures(self) -> list[BinaryVerdict]:
        return [b for b in self.binaries if not b.ok]

    def as_json(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for b in self.binaries:
            counts[b.status] = counts.get(b.status, 0) + 1
        return {
            "image": self.image,
            "ref": self.ref,
            "image_id": self.image_id,
            "target": self.target,
            "sm": self.sm,
            "sm_source": self.sm_source,
            "ok": self.ok,
            "note": self.note,
            "needs": needs(self.sm) if self.sm is not None else None,
            "counts": counts,
            "failed": [b.path for b in self.failures],
            "shared_objects": self.shared_objects,
            "cuobjdump": self.cuobjdump,
            "python": self.python,
            "seconds": round(self.seconds, 2),
            "binaries": [b.as_json() for b in self.binaries],
        }


def failure_lines(result: AuditResult) -> list[str]:
    """One line per failing binary: what it has, and what the target needs."""
    return [f"{result.image}: {b.short_path}: {b.detail}" for b in result.failures]


# ----------------------------------------------------------------------------- tools


def machine_of(docker_arch: str | None) -> str:
    machine = _DOCKER_ARCH.get((docker_arch or "amd64").lower())
    if machine is None:
        raise ConfigError(
            f"no cuobjdump for {docker_arch} images: NVIDIA publishes it for x86_64 and aarch64 only"
        )
    return machine


def wheel_filename(machine: str, version: str = CUOBJDUMP_VERSION) -> str:
    return f"nvidia_cuda_cuobjdump-{version}-py3-none-manylinux2014_{machine}.manylinux_2_17_{machine}.whl"


def download_command(machine: str, dest: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--platform",
        f"manylinux2014_{machine}",
        "--dest",
        str(dest),
        f"{CUOBJDUMP_PACKAGE}=={CUOBJDUMP_VERSION}",
    ]


def _wheel_version(path: Path) -> Version:
    try:
        return Version(path.name.split("-")[1])
    except (IndexError, InvalidVersion):
        return Version("0")


def _unpack(wheel: Path, dest: Path) -> Path:
    """Extract cuobjdump from the wheel into dest/ (atomically: a killed run leaves nothing)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if _WHEEL_MEMBER.match(n)), None)
            if member is None:
                raise ConfigError(f"{wheel}: no nvidia/cu*/bin/cuobjdump inside; is it the Linux wheel?")
            data = zf.read(member)
    except zipfile.BadZipFile:
        raise ConfigError(f"{wheel}: not a wheel (bad zip)") from None
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / ".cuobjdump.tmp"
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(dest / "cuobjdump")
    return dest / "cuobjdump"


def find_cuobjdump(
    machine: str,
    cache_dir: Path,
    *,
    wheelhouse: Path | None = None,
    cuobjdump: Path | None = None,
    run: Any = subprocess.run,
) -> Path:
    """A cuobjdump binary for `machine`: --cuobjdump, else the wheelhouse, else the cache, else PyPI."""
    if cuobjdump is not None:
        if not cuobjdump.is_file():
            raise ConfigError(f"--cuobjdump {cuobjdump}: no such file")
        return cuobjdump
    if wheelhouse is not None:
        if not wheelhouse.is_dir():
            raise ConfigError(f"--wheelhouse {wheelhouse}: no such folder")
        wheels = sorted(
            wheelhouse.glob(f"nvidia_cuda_cuobjdump-*{machine}*.whl"), key=_wheel_version, reverse=True
        )
        if not wheels:
            raise ConfigError(
                f"--wheelhouse {wheelhouse} holds no nvidia_cuda_cuobjdump wheel for {machine}; add "
                f"{wheel_filename(machine)} (pip download --no-deps --only-binary=:all: --platform "
                f"manylinux2014_{machine} {CUOBJDUMP_PACKAGE}=={CUOBJDUMP_VERSION})"
            )
        version = str(_wheel_version(wheels[0]))
        return _unpack(wheels[0], cache_dir / f"cuobjdump-{version}-{machine}")
    cached = cache_dir / f"cuobjdump-{CUOBJDUMP_VERSION}-{machine}" / "cuobjdump"
    if cached.is_file():
        return cached
    with tempfile.TemporaryDirectory(prefix="qwen-ft-cuobjdump-") as tmp:
        argv = download_command(machine, Path(tmp))
        try:
            proc = run(argv, capture_output=True, text=True, timeout=300, check=False)
            code, tail = proc.returncode, (proc.stderr or proc.stdout or "").strip().splitlines()
        except (OSError, subprocess.TimeoutExpired) as exc:
            code, tail = 1, [str(exc)]
        wheel = Path(tmp) / wheel_filename(machine)
        if code != 0 or not wheel.is_file():
            last = next((line for line in reversed(tail) if "ignored" not in line), "no output")
            raise ConfigError(
                f"the audit needs cuobjdump, and `pip download {CUOBJDUMP_PACKAGE}=={CUOBJDUMP_VERSION}` "
                f"failed ({last.strip()[:160]}); offline, pass --cuobjdump-wheelhouse DIR holding "
                f"{wheel_filename(machine)}, or --cuobjdump PATH"
            )
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != CUOBJDUMP_SHA256.get(machine):
            pinned = CUOBJDUMP_SHA256.get(machine, "")
            raise ConfigError(
                f"{wheel.name}: sha256 {digest[:16]}… is not the pinned {pinned[:16]}…; "
                "refusing to run it (pass --wheelhouse or --cuobjdump to use another build)"
            )
        return _unpack(wheel, cached.parent)


def stage_tools(cuobjdump: Path, cache_dir: Path) -> Path:
    """A folder holding exactly cuobjdump and the probe: the one bind mount the container gets."""
    tools = cache_dir / "mount"
    tools.mkdir(parents=True, exist_ok=True)
    probe = Path(__file__).with_name("audit_probe.py")
    for src, name in ((cuobjdump, "cuobjdump"), (probe, "audit_probe.py")):
        dst = tools / name
        if dst.exists() and dst.read_bytes() == src.read_bytes():
            continue
        tmp = tools / f".{name}.tmp"
        shutil.copyfile(src, tmp)
        tmp.chmod(0o755)
        tmp.replace(dst)
    return tools


# ----------------------------------------------------------------------------- running


def probe_argv() -> list[str]:
    return ["python3", f"{MOUNT}/audit_probe.py", "--cuobjdump", f"{MOUNT}/cuobjdump", "--skip", MOUNT]


def collect(
    engine: AuditEngine, ref: str, tools: Path, *, timeout: float, labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run the probe in a throwaway container of `ref`; its one JSON object."""
    run = engine.run_container(
        ref, probe_argv(), timeout=timeout, volumes={str(tools.resolve()): MOUNT}, labels=labels or {}
    )
    if run.timed_out:
        raise EngineError(f"audit of {ref} timed out after {timeout:g} s; raise --timeout")
    docs = [d for d in parse_json_lines(run.stdout) if d.get("probe") == 1]
    if run.exit_code != 0 or not docs:
        last = next((line for line in reversed(run.stderr.splitlines()) if line.strip()), "no output")
        hint = "; the image needs python3 on PATH" if "python3" in last and "not found" in last else ""
        raise EngineError(f"audit probe in {ref} failed (exit {run.exit_code}): {last.strip()[:200]}{hint}")
    return docs[-1]


def target_sm(ref: str, labels: Mapping[str, str] | None, sm: int | str | None) -> tuple[int | None, str]:
    """The SM to judge against and where it came from; one-line errors for foreign images."""
    if labels is None:
        raise ConfigError(f"image {ref} not found; build it first (qwen-ft-images build), or docker pull it")
    if sm is not None:
        return parse_sm(sm), "--sm"
    label = labels.get(contract.SM)
    if label is None:
        raise ConfigError(
            f"{ref} was not built by qwen-ft-images (no {contract.SM} label); pass --sm N to audit it anyway"
        )
    if label.strip().lower() in ("", "none"):
        return None, "label"
    try:
        return parse_sm(label), "label"
    except ConfigError:
        raise ConfigError(f"{ref}: label {contract.SM}={label!r} is not an SM; pass --sm N") from None


def audit_image(
    engine: AuditEngine,
    image_ref: str,
    sm: int | str | None = None,
    *,
    name: str | None = None,
    cache_dir: Path = Path("build/cache/audit"),
    wheelhouse: Path | None = None,
    cuobjdump: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    labels: Mapping[str, str] | None = None,
) -> AuditResult:
    """Audit one image against `sm` (default: its SM label).

    Raises ConfigError (exit 2) for a missing or foreign image or a missing cuobjdump, and
    EngineError (exit 5) when the probe cannot run; a failing verdict is in the result
    (`result.ok`), not raised, so callers decide.
    """
    start = time.monotonic()
    image_labels = engine.image_labels(image_ref)
    target, source = target_sm(image_ref, image_labels, sm)
    assert image_labels is not None
    result = AuditResult(
        image=name or image_ref,
        ref=image_ref,
        image_id=engine.image_id(image_ref),
        target=image_labels.get(contract.TARGET),
        sm=target,
        sm_source=source,
    )
    if target is None:
        return replace(result, note="cpu image: no target SM, nothing to audit (pass --sm to force)")
    machine = machine_of(engine.image_architecture(image_ref))
    tool = find_cuobjdump(machine, cache_dir, wheelhouse=wheelhouse, cuobjdump=cuobjdump)
    tools = stage_tools(tool, cache_dir)
    probe = collect(engine, image_ref, tools, timeout=timeout, labels=labels)
    return replace(
        result,
        binaries=tuple(judge_probe(target, probe, load_waivers())),
        shared_objects=int(probe.get("shared_objects") or 0),
        cuobjdump=str(probe.get("cuobjdump") or "") or None,
        python=probe.get("python"),
        seconds=time.monotonic() - start,
    )


# ----------------------------------------------------------------------------- reports


def report_json(results: Sequence[AuditResult], meta: Mapping[str, Any]) -> dict[str, Any]:
    return {**meta, "ok": all(r.ok for r in results), "images": [r.as_json() for r in results]}


def write_report(build: Path, report: Mapping[str, Any]) -> Path:
    """build/reports/audit.json. Entries for images not audited this time are kept (newest
    first), so auditing one image does not drop the others from the published report."""
    path = build / "reports" / "audit.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    images = list(report.get("images") or [])
    fresh = {(i.get("ref"), i.get("sm")) for i in images}
    with contextlib.suppress(OSError, ValueError, TypeError):
        old = json.loads(path.read_text())
        images += [i for i in old.get("images") or [] if (i.get("ref"), i.get("sm")) not in fresh]
    data = {**report, "images": images}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- the stage


def execute(
    project: Project,
    targets: Sequence[tuple[str, str]],
    sm: str | None,
    *,
    docker: str,
    wheelhouse: Path | None,
    cuobjdump: Path | None,
    timeout: float,
    on_image: Callable[[str, str, AuditResult | None], None],
) -> tuple[list[AuditResult], dict[str, Any]]:
    """Check every (name, ref) is built, audit each in turn, and return the results and report."""
    from builder.engine import CommandLog, DockerEngine

    engine = DockerEngine(docker, CommandLog(project.logs / "commands.sh"))
    # Not engine.check(): that also insists on BuildKit, which running a container does not need.
    engine_version = str(engine.client.version().get("Version", "unknown"))
    missing = [ref for _, ref in targets if engine.image_labels(ref) is None]
    if missing:
        names = " ".join(name for name, ref in targets if ref in missing and name != ref)
        hint = f"; run qwen-ft-images build {names}" if names else ""
        raise ConfigError(f"not built: {', '.join(missing)}{hint}")
    started = time.time()
    labels = {contract.AUDIT_RUN: uuid.uuid4().hex[:12]}
    results: list[AuditResult] = []
    for name, ref in targets:
        on_image(name, ref, None)
        result = audit_image(
            engine,
            ref,
            sm,
            name=name,
            cache_dir=project.build / "cache" / "audit",
            wheelhouse=wheelhouse,
            cuobjdump=cuobjdump,
            timeout=timeout,
            labels=labels,
        )
        results.append(result)
        on_image(name, ref, result)
    meta = {"command": "audit", "started": started, "seconds": round(time.time() - started, 2)}
    return results, report_json(results, {**meta, "engine": engine_version})


def raise_for_failures(results: Sequence[AuditResult]) -> None:
    failed = [r for r in results if not r.ok]
    if not failed:
        return
    lines = [line for r in failed for line in failure_lines(r)]
    more = f" (+{len(lines) - 3} more)" if len(lines) > 3 else ""
    count = sum(len(r.failures) for r in failed)
    raise AuditFailed(
        f"{count} {'binary lacks' if count == 1 else 'binaries lack'} kernels for the target GPU: "
        + "; ".join(lines[:3])
        + more
    )
