"""The up-to-date answer (builder.uptodate): an identical `build` replayed before the CLI is
imported, only while nothing that decided it has changed, and never for a failed build.

The engine is a fake Engine API on a Unix socket (DOCKER_HOST), so these run without Docker;
tests/test_docker_build.py repeats the essentials on a real engine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_build_plan import FakeEngine

from builder import cli, jobs, resolve, uptodate
from builder.commands.common import Context
from builder.options import BuildOptions

ROOT = Path(__file__).resolve().parent.parent
ARGS = ("build", "cpu", "--platform", "linux/amd64")


class EngineAPI:
    """Just enough of the Engine API for `local_images`: GET /images/{ref}/json and /version."""

    def __init__(self, folder: Path) -> None:
        self.images: dict[str, dict[str, object]] = {}  # ref -> inspect JSON
        self.requests: list[str] = []
        self.socket = folder / "engine.sock"
        api = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline().decode()
                while self.rfile.readline() not in (b"\r\n", b""):
                    pass
                url = line.split()[1]
                api.requests.append(url)
                ref = url[len("/images/") : -len("/json")] if url.startswith("/images/") else None
                body = api.images.get(ref) if ref is not None else {"Version": "99.0-test"}
                status = "200 OK" if body is not None else "404 Not Found"
                data = json.dumps(body if body is not None else {"message": "No such image"}).encode()
                self.wfile.write(
                    f"HTTP/1.0 {status}\r\nServer: Docker/99.0-test (linux)\r\n"
                    f"Content-Type: application/json\r\n\r\n".encode()
                    + data
                )

        self.server = socketserver.ThreadingUnixStreamServer(str(self.socket), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def hold(self, job: jobs.BuildJob, image_id: str = "sha256:" + "a" * 64) -> None:
        """The engine has this job's image, under every one of its tags."""
        entry = {
            "Id": image_id,
            "Size": 1234,
            "RepoTags": list(job.tags),
            "Config": {"Labels": dict(job.labels)},
        }
        for tag in job.tags:
            self.images[tag] = entry

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def engine_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[EngineAPI]:
    folder = Path(tempfile.mkdtemp(prefix="qft-", dir="/tmp"))  # a socket path must be short
    api = EngineAPI(folder)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{api.socket}")
    monkeypatch.delenv("DOCKER_CONTEXT", raising=False)
    for name in ("QWEN_FT_MATRIX", "QWEN_FT_BASE_MAP", "QWEN_FT_PLATFORM", "QWEN_FT_REGISTRY"):
        monkeypatch.delenv(name, raising=False)
    yield api
    api.close()
    shutil.rmtree(folder, ignore_errors=True)


def planned(
    project: Path, *selectors: str, platforms: tuple[str, ...] = ("linux/amd64",)
) -> list[jobs.BuildJob]:
    ctx = Context(project / "matrix.yaml", debug=False)
    _, kb, res = ctx.load()
    return jobs.plan_jobs(
        ctx.project, res, kb, resolve.select(res, selectors), BuildOptions(platforms=platforms)
    )


def full_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    """The full CLI in this process, handed its raw arguments as the console script does."""
    capsys.readouterr()
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def replayed(capsys: pytest.CaptureFixture[str], *args: str) -> bool:
    capsys.readouterr()
    return uptodate.replay(list(args))


