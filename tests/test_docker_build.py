"""Docker tier: real builds, tags, registry round trips and the secrets guarantee, on a real engine."""

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
from docker_support import BASE_IMAGE, CA_BUNDLE, DOCKER, REGISTRY, Built, cli, copy_project, docker

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


def test_cpu_image_is_built_and_tagged(built_cpu: Built) -> None:
    r = built_cpu.result("cpu-fp32")
    assert r["status"] == "built" or r["status"] == "up-to-date"
    tags = r["tags"]
    assert isinstance(tags, list)
    assert tags[0] == "qwen-ft:cpu-fp32"
    assert tags[1] == "qwen-ft:cpu-fp32-torch2.13.0-py3.11"
    assert re.fullmatch(r"qwen-ft:cpu-[0-9a-f]{12}", tags[2])
    ids = {inspect(t)["Id"] for t in tags}
    assert ids == {r["image_id"]}, "alias, pinned and content tags name one image"
    labels = labels_of("qwen-ft:cpu-fp32")
    assert labels["io.qwen-ft.target"] == "cpu"
    assert labels["io.qwen-ft.dtype"] == "fp32"
    assert labels["io.qwen-ft.attn"] == "sdpa"
    assert labels["io.qwen-ft.torch"] == "2.13.0"
    assert labels["io.qwen-ft.triton"] == "remove"
    assert labels["io.qwen-ft.content-hash"].startswith(str(tags[2]).split("-")[-1])
    spec = json.loads(labels["io.qwen-ft.spec"])
    assert spec["torch"] == "torch==2.13.0+cpu"
    assert labels["org.opencontainers.image.base.name"] == "debian:bookworm-slim"
    env = inspect("qwen-ft:cpu-fp32")["Config"]
    assert isinstance(env, dict)
    assert "QWEN_FT_DTYPE=fp32" in env["Env"]


