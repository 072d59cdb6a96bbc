"""An on-disk memo: a value stored under the hash of the bytes that determine it.

It lets an up-to-date `make images` skip YAML parsing, resolution and rendering: the
resolution is keyed by the matrix file and the builder's own sources (its knowledge base
included), the build jobs additionally by the runtime context and the build options.
Entries are pickles written atomically under build/cache/memo/, so concurrent runs never
read half a file; a stale or unreadable entry is recomputed. The folder is the project's
own build output, as trusted as the project itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_FORMAT = b"qwen-ft-memo-1"


def digest(parts: Iterable[bytes | str]) -> str:
    h = hashlib.sha256(_FORMAT)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


@cache
def builder_sources() -> str:
    """The builder's code and knowledge, by name, size and mtime (like make): an edited rule or
    fact invalidates every entry, and a lookup reads no file."""
    root = Path(__file__).resolve().parent
    interface = root.parent / "runtime" / "qwen_ft_runtime" / "interface.py"
    if not interface.is_file():  # installed, not a checkout: the runtime package sits beside builder
        import qwen_ft_runtime.interface as module

        interface = Path(module.__file__ or "")
    return digest(
        [tree_stamp(root, suffixes=(".py", ".yaml")), tree_stamp(interface.parent, suffixes=(".py",))]
    )


def tree_stamp(root: Path, suffixes: tuple[str, ...] | None = None) -> str:
    """Names, sizes and mtimes of the files under root: a cheap change detector (no reads)."""
    parts: list[str] = []
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
            continue
        if suffixes is not None and path.suffix not in suffixes:
            continue
        st = path.stat()
        parts.append(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}")
    return digest(parts)


def _write(path: Path, data: bytes) -> None:
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:12]}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        Path(tmp).replace(path)
    except OSError:
        pass  # a read-only or full build/ only costs speed


def read_json(folder: Path, key: str) -> Any:
    """A plain-data entry (no pickle: the no-op path must not import the classes), or None."""
    try:
        return json.loads((folder / f"{key}.json").read_bytes())
    except (OSError, ValueError):
        return None


def write_json(folder: Path, key: str, value: Any) -> None:
    _write(folder / f"{key}.json", json.dumps(value).encode())


def cached(folder: Path, key: str, compute: Callable[[], T]) -> T:
    """The stored value for key, or compute() stored under it."""
    import pickle

    path = folder / f"{key}.pickle"
    try:
        with path.open("rb") as f:
            value: T = pickle.load(f)
        return value
    except FileNotFoundError:
        pass
    except Exception:
        path.unlink(missing_ok=True)
    value = compute()
    _write(path, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    return value