@pytest.fixture
def answered(
    engine_api: EngineAPI,
    project_copy: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Path:
    """A project whose cpu image the engine holds, after one full `build` that found it up to date."""
    monkeypatch.chdir(project_copy)
    (job,) = planned(project_copy, "cpu")
    engine_api.hold(job)
    code, err = full_cli(monkeypatch, capsys, *ARGS)
    assert code == 0, err
    assert "cpu-fp32: up-to-date" in err
    return project_copy


def test_an_identical_build_is_replayed_with_the_same_lines_and_record(
    answered: Path, engine_api: EngineAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    full = json.loads((answered / "build" / "report.json").read_text())
    engine_api.requests.clear()
    assert replayed(capsys, *ARGS)
    err = capsys.readouterr().err
    assert err.startswith("cpu-fp32: up-to-date (sha256:aaaaaaaaaaaa, qwen-ft:cpu-")
    assert err.endswith("report: build/report.json\n")
    again = json.loads((answered / "build" / "report.json").read_text())
    for data in (full, again):
        assert data.pop("started") > 0 and data.pop("seconds") >= 0
    assert again == full, "the replay writes the record the full path wrote"
    assert again["engine"] == "99.0-test" and again["images"][0]["image_id"] == "sha256:" + "a" * 64
    assert engine_api.requests == [f"/images/{again['images'][0]['tags'][-1]}/json"], "one inspect per image"


def _touch(path: Path) -> None:
    path.write_text(path.read_text(encoding="utf-8") + "\n# changed\n", encoding="utf-8")


CHANGES: dict[str, Callable[[Path, EngineAPI, pytest.MonkeyPatch], None]] = {
    "the matrix file": lambda p, api, mp: _touch(p / "matrix.yaml"),
    "a template": lambda p, api, mp: _touch(p / "templates" / "Dockerfile.j2"),
    "a runtime file": lambda p, api, mp: _touch(p / "runtime" / "qwen_ft_runtime" / "smoke.py"),
    "a new runtime file": lambda p, api, mp: (p / "runtime" / "qwen_ft_runtime" / "new.py").write_text(
        "x = 1\n"
    ),
    "an option's environment variable": lambda p, api, mp: mp.setenv(
        "QWEN_FT_REGISTRY", "127.0.0.1:5000/team"
    ),
    "the engine": lambda p, api, mp: mp.setenv("DOCKER_HOST", "unix:///nonexistent.sock"),
    "the working directory": lambda p, api, mp: mp.chdir(p / "templates"),
    "a moved alias": lambda p, api, mp: [
        img.update(RepoTags=[t for t in img["RepoTags"] if t.endswith(("-py3.11",)) or "-fp32" not in t])  # type: ignore[union-attr]
        for img in api.images.values()
    ],
    "another content hash": lambda p, api, mp: [
        img.update(Config={"Labels": {"io.qwen-ft.content-hash": "e" * 64}}) for img in api.images.values()
    ],
    "a removed image": lambda p, api, mp: api.images.clear(),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_change_to_what_decided_it_falls_through_to_the_full_path(
    answered: Path, engine_api: EngineAPI, monkeypatch: pytest.MonkeyPatch, capsys, change: str
) -> None:
    assert replayed(capsys, *ARGS)
    CHANGES[change](answered, engine_api, monkeypatch)
    args = ARGS if change != "the working directory" else ("-f", str(answered / "matrix.yaml"), *ARGS)
    assert not replayed(capsys, *args), change
    assert capsys.readouterr().err == "", "a fall-through prints nothing: the full path speaks"


def test_other_arguments_are_another_answer(answered: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert not replayed(capsys, *ARGS, "--jobs", "2")
    assert not replayed(capsys, "build", "cpu")
    assert not replayed(capsys, "--debug", *ARGS)


def test_a_checked_input_that_disappeared_falls_through(
    engine_api: EngineAPI, project_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    monkeypatch.chdir(project_copy)
    (job,) = planned(project_copy, "cpu")
    engine_api.hold(job)
    house = tmp_path / "wheels"
    house.mkdir()
    code, err = full_cli(monkeypatch, capsys, *ARGS, "--wheelhouse", str(house))
    assert code == 0, err
    assert replayed(capsys, *ARGS, "--wheelhouse", str(house))
    house.rmdir()
    assert not replayed(capsys, *ARGS, "--wheelhouse", str(house))
    code, err = full_cli(monkeypatch, capsys, *ARGS, "--wheelhouse", str(house))
    assert code != 0 and "--wheelhouse" in err, "the full path names the problem"


def test_a_failed_build_stores_no_answer(
    engine_api: EngineAPI, project_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import builder.engine

    monkeypatch.chdir(project_copy)
    (job,) = planned(project_copy, "cpu")
    fake = FakeEngine(fail={job.name})
    monkeypatch.setattr(builder.engine, "DockerEngine", lambda *a, **k: fake)
    code, _ = full_cli(monkeypatch, capsys, *ARGS)
    assert code != 0 and ("build", job.name) in fake.calls
    engine_api.hold(job)  # even should the image appear, no answer was kept for the failed run
    memo = project_copy / "build" / "cache" / "memo"
    key = uptodate.answer_key("matrix.yaml", ARGS, str(project_copy))
    assert not (memo / f"{key}.json").exists()
    assert not replayed(capsys, *ARGS)


def test_a_dry_run_or_push_is_never_answered(answered: Path, capsys, monkeypatch) -> None:
    for extra in (("--dry-run",), ("--push", "--registry", "127.0.0.1:5000/x")):
        key = uptodate.answer_key("matrix.yaml", (*ARGS, *extra), str(answered))
        assert not (answered / "build" / "cache" / "memo" / f"{key}.json").exists()
        assert not replayed(capsys, *ARGS, *extra)


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["build"], {}, "matrix.yaml"),
        (["build", "cpu"], {"QWEN_FT_MATRIX": "other.yaml"}, "other.yaml"),
        (["-f", "x.yaml", "build"], {"QWEN_FT_MATRIX": "other.yaml"}, "x.yaml"),
        (["--matrix", "x.yaml", "build"], {}, "x.yaml"),
        (["--matrix=x.yaml", "build", "--push"], {}, "x.yaml"),
        (["smoke", "cpu"], {}, None),
        (["--debug", "build"], {}, None),
        (["-f"], {}, None),
        ([], {}, None),
    ],
)
def test_locate_reads_only_the_matrix_option_before_build(
    argv: list[str], env: dict[str, str], expected: str | None
) -> None:
    assert uptodate.locate(argv, env) == expected


def test_the_console_script_replays_without_importing_the_cli(answered: Path) -> None:
    """The whole point: the answer comes before click, YAML, the resolver, Jinja or docker.
    `python -S`: not even site-packages, so only the standard library and this checkout."""
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; sys.argv = ['qwen-ft-images', *sys.argv[3:]]\n"
        "from builder.__main__ import main\n"
        "main()\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code, str(ROOT), str(ROOT / "runtime"), *ARGS],
        capture_output=True,
        text=True,
        cwd=answered,
        env=os.environ,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cpu-fp32: up-to-date" in proc.stderr
    loaded = set(proc.stdout.split())
    heavy = {"click", "rich", "yaml", "jinja2", "docker", "packaging", "dataclasses", "typing", "pathlib"}
    builders = {m for m in loaded if m.startswith("builder")}
    assert not heavy & loaded, sorted(heavy & loaded)
    assert builders == {
        "builder",
        "builder.__main__",
        "builder.uptodate",
        "builder.memo",
        "builder.contract",
    }, sorted(builders)


def test_memoized_jobs_follow_the_platform_filter_and_the_templates(project_copy: Path) -> None:
    """Regression: the jobs memo once ignored --platform and templates/, so `build cpu` after
    `build cpu --platform linux/amd64` planned (and called up to date) the amd64 image only."""
    ctx = Context(project_copy / "matrix.yaml", debug=False)
    _, kb, res = ctx.load()
    cells = resolve.select(res, ["cpu"])
    one = ctx.jobs(res, kb, cells, BuildOptions(platforms=("linux/amd64",)))
    both = ctx.jobs(res, kb, cells, BuildOptions())
    assert [j.platform for j in one] == ["linux/amd64"]
    assert sorted(j.platform for j in both) == ["linux/amd64", "linux/arm64"]
    _touch(project_copy / "templates" / "Dockerfile.j2")
    again = ctx.jobs(res, kb, cells, BuildOptions())
    assert {j.digest for j in again}.isdisjoint({j.digest for j in both}), "a template edit changes the hash"


def test_a_proxy_password_keeps_no_answer(
    engine_api: EngineAPI, project_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """An answer is kept under its invocation as given; one carrying a proxy password is not
    kept at all (the full path's no-op still answers it)."""
    monkeypatch.chdir(project_copy)
    (job,) = planned(project_copy, "cpu")
    engine_api.hold(job)
    monkeypatch.setenv("QWEN_FT_HTTPS_PROXY", "http://me:s3cr3t-pw@proxy.invalid:3128")
    for args in (ARGS, (*ARGS, "--http-proxy", "http://me:s3cr3t-pw@proxy.invalid:3128")):
        code, err = full_cli(monkeypatch, capsys, *args)
        assert code == 0 and "cpu-fp32: up-to-date" in err, err
        assert not replayed(capsys, *args)
    for path in (project_copy / "build").rglob("*"):
        if path.is_file():
            assert b"s3cr3t-pw" not in path.read_bytes(), path


@pytest.mark.parametrize("args", [("render",), ("render", "--check")])
def test_an_unchanged_render_is_replayed_until_images_or_its_inputs_change(
    project_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys, args: tuple[str, ...]
) -> None:
    monkeypatch.chdir(project_copy)
    assert not replayed(capsys, *args), "nothing kept yet"
    code, _ = full_cli(monkeypatch, capsys, "render")  # may write files: keeps no answer
    assert code == 0
    capsys.readouterr()
    cli.main(list(args))  # changes nothing: keeps its answer
    said = capsys.readouterr().out
    assert re.fullmatch(r"\d+ files rendered, 0 changed\n|images/ is up to date \(\d+ files\)\n", said), said
    assert replayed(capsys, *args)
    assert capsys.readouterr().out == said, "the same words"
    dockerfile = next((project_copy / "images").glob("*/Dockerfile"))
    dockerfile.write_text(dockerfile.read_text() + "# hand edit\n")
    assert not replayed(capsys, *args), "images/ changed by hand: render must rewrite (or --check fail)"
    code, _ = full_cli(monkeypatch, capsys, *args)
    assert code == (0 if args == ("render",) else 4)
