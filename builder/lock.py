"""One run at a time per project: `build` and `bake` hold build/.lock while they stage and build.

Concurrent runs of one project would delete each other's build/context, share logs and
report.json, and fail each other's builds. The lock is an flock(2) on build/.lock: the
kernel drops it when the holder exits, even on `kill -9`, so it is never stale. The file
holds the holder's pid, so the refusal names it. Other projects (other build/ folders)
are not affected. `render` does not lock: its writes are atomic under unique temp names.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from builder.errors import Busy
from builder.fsio import ensure_dir, problem
from builder.project import Project


@contextmanager
def project_lock(project: Project, command: str) -> Iterator[None]:
    """Hold build/.lock for the duration, or raise Busy at once naming the holder's pid."""
    ensure_dir(project.build)
    path = project.build / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # children do not inherit it
    except OSError as exc:
        from builder.errors import ConfigError

        raise ConfigError(problem(exc, path)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(
                f"another build is running ({_holder(fd)}) in {project.root}; "
                "wait for it to finish, or use a separate copy of the project"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: qwen-ft-images {command}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    # The holder writes its pid right after locking: give it a moment if we came in between.
    for _ in range(20):
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "pid unknown"


@contextmanager
def push_lock(remote_ref: str) -> Iterator[None]:
    """Serialise `docker tag` + `docker push` of one remote name across every run on this host.

    `docker push` sends whatever the local name points at when it starts, and that name is
    shared by all runs on the host; the lock keeps another run from retagging it between
    our tag and our push. Blocking, because the other push ends on its own.
    """
    import hashlib
    import tempfile

    name = hashlib.sha256(remote_ref.encode()).hexdigest()[:24]
    path = Path(tempfile.gettempdir()) / f"qwen-ft-push-{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
