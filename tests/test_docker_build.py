"""Docker tier: real builds, tags, registry round trips and the secrets guarantee, on a real engine.

Tests taking `built_via` or `build_client` run once per BuildKit path (docker_support): the
buildx plugin and a pre-23 client's built-in BuildKit. The others say why one path suffices.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
from docker_support import (
    BASE_IMAGE,
    CA_BUNDLE,
    DOCKER,
    REGISTRY,
    Built,
    Client,
    cli,
    copy_project,
    docker,
    remove_images,
    session_image,
)

pytestmark = pytest.mark.docker

# The registry outlives a test session; a fresh namespace keeps immutable tags from clashing.
RUN_ID = uuid.uuid4().hex[:8]


def inspect(ref: str) -> dict[str, object]:
    data = json.loads(docker("image", "inspect", ref).stdout)
    assert isinstance(data, list)
    first = data[0]
    assert isinstance(first, dict)
    return first


def labels_of(ref: str) -> dict[str, str]:
    config = inspect(ref)["Config"]
    assert isinstance(config, dict)
    return dict(config.get("Labels") or {})


def test_cpu_image_is_built_and_tagged(built_via: Built) -> None:
    r = built_via.result("cpu-fp32")
    assert built_via.client is not None
    assert r["status"] == "built", "a fresh image name: the build really ran"
    log = Path(str(r["log"])).read_text()
    assert log.startswith(built_via.client.build_command), log.splitlines()[0]
    image = built_via.image
    tags = r["tags"]
    assert isinstance(tags, list)
    assert tags[0] == f"{image}:cpu-fp32"
    assert tags[1] == f"{image}:cpu-fp32-torch2.13.0-py3.11"
    assert re.fullmatch(rf"{image}:cpu-[0-9a-f]{{12}}", tags[2])
    ids = {inspect(t)["Id"] for t in tags}
    assert ids == {r["image_id"]}, "alias, pinned and content tags name one image"
    labels = labels_of(tags[0])
    assert labels["io.qwen-ft.target"] == "cpu"
    assert labels["io.qwen-ft.dtype"] == "fp32"
    assert labels["io.qwen-ft.attn"] == "sdpa"
    assert labels["io.qwen-ft.torch"] == "2.13.0"
    assert labels["io.qwen-ft.triton"] == "remove"
    assert labels["io.qwen-ft.content-hash"].startswith(str(tags[2]).split("-")[-1])
    spec = json.loads(labels["io.qwen-ft.spec"])
    assert spec["torch"] == "torch==2.13.0+cpu"
    assert labels["org.opencontainers.image.base.name"] == "debian:bookworm-slim"
    env = inspect(tags[0])["Config"]
    assert isinstance(env, dict)
    assert "QWEN_FT_DTYPE=fp32" in env["Env"]


def test_rebuild_does_no_build_work(built_via: Built) -> None:
    log = built_via.project / "build" / "logs" / "cpu-fp32.log"
    before = log.stat().st_mtime_ns if log.exists() else None
    proc = cli(built_via.project, "build", "cpu", *built_via.base_args, client=built_via.client)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((built_via.project / "build" / "report.json").read_text())
    assert [r["status"] for r in report["images"]] == ["up-to-date"]
    after = log.stat().st_mtime_ns if log.exists() else None
    assert before == after, "no docker build ran, so no build log was written"


def test_the_replayed_answer_is_checked_against_the_engine(built_cpu: Built) -> None:
    """An identical `build` is answered before the CLI is imported (builder.uptodate), but only
    while the engine bears it out: an alias moved by hand falls through to the full path,
    which tags it back. One path suffices: neither answer runs a build client."""
    args = ("build", "cpu", *built_cpu.base_args)
    for _ in range(2):  # the first may be the full path (it stores the answer), the second replays
        proc = cli(built_cpu.project, *args)
        assert proc.returncode == 0, proc.stderr
    memo = built_cpu.project / "build" / "cache" / "memo"
    answers = [p for p in memo.glob("*.json") if '"format": 1, "argv"' in p.read_text()]
    assert answers, "the full path kept its answer for the replay"
    alias = f"{built_cpu.image}:cpu-fp32"
    right = inspect(alias)["Id"]
    docker("tag", BASE_IMAGE, alias)
    try:
        proc = cli(built_cpu.project, *args)
        assert proc.returncode == 0, proc.stderr
        assert inspect(alias)["Id"] == right, "the full path ran and put the alias back"
        report = json.loads((built_cpu.project / "build" / "report.json").read_text())
        assert [r["status"] for r in report["images"]] == ["up-to-date"]
    finally:
        docker("tag", str(right), alias)


def test_push_pull_round_trip_with_plain_docker(built_via: Built) -> None:
    registry = f"{REGISTRY}/qwen-ft-ci-{RUN_ID}"
    proc = cli(
        built_via.project, "build", "cpu", *built_via.base_args, "--push", "--registry", registry,
        client=built_via.client,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((built_via.project / "build" / "report.json").read_text())
    assert report["images"][0]["status"] == "up-to-date", "pushes the image built_via made"
    pushed = report["images"][0]["pushed"]
    alias_ref = f"{registry}/{built_via.image}:cpu-fp32"
    assert alias_ref in pushed and len(pushed) == 3
    digest = pushed[alias_ref]
    assert digest.startswith("sha256:")
    # alias and pinned are manifest lists in the registry (one platform here): only the
    # per-platform content tag exists locally
    assert len({d for r, d in pushed.items() if r != alias_ref}) == 2
    for ref in pushed:
        docker("rmi", ref, check=False)
    assert docker("image", "inspect", alias_ref, check=False).returncode != 0
    pull = subprocess.run([DOCKER, "pull", alias_ref], capture_output=True, text=True, timeout=600)
    assert pull.returncode == 0, pull.stderr
    assert f"Digest: {digest}" in pull.stdout
    repo_digests = inspect(alias_ref)["RepoDigests"]
    assert isinstance(repo_digests, list)
    assert f"{registry}/{built_via.image}@{digest}" in repo_digests
    assert inspect(alias_ref)["Id"] == inspect(f"{built_via.image}:cpu-fp32")["Id"]


def _edit_runtime(project: Path, marker: str) -> None:
    """Change only the runtime, so only the image's last layer rebuilds."""
    init = project / "runtime" / "qwen_ft_runtime" / "__init__.py"
    init.write_text(init.read_text() + f"\n# {marker}\n")


