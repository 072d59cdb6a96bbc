"""The one module that talks to the Docker engine.

Builds go through BuildKit via the docker CLI (`docker buildx build` when the
buildx plugin exists, else a client with built-in BuildKit and DOCKER_BUILDKIT=1):
the docker SDK cannot do BuildKit builds (docker/docker-py#2230). Everything
else (version check, inspect, tag, push, pull, run, remove) uses the SDK.

The one read it does not hold is `builder.uptodate.local_images`: read-only Engine API
inspects with the standard library, kept there so an up-to-date `build` never imports
this module.

Every engine operation is also appended, as the equivalent docker CLI command,
to a replayable shell script, so a failed run can be reproduced by hand.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from packaging.version import InvalidVersion, Version

from builder.errors import EngineError, Interrupted, RegistryError
from builder.options import BY_NAME

DOCKER_ENV = BY_NAME["docker"].env

if TYPE_CHECKING:
    import docker

    from builder.uptodate import Snapshot

# RUN --mount=type=secret|cache|bind needs BuildKit's Dockerfile frontend 1.2+, built
# into dockerd since 18.09 and stable since 20.10; older daemons fail at parse time.
MIN_ENGINE = Version("20.10")
# docker CLI 23+ no longer carries the legacy BuildKit path: it needs the buildx plugin.
_CLI_BUILTIN_BUILDKIT_MAX = Version("23")


@dataclass(frozen=True)
class BuildRequest:
    """Everything one `docker build` needs; tags are applied only after it succeeds."""

    name: str
    dockerfile: Path
    context: Path
    build_args: Mapping[str, str]
    labels: Mapping[str, str]
    secrets: Mapping[str, Path] = field(default_factory=dict)
    # Docker's predefined proxy args: passed as build args, but never stored in history.
    proxies: Mapping[str, str] = field(default_factory=dict)
    network: str | None = None
    # BuildKit's --platform (linux/arm64 runs its RUN steps under qemu-user-static here).
    # None for linux/amd64, so the amd64 command stays what it always was.
    platform: str | None = None


@dataclass(frozen=True)
class BuildOutcome:
    ok: bool
    image_id: str | None
    failed_step: str | None
    error: str | None
    log: Path


@dataclass(frozen=True)
class ContainerRun:
    exit_code: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False


class Engine(Protocol):
    """What build/smoke need from an engine; tests use a recording fake."""

    def check(self) -> str: ...
    def build(self, req: BuildRequest, log: Path, on_step: Callable[[str], None]) -> BuildOutcome: ...
    def image_labels(self, ref: str) -> Mapping[str, str] | None: ...
    def image_id(self, ref: str) -> str | None: ...
    def image_size(self, ref: str) -> int: ...
    def repo_digests(self, ref: str) -> list[str]: ...
    def tag(self, image_id: str, ref: str) -> None: ...
    def push(self, ref: str) -> str: ...
    def pull(self, ref: str) -> str: ...
    def remote_digest(self, ref: str) -> str | None: ...
    def remove_image(self, ref: str) -> None: ...
    def create_manifest_list(self, target: str, sources: Sequence[str]) -> str: ...
    def manifest_platforms(self, ref: str) -> dict[str, str] | None: ...
    def image_platform(self, ref: str) -> str | None: ...
    def pull_ref(self, ref: str) -> None: ...


class ContainerEngine(Protocol):
    """What smoke, audit and compare need to run containers (DockerEngine; tests use fakes)."""

    def image_labels(self, ref: str) -> Mapping[str, str] | None: ...
    def image_id(self, ref: str) -> str | None: ...
    def run_container(
        self,
        image: str,
        command: Sequence[str],
        *,
        timeout: float,
        gpus: bool = False,
        env: Mapping[str, str] | None = None,
        volumes: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> ContainerRun: ...


def _plain_http(ref: str) -> bool:
    """dockerd's default insecure registries: loopback, where CI and tests run theirs."""
    host = ref.split("/", 1)[0]
    return host.startswith(("127.", "localhost")) or host == "[::1]"


def docker_executable(configured: str | None) -> str:
    # builder.options resolved --docker, its env var and the default already.
    exe = configured or "docker"
    found = shutil.which(exe)
    if found is None:
        raise EngineError(
            f"docker executable '{exe}' not found; install the Docker CLI or pass --docker PATH "
            f"(or set {DOCKER_ENV})"
        )
    return found


