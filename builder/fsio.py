"""Writing the project's output files: atomically, under unique temp names, with one-line errors.

Every generated file (Dockerfiles, images/README.md, bake files, the schema, reports)
goes through `write_atomic`: a reader never sees half a file, two concurrent runs never
share a temp file, and a folder that is missing, read-only or a plain file is one
`ConfigError` naming the path instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from builder.errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: mkstemp creates 0600 files, generated files get the usual 0666 & ~umask.
_FILE_MODE = 0o666 & ~_umask()


def problem(exc: OSError, path: Path) -> str:
    """`PATH: what is wrong; what to do`, for an OSError met while writing PATH."""
    where = exc.filename or path
    hints = {
        errno.ENOENT: "the folder does not exist; create it first",
        errno.ENOTDIR: "a part of this path is a file, not a folder; move that file away",
        errno.EEXIST: "a file is in the way of a folder; move it away",
        errno.EACCES: "permission denied; fix the folder's permissions or run elsewhere",
        errno.EPERM: "not permitted; fix the folder's permissions or run elsewhere",
        errno.EROFS: "the file system is read-only; write to a writable checkout",
        errno.ENOSPC: "the disk is full; free space and retry",
        errno.EISDIR: "is a folder, not a file; pass a file path",
    }
    return f"{where}: {hints.get(exc.errno or 0, exc.strerror or str(exc))}"


def ensure_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{path}: is a file, not a folder; move it away") from None
    except OSError as exc:
        raise ConfigError(problem(exc, path)) from None


def _unique_temp(path: Path) -> tuple[int, str]:
    """An exclusive temp file beside path, named by pid and clock (no tempfile import: the
    no-op build's start-up counts every millisecond)."""
    while True:
        tmp = f"{path.parent}/.{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue


def write_atomic(path: Path, text: str, *, parents: bool = True) -> None:
    """Write `text` to `path` via a unique temp file in the same folder and a rename.

    parents=False is for paths the user named (`-o FILE`): a missing folder is their
    typo, not something to create.
    """
    if parents:
        ensure_dir(path.parent)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a file; pass a file path")
    try:
        fd, tmp = _unique_temp(path)
    except OSError as exc:
        raise ConfigError(problem(exc, path.parent)) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), _FILE_MODE)
            f.write(text)
        Path(tmp).replace(path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ConfigError(problem(exc, path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
