"""The in-container half of `qwen-ft-images audit`: find every binary with device code, list it.

This file is bind-mounted read-only into a throwaway container of the audited image, next to
an unpacked `cuobjdump`, and run by the image's own Python. So it uses only the standard
library and runs on Python 3.8+. It only collects: it prints one JSON object on stdout with
cuobjdump's raw listings, and the host (builder/audit.py) parses them and judges, so the
parsing is unit-tested on recorded listings and never depends on the image's Python.

A file is listed when it is a shared object (`*.so`, `*.so.*`) whose ELF section headers name
a fatbinary section, or a loose `*.cubin`/`*.fatbin`. Reading section headers costs a few
kilobytes per file; cuobjdump reads the whole file (seconds for a 1 GB libtorch_cuda.so), so
it only runs on the files that carry device code.
"""

# os.path on plain strings: the paths come from os.walk and go to subprocess and JSON as str.
# ruff: noqa: PTH113, PTH114, PTH118, PTH123, PTH202

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# Sections nvcc/nvlink put fatbinaries in: .nv_fatbin holds them; .nvFatBinSegment holds the
# wrappers that point at them; __nv_relfatbin is used for relocatable device code.
FATBIN_SECTIONS = frozenset({".nv_fatbin", ".nvFatBinSegment", "__nv_relfatbin"})
SKIP_DIRS = ("/proc", "/sys", "/dev", "/run")
LOOSE_SUFFIXES = (".cubin", ".fatbin")


def is_shared_object(name: str) -> bool:
    return name.endswith(".so") or ".so." in name


class Section:
    __slots__ = ("flags", "name", "offset", "size", "type")

    def __init__(self, name: str, type_: int, flags: int, offset: int, size: int) -> None:
        self.name, self.type, self.flags, self.offset, self.size = name, type_, flags, offset, size


