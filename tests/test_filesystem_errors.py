"""File-system trouble and usage errors are one `error:` line (issue 14, findings 11, 12 and 14)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_config_errors import assert_one_line_error, run_cli


def _cli(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("--matrix", str(project / "matrix.yaml"), *args, cwd=project)


def _stale_image(project: Path) -> Path:
    """Make render have work to do: one Dockerfile differs from the render."""
    dockerfile = project / "images" / "cpu-fp32" / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "# edited\n")
    return dockerfile


# ----------------------------------------------------------------------------- finding 11


def test_render_into_a_read_only_images_folder_is_one_line(project_copy: Path) -> None:
    _stale_image(project_copy)
    images = project_copy / "images"
    argv = [sys.executable, "-m", "builder", "--matrix", str(project_copy / "matrix.yaml"), "render"]
    if os.geteuid() == 0:
        # Root ignores permission bits: make the folder read-only for real, in a private mount namespace.
        if shutil.which("unshare") is None:
            pytest.fail("running as root needs unshare(1) to make images/ read-only")
        script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'
        argv = ["unshare", "-m", "sh", "-c", script, "sh", str(images), *argv]
    else:
        images.chmod(0o555)
        for sub in images.iterdir():
            if sub.is_dir():
                sub.chmod(0o555)
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.run(argv, cwd=project_copy, capture_output=True, text=True, timeout=120, env=env)
    finally:
        for p in (images, *images.iterdir()):
            if p.is_dir():
                p.chmod(0o755)
    assert_one_line_error(proc, "cpu-fp32", "read-only" if os.geteuid() == 0 else "permission denied")


def test_images_being_a_file_is_one_line(project_copy: Path) -> None:
    shutil.rmtree(project_copy / "images")
    (project_copy / "images").write_text("not a folder\n")
    assert_one_line_error(_cli(project_copy, "render"), "images")
    assert_one_line_error(_cli(project_copy, "render", "--check"), code=4)


def test_build_being_a_file_is_one_line(project_copy: Path) -> None:
    (project_copy / "build").write_text("not a folder\n")
    assert_one_line_error(_cli(project_copy, "bake", "-o", "-", "cpu"), "build", "is a file")
    assert_one_line_error(_cli(project_copy, "build", "--dry-run", "cpu"), "build", "is a file")


@pytest.mark.parametrize("command", [("bake", "cpu"), ("schema",)], ids=["bake", "schema"])
def test_output_into_a_missing_folder_is_one_line(project_copy: Path, command: tuple[str, ...]) -> None:
    target = project_copy / "no" / "such" / "out.json"
    assert_one_line_error(_cli(project_copy, command[0], "-o", str(target), *command[1:]), "does not exist")
    assert not (project_copy / "no").exists()


def test_output_onto_a_folder_is_one_line(project_copy: Path) -> None:
    assert_one_line_error(_cli(project_copy, "schema", "-o", str(project_copy / "images")), "is a directory")


# ----------------------------------------------------------------------------- finding 12


def test_render_never_follows_a_symlinked_folder_out_of_the_project(
    project_copy: Path, tmp_path_factory
) -> None:
    outside = tmp_path_factory.mktemp("outside")
    victim = outside / "Dockerfile"
    victim.write_text("FROM scratch\n")
    (project_copy / "images" / "gone-fp16").symlink_to(outside, target_is_directory=True)
    assert_one_line_error(_cli(project_copy, "render"), "gone-fp16", "symbolic link")
    assert victim.read_text() == "FROM scratch\n"


def test_render_never_writes_through_a_symlinked_image_folder(project_copy: Path, tmp_path_factory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "Dockerfile").write_text("FROM scratch\n")
    cpu = project_copy / "images" / "cpu-fp32"
    shutil.rmtree(cpu)
    cpu.symlink_to(outside, target_is_directory=True)
    assert_one_line_error(_cli(project_copy, "render"), "cpu-fp32", "symbolic link")
    assert (outside / "Dockerfile").read_text() == "FROM scratch\n"


# ----------------------------------------------------------------------------- finding 14


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("bogus",), "No such command 'bogus'"),
        (("build", "--jobs", "x"), "'x' is not a valid integer"),
        (("explain",), "Missing argument 'TARGET'"),
        (("explain", "v100", "--dtype", "fp8"), "'fp8' is not one of"),
        (("matrix", "--nope"), "No such option '--nope'"),
    ],
)
def test_usage_errors_are_one_line(args: tuple[str, ...], fragment: str) -> None:
    assert_one_line_error(run_cli(*args), fragment, "--help")


def test_messages_never_carry_raw_newlines(tmp_path: Path) -> None:
    path = tmp_path / "matrix.yaml"
    path.write_text('targets:\n  "v100\\nFROM evil":\n    sm: 70\n')
    proc = run_cli("--matrix", str(path), "matrix")
    assert_one_line_error(proc, "\\n")


def test_render_writes_through_unique_temp_names(project_copy: Path) -> None:
    """Finding 5: another run's temp file (here a folder, to make the clash certain) is never ours."""
    dockerfile = _stale_image(project_copy)
    (dockerfile.parent / "Dockerfile.tmp").mkdir()
    proc = _cli(project_copy, "render")
    assert proc.returncode == 0, proc.stderr
    assert "# edited" not in dockerfile.read_text()
    assert not [p for p in dockerfile.parent.iterdir() if p.name not in ("Dockerfile", "Dockerfile.tmp")]