# (exit status, stdout) of a command, or None when the program is not there; injectable
# so `doctor` can probe through its own runner and tests through a table.
ProbeRun = Callable[[Sequence[str]], "tuple[int, str] | None"]


def _probe_run(argv: Sequence[str]) -> tuple[int, str] | None:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    except (FileNotFoundError, PermissionError):
        return None
    except subprocess.TimeoutExpired:
        return 124, ""
    return done.returncode, done.stdout


@dataclass(frozen=True)
class BuildClient:
    """A docker CLI and the BuildKit path it builds through (None: it has none)."""

    exe: str
    path: str | None  # "buildx" | "builtin" | None
    version: str = ""  # the client's version; asked only when there is no buildx
    buildx: str = ""  # `docker buildx version`, e.g. "github.com/docker/buildx v0.13.1 <rev>"

    @property
    def argv(self) -> list[str]:
        return [self.exe, "buildx", "build", "--load"] if self.path == "buildx" else [self.exe, "build"]

    @property
    def env(self) -> dict[str, str]:
        return {"DOCKER_BUILDKIT": "1"} if self.path == "builtin" else {}

    def has(self) -> str:
        if self.path == "buildx":
            return "has the buildx plugin"
        return f"({self.version}) has built-in BuildKit" if self.path == "builtin" else "has no BuildKit"

    def describe(self) -> str:
        """One line for `doctor` and the notes: the command builds run and which client runs it."""
        if self.path == "buildx":
            words = self.buildx.split()
            plugin = f"buildx {words[1]}" if len(words) > 1 else "buildx"
            return f"docker buildx build --load ({self.exe}, {plugin})"
        if self.path == "builtin":
            return f"DOCKER_BUILDKIT=1 docker build ({self.exe} {self.version}, built-in BuildKit)"
        return f"none ({self.exe} {self.version or '?'} has no buildx plugin and no built-in BuildKit)"


def probe_build_client(exe: str, run: ProbeRun = _probe_run) -> BuildClient | None:
    """How `exe` builds: the buildx plugin if it has one, else built-in BuildKit if it is pre-23.

    None when `exe` cannot be run at all.
    """
    buildx = run([exe, "buildx", "version"])
    if buildx is None:
        return None
    if buildx[0] == 0:
        return BuildClient(exe, "buildx", buildx=buildx[1].strip())
    client = run([exe, "version", "--format", "{{.Client.Version}}"])
    raw = client[1].strip() if client is not None else ""
    try:
        version = Version(re.sub(r"[+~].*$", "", raw))
    except InvalidVersion:
        version = Version("0")
    return BuildClient(exe, "builtin" if version < _CLI_BUILTIN_BUILDKIT_MAX else None, version=raw)


def docker_clients_on_path(name: str = "docker") -> list[str]:
    """Every `docker` on PATH in order (`which -a`), one per real file (/bin -> /usr/bin)."""
    seen: set[str] = set()
    found: list[str] = []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder or ".") / name
        real = str(candidate.resolve())
        if candidate.is_file() and os.access(candidate, os.X_OK) and real not in seen:
            seen.add(real)
            found.append(str(candidate))
    return found


def find_build_client(
    exe: str, run: ProbeRun = _probe_run, others: Sequence[str] | None = None
) -> BuildClient:
    """The client builds go through: `exe` itself, or a one-line error that names a client that works.

    Another client is named, never switched to: it may be a different Docker install with
    its own plugins and defaults, so using it is the user's explicit choice (--docker).
    """
    client = probe_build_client(exe, run)
    if client is not None and client.path is not None:
        return client
    version = f" ({client.version})" if client is not None and client.version else ""
    problem = f"{exe}{version} has no buildx plugin and no built-in BuildKit (docker 23+ needs the plugin)"
    real = str(Path(shutil.which(exe) or exe).resolve())
    for other in others if others is not None else docker_clients_on_path():
        if str(Path(other).resolve()) == real:
            continue
        alternative = probe_build_client(other, run)
        if alternative is not None and alternative.path is not None:
            raise EngineError(
                f"{problem}; {other} {alternative.has()}: pass --docker {other} "
                f"(or set QWEN_FT_DOCKER={other}), or install the docker-buildx plugin (ci/README.md)"
            )
    raise EngineError(
        f"{problem}; install the docker-buildx plugin (ci/README.md), or pass --docker with a "
        "client that has it"
    )


