"""Kernel audit: parsing recorded cuobjdump listings, NVIDIA's compatibility rules, the verdicts,
the in-container probe's ELF/fatbinary readers, the cuobjdump wheel handling and audit_image
against a fake engine. No Docker needed (the real image is audited in tests/e2e/)."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from packaging.specifiers import SpecifierSet

from builder import audit, audit_probe
from builder.audit import Arch, Listing
from builder.engine import ContainerRun
from builder.errors import ConfigError, EngineError
from builder.knowledge.waivers import Waiver, load_waivers

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "cuobjdump"
PROBE = FIXTURES / "probe-v100-fp16-cu128-torch2.8.0.json.gz"


def listing(name: str) -> Listing:
    return audit.parse_listing((FIXTURES / f"{name}.txt").read_text())


def probe_json() -> dict[str, Any]:
    with gzip.open(PROBE, "rt") as f:
        data: dict[str, Any] = json.load(f)
    return data


# ----------------------------------------------------------------------------- parsing


def test_parse_libtorch_cuda_listing() -> None:
    got = listing("libtorch_cuda.so")
    for sm in (70, 75, 80, 86, 90, 100, 120):
        assert got.sass[Arch(sm)] == 393
    assert got.sass[Arch(89)] == 1
    assert got.sass[Arch(90, "a")] == 4
    assert got.sass[Arch(100, "a")] == 1 and got.sass[Arch(120, "a")] == 1
    assert got.ptx == {}  # torch 2.8.0's cu128 wheel ships no PTX
    assert got.unparsed == ()
    assert sum(got.sass.values()) == 2758


def test_parse_ptx_and_stub_listings() -> None:
    lt = listing("libcusparseLt.so.0")
    assert Arch(52) in lt.ptx and Arch(80) in lt.sass
    assert not any(a.major == 7 for a in lt.sass)  # no Volta or Turing SASS in cuSPARSELt
    assert listing("libcufft.so.11").sass == {Arch(52): 1}
    assert listing("libcublas.so.12").ptx == {Arch(120): 192}


def test_parse_listing_keeps_unknown_lines() -> None:
    got = audit.parse_listing(
        "ELF file    1: x.1.sm_70.cubin\nsomething new\nPTX file    1: x.1.sm_90a.ptx\n"
    )
    assert got.sass == {Arch(70): 1}
    assert got.ptx == {Arch(90, "a"): 1}
    assert got.unparsed == ("something new",)


@pytest.mark.parametrize(
    ("value", "sm"),
    [
        (70, 70),
        ("70", 70),
        ("sm_70", 70),
        ("SM70", 70),
        ("7.0", 70),
        ("8.9", 89),
        ("10.3", 103),
        ("120", 120),
        ("12.1", 121),
    ],
)
def test_parse_sm(value: str | int, sm: int) -> None:
    assert audit.parse_sm(value) == sm


@pytest.mark.parametrize("value", ["", "sm", "7.x", "compute_70", "1", "sm_7000", "7.10"])
def test_parse_sm_rejects(value: str) -> None:
    with pytest.raises(ConfigError, match="expected an SM"):
        audit.parse_sm(value)


# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("arch", "target", "runs"),
    [
        (Arch(70), 70, True),
        (Arch(70), 75, True),  # same major, lower minor
        (Arch(75), 70, False),  # a higher minor never runs on a lower one
        (Arch(86), 89, True),
        (Arch(80), 90, False),  # across majors: never
        (Arch(100), 103, True),  # B200 kernels on B300
        (Arch(100), 110, False),
        (Arch(101), 110, False),
        (Arch(120), 121, True),  # RTX 50 kernels on DGX Spark
        (Arch(90, "a"), 90, True),
        (Arch(90, "a"), 100, False),
        (Arch(100, "a"), 103, False),  # arch-specific: that SM only
        (Arch(100, "f"), 103, True),  # family-specific: same major, same or later minor
        (Arch(103, "f"), 100, False),
    ],
)
def test_sass_binary_compatibility(arch: Arch, target: int, runs: bool) -> None:
    assert audit.sass_runs_on(arch, target) is runs


@pytest.mark.parametrize(
    ("arch", "target", "jits"),
    [
        (Arch(52), 70, True),
        (Arch(90), 121, True),  # PTX is forward compatible across majors
        (Arch(120), 110, False),  # but never backwards
        (Arch(70), 70, True),
        (Arch(90, "a"), 90, True),
        (Arch(90, "a"), 100, False),
        (Arch(100, "f"), 103, True),
        (Arch(100, "f"), 120, False),
    ],
)
def test_ptx_jit_rule(arch: Arch, target: int, jits: bool) -> None:
    assert audit.ptx_jits_for(arch, target) is jits


def test_needs_wording() -> None:
    assert audit.needs(70) == "SASS sm_70 or PTX compute_70 or lower"
    assert audit.needs(89) == "SASS one of sm_80..sm_89 or PTX compute_89 or lower"


# ----------------------------------------------------------------------------- verdicts


def test_libtorch_serves_v100_with_its_own_sass() -> None:
    v = audit.judge_binary(70, "/x/torch/lib/libtorch_cuda.so", listing("libtorch_cuda.so"))
    assert v.status == "ok" and v.via == "sm_70 SASS"
    assert "393 sm_70" in v.detail


def test_lower_minor_sass_serves_ada() -> None:
    v = audit.judge_binary(89, "libcublas.so.12", listing("libcublas.so.12"))
    assert v.status == "ok" and v.via == "sm_86 SASS"
    assert "binary compatible with sm_89" in v.detail


def test_exact_sm89_cubin_preferred_over_compatible() -> None:
    v = audit.judge_binary(89, "libtorch_cuda.so", listing("libtorch_cuda.so"))
    assert v.via == "sm_89 SASS"


def test_cusparselt_serves_v100_only_through_ptx() -> None:
    v = audit.judge_binary(70, "libcusparseLt.so.0", listing("libcusparseLt.so.0"))
    assert v.status == "ok" and v.via == "compute_52 PTX (JIT)"
    assert "JIT" in v.detail


def test_libtorch_fails_for_pascal_with_a_clear_row() -> None:
    v = audit.judge_binary(
        60, "/opt/venv/lib/python3.11/site-packages/torch/lib/libtorch_cuda.so", listing("libtorch_cuda.so")
    )
    assert v.status == "fail" and not v.ok
    assert v.short_path == "torch/lib/libtorch_cuda.so"
    assert v.detail == (
        "has SASS sm_70 sm_75 sm_80 sm_86 sm_89 sm_90 sm_90a sm_100 sm_100a sm_120 sm_120a; PTX none; "
        "sm_60 needs SASS sm_60 or PTX compute_60 or lower"
    )


def test_cufftw_stub_is_waived_by_the_knowledge_base() -> None:
    waivers = load_waivers()
    v = audit.judge_binary(
        70,
        "/x/nvidia/cufft/lib/libcufftw.so.11",
        listing("libcufftw.so.11"),
        dist="nvidia-cufft-cu12",
        waivers=waivers,
    )
    assert v.status == "waived" and v.ok and v.waiver == "cufftw-stub"
    # The waiver is for that file of that package only.
    other = audit.judge_binary(70, "/x/libfoo.so", listing("libcufftw.so.11"), dist="foo", waivers=waivers)
    assert other.status == "fail"


def test_waiver_sm_specifier() -> None:
    w = Waiver("w", "pkg", "lib*.so", SpecifierSet("<80"), "why", "src")
    assert w.applies("pkg", "/a/libx.so", 75)
    assert not w.applies("pkg", "/a/libx.so", 80)
    assert not w.applies("other", "/a/libx.so", 75)


def test_cuobjdump_error_without_listing_is_an_error_verdict() -> None:
    v = audit.judge_binary(70, "libx.so", Listing(), error="cuobjdump exit 1: boom")
    assert v.status == "error" and not v.ok


def test_whole_recorded_image_passes_for_v100() -> None:
    verdicts = audit.judge_probe(70, probe_json(), load_waivers())
    assert len(verdicts) == 20
    assert [v.short_path for v in verdicts if v.status == "waived"] == ["nvidia/cufft/lib/libcufftw.so.11"]
    assert all(v.ok for v in verdicts)
    by_name = {v.short_path.rsplit("/", 1)[-1]: v for v in verdicts}
    # cuFFT's kernels are fatbinaries embedded in .ldata, invisible to cuobjdump's listing.
    assert by_name["libcufft.so.11"].embedded_fatbins > 20000
    assert by_name["libcufft.so.11"].via == "sm_70 SASS"
    assert by_name["libcupti.so.12"].listing.sass  # no .nv_fatbin at all, only embedded ones


def test_whole_recorded_image_fails_for_pascal_on_libtorch_only() -> None:
    verdicts = audit.judge_probe(60, probe_json(), load_waivers())
    assert [v.short_path for v in verdicts if not v.ok] == ["torch/lib/libtorch_cuda.so"]


def test_whole_recorded_image_fails_for_thor() -> None:
    verdicts = audit.judge_probe(110, probe_json(), load_waivers())
    failed = {v.short_path for v in verdicts if not v.ok}
    assert "torch/lib/libtorch_cuda.so" in failed and len(failed) == 12
    # Libraries with PTX below compute_110 still serve Thor through the JIT.
    jit = {v.short_path for v in verdicts if v.via and "PTX" in v.via}
    assert "nvidia/cusolver/lib/libcusolver.so.11" in jit


@pytest.mark.parametrize("sm", [75, 80, 86, 89, 90, 100, 103, 120, 121])
def test_whole_recorded_image_serves_every_arch_torch_builds_for(sm: int) -> None:
    assert all(v.ok for v in audit.judge_probe(sm, probe_json(), load_waivers()))


def test_binaries_without_device_code_are_dropped() -> None:
    stderr = (FIXTURES / "libc10.so.stderr.txt").read_text()
    probe = {
        "binaries": [{"path": "/x/libc10.so", "rc": 255, "stdout": "", "stderr": stderr, "embedded": None}]
    }
    assert audit.judge_probe(70, probe, ()) == []


# ----------------------------------------------------------------------------- the probe


def fatbin(entries: Sequence[tuple[int, int]], payload: bytes = b"\0" * 16) -> bytes:
    """A fatbinary as nvcc lays it out: a 16-byte header, then (64-byte header + payload) entries."""
    body = b""
    for kind, arch in entries:
        body += struct.pack(
            "<HHIQIIHHIIIQQQ", kind, 0x101, 64, len(payload), 0, 0, 1, 0, arch, 0, 0, 0x2011, 0, 0
        )
        body += payload
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def make_elf(sections: Sequence[tuple[str, int, int, bytes]]) -> bytes:
    """A minimal 64-bit little-endian ELF with these (name, type, flags, data) sections."""
    names = [name for name, *_ in sections] + [".shstrtab"]
    strtab = b"\0"
    name_at = [0]
    for name in names:
        name_at.append(len(strtab))
        strtab += name.encode() + b"\0"
    rows = [(0, 0, b""), *((t, f, d) for _, t, f, d in sections), (3, 0, strtab)]  # 3 = SHT_STRTAB
    data = b""
    headers = []
    for at, (type_, flags, blob) in zip(name_at, rows, strict=True):
        headers.append(
            struct.pack(
                "<IIQQQQIIQQ", at, type_, flags, 0, 64 + len(data) if blob else 0, len(blob), 0, 0, 1, 0
            )
        )
        data += blob
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    head = struct.pack(
        "<16sHHIQQQIHHHHHH", ident, 3, 62, 1, 0, 0, 64 + len(data), 0, 64, 0, 0, 64, len(rows), len(rows) - 1
    )
    return head + data + b"".join(headers)


def test_scan_fatbins_counts_entries_and_ignores_stray_magic() -> None:
    blob = b"xx" + fatbin([(2, 70), (1, 80), (8, 50)]) + b"\x50\xed\x55\xba garbage" + fatbin([(2, 90)])
    found, entries = audit_probe.scan_fatbins(blob, 0, len(blob))
    assert found == 2
    assert entries == {("sass", 70): 1, ("ptx", 80): 1, ("sass", 90): 1}  # kind 8 (LTO IR) not counted


def test_scan_fatbins_rejects_truncated_fatbin() -> None:
    blob = fatbin([(2, 70)])[:-4]
    assert audit_probe.scan_fatbins(blob, 0, len(blob)) == (0, {})


def test_elf_sections_reads_names_types_and_sizes(tmp_path: Path) -> None:
    path = tmp_path / "libx.so"
    path.write_bytes(make_elf([(".text", 1, 0x6, b"\x90" * 8), (".nv_fatbin", 1, 0x2, fatbin([(2, 70)]))]))
    sections = audit_probe.elf_sections(str(path))
    assert sections is not None
    by_name = {s.name: s for s in sections}
    assert by_name[".nv_fatbin"].size == len(fatbin([(2, 70)]))
    assert by_name[".text"].flags & 0x4
    assert audit_probe.elf_sections(str(ROOT / "pyproject.toml")) is None
    assert audit_probe.elf_section_names(sys.executable) is not None  # a real ELF (the interpreter)


def test_candidates_finds_listed_embedded_and_loose_device_code(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libfat.so").write_bytes(make_elf([(".nv_fatbin", 1, 0x2, fatbin([(2, 70)]))]))
    (lib / "libdata.so.1").write_bytes(
        make_elf([(".ldata", 1, 0x3, b"\0" * 64 + fatbin([(2, 80), (1, 90)]))])
    )
    (lib / "libplain.so").write_bytes(make_elf([(".rodata", 1, 0x2, b"no device code here" * 8)]))
    (lib / "kernels.cubin").write_bytes(b"\0")
    (lib / "notes.txt").write_text("x")
    (lib / "libfat.so.1").symlink_to("libfat.so")
    (lib / "libfat-hardlink.so").hardlink_to(lib / "libfat.so")
    (tmp_path / "skipme").mkdir()
    (tmp_path / "skipme" / "libfat.so").write_bytes((lib / "libfat.so").read_bytes())
    found, looked = audit_probe.candidates([str(tmp_path)], (str(tmp_path / "skipme"),))
    names = {Path(f["path"]).name: f for f in found}
    assert set(names) == {"kernels.cubin", "libdata.so.1", "libfat-hardlink.so"} or set(names) == {
        "kernels.cubin",
        "libdata.so.1",
        "libfat.so",
    }
    assert looked == 3  # libfat (once, despite the hard link), libdata, libplain
    data = names["libdata.so.1"]
    assert data["list"] is False
    assert data["embedded"] == {"fatbins": 1, "entries": [["ptx", 90, 1], ["sass", 80, 1]]}


def test_probe_main_with_a_fake_cuobjdump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "libfat.so").write_bytes(make_elf([(".nv_fatbin", 1, 0x2, fatbin([(2, 70)]))]))
    tool = tmp_path / "cuobjdump"
    tool.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "Cuda compilation tools, release 13.4, V13.4.92"; exit 0; fi\n'
        'echo "ELF file    1: libfat.1.sm_70.cubin"\n'
    )
    tool.chmod(0o755)
    assert audit_probe.main(["--cuobjdump", str(tool), "--root", str(root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cuobjdump"] == "Cuda compilation tools, release 13.4, V13.4.92"
    assert out["shared_objects"] == 1
    verdicts = audit.judge_probe(70, out, ())
    assert [(Path(v.path).name, v.status, v.via) for v in verdicts] == [("libfat.so", "ok", "sm_70 SASS")]


def test_probe_main_reports_a_cuobjdump_that_cannot_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert audit_probe.main(["--cuobjdump", str(tmp_path / "missing"), "--root", str(tmp_path)]) == 3
    assert "does not run in this image" in capsys.readouterr().err


# ----------------------------------------------------------------------------- cuobjdump


def fake_wheel(
    folder: Path, machine: str = "x86_64", version: str = "13.4.92", member: str = "nvidia/cu13/bin/cuobjdump"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / audit.wheel_filename(machine, version)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, b"#!/bin/sh\necho fake\n")
        zf.writestr(f"nvidia_cuda_cuobjdump-{version}.dist-info/METADATA", "Name: nvidia-cuda-cuobjdump\n")
    return path


def test_wheelhouse_wheel_is_unpacked_executable(tmp_path: Path) -> None:
    fake_wheel(tmp_path / "wh", version="13.2.51")
    fake_wheel(tmp_path / "wh", version="13.4.92")
    tool = audit.find_cuobjdump("x86_64", tmp_path / "cache", wheelhouse=tmp_path / "wh")
    assert tool == tmp_path / "cache" / "cuobjdump-13.4.92-x86_64" / "cuobjdump"  # the newest wins
    assert os.access(tool, os.X_OK)


def test_wheelhouse_without_the_wheel_says_what_to_add(tmp_path: Path) -> None:
    (tmp_path / "wh").mkdir()
    with pytest.raises(ConfigError, match="holds no nvidia_cuda_cuobjdump wheel for x86_64") as exc:
        audit.find_cuobjdump("x86_64", tmp_path / "cache", wheelhouse=tmp_path / "wh")
    assert exc.value.exit_code == 2
    assert "nvidia_cuda_cuobjdump-13.4.92-py3-none-manylinux2014_x86_64" in exc.value.message


def test_wheel_without_the_binary_is_refused(tmp_path: Path) -> None:
    fake_wheel(tmp_path / "wh", member="nvidia/cu13/bin/something-else")
    with pytest.raises(ConfigError, match="no nvidia/cu\\*/bin/cuobjdump inside"):
        audit.find_cuobjdump("x86_64", tmp_path / "cache", wheelhouse=tmp_path / "wh")


def test_offline_without_wheelhouse_is_one_clear_line(tmp_path: Path) -> None:
    def offline(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert "nvidia-cuda-cuobjdump==13.4.92" in argv and "manylinux2014_x86_64" in argv
        return subprocess.CompletedProcess(
            argv,
            1,
            "",
            "ERROR: Could not find a version that satisfies the requirement nvidia-cuda-cuobjdump==13.4.92\n",
        )

    with pytest.raises(ConfigError) as exc:
        audit.find_cuobjdump("x86_64", tmp_path / "cache", run=offline)
    assert exc.value.exit_code == 2
    assert "\n" not in exc.value.message
    assert "--cuobjdump-wheelhouse DIR" in exc.value.message and "--cuobjdump PATH" in exc.value.message
    assert "Could not find a version" in exc.value.message


def test_download_is_checked_against_the_pinned_digest(tmp_path: Path) -> None:
    def download(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        fake_wheel(Path(argv[argv.index("--dest") + 1]))
        return subprocess.CompletedProcess(argv, 0, "", "")

    with pytest.raises(ConfigError, match="is not the pinned"):
        audit.find_cuobjdump("x86_64", tmp_path / "cache", run=download)


def test_cached_cuobjdump_is_reused_without_network(tmp_path: Path) -> None:
    cached = tmp_path / "cache" / "cuobjdump-13.4.92-x86_64" / "cuobjdump"
    cached.parent.mkdir(parents=True)
    cached.write_text("x")

    def no_network(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        raise AssertionError("must not download")

    assert audit.find_cuobjdump("x86_64", tmp_path / "cache", run=no_network) == cached


def test_explicit_cuobjdump_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        audit.find_cuobjdump("x86_64", tmp_path, cuobjdump=tmp_path / "nope")
    tool = tmp_path / "cuobjdump"
    tool.write_text("x")
    assert audit.find_cuobjdump("x86_64", tmp_path, cuobjdump=tool) == tool


def test_machine_names() -> None:
    assert audit.machine_of("amd64") == "x86_64"
    assert audit.machine_of("arm64") == "aarch64"
    with pytest.raises(ConfigError, match="x86_64 and aarch64 only"):
        audit.machine_of("ppc64le")


# ----------------------------------------------------------------------------- audit_image


class FakeEngine:
    def __init__(self, labels: Mapping[str, str] | None, run: ContainerRun | None = None) -> None:
        self.labels = labels
        self.run = run
        self.calls: list[dict[str, Any]] = []

    def image_labels(self, ref: str) -> Mapping[str, str] | None:
        return self.labels

    def image_id(self, ref: str) -> str | None:
        return "sha256:abc"

    def image_architecture(self, ref: str) -> str | None:
        return "amd64"

    def run_container(self, image: str, command: Sequence[str], **kwargs: Any) -> ContainerRun:
        self.calls.append({"image": image, "command": list(command), **kwargs})
        assert self.run is not None
        return self.run


V100_LABELS = {"io.qwen-ft.sm": "70", "io.qwen-ft.target": "v100"}


def tool_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    (cache / "cuobjdump-13.4.92-x86_64").mkdir(parents=True)
    (cache / "cuobjdump-13.4.92-x86_64" / "cuobjdump").write_text("x")
    return cache


def test_audit_image_runs_the_probe_read_only_and_judges(tmp_path: Path) -> None:
    out = io.StringIO()
    json.dump(probe_json(), out)
    engine = FakeEngine(V100_LABELS, ContainerRun(0, "log line\n" + out.getvalue() + "\n", "", 3.0))
    result = audit.audit_image(engine, "qwen-ft:v100", cache_dir=tool_cache(tmp_path), labels={"k": "v"})
    assert result.ok and result.sm == 70 and result.sm_source == "label" and result.target == "v100"
    assert len(result.binaries) == 20 and result.shared_objects == 529
    assert result.python == "3.11.2" and result.cuobjdump and "13.4" in result.cuobjdump
    (call,) = engine.calls
    assert call["command"][:2] == ["python3", "/opt/qwen-ft-audit/audit_probe.py"]
    (mount,) = call["volumes"].items()
    assert mount[1] == audit.MOUNT
    assert sorted(p.name for p in Path(mount[0]).iterdir()) == ["audit_probe.py", "cuobjdump"]
    assert call["labels"] == {"k": "v"}
    data = result.as_json()
    assert data["counts"] == {"ok": 19, "waived": 1} and data["failed"] == []
    json.dumps(data)  # serialisable


def test_audit_image_against_another_sm(tmp_path: Path) -> None:
    engine = FakeEngine(V100_LABELS, ContainerRun(0, json.dumps(probe_json()), "", 1.0))
    result = audit.audit_image(engine, "qwen-ft:v100", "sm_60", cache_dir=tool_cache(tmp_path))
    assert not result.ok and result.sm_source == "--sm"
    assert [b.short_path for b in result.failures] == ["torch/lib/libtorch_cuda.so"]
    (line,) = audit.failure_lines(result)
    assert line.startswith("qwen-ft:v100: torch/lib/libtorch_cuda.so: has SASS sm_70")


def test_foreign_image_is_one_line_exit_2(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="was not built by qwen-ft-images") as exc:
        audit.audit_image(FakeEngine({"maintainer": "x"}), "debian:bookworm", cache_dir=tmp_path)
    assert exc.value.exit_code == 2 and "\n" not in exc.value.message


def test_missing_image(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        audit.audit_image(FakeEngine(None), "nope:1", cache_dir=tmp_path)


def test_cpu_image_is_skipped_without_a_container(tmp_path: Path) -> None:
    engine = FakeEngine({"io.qwen-ft.sm": "none", "io.qwen-ft.target": "cpu"})
    result = audit.audit_image(engine, "qwen-ft:cpu-fp32", cache_dir=tmp_path)
    assert result.ok and result.sm is None and "cpu image" in (result.note or "")
    assert engine.calls == []


@pytest.mark.parametrize(
    ("run", "message"),
    [
        (ContainerRun(None, "", "", 900.0, timed_out=True), "timed out after 900 s"),
        (ContainerRun(127, "", "exec: python3: not found\n", 0.1), "needs python3"),
        (
            ContainerRun(
                3, "", "audit_probe: cuobjdump does not run in this image: exec format error\n", 0.1
            ),
            "exit 3",
        ),
    ],
)
def test_probe_failures_are_engine_errors(tmp_path: Path, run: ContainerRun, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        audit.audit_image(
            FakeEngine(V100_LABELS, run), "qwen-ft:v100", cache_dir=tool_cache(tmp_path), timeout=900
        )


def test_report_merges_earlier_images(tmp_path: Path) -> None:
    first = {
        "command": "audit",
        "images": [{"ref": "a", "sm": 70, "ok": True}, {"ref": "b", "sm": 70, "ok": True}],
    }
    audit.write_report(tmp_path, first)
    path = audit.write_report(tmp_path, {"command": "audit", "images": [{"ref": "a", "sm": 70, "ok": False}]})
    data = json.loads(path.read_text())
    assert [(i["ref"], i["ok"]) for i in data["images"]] == [("a", False), ("b", True)]


# ----------------------------------------------------------------------------- command line


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "builder", "--matrix", str(ROOT / "matrix.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_bad_sm_is_exit_2_before_docker() -> None:
    proc = run_cli("audit", "--sm", "7.x", "--docker", "/nonexistent/docker")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: --sm '7.x': expected an SM such as 70, sm_70 or 7.0"


def test_cli_help_lists_the_options() -> None:
    proc = run_cli("audit", "--help")
    assert proc.returncode == 0
    for option in ("--sm", "--json", "--cuobjdump-wheelhouse", "--cuobjdump", "--image", "--timeout"):
        assert option in proc.stdout