def elf_sections(path: str) -> list[Section] | None:
    """The ELF section header table, or None for a file that is not ELF."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 52 or ident[:4] != b"\x7fELF":
            return None
        wide = ident[4] == 2  # EI_CLASS: 1 = 32-bit, 2 = 64-bit
        end = "<" if ident[5] == 1 else ">"  # EI_DATA: 1 = little-endian
        if wide:
            shoff = struct.unpack_from(end + "Q", ident, 0x28)[0]
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", ident, 0x3A)
        else:
            shoff = struct.unpack_from(end + "I", ident, 0x20)[0]
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", ident, 0x2E)
        if shoff == 0 or shentsize == 0:
            return []
        f.seek(shoff)
        first = f.read(shentsize)
        if len(first) < shentsize:
            return []
        # More than 0xff00 sections: the real count and string-table index live in section 0.
        if shnum == 0:
            shnum = struct.unpack_from(end + ("Q" if wide else "I"), first, 0x20 if wide else 0x14)[0]
        if shstrndx == 0xFFFF:
            shstrndx = struct.unpack_from(end + "I", first, 0x28 if wide else 0x18)[0]
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        if len(table) < shentsize * shnum or shstrndx >= shnum:
            return []
        raw = []
        for index in range(shnum):
            base = index * shentsize
            if wide:
                name_at, type_, flags = struct.unpack_from(end + "IIQ", table, base)
                offset, size = struct.unpack_from(end + "QQ", table, base + 0x18)
            else:
                name_at, type_, flags = struct.unpack_from(end + "III", table, base)
                offset, size = struct.unpack_from(end + "II", table, base + 0x10)
            raw.append((name_at, type_, flags, offset, size))
        str_off, str_size = raw[shstrndx][3], raw[shstrndx][4]
        f.seek(str_off)
        strings = f.read(min(str_size, 1 << 20))
        out = []
        for name_at, type_, flags, offset, size in raw:
            stop = strings.find(b"\0", name_at)
            name = strings[name_at : stop if stop >= 0 else None].decode("latin-1")
            out.append(Section(name, type_, flags, offset, size))
        return out


def elf_section_names(path: str) -> set[str] | None:
    sections = elf_sections(path)
    return None if sections is None else {s.name for s in sections}


# A fatbinary starts with this header: magic, version 1, header size 16, then the size of what
# follows; each entry then has its own header (kind, header size, payload size, ..., arch).
FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
FATBIN_KINDS = {1: "ptx", 2: "sass"}  # 8 is LTO IR (NVVM), which no driver runs as such
SHT_PROGBITS = 1
SHF_EXECINSTR = 0x4
NOT_DATA = (".eh_frame", ".gcc_except_table", ".comment", ".debug", ".note", ".stapsdt", ".gnu")


def scan_fatbins(buf: Any, start: int, stop: int) -> tuple[int, dict[tuple[str, int], int]]:
    """Fatbinaries embedded in buf[start:stop]: (how many, {(kind, sm): entries}).

    Some libraries keep most kernels outside .nv_fatbin, as data they load themselves
    (cuFFT 11's 266 MB .ldata holds ~23,000 fatbinaries; cuobjdump lists only its one-entry
    .nv_fatbin stub). A hit counts only if its header and every entry header are
    consistent, so stray magic bytes in other data are ignored.
    """
    found = 0
    entries: dict[tuple[str, int], int] = {}
    at = buf.find(FATBIN_MAGIC, start, stop)
    while at >= 0:
        nxt = at + 4
        if at + 16 <= stop:
            version, header, size = struct.unpack_from("<HHQ", buf, at + 4)
            body, body_end = at + header, at + header + size
            if version == 1 and header == 16 and size > 0 and body_end <= stop:
                parsed = _entries(buf, body, body_end)
                if parsed is not None:
                    found += 1
                    for key in parsed:
                        entries[key] = entries.get(key, 0) + 1
                    nxt = body_end
        at = buf.find(FATBIN_MAGIC, nxt, stop)
    return found, entries


def _entries(buf: Any, at: int, stop: int) -> list[tuple[str, int]] | None:
    out = []
    while at < stop:
        if at + 32 > stop:
            return None
        kind, _, header, size = struct.unpack_from("<HHIQ", buf, at)
        arch = struct.unpack_from("<I", buf, at + 28)[0]
        if not (32 <= header <= 512) or at + header + size > stop or not (10 <= arch < 1000):
            return None
        if kind in FATBIN_KINDS:
            out.append((FATBIN_KINDS[kind], arch))
        at += header + size
    return out


def embedded_fatbins(path: str, sections: list[Section]) -> dict[str, Any] | None:
    """Scan the data sections (not .nv_fatbin, not code) for fatbinaries loaded by hand."""
    spans = [
        (s.offset, s.offset + s.size)
        for s in sections
        if s.type == SHT_PROGBITS
        and not s.flags & SHF_EXECINSTR
        and s.size >= 64
        and s.name not in FATBIN_SECTIONS
        and not s.name.startswith(NOT_DATA)
    ]
    if not spans:
        return None
    total = 0
    entries: dict[tuple[str, int], int] = {}
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):
            return None
        with mm:
            size = len(mm)
            for start, stop in spans:
                n, found = scan_fatbins(mm, start, min(stop, size))
                total += n
                for key, count in found.items():
                    entries[key] = entries.get(key, 0) + count
    if not total:
        return None
    return {"fatbins": total, "entries": sorted([kind, sm, n] for (kind, sm), n in entries.items())}


def candidates(roots: list[str], skip: tuple[str, ...]) -> tuple[list[dict[str, Any]], int]:
    """Files that hold device code, and how many shared objects were looked at.

    Symlinks are skipped and hard links read once: libcudnn.so.9 -> libcudnn.so.9.10.2 is one
    binary, not two.
    """
    seen: set[tuple[int, int]] = set()
    found: list[dict[str, Any]] = []
    looked = 0
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if os.path.join(folder, d) not in skip)
            for name in sorted(files):
                loose = name.endswith(LOOSE_SUFFIXES)
                if not (loose or is_shared_object(name)):
                    continue
                path = os.path.join(folder, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not os.path.isfile(path) or os.path.islink(path) or (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                if loose:
                    found.append({"path": path, "list": True, "embedded": None})
                    continue
                looked += 1
                try:
                    sections = elf_sections(path)
                    if not sections:
                        continue
                    listed = any(s.name in FATBIN_SECTIONS and s.size for s in sections)
                    embedded = embedded_fatbins(path, sections)
                except (OSError, struct.error, ValueError):
                    continue
                if listed or embedded:
                    found.append({"path": path, "list": listed, "embedded": embedded})
    return found, looked


def owners() -> dict[str, tuple[str, str]]:
    """realpath -> (distribution, version) for every file pip installed."""
    out: dict[str, tuple[str, str]] = {}
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python < 3.8
        return out
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or "?"
        for item in dist.files or []:
            text = str(item)
            if is_shared_object(text) or text.endswith(LOOSE_SUFFIXES):
                out[os.path.realpath(str(dist.locate_file(item)))] = (name, dist.version)
    return out


def listing(cuobjdump: str, path: str) -> dict[str, Any]:
    start = time.monotonic()
    proc = subprocess.run(
        [cuobjdump, "--list-elf", "--list-ptx", path],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "rc": proc.returncode,
        "stdout": proc.stdout,
        "stderr": proc.stderr.strip()[-2000:],
        "seconds": round(time.monotonic() - start, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="audit_probe")
    parser.add_argument("--cuobjdump", required=True)
    parser.add_argument("--root", action="append", dest="roots")
    parser.add_argument("--skip", action="append", default=[])
    parser.add_argument("--jobs", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        version = subprocess.run(
            [args.cuobjdump, "--version"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        problem = "" if version.returncode == 0 else version.stdout.strip()[-300:]
    except OSError as exc:  # e.g. an x86-64 cuobjdump in an arm64 image
        problem = str(exc)
    if problem:
        print(f"audit_probe: {args.cuobjdump} does not run in this image: {problem}", file=sys.stderr)
        return 3
    skip = tuple(SKIP_DIRS) + tuple(args.skip)
    found, looked = candidates(args.roots or ["/"], skip)
    dists = owners()
    # cuobjdump is I/O bound on the big libraries; a few at a time is what a 2-core host affords.
    jobs = args.jobs or max(1, min(4, os.cpu_count() or 1))

    def one(item: dict[str, Any]) -> dict[str, Any]:
        path = item["path"]
        dist = dists.get(os.path.realpath(path))
        out = {
            "path": path,
            "size": os.path.getsize(path),
            "dist": dist[0] if dist else None,
            "dist_version": dist[1] if dist else None,
            "embedded": item["embedded"],
        }
        if item["list"]:
            out.update(listing(args.cuobjdump, path))
        return out

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        binaries = list(pool.map(one, found))
    release = [line.strip() for line in version.stdout.splitlines() if "release" in line]
    json.dump(
        {
            "probe": 1,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cuobjdump": release[0] if release else version.stdout.strip()[-200:],
            "shared_objects": looked,
            "binaries": binaries,
            "seconds": round(time.monotonic() - start, 2),
        },
        sys.stdout,
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
