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

from __future__ import annotations

import argparse
import json
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


def elf_section_names(path: str) -> set[str] | None:
    """Section names from the ELF section header table, or None for a non-ELF file."""
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
            return set()
        f.seek(shoff)
        first = f.read(shentsize)
        if len(first) < shentsize:
            return set()
        # More than 0xff00 sections: the real count and string-table index live in section 0.
        if shnum == 0:
            shnum = struct.unpack_from(end + ("Q" if wide else "I"), first, 0x20 if wide else 0x14)[0]
        if shstrndx == 0xFFFF:
            shstrndx = struct.unpack_from(end + "I", first, 0x28 if wide else 0x18)[0]
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        if len(table) < shentsize * shnum or shstrndx >= shnum:
            return set()

        def offset_size(index: int) -> tuple[int, int]:
            base = index * shentsize
            if wide:
                off, size = struct.unpack_from(end + "QQ", table, base + 0x18)
            else:
                off, size = struct.unpack_from(end + "II", table, base + 0x10)
            return int(off), int(size)

        str_off, str_size = offset_size(shstrndx)
        f.seek(str_off)
        strings = f.read(min(str_size, 1 << 20))
        names = set()
        for index in range(shnum):
            name_at = struct.unpack_from(end + "I", table, index * shentsize)[0]
            stop = strings.find(b"\0", name_at)
            names.add(strings[name_at : stop if stop >= 0 else None].decode("latin-1"))
        return names


def candidates(roots: list[str], skip: tuple[str, ...]) -> tuple[list[str], int]:
    """(files that may hold device code, shared objects looked at). Symlinks and hard links
    are followed once: libcudnn.so.9 -> libcudnn.so.9.10.2 is one binary, not two."""
    seen: set[tuple[int, int]] = set()
    found: list[str] = []
    looked = 0
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skip]
            for name in files:
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
                    found.append(path)
                    continue
                looked += 1
                try:
                    sections = elf_section_names(path)
                except (OSError, struct.error):
                    continue
                if sections and sections & FATBIN_SECTIONS:
                    found.append(path)
    return sorted(found), looked


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
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
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
    version = subprocess.run(
        [args.cuobjdump, "--version"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        universal_newlines=True,
        check=False,
    )
    if version.returncode != 0:
        print(f"audit_probe: {args.cuobjdump} does not run here: {version.stdout.strip()}", file=sys.stderr)
        return 2
    skip = tuple(SKIP_DIRS) + tuple(args.skip)
    files, looked = candidates(args.roots or ["/"], skip)
    dists = owners()
    # cuobjdump is I/O bound on the big libraries; two at a time is what a 2-core host affords.
    jobs = args.jobs or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        listings = list(pool.map(lambda p: listing(args.cuobjdump, p), files))
    binaries = []
    for path, result in zip(files, listings):
        dist = dists.get(os.path.realpath(path))
        binaries.append(
            {
                "path": path,
                "size": os.path.getsize(path),
                "dist": dist[0] if dist else None,
                "dist_version": dist[1] if dist else None,
                **result,
            }
        )
    version_lines = [line for line in version.stdout.splitlines() if line.strip()]
    json.dump(
        {
            "probe": 1,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cuobjdump": version_lines[-1] if version_lines else "",
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