def test_rebuild_does_no_build_work(built_cpu: Built) -> None:
    log = built_cpu.project / "build" / "logs" / "cpu-fp32.log"
    before = log.stat().st_mtime_ns if log.exists() else None
    proc = cli(built_cpu.project, "build", "cpu", *built_cpu.base_args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((built_cpu.project / "build" / "report.json").read_text())
    assert [r["status"] for r in report["images"]] == ["up-to-date"]
    after = log.stat().st_mtime_ns if log.exists() else None
    assert before == after, "no docker build ran, so no build log was written"


def test_push_pull_round_trip_with_plain_docker(built_cpu: Built) -> None:
    registry = f"{REGISTRY}/qwen-ft-ci-{RUN_ID}"
    proc = cli(built_cpu.project, "build", "cpu", *built_cpu.base_args, "--push", "--registry", registry)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((built_cpu.project / "build" / "report.json").read_text())
    pushed = report["images"][0]["pushed"]
    alias_ref = f"{registry}/qwen-ft:cpu-fp32"
    assert alias_ref in pushed and len(pushed) == 3
    digest = pushed[alias_ref]
    assert digest.startswith("sha256:")
    for ref in pushed:
        docker("rmi", ref)
    assert docker("image", "inspect", alias_ref, check=False).returncode != 0
    pull = subprocess.run([DOCKER, "pull", alias_ref], capture_output=True, text=True, timeout=600)
    assert pull.returncode == 0, pull.stderr
    assert f"Digest: {digest}" in pull.stdout
    repo_digests = inspect(alias_ref)["RepoDigests"]
    assert isinstance(repo_digests, list)
    assert f"{registry}/qwen-ft@{digest}" in repo_digests
    assert inspect(alias_ref)["Id"] == inspect("qwen-ft:cpu-fp32")["Id"]


def _edit_runtime(project: Path, marker: str) -> None:
    """Change only the runtime, so only the image's last layer rebuilds."""
    init = project / "runtime" / "qwen_ft_runtime" / "__init__.py"
    init.write_text(init.read_text() + f"\n# {marker}\n")


def test_immutable_tags_refuse_a_changed_image(tmp_path: Path, built_cpu: Built) -> None:
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


def test_one_failing_image_leaves_the_others_built(tmp_path: Path, built_cpu: Built) -> None:
    project = copy_project(tmp_path / "broken")
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
            "# ---- the image\nFROM ${BASE_IMAGE}\n",
            '# ---- the image\nFROM ${BASE_IMAGE}\n{% if cell.spec.target == "cpu2" %}RUN echo "deliberately broken" && exit 3\n{% endif %}',
        )
    )
    assert cli(project, "render").returncode == 0
    proc = cli(project, "build", "cpu", "cpu2", *built_cpu.base_args, "--jobs", "2")
    assert proc.returncode == 6, proc.stdout + proc.stderr
    report = json.loads((project / "build" / "report.json").read_text())
    status = {r["image"]: r for r in report["images"]}
    assert status["cpu-fp32"]["status"] in ("built", "up-to-date")
    assert status["cpu2-fp32"]["status"] == "failed"
    assert "exit 3" in (status["cpu2-fp32"]["failed_step"] or "")
    assert status["cpu2-fp32"]["log"].endswith("build/logs/cpu2-fp32.log")
    assert "deliberately broken" in Path(status["cpu2-fp32"]["log"]).read_text()
    assert docker("image", "inspect", "qwen-ft:cpu2-fp32", check=False).returncode != 0, (
        "no tag for a failure"
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 2 images failed: cpu2-fp32")


def test_no_ca_or_proxy_remains_in_the_image(tmp_path: Path, built_cpu: Built) -> None:
    """--ca-bundle and proxies reach the build, but no file, ENV or history entry keeps them."""
    marker = "qwen-ft-ca-marker-5f1c2b"
    bundle = tmp_path / "corp-ca.pem"
    bundle.write_text(CA_BUNDLE.read_text() + f"\n# {marker}\n")
    project = copy_project(tmp_path / "secrets", image="qwen-ft-secrets")
    args = [a if a != str(CA_BUNDLE) else str(bundle) for a in built_cpu.base_args]
    # Warm the layer cache without proxies first (a no-op if the cpu image's layers are cached):
    # the proxy below does not exist, so only the last layer may run with it.
    warm = cli(project, "build", "cpu", *args)
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
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (project / "build" / "logs" / "cpu-fp32.log").read_text()
    assert "--secret id=ca_bundle" in log and "--build-arg HTTP_PROXY" in log, (
        "the options did reach the build"
    )
    ref = "qwen-ft-secrets:cpu-fp32"
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


def test_bad_build_inputs_are_one_line_errors(tmp_path: Path, built_cpu: Built) -> None:
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


def test_unreachable_base_image_suggests_base_map(tmp_path: Path, docker_engine: str) -> None:
    project = copy_project(tmp_path / "nobase", image="qwen-ft-nobase")
    proc = cli(project, "build", "cpu", "--base-map", "debian:bookworm-slim=127.0.0.1:5000/no/such-base:1")
    assert proc.returncode == 6, proc.stderr
    report = json.loads((project / "build" / "report.json").read_text())
    assert "--base-map" in report["images"][0]["error"]


def test_dry_run_runs_nothing(tmp_path: Path, docker_engine: str) -> None:
    project = copy_project(tmp_path / "dry", image="qwen-ft-dry")
    proc = cli(project, "build", "--dry-run", "--base-map", f"nvidia/cuda:*={BASE_IMAGE}")
    assert proc.returncode == 0, proc.stderr
    assert "build --progress=plain" in proc.stdout
    assert f"BASE_IMAGE={BASE_IMAGE}" in proc.stdout
    assert proc.stdout.count("# ") >= 9
    assert docker("image", "inspect", "qwen-ft-dry:v100-fp16", check=False).returncode != 0
    assert not (project / "build" / "report.json").exists()


def test_prune_removes_only_superseded_content_tags(tmp_path: Path, built_cpu: Built) -> None:
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


def test_ctrl_c_cancels_builds_and_moves_no_tag(tmp_path: Path, built_cpu: Built) -> None:
    """SIGINT mid-build: exit 130, one line, no new tag, no container left behind."""
    import os
    import signal
    import sys
    import time

    project = copy_project(tmp_path / "interrupt", image="qwen-ft-interrupt")
    tpl = project / "templates" / "Dockerfile.j2"
    tpl.write_text(
        tpl.read_text().replace(
            "# ---- the image\nFROM ${BASE_IMAGE}\n",
            f"# ---- the image\nFROM ${{BASE_IMAGE}}\nRUN echo started-{RUN_ID} && sleep 120\n",
        )
    )
    assert cli(project, "render").returncode == 0
    # A leftover from an earlier session would make the build a no-op: start clean.
    for ref in docker("images", "--format", "{{.Repository}}:{{.Tag}}", "qwen-ft-interrupt").stdout.split():
        docker("rmi", "-f", ref, check=False)
    before = set(docker("ps", "-aq").stdout.split())
    env = {**os.environ, "QWEN_FT_DOCKER": DOCKER}
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
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted")
    assert "Traceback" not in err
    assert docker("image", "inspect", "qwen-ft-interrupt:cpu-fp32", check=False).returncode != 0
    assert set(docker("ps", "-aq").stdout.split()) <= before, "no container left behind"
