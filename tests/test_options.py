"""One precedence for every option: command line > environment > matrix.yaml > default."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder import options
from builder.options import BY_NAME, OPTIONS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("cli", "env", "matrix", "want", "source"),
    [
        (
            {"registry": "cli.example/ns"},
            {"QWEN_FT_REGISTRY": "env.example/ns"},
            {"registry": "m/ns"},
            "cli.example/ns",
            "command line",
        ),
        (
            {"registry": None},
            {"QWEN_FT_REGISTRY": "env.example/ns"},
            {"registry": "m/ns"},
            "env.example/ns",
            "$QWEN_FT_REGISTRY",
        ),
        ({"registry": None}, {}, {"registry": "m/ns"}, "m/ns", "matrix.yaml registry"),
        ({"registry": None}, {}, {"registry": None}, "", "default"),
        # An explicit empty value is given: it means "no registry", whatever matrix.yaml says.
        ({"registry": ""}, {}, {"registry": "m/ns"}, "", "command line"),
    ],
)
def test_registry_precedence(cli: dict, env: dict, matrix: dict, want: str, source: str) -> None:
    got = options.resolve(["registry"], cli, env, matrix)
    assert got["registry"] == want
    assert got.sources["registry"] == source


def test_env_values_are_converted_to_the_option_kind() -> None:
    got = options.resolve(["jobs", "wheelhouse", "push"], {}, {"QWEN_FT_WHEELHOUSE": "/srv/w"})
    assert got["jobs"] == 1 and got.sources["jobs"] == "default"
    assert got["wheelhouse"] == Path("/srv/w")
    assert got["push"] is False


def test_every_option_is_declared_once() -> None:
    names = [o.name for o in OPTIONS]
    flags = [f for o in OPTIONS for f in o.flags]
    envs = [o.env for o in OPTIONS if o.env]
    assert len(names) == len(set(names))
    assert len(flags) == len(set(flags))
    assert len(envs) == len(set(envs))
    assert BY_NAME["cuobjdump_wheelhouse"].flags == ("--cuobjdump-wheelhouse",)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_FT_")}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "builder", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full,
        check=False,
    )


def test_dry_run_prints_each_value_with_its_source() -> None:
    proc = _cli("build", "cpu", "--dry-run", "--jobs", "2", env={"QWEN_FT_DOCKER": "sh"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "# jobs = 2 (command line)" in lines
    assert "# docker = 'sh' ($QWEN_FT_DOCKER)" in lines
    assert "# registry = '' (default)" in lines


def test_ci_matrix_and_build_agree_on_the_registry(tmp_path: Path) -> None:
    """`--registry ""` used to fall back to matrix.yaml for build but mean none for ci-matrix."""
    text = (ROOT / "matrix.yaml").read_text().replace('registry: ""', 'registry: "m.example/team"')
    assert "m.example/team" in text, "matrix.yaml should declare registry"
    for name in ("matrix.yaml", "templates", "images"):
        src = ROOT / name
        if src.is_dir():
            (tmp_path / name).symlink_to(src)
    # runtime/ is the build context: a link there is refused (issue 14, finding 1), so copy it.
    shutil.copytree(ROOT / "runtime", tmp_path / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "matrix.yaml").write_text(text)
    proc = _cli("-f", str(tmp_path / "matrix.yaml"), "ci-matrix", "cpu", "--json")
    assert json.loads(proc.stdout)["include"][0]["hash_tag"].startswith("m.example/team/")
    proc = _cli("-f", str(tmp_path / "matrix.yaml"), "ci-matrix", "cpu", "--json", "--registry", "")
    assert json.loads(proc.stdout)["include"][0]["hash_tag"].startswith("qwen-ft:")
    env = {"QWEN_FT_REGISTRY": "e.example/x"}
    proc = _cli("-f", str(tmp_path / "matrix.yaml"), "ci-matrix", "cpu", "--json", env=env)
    assert json.loads(proc.stdout)["include"][0]["hash_tag"].startswith("e.example/x/")
    dry = _cli("-f", str(tmp_path / "matrix.yaml"), "build", "cpu", "--dry-run", "--push", "--registry", "")
    assert dry.returncode == 2 and "--push needs --registry" in dry.stderr