def test_immutable_tags_refuse_a_changed_image(tmp_path: Path, built_cpu: Built) -> None:
    # One path suffices: the refusal is build.push_image's registry digest check (SDK calls
    # after the build), the same code whichever client built the image.
    registry = f"{REGISTRY}/qwen-ft-immutable-{RUN_ID}"
    first = cli(built_cpu.project, "build", "cpu", *built_cpu.base_args, "--push", "--registry", registry)
    assert first.returncode == 0, first.stderr
    project = copy_project(tmp_path / "changed")
    _edit_runtime(project, "a change that keeps the pinned tag but changes the image")
    proc = cli(project, "build", "cpu", *built_cpu.base_args, "--push", "--registry", registry)
    assert proc.returncode == 7, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert "cpu-fp32-torch2.13.0-py3.11 already exists" in err and "--force" in err
    assert "Traceback" not in proc.stderr
    forced = cli(project, "build", "cpu", *built_cpu.base_args, "--push", "--registry", registry, "--force")
    assert forced.returncode == 0, forced.stderr


def test_one_failing_image_leaves_the_others_built(
    tmp_path: Path, built_cpu: Built, build_client: Client
) -> None:
    # Per path: the failed step is read from each client's own progress output.
    image = session_image("broken", build_client)
    project = copy_project(tmp_path / "broken", image=image)
    matrix = project / "matrix.yaml"
    matrix.write_text(
        matrix.read_text().replace(
            "include:\n",
            '  cpu2:\n    sm: null\n    axes:\n      torch: ["2.13.0"]\n      python: ["3.11"]\n\ninclude:\n',
            1,
        )
    )
    tpl = project / "templates" / "Dockerfile.j2"
    tpl.write_text(
        tpl.read_text().replace(
            "FROM ${BASE_IMAGE} AS stack\n",
            'FROM ${BASE_IMAGE} AS stack\n{% if cell.spec.target == "cpu2" %}RUN echo "deliberately broken" && exit 3\n{% endif %}',
        )
    )
    assert cli(project, "render").returncode == 0
    proc = cli(project, "build", "cpu", "cpu2", *built_cpu.base_args, "--jobs", "2", client=build_client)
    assert proc.returncode == 6, proc.stdout + proc.stderr
    report = json.loads((project / "build" / "report.json").read_text())
    status = {r["image"]: r for r in report["images"]}
    assert status["cpu-fp32"]["status"] in ("built", "up-to-date")
    assert status["cpu2-fp32"]["status"] == "failed"
    assert "exit 3" in (status["cpu2-fp32"]["failed_step"] or "")
    assert status["cpu2-fp32"]["log"].endswith("build/logs/cpu2-fp32.log")
    assert "deliberately broken" in Path(status["cpu2-fp32"]["log"]).read_text()
    assert docker("image", "inspect", f"{image}:cpu2-fp32", check=False).returncode != 0, (
        "no tag for a failure"
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 2 images failed: cpu2-fp32")
    assert Path(status["cpu2-fp32"]["log"]).read_text().startswith(build_client.build_command)
    remove_images(image)


def test_no_ca_or_proxy_remains_in_the_image(tmp_path: Path, built_cpu: Built, build_client: Client) -> None:
    """--ca-bundle and proxies reach the build, but no file, ENV or history entry keeps them.

    Per path: each client sends the secret and the proxy build args its own way.
    """
    marker = "qwen-ft-ca-marker-5f1c2b"
    bundle = tmp_path / "corp-ca.pem"
    bundle.write_text(CA_BUNDLE.read_text() + f"\n# {marker}\n")
    image = session_image("secrets", build_client)
    project = copy_project(tmp_path / "secrets", image=image)
    args = [a if a != str(CA_BUNDLE) else str(bundle) for a in built_cpu.base_args]
    # Warm the layer cache without proxies first (a no-op if the cpu image's layers are cached):
    # the proxy below does not exist, so only the last layer may run with it.
    warm = cli(project, "build", "cpu", *args, client=build_client)
    assert warm.returncode == 0, warm.stdout + warm.stderr
    _edit_runtime(project, "force a fresh last layer for this build")
    proxy = "http://proxy.invalid:3128"
    proc = cli(
        project,
        "build",
        "cpu",
        *args,
        "--http-proxy",
        proxy,
        "--https-proxy",
        proxy,
        "--no-proxy",
        "localhost",
        client=build_client,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (project / "build" / "logs" / "cpu-fp32.log").read_text()
    assert log.startswith(build_client.build_command)
    assert "--secret id=ca_bundle" in log and "--build-arg HTTP_PROXY" in log, (
        "the options did reach the build"
    )
    ref = f"{image}:cpu-fp32"
    history = docker("history", "--no-trunc", ref).stdout
    assert "proxy.invalid" not in history and marker not in history
    config = inspect(ref)["Config"]
    assert isinstance(config, dict)
    assert not [e for e in config["Env"] if "proxy" in e.lower()], config["Env"]
    assert "proxy.invalid" not in json.dumps(inspect(ref))
    # No file in the image holds the bundle: export the filesystem and search it.
    cid = docker("create", ref).stdout.strip()
    try:
        export = subprocess.run([DOCKER, "export", cid], capture_output=True, timeout=600, check=True)
    finally:
        docker("rm", "-f", cid)
    assert marker.encode() not in export.stdout
    with tarfile.open(fileobj=io.BytesIO(export.stdout)) as tar:
        for member in tar:
            # BuildKit leaves the empty mount point /run/secrets; nothing may sit inside it.
            assert not member.name.startswith("run/secrets/"), member.name
            assert "99build-ca" not in member.name, member.name
            if member.isfile() and member.size < 50_000_000:
                data = tar.extractfile(member)
                assert data is not None
                assert b"/run/secrets/ca_bundle" not in data.read(), f"{member.name} names the CA secret"
    report = (project / "build" / "report.json").read_text()
    assert "proxy.invalid" in report  # no credentials in it, so it is recorded as given
    remove_images(image)


def test_bad_build_inputs_are_one_line_errors(tmp_path: Path, built_cpu: Built) -> None:
    # One path suffices: every case is refused before a build command is chosen.
    cases = [
        (["--wheelhouse", str(tmp_path / "nope")], 2, "--wheelhouse"),
        (["--ca-bundle", str(tmp_path / "nope.pem")], 2, "--ca-bundle"),
        (["--base-map", "no-equals-sign"], 2, "PATTERN=REPLACEMENT"),
        (["--push"], 2, "--push needs --registry"),
        (["--push", "--registry", "127.0.0.1:5999/nowhere"], 7, "unreachable"),
        (["--docker", "/nonexistent/docker"], 5, "not found"),
    ]
    for extra, code, fragment in cases:
        proc = cli(built_cpu.project, "build", "cpu", *extra)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code, (extra, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert fragment in lines[-1], (extra, lines)
    proc = cli(built_cpu.project, "build", "z100")
    assert proc.returncode == 2 and "matches no image; valid:" in proc.stderr


def test_unreachable_base_image_suggests_base_map(tmp_path: Path, build_client: Client) -> None:
    # Per path: the hint is read from each client's own error output.
    project = copy_project(tmp_path / "nobase", image=session_image("nobase", build_client))
    proc = cli(
        project, "build", "cpu", "--base-map", "debian:bookworm-slim=127.0.0.1:5000/no/such-base:1",
        client=build_client,
    )  # fmt: skip
    assert proc.returncode == 6, proc.stderr
    report = json.loads((project / "build" / "report.json").read_text())
    assert "--base-map" in report["images"][0]["error"]


def test_dry_run_runs_nothing(tmp_path: Path, build_client: Client) -> None:
    project = copy_project(tmp_path / "dry", image="qwen-ft-dry")
    proc = cli(
        project, "build", "--dry-run", "--base-map", f"nvidia/cuda:*={BASE_IMAGE}", client=build_client
    )
    assert proc.returncode == 0, proc.stderr
    command = build_client.build_command.removeprefix("$ ") + "--progress=plain"
    if build_client.path == "builtin":
        command = "DOCKER_BUILDKIT=1 " + command
    lines = proc.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("# v100-fp16:"))
    assert lines[first + 1].startswith(command), lines[first + 1]
    assert f"BASE_IMAGE={BASE_IMAGE}" in proc.stdout
    assert proc.stdout.count("# ") >= 9
    assert docker("image", "inspect", "qwen-ft-dry:v100-fp16", check=False).returncode != 0
    assert not (project / "build" / "report.json").exists()


def test_prune_removes_only_superseded_content_tags(tmp_path: Path, built_cpu: Built) -> None:
    # One path suffices: prune lists and removes tags through the SDK; builds only set it up.
    project = copy_project(tmp_path / "prune", image="qwen-ft-prune")
    first = cli(project, "build", "cpu", *built_cpu.base_args)
    assert first.returncode == 0, first.stderr
    old_tag = json.loads((project / "build" / "report.json").read_text())["images"][0]["tags"][2]
    _edit_runtime(project, "supersede the first image")
    second = cli(project, "build", "cpu", *built_cpu.base_args)
    assert second.returncode == 0, second.stderr
    tags = json.loads((project / "build" / "report.json").read_text())["images"][0]["tags"]
    assert tags[2] != old_tag
    dry = cli(project, "prune", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.strip() == f"would remove {old_tag}"
    assert docker("image", "inspect", old_tag, check=False).returncode == 0
    done = cli(project, "prune")
    assert done.returncode == 0 and done.stdout.strip() == f"removed {old_tag}"
    assert docker("image", "inspect", old_tag, check=False).returncode != 0
    for ref in tags:
        assert docker("image", "inspect", ref, check=False).returncode == 0, ref


@pytest.fixture(scope="module", autouse=True)
def _cleanup_test_images() -> object:
    yield None
    out = docker("images", "--format", "{{.Repository}}:{{.Tag}}", check=False).stdout.split()
    for ref in out:
        if ref.startswith(
            (f"{REGISTRY}/", "qwen-ft-secrets:", "qwen-ft-nobase:", "qwen-ft-interrupt:", "qwen-ft-prune:")
        ):
            docker("rmi", "-f", ref, check=False)
    shutil.rmtree("/nonexistent", ignore_errors=True)


def test_ctrl_c_cancels_builds_and_moves_no_tag(
    tmp_path: Path, built_cpu: Built, build_client: Client
) -> None:
    """SIGINT mid-build: exit 130, one line, no new tag, no container left behind.

    Per path: buildx and the classic client each handle the interrupt themselves.
    """
    _interrupt_mid_build(tmp_path, built_cpu, build_client, "SIGINT")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGKILL"])
def test_sigterm_and_kill_leave_no_build_running(tmp_path: Path, built_cpu: Built, signame: str) -> None:
    """SIGTERM is handled like Ctrl-C; after `kill -9` the `docker build` child dies with the CLI
    (PR_SET_PDEATHSIG) instead of finishing an orphan image. One client suffices: the signal
    handling is the CLI's own, before any client-specific code."""
    from docker_support import find_client

    _interrupt_mid_build(tmp_path, built_cpu, find_client("buildx"), signame)


def _interrupt_mid_build(tmp_path: Path, built_cpu: Built, build_client: Client, signame: str) -> None:
    import os
    import signal
    import sys
    import time

    image = session_image("interrupt", build_client)
    project = copy_project(tmp_path / "interrupt", image=image)
    tpl = project / "templates" / "Dockerfile.j2"
    tpl.write_text(
        tpl.read_text().replace(
            "FROM ${BASE_IMAGE} AS stack\n",
            f"FROM ${{BASE_IMAGE}} AS stack\nRUN echo started-{RUN_ID} && sleep 120\n",
        )
    )
    assert cli(project, "render").returncode == 0
    before = set(docker("ps", "-aq").stdout.split())
    env = {**os.environ, "QWEN_FT_DOCKER": build_client.exe, **build_client.env}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "builder",
            "--matrix",
            str(project / "matrix.yaml"),
            "build",
            "cpu",
            *built_cpu.base_args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    log = project / "build" / "logs" / "cpu-fp32.log"
    # The step's own output line ("#5 0.31 started-…"), not its header, proves it is running;
    # RUN_ID keeps the layer out of the build cache.
    running = re.compile(rf"^#\d+ [\d.]+ started-{RUN_ID}$", re.M)

    def started() -> bool:
        return log.exists() and running.search(log.read_text()) is not None

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not started():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"build ended before the slow step (exit {proc.returncode}): {err[-2000:]}")
        time.sleep(0.5)
    if not started():
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the slow step never started: {err[-2000:]}")
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=120)
    if signame == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
        # The CLI is gone at once; its `docker build` child (its argv names this project) must follow.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _processes_naming(project):
            time.sleep(0.5)
        assert not _processes_naming(project), "docker build outlived the CLI"
    else:
        assert proc.returncode == 130, err
        assert err.strip().splitlines()[-1].startswith("error: interrupted")
        assert "Traceback" not in err
    assert log.read_text().startswith(build_client.build_command)
    assert docker("image", "inspect", f"{image}:cpu-fp32", check=False).returncode != 0
    # The daemon is shared: only a container running our step (by its RUN_ID) would be ours.
    new = set(docker("ps", "-aq").stdout.split()) - before
    ours = [
        c for c in new if RUN_ID in docker("inspect", "-f", "{{json .Config.Cmd}}", c, check=False).stdout
    ]
    assert not ours, "no container left behind"


def _processes_naming(project: Path) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(project) in text:
            found.append(text[:200])
    return found
