"""Replayed answers: `build` and `render` answered when nothing that decides them has changed.

An up-to-date `make images` should cost what `make` costs when nothing changed (issue #15).
When a `build` (not `--push`, not `--dry-run`) leaves every selected image built and tagged,
or a `render` changes nothing, it keeps its answer in build/cache/memo/ under the exact
invocation: the arguments, the working directory, the environment variables the options
read, and stamps (names, sizes and mtimes, like make) of everything the answer was computed
from, taken before it was read: the matrix file, templates/, runtime/, the builder's own code
and knowledge, and for `render` images/ itself. The console script (builder/__main__.py) asks
`replay` first. When every stamp still matches (and, for `build`, one Engine API inspect per
image shows each still carrying its content hash under every tag), it prints the same lines
and writes the same build record as the full path, before click, YAML, the resolver, Jinja or
the docker SDK are imported. Anything else (a miss, a changed stamp, a moved tag, an engine
that is not a local socket) falls through to the full CLI, which decides properly: this path
only repeats what the full path already said.

The standard library (none of dataclasses, typing or pathlib at run time: their imports cost
more than the rest of this path), builder.memo and the label names of builder.contract;
`lint-imports` and tests/test_uptodate.py hold it to that.
"""

from __future__ import annotations

import json
import os
import sys
import time

from builder import MATRIX_ENV, MATRIX_FILE, MATRIX_FLAGS, memo
from builder.contract import CONTENT_HASH

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from typing import Any

# Which engine answers: part of every stored answer, like the options' own variables.
ENGINE_ENV = ("DOCKER_HOST", "DOCKER_CONTEXT")
_ANSWER_FORMAT = 1


# ----------------------------------------------------------------------------- where, and under what key


def memo_folder(matrix: str) -> str:
    """build/cache/memo/ of the project whose matrix file this is (builder.project.Project.memo)."""
    return os.path.join(os.path.dirname(os.path.abspath(matrix)), "build", "cache", "memo")


# The commands whose up-to-date answer can be replayed: `build` (checked against the engine)
# and `render` (its answer is its output, when images/ is what it last wrote).
REPLAYABLE = ("build", "render")


