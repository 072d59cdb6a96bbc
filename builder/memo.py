"""On-disk memos under build/cache/memo/: values stored under the hash of what determines them.

They let an up-to-date `make images` skip YAML parsing, resolution and rendering: the
resolution is keyed by the matrix file and the builder's own sources (its knowledge base
included), the build jobs also by templates/, runtime/ and the build options, and a whole
`build` answer (builder.uptodate) by its invocation and stamps of all of those. Entries are
written atomically, so concurrent runs never read half a file; a stale or unreadable entry
is recomputed. The folder is the project's own build output, as trusted as the project.

The standard library only, and light: the no-op path (builder.uptodate) stamps and reads
through this module before anything else is imported.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any, TypeVar

    T = TypeVar("T")

_FORMAT = b"qwen-ft-memo-2"


def digest(parts: Iterable[bytes | str]) -> str:
    h = hashlib.sha256(_FORMAT)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def tree_stamp(root: str | os.PathLike[str], suffixes: tuple[str, ...] | None = None) -> str:
    """Names, sizes and mtimes of the files under root (or of root, a file): a cheap change
    detector, like make's, that reads no file. A missing root has a stamp of its own."""
    top = os.fspath(root)
    try:
        st = os.stat(top)
    except OSError:
        return digest(["missing"])
    if not os.path.isdir(top):
        return digest(["file", str(st.st_size), str(st.st_mtime_ns)])
    parts: list[str] = []

    def walk(folder: str, rel: str) -> None:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            name = rel + entry.name
            if entry.is_dir():
                if entry.name != "__pycache__":
                    walk(entry.path, name + "/")
            elif not entry.name.endswith((".pyc", ".pyo")) and (
                suffixes is None or entry.name.endswith(suffixes)
            ):
                est = entry.stat()
                parts.append(f"{name}\0{est.st_size}\0{est.st_mtime_ns}")

    walk(top, "")
    return digest(parts)


def builder_sources() -> list[tuple[str, tuple[str, ...] | None]]:
    """The builder's code and knowledge, and the runtime interface it shares with the images:
    what every memo also depends on (an edited rule or fact invalidates every entry)."""
    here = os.path.dirname(os.path.abspath(__file__))
    interface = os.path.join(os.path.dirname(here), "runtime", "qwen_ft_runtime")
    if not os.path.isfile(os.path.join(interface, "interface.py")):
        # installed, not a checkout: the runtime package sits beside builder
        interface = os.path.join(os.path.dirname(here), "qwen_ft_runtime")
    return [(here, (".py", ".yaml")), (interface, (".py",))]


@functools.cache
def builder_stamp() -> str:
    """One stamp of `builder_sources`, taken once per process."""
    return digest(tree_stamp(path, suffixes) for path, suffixes in builder_sources())


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Via a temp file unique to this process and a rename: readers never see half a file."""
    target = os.fspath(path)
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(target)[:24]}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(folder: str | os.PathLike[str], key: str) -> Any:
    """A plain-data entry (no pickle: the no-op path must not import the classes), or None."""
    try:
        with open(os.path.join(folder, f"{key}.json"), "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def write_json(folder: str | os.PathLike[str], key: str, value: Any) -> None:
    """Best effort: a read-only or full build/ only costs speed."""
    with contextlib.suppress(OSError):
        write_atomic(os.path.join(folder, f"{key}.json"), json.dumps(value).encode())


def cached(folder: str | os.PathLike[str], key: str, compute: Callable[[], T]) -> T:
    """The stored value for key, or compute() stored under it."""
    import pickle

    path = os.path.join(folder, f"{key}.pickle")
    try:
        with open(path, "rb") as f:
            value: T = pickle.load(f)
        return value
    except FileNotFoundError:
        pass
    except Exception:
        with contextlib.suppress(OSError):
            os.unlink(path)
    value = compute()
    with contextlib.suppress(OSError):  # a read-only or full build/ only costs speed
        write_atomic(path, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    return value