def describe_build_path(exe: str, run: ProbeRun = _probe_run) -> str | None:
    """`doctor`'s line: how builds would run with `exe`, or why they cannot; None if no client."""
    exe = shutil.which(exe) or exe
    client = probe_build_client(exe, run)
    if client is None:
        return None
    if client.path is not None:
        return client.describe()
    try:
        find_build_client(exe, run)
    except EngineError as exc:
        return f"none: {exc.message}"
    return client.describe()  # pragma: no cover - find_build_client raises for a client without a path


class SnapshotEngine:
    """Image questions answered from one Engine API snapshot (builder.uptodate.local_images,
    which lives there to keep the no-op path's imports small); a DockerEngine (and the SDK
    import) is made only when something must run. An up-to-date `smoke` then never starts one."""

    def __init__(self, snapshot: Snapshot, make: Callable[[], DockerEngine]) -> None:
        self.snapshot = snapshot
        self._make = make
        self._engine: DockerEngine | None = None

    @property
    def engine(self) -> DockerEngine:
        if self._engine is None:
            self._engine = self._make()
        return self._engine

    def check(self) -> str:
        return self.snapshot.engine_version

    def image_labels(self, ref: str) -> Mapping[str, str] | None:
        if ref not in self.snapshot.asked:
            return self.engine.image_labels(ref)
        image = self.snapshot.tags.get(ref)
        return None if image is None else image.labels

    def image_id(self, ref: str) -> str | None:
        if ref not in self.snapshot.asked:
            return self.engine.image_id(ref)
        image = self.snapshot.tags.get(ref)
        return None if image is None else image.id

    def image_architecture(self, ref: str) -> str | None:
        return self.engine.image_architecture(ref)

    def run_container(
        self,
        image: str,
        command: Sequence[str],
        *,
        timeout: float,
        gpus: bool = False,
        env: Mapping[str, str] | None = None,
        volumes: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> ContainerRun:
        return self.engine.run_container(
            image, command, timeout=timeout, gpus=gpus, env=env, volumes=volumes, labels=labels
        )


class CommandLog:
    """Appends each engine operation to build/logs/commands.sh as a runnable command."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                path.write_text("#!/bin/sh\n# Engine commands run by qwen-ft-images, in order.\nset -e\n")
                path.chmod(0o755)

    def record(self, argv: Sequence[str], env: Mapping[str, str] | None = None, comment: str = "") -> None:
        if self.path is None:
            return
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        line = (prefix + " " if prefix else "") + shlex.join(argv)
        with self._lock, self.path.open("a") as f:
            if comment:
                f.write(f"# {comment}\n")
            f.write(line + "\n")


_STEP = re.compile(r"^#(?P<id>\d+) \[(?P<step>[^\]]+)\] (?P<cmd>.*)$")
_STEP_ERROR = re.compile(r"^#(?P<id>\d+) ERROR:")


@functools.cache
def _error_hints() -> tuple[tuple[re.Pattern[str], str], ...]:
    """Compiled on the first failed build, not at import (the no-op path never needs them)."""
    return (
        (
            re.compile(r"no space left on device", re.I),
            "disk full: free space (docker system prune) and rebuild",
        ),
        (
            re.compile(
                r"(failed to resolve source metadata|pull access denied|failed to do request|"
                r"manifest unknown|failed to authorize|failed to create LLB definition).*",
                re.I,
            ),
            "base image unreachable: mirror it and pass --base-map 'PATTERN=MIRROR' (or docker load it)",
        ),
    )


class DockerEngine:
    def __init__(self, docker_exe: str | None = None, commands: CommandLog | None = None) -> None:
        self.exe = docker_executable(docker_exe)
        self.commands = commands or CommandLog(None)
        self._client: docker.DockerClient | None = None
        self._build_argv: list[str] | None = None
        self._build_env: dict[str, str] = {}
        self._running: set[subprocess.Popen[str]] = set()
        self._running_lock = threading.Lock()
        self._cancelled = threading.Event()

    def cancel_all(self) -> None:
        """Stop every running build and push (Ctrl-C): BuildKit cancels and leaves no build containers."""
        self._cancelled.set()
        with self._running_lock:
            procs = list(self._running)
        for proc in procs:
            _terminate(proc)

    # -- engine presence --------------------------------------------------------------
    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            import docker

            try:
                self._client = docker.from_env(timeout=600)
                self._client.ping()
            except docker.errors.DockerException as exc:
                raise EngineError(
                    f"no Docker daemon answers ({_short(exc)}); start dockerd (or Docker Desktop) "
                    "or set DOCKER_HOST"
                ) from None
        return self._client

    def check(self) -> str:
        """Fail early, with what to do, if the daemon is missing or too old."""
        info = self.client.version()
        raw = str(info.get("Version", "0"))
        try:
            version = Version(re.sub(r"[+~].*$", "", raw))
        except InvalidVersion:
            version = Version("0")
        if version < MIN_ENGINE:
            raise EngineError(
                f"Docker engine {raw} is too old: RUN --mount needs {MIN_ENGINE}+; upgrade dockerd"
            )
        # The BuildKit probe (two docker CLI calls) waits until something must be built.
        return raw

    def _detect_buildkit(self) -> None:
        if self._build_argv is not None:
            return
        client = find_build_client(self.exe)
        self._build_argv = client.argv
        self._build_env = client.env

    # -- builds -----------------------------------------------------------------------
    def build_argv(self, req: BuildRequest, iidfile: Path) -> tuple[list[str], dict[str, str]]:
        """The exact command (and extra environment) for one build; also shown by --dry-run."""
        self._detect_buildkit()
        assert self._build_argv is not None
        argv = [*self._build_argv, "--progress=plain", "--iidfile", str(iidfile), "-f", str(req.dockerfile)]
        for key, value in sorted(req.build_args.items()):
            argv += ["--build-arg", f"{key}={value}"]
        for key in sorted(req.proxies):
            # Name only: the docker CLI reads the value from its environment (see build()),
            # so proxy credentials never show in `ps`, commands.sh, the log or --dry-run.
            argv += ["--build-arg", key]
        for key, value in sorted(req.labels.items()):
            argv += ["--label", f"{key}={value}"]
        for sid, src in sorted(req.secrets.items()):
            argv += ["--secret", f"id={sid},src={src}"]
        if req.network:
            argv += ["--network", req.network]
        if req.platform:
            argv += ["--platform", req.platform]
        argv.append(str(req.context))
        return argv, dict(self._build_env)

    def build(self, req: BuildRequest, log: Path, on_step: Callable[[str], None]) -> BuildOutcome:
        log.parent.mkdir(parents=True, exist_ok=True)
        iidfile = log.with_suffix(".iid")
        iidfile.unlink(missing_ok=True)
        argv, extra_env = self.build_argv(req, iidfile)
        proxy_note = f"; reads {', '.join(sorted(req.proxies))} from the environment" if req.proxies else ""
        self.commands.record(argv, extra_env, comment=f"build {req.name}{proxy_note}")
        env = {**os.environ, **extra_env, **req.proxies}
        last_step = None
        failed_step = None
        steps: dict[str, str] = {}
        tail: list[str] = []
        with log.open("w", buffering=1) as out:  # line-buffered: `tail -f` works mid-build
            out.write("$ " + shlex.join(argv) + "\n")
            # A new session keeps a terminal's Ctrl-C away from the child: we stop it
            # ourselves, so BuildKit cancels cleanly and no half-built image gets tagged.
            proc = subprocess.Popen(
                [sys.executable, "-c", _SUPERVISOR, *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            with self._running_lock:
                self._running.add(proc)
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    out.write(line)
                    tail = [*tail[-40:], line.rstrip()]
                    m = _STEP.match(line.rstrip())
                    if m:
                        last_step = f"[{m.group('step')}] {m.group('cmd')}"[:160]
                        steps[m.group("id")] = last_step
                        on_step(last_step)
                    err = _STEP_ERROR.match(line)
                    if err and failed_step is None:
                        failed_step = steps.get(err.group("id"))
                code = proc.wait()
            except BaseException:
                _terminate(proc)
                raise
            finally:
                with self._running_lock:
                    self._running.discard(proc)
        if code != 0:
            error = _summarise_error(tail)
            return BuildOutcome(False, None, failed_step or last_step, error, log)
        image_id = iidfile.read_text().strip() if iidfile.exists() else None
        iidfile.unlink(missing_ok=True)
        return BuildOutcome(image_id is not None, image_id, None, None if image_id else "no image id", log)

    # -- images -----------------------------------------------------------------------
    def _inspect(self, ref: str) -> dict[str, Any] | None:
        import docker

        try:
            data: dict[str, Any] = self.client.api.inspect_image(ref)  # type: ignore[no-untyped-call]
        except docker.errors.ImageNotFound:
            return None
        return data

    def image_labels(self, ref: str) -> Mapping[str, str] | None:
        data = self._inspect(ref)
        if data is None:
            return None
        return dict((data.get("Config") or {}).get("Labels") or {})

    def image_id(self, ref: str) -> str | None:
        data = self._inspect(ref)
        return None if data is None else str(data["Id"])

    def image_size(self, ref: str) -> int:
        data = self._inspect(ref)
        return 0 if data is None else int(data.get("Size", 0))

    def repo_digests(self, ref: str) -> list[str]:
        data = self._inspect(ref)
        return [] if data is None else list(data.get("RepoDigests") or [])

    def image_architecture(self, ref: str) -> str | None:
        """The image's CPU architecture as Docker names it (amd64, arm64), or None if absent."""
        data = self._inspect(ref)
        return None if data is None else str(data.get("Architecture") or "") or None

    def tag(self, image_id: str, ref: str) -> None:
        repo, tag = split_ref(ref)
        self.commands.record([self.exe, "tag", image_id, ref])
        self.client.api.tag(image_id, repo, tag, force=True)

    def push(self, ref: str) -> str:
        """Push and return the manifest digest the registry reported."""
        import docker

        repo, tag = split_ref(ref)
        self.commands.record([self.exe, "push", ref])
        digest = None
        try:
            for event in self.client.api.push(repo, tag=tag, stream=True, decode=True):
                if self._cancelled.is_set():  # Ctrl-C: stop reading; the daemon drops the push
                    raise Interrupted(f"push of {ref} was interrupted")
                if "error" in event:
                    raise RegistryError(f"push of {ref} failed: {_short(event['error'])}")
                aux = event.get("aux") or {}
                if "Digest" in aux:
                    digest = str(aux["Digest"])
        except (docker.errors.APIError, OSError) as exc:
            raise RegistryError(f"push of {ref} failed: {_short(exc)}; is the registry reachable?") from None
        if digest is None:
            raise RegistryError(f"push of {ref} reported no digest")
        return digest

    def pull(self, ref: str) -> str:
        import docker

        # By digest (repo@sha256:...) or by tag; the SDK takes a digest in place of a tag.
        repo, tag = ref.split("@", 1) if "@" in ref else split_ref(ref)
        self.commands.record([self.exe, "pull", ref])
        try:
            image = self.client.images.pull(repo, tag=tag)
        except (docker.errors.APIError, OSError) as exc:
            raise RegistryError(f"pull of {ref} failed: {_short(exc)}") from None
        return str(image.id)

    def remote_digest(self, ref: str) -> str | None:
        """The manifest digest a registry holds for ref, or None if the tag does not exist."""
        import docker

        try:
            data = self.client.images.get_registry_data(ref)
        except docker.errors.APIError as exc:
            # Only the registry's own "no such tag/repository" codes mean absent: a 403 such as
            # "project not found or no read permission" must not skip the immutability check.
            status = exc.response.status_code if exc.response is not None else None
            if status == 404 and _ABSENT.search(f"{exc} {exc.explanation or ''}"):
                return None
            raise RegistryError(
                f"registry for {ref} is unreachable or refused: {_short(exc)}; "
                "check --registry and that the registry runs"
            ) from None
        return str(data.id)

    # -- manifest lists: one tag, one image per platform ------------------------------
    def _manifest_cli(self, args: Sequence[str], what: str, *, missing_ok: bool = False) -> str | None:
        argv = [self.exe, "manifest", *args]
        self.commands.record(argv)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            text = (done.stderr or done.stdout).strip()
            if missing_ok and ("no such manifest" in text.lower() or "manifest unknown" in text.lower()):
                return None
            raise RegistryError(f"{what} failed: {_short(text)}")
        return done.stdout

    def create_manifest_list(self, target: str, sources: Sequence[str]) -> str:
        """Assemble and push a manifest list of already-pushed images; its digest.

        `docker manifest` works with every client here (20.10 has it; buildx's `imagetools
        create` would need the builder to trust a plain-HTTP registry, docker manifest only
        --insecure). Each entry's platform is read from the image's own config, so an arm64
        image lands under linux/arm64 whatever host built it.
        """
        insecure = ["--insecure"] if _plain_http(target) else []
        self._manifest_cli(["rm", target], f"docker manifest rm {target}", missing_ok=True)
        self._manifest_cli(["create", *insecure, target, *sources], f"docker manifest create {target}")
        out = (
            self._manifest_cli(["push", *insecure, "--purge", target], f"docker manifest push {target}") or ""
        )
        digests = [w for w in out.split() if w.startswith("sha256:")]
        if not digests:
            raise RegistryError(f"docker manifest push {target} reported no digest: {_short(out)}")
        return digests[-1]

    def manifest_platforms(self, ref: str) -> dict[str, str] | None:
        """{'linux/arm64': digest, ...} of a manifest list in the registry; None if the tag is absent.
        A plain (single-image) manifest answers {} : it names no platform."""
        insecure = ["--insecure"] if _plain_http(ref) else []
        out = self._manifest_cli(
            ["inspect", *insecure, ref], f"docker manifest inspect {ref}", missing_ok=True
        )
        if out is None:
            return None
        data = json.loads(out)
        entries = data.get("manifests") if isinstance(data, dict) else None
        if not entries:
            return {}
        return {
            f"{m['platform']['os']}/{m['platform']['architecture']}": str(m["digest"])
            for m in entries
            if m.get("platform")
        }

    def image_platform(self, ref: str) -> str | None:
        data = self._inspect(ref)
        if data is None:
            return None
        return f"{data.get('Os') or 'linux'}/{data.get('Architecture') or ''}"

    def pull_ref(self, ref: str) -> None:
        """`docker pull REF` with the CLI: also takes repo@sha256:… (the SDK's pull does not)."""
        argv = [self.exe, "pull", "-q", ref]
        self.commands.record(argv)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
        if done.returncode != 0:
            raise RegistryError(f"pull of {ref} failed: {_short((done.stderr or done.stdout).strip())}")

    def local_tags(self, repository: str) -> dict[str, str]:
        """Every local tag of a repository, mapped to its image id."""
        out: dict[str, str] = {}
        for image in self.client.images.list(name=repository):
            for tag in image.tags:
                if tag.rsplit(":", 1)[0] == repository:
                    out[tag] = str(image.id)
        return out

    def remove_image(self, ref: str) -> None:
        import docker

        self.commands.record([self.exe, "rmi", ref])
        with contextlib.suppress(docker.errors.ImageNotFound):
            self.client.api.remove_image(ref, noprune=False)

    # -- containers -------------------------------------------------------------------
    @contextlib.contextmanager
    def container(
        self,
        image: str,
        command: Sequence[str],
        *,
        gpus: bool = False,
        env: Mapping[str, str] | None = None,
        volumes: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Iterator[Any]:
        """A started container that is always removed, even on Ctrl-C.

        `volumes` maps host paths to container paths, mounted read-only. The name is chosen
        before the container is created, so an interrupt at any point still finds it to remove,
        and a second Ctrl-C waits until the removal is done.
        """
        import uuid  # here, not at import: the no-op build path imports this module

        import docker

        name = f"qwen-ft-{uuid.uuid4().hex[:12]}"
        kwargs: dict[str, Any] = {"name": name, "environment": dict(env or {}), "labels": dict(labels or {})}
        flags = ["--gpus", "all"] if gpus else []
        if gpus:
            kwargs["device_requests"] = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
            # As `doctor` tells users to run training (deepspeed.yaml container_run): NCCL's SHM
            # transport and DataLoader workers outgrow Docker's 64 MB /dev/shm with several ranks.
            kwargs["ipc_mode"] = "host"
            kwargs["ulimits"] = [
                docker.types.Ulimit(name="memlock", soft=-1, hard=-1),
                docker.types.Ulimit(name="stack", soft=67108864, hard=67108864),
            ]
            flags += ["--ipc=host", "--ulimit", "memlock=-1", "--ulimit", "stack=67108864"]
        for key, value in (env or {}).items():
            flags += ["-e", f"{key}={value}"]
        if volumes:
            kwargs["volumes"] = {str(src): {"bind": dst, "mode": "ro"} for src, dst in volumes.items()}
            for src, dst in volumes.items():
                flags += ["-v", f"{src}:{dst}:ro"]
        self.commands.record([self.exe, "run", "--rm", *flags, image, *command])
        try:
            box = self.client.containers.create(image, list(command), **kwargs)
            box.start()
            yield box
        finally:
            with _sigint_deferred(), contextlib.suppress(docker.errors.APIError):
                self.client.api.remove_container(name, force=True)

    def run_container(
        self,
        image: str,
        command: Sequence[str],
        *,
        timeout: float,
        gpus: bool = False,
        env: Mapping[str, str] | None = None,
        volumes: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> ContainerRun:
        """Run a container to its end (killed after `timeout` s); stdout and stderr kept apart."""
        import docker
        import requests

        start = time.monotonic()
        try:
            with self.container(image, command, gpus=gpus, env=env, volumes=volumes, labels=labels) as box:
                code: int | None = None
                try:
                    code = int(box.wait(timeout=timeout)["StatusCode"])
                except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError) as exc:
                    if not isinstance(exc, requests.exceptions.ReadTimeout) and (
                        time.monotonic() - start < timeout
                    ):
                        raise EngineError(
                            f"lost the Docker daemon while running {image}: {_short(exc)}"
                        ) from None
                    with contextlib.suppress(docker.errors.APIError):
                        box.kill()
                stdout = box.logs(stdout=True, stderr=False).decode(errors="replace")
                stderr = box.logs(stdout=False, stderr=True).decode(errors="replace")
        except docker.errors.APIError as exc:
            hint = "; is the NVIDIA Container Toolkit installed and dockerd restarted?" if gpus else ""
            raise EngineError(f"docker could not run {image}: {_short(exc)}{hint}") from None
        return ContainerRun(code, stdout, stderr, time.monotonic() - start, timed_out=code is None)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C off while cleanup runs, then raise it: a second Ctrl-C cannot skip a removal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


_ABSENT = re.compile(r"manifest unknown|name unknown|repository name not known to registry", re.I)


def split_ref(ref: str) -> tuple[str, str]:
    """'host:5000/ns/name:tag' -> ('host:5000/ns/name', 'tag')."""
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag:
        return ref, "latest"
    return name, tag


# The build runs under this small supervisor, alone in its process group. The kernel sends it
# SIGTERM when the CLI dies, even by `kill -9` (_die_with_parent); it then interrupts the whole
# group, the docker client and its buildx plugin process alike, as Ctrl-C would, so BuildKit
# cancels the build and no orphan finishes an image. The group's own SIGINT (_terminate) is
# for docker: the supervisor waits for it to exit and passes its exit code on.
_SUPERVISOR = """
import os, signal, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
def parent_gone(signum, frame):
    os.killpg(0, signal.SIGINT)
    signal.signal(signal.SIGALRM, lambda s, f: os.killpg(0, signal.SIGKILL))
    signal.alarm(20)
signal.signal(signal.SIGINT, lambda s, f: None)
signal.signal(signal.SIGTERM, parent_gone)
code = child.wait()
sys.exit(code if code >= 0 else 128 - code)
"""


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when its parent dies, even by `kill -9`, so no
    `docker build` outlives the CLI (see _SUPERVISOR)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _terminate(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _summarise_error(tail: list[str]) -> str:
    text = "\n".join(tail)
    for pattern, hint in _error_hints():
        found = pattern.search(text)
        if found:
            return f"{hint} ({found.group(0).strip()[:200]})"
    for line in reversed(tail):
        if line.startswith(("ERROR", "error:", "failed to solve")) or "ERROR:" in line:
            return line.strip()[:300]
    return (tail[-1] if tail else "build failed")[:300]


def _short(exc: object) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def parse_json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


__all__ = [
    "BuildClient",
    "BuildOutcome",
    "BuildRequest",
    "CommandLog",
    "ContainerRun",
    "DockerEngine",
    "Engine",
    "Interrupted",
    "find_build_client",
    "split_ref",
]