def locate(argv: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """The matrix file of a `build` or `render` invocation, from the global options before the
    command name; None for any other shape of argv (the CLI then parses it properly)."""
    matrix = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in REPLAYABLE:
            return matrix or environ.get(MATRIX_ENV) or MATRIX_FILE
        if arg in MATRIX_FLAGS and i + 1 < len(argv):
            matrix, i = argv[i + 1], i + 2
        elif arg.startswith("--matrix="):
            matrix, i = arg.partition("=")[2], i + 1
        else:
            return None
    return None


def answer_key(matrix: str, argv: Sequence[str], cwd: str) -> str:
    return memo.digest(["build-answer", os.path.abspath(matrix), cwd, *argv])


# ----------------------------------------------------------------------------- the engine's images


class LocalImage:
    __slots__ = ("id", "labels", "size", "tags")

    def __init__(self, id: str, size: int, labels: Mapping[str, str], tags: Iterable[str] = ()) -> None:
        self.id, self.size, self.labels, self.tags = id, size, labels, frozenset(tags)

    def __repr__(self) -> str:
        return f"LocalImage({self.id!r}, {self.size}, {dict(self.labels)!r}, {sorted(self.tags)!r})"


class Snapshot:
    """Local images by the references asked for (a missing one is absent), and the engine's version."""

    __slots__ = ("asked", "engine_version", "tags")

    def __init__(
        self, engine_version: str, tags: Mapping[str, LocalImage], asked: Iterable[str] | None = None
    ) -> None:
        self.engine_version, self.tags = engine_version, tags
        self.asked = frozenset(tags if asked is None else asked)


def local_images(
    refs: Iterable[str], timeout: float = 5.0, *, environ: Mapping[str, str] | None = None
) -> Snapshot | None:
    """Each of `refs` that exists locally -> its image (ID, size, labels and every tag it has),
    one Engine API inspect per reference over the Unix socket; the engine's version comes in
    the answers' Server header.

    An inspect costs the engine about a millisecond whatever it stores, where listing a
    repository's images walks every image it has. The standard library only: no docker SDK
    and no CLI process. None when the engine is not a local Unix socket or does not answer
    as expected, so the caller takes the SDK path, which reports problems properly.
    Read-only; everything that changes the engine is builder.engine's.
    """
    import socket

    env = os.environ if environ is None else environ
    host = env.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not host.startswith("unix://") or env.get("DOCKER_CONTEXT"):
        return None
    path = host[len("unix://") :]

    def get(url: str) -> tuple[str, dict[str, str], bytes]:
        # HTTP/1.0: the engine answers with a plain body and closes, so no chunked decoding
        # and no http.client import.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(f"GET {url} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
            chunks = []
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split()
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return (status[1] if len(status) > 1 else ""), headers, body

    version = ""
    out: dict[str, LocalImage] = {}
    asked = list(dict.fromkeys(refs))
    try:
        for ref in asked:
            quoted = "".join(c if c.isalnum() or c in "-._~:/@" else f"%{ord(c):02X}" for c in ref)
            status, headers, body = get(f"/images/{quoted}/json")
            server = headers.get("server", "")  # "Docker/20.10.24+dfsg1 (linux)"
            if server.startswith("Docker/"):
                version = server[len("Docker/") :].split()[0]
            if status == "404":
                continue
            if status != "200":
                return None
            data = json.loads(body)
            labels = (data.get("Config") or {}).get("Labels") or {}
            tags = [str(t) for t in data.get("RepoTags") or []]
            out[ref] = LocalImage(str(data["Id"]), int(data.get("Size") or 0), dict(labels), tags)
        if not version:
            status, _, body = get("/version")
            version = str(json.loads(body).get("Version", "unknown")) if status == "200" else "unknown"
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
    return Snapshot(version, out, asked)


# ----------------------------------------------------------------------------- the answer


def up_to_date(jobs: Sequence[Mapping[str, Any]], snapshot: Snapshot | None) -> list[LocalImage] | None:
    """Each job's image when every one is built, carries its content hash and has every tag
    on that one image; else None (the full path decides).

    A job is {"name", "digest", "tags"}, the content-hash tag last (builder.jobs.BuildJob).
    """
    if snapshot is None:
        return None
    found = []
    for job in jobs:
        tags = job["tags"]
        image = snapshot.tags.get(tags[-1])
        if image is None or image.labels.get(CONTENT_HASH) != job["digest"]:
            return None
        if not image.tags.issuperset(tags):  # an alias or pinned tag moved, or is missing
            return None
        found.append(image)
    return found


def answer(entry: Mapping[str, Any], started: float, *, environ: Mapping[str, str] | None = None) -> bool:
    """Say "up to date" for every image of a stored answer and write its build record, when
    one Engine API snapshot bears it out; False (nothing written or printed) otherwise.

    The full path calls this too, with the answer it just planned: one home for the no-op.
    """
    snapshot = local_images([job["tags"][-1] for job in entry["jobs"]], environ=environ)
    images = up_to_date(entry["jobs"], snapshot)
    if images is None or snapshot is None:
        return False
    record = entry["record"]
    meta = dict(record["meta"])
    meta.update(started=started, seconds=round(time.time() - started, 2), engine=snapshot.engine_version)
    rows = []
    for row, image in zip(record["images"], images, strict=True):
        rows.append({**row, "size": image.size, "image_id": image.id})
    path = os.path.join(str(entry["root"]), "build", "report.json")
    try:
        memo.write_atomic(path, (json.dumps({**meta, "images": rows}, indent=2) + "\n").encode())
    except OSError:
        return False  # the full path says what is wrong with build/
    lines = [
        f"{job['name']}: up-to-date ({image.id[:19]}, {job['tags'][-1]})"
        for job, image in zip(entry["jobs"], images, strict=True)
    ]
    sys.stderr.write("".join(line + "\n" for line in lines) + "report: build/report.json\n")
    sys.stderr.flush()
    return True


def stamps(inputs: Iterable[str]) -> list[list[Any]]:
    """Stamps of the files and folders an answer is computed from, and of the builder's own
    sources. Taken *before* they are read, so an edit during the run makes the kept answer
    stale, never wrong."""
    rows: list[tuple[str, tuple[str, ...] | None]] = [(path, None) for path in inputs]
    return [
        [path, list(suffixes) if suffixes else None, memo.tree_stamp(path, suffixes)]
        for path, suffixes in [*rows, *memo.builder_sources()]
    ]


def store(
    matrix: str,
    argv: Sequence[str],
    environ: Mapping[str, str],
    env_names: Iterable[str],
    inputs: list[list[Any]],
    exists: Iterable[tuple[str, str]],
    answer: Mapping[str, Any],
) -> None:
    """Keep an answer the full path just gave, for `replay` of the same invocation.

    inputs: `stamps` taken when the run began; exists: paths the options checked ("dir" or
    "file"), which must still be there.
    """
    cwd = os.getcwd()
    names = sorted({*env_names, *ENGINE_ENV})
    entry = {
        "format": _ANSWER_FORMAT,
        "argv": list(argv),
        "cwd": cwd,
        "env": {name: environ.get(name) for name in names},
        "inputs": inputs,
        "exists": [list(e) for e in exists],
        **answer,
    }
    memo.write_json(memo_folder(matrix), answer_key(matrix, argv, cwd), entry)


def replay(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> bool:
    """Answer an up-to-date `build` or `render` from its stored answer; False when the full CLI
    must run (and then nothing was printed or written)."""
    started = time.time()
    env = os.environ if environ is None else environ
    matrix = locate(argv, env)
    if matrix is None:
        return False
    cwd = os.getcwd()
    entry = memo.read_json(memo_folder(matrix), answer_key(matrix, argv, cwd))
    try:
        if not _still_true(entry, argv, cwd, env):
            return False
        if "stdout" in entry:  # render: images/ is what it was when this was said
            sys.stdout.write(str(entry["stdout"]))
            sys.stdout.flush()
            return True
        return answer(entry, started, environ=env)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return False  # an entry of another shape: the full path decides (and overwrites it)


def _still_true(entry: Any, argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> bool:
    if not isinstance(entry, dict) or entry.get("format") != _ANSWER_FORMAT:
        return False
    if entry["argv"] != list(argv) or entry["cwd"] != cwd:
        return False
    if any(env.get(name) != value for name, value in entry["env"].items()):
        return False
    for path, kind in entry["exists"]:
        if not (os.path.isdir(path) if kind == "dir" else os.path.isfile(path)):
            return False
    return all(
        memo.tree_stamp(path, tuple(suffixes) if suffixes else None) == stamp
        for path, suffixes, stamp in entry["inputs"]
    )
