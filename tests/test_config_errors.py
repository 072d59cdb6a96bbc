"""Bad input: one line on stderr naming the problem and the fix, exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from builder import config
from builder.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

GOOD = (ROOT / "matrix.yaml").read_text()


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "builder", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str, code: int = 2) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "matrix.yaml"
    path.write_text(text)
    return path


_TORCHES = ", ".join(f'"2.{j}.0"' for j in range(40))
# 50 targets x 40 torch x 3 CUDA x 2 Python x 2 flash-attn = 24,000 cells (each target alone is fine).
_BIG_TARGETS = [f"  big{i}:\n    sm: 80\n    axes: {{torch: [{_TORCHES}]}}\n" for i in range(50)]

CASES = [
    (
        "unknown-top-key",
        GOOD.replace("registry:", "registy:"),
        ["registy: unknown key; did you mean 'registry'?"],
    ),
    (
        "unknown-target-key",
        GOOD.replace("  v100:\n    sm: 70\n", "  v100:\n    sm: 70\n    dtyp: fp16\n"),
        ["targets.v100.dtyp: unknown key; did you mean 'dtype'?"],
    ),
    (
        "unknown-axis",
        GOOD.replace('  flash_attn: ["2.8.3", "none"]', '  flash_atn: ["2.8.3", "none"]'),
        ["axes.flash_atn: unknown key; did you mean 'flash_attn'?"],
    ),
    (
        "bad-version",
        GOOD.replace('torch: ["2.8.0", "2.14.1", "2.15.0"]', 'torch: ["2.8.0", "two"]'),
        ["axes.torch[1]", "'two'"],
    ),
    (
        "float-version",
        GOOD.replace('cuda: ["12.6", "12.8", "13.0"]', "cuda: [12.6, 12.8]"),
        ["axes.cuda[0]", "quote"],
    ),
    ("wrong-type", GOOD.replace("    sm: 70\n", "    sm: seventy\n"), ["targets.v100.sm", "integer"]),
    ("bad-enum", GOOD.replace("    sm: 75\n", "    sm: 75\n    dtype: fp8\n"), ["targets.t4.dtype", "'fp8'"]),
    ("empty", "", ["the matrix is empty"]),
    ("no-targets", "image: qwen-ft\ntargets: {}\n", ["targets: is empty"]),
    ("yaml-syntax", GOOD.replace("axes:\n", "axes: [\n", 1), ["YAML syntax error"]),
    (
        "include-unknown-target",
        GOOD.replace("- {target: v100,", "- {target: v10,"),
        ["include[0].target: no target named 'v10'; did you mean 'v100'?"],
    ),
    (
        "exclude-matches-nothing",
        GOOD.replace("exclude: []", "exclude: [{target: z*}]"),
        ["exclude[0].target"],
    ),
    (
        "every-cell-invalid",
        GOOD.replace("    sm: 70\n", '    sm: 70\n    axes: {cuda: ["13.0"]}\n'),
        ["targets.v100: every cell is invalid", "matrix --all"],
    ),
    ("missing-sm", GOOD.replace("    sm: 75\n", ""), ["targets.t4: missing 'sm'"]),
    (
        # Finding 7: 30 values per axis (810,000 cells) took minutes and gigabytes; now one line.
        "oversized-target",
        GOOD.replace(
            "    sm: 70\n",
            "    sm: 70\n    axes: {{cuda: [{}], torch: [{}], python: [{}], flash_attn: [{}]}}\n".format(
                *(", ".join(f'"{a}.{i}"' for i in range(30)) for a in ("12", "2", "3", "2"))
            ),
        ),
        ["targets.v100: its axes make 810,000 candidate cells; the limit is 2,000 per target"],
    ),
    (
        "platform-typo",
        GOOD.replace(
            "      platform: [linux/amd64, linux/arm64]", "      platform: [linux/amd64, linux/arm]", 1
        ),
        [
            "targets.h100.axes.platform[1]",
            "'linux/arm' is not one of linux/amd64, linux/arm64",
            "linux/arm64",
        ],
    ),
    (
        "platform-twice",
        GOOD.replace(
            "      platform: [linux/amd64, linux/arm64]", "      platform: [linux/arm64, linux/arm64]", 1
        ),
        ["targets.h100.axes.platform: lists a value twice"],
    ),
    (
        "platform-empty",
        GOOD.replace("      platform: [linux/amd64, linux/arm64]", "      platform: []", 1),
        ["targets.h100.axes.platform: the list is empty"],
    ),
    (
        "oversized-matrix",
        GOOD.replace("targets:\n", "targets:\n" + "".join(_BIG_TARGETS), 1),
        ["candidate cells; the limit is 20,000"],
    ),
]


@pytest.mark.parametrize(("text", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_matrix(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path, text)
    assert_one_line_error(run_cli("--matrix", str(path), "matrix"), str(path), *fragments)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert_one_line_error(run_cli("--matrix", str(missing), "matrix"), "no such file", "--matrix")


def test_selector_matching_nothing() -> None:
    assert_one_line_error(run_cli("matrix", "x100"), "selector 'x100' matches no image; valid:", "v100")


def test_explain_bad_version_and_unknown_target() -> None:
    assert_one_line_error(
        run_cli("explain", "v100", "--torch", "latest"), "--torch 'latest' is not a version"
    )
    assert_one_line_error(run_cli("explain", "v1000"), "unknown target 'v1000'; did you mean 'v100'?")


def test_explain_invalid_cell_exits_1_with_json() -> None:
    proc = run_cli("explain", "v100", "--flash-attn", "2.8.3", "--json")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["valid"] is False
    assert {r["rule"] for r in data["reasons"]} >= {"flash-attn-sm"}
    assert set(data["reasons"][0]) == {"rule", "message", "source"}


def test_explain_json_shape() -> None:
    proc = run_cli("explain", "v100", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["target"] == "v100" and data["sm"] == 70 and data["valid"] is True
    plan = data["plan"]
    for key in (
        "base_image",
        "torch",
        "flash_attn",
        "triton",
        "dtype",
        "attn_implementation",
        "torch_cuda_arch_list",
        "min_driver",
        "tags",
        "labels",
    ):
        assert key in plan
    assert set(plan["torch"]) >= {"version", "cuda", "index_url"}
    assert set(plan["flash_attn"]) >= {"strategy", "version", "wheel_url"}
    assert plan["dtype"] == "fp16" and plan["triton"] == "remove" and plan["flash_attn"]["strategy"] == "none"


def test_schema_is_committed_and_in_sync() -> None:
    committed = (ROOT / "matrix.schema.json").read_text()
    assert committed == config.schema_json(), "run `qwen-ft-images schema -o matrix.schema.json`"
    assert run_cli("schema").stdout == committed


def test_matrix_validates_against_published_schema() -> None:
    """A real JSON Schema validator (check-jsonschema) agrees with ours on the default matrix."""
    import shutil

    exe = shutil.which("check-jsonschema")
    if exe is None:
        pytest.fail("check-jsonschema is not installed: pip install -e '.[dev]'")
    proc = subprocess.run(
        [exe, "--schemafile", str(ROOT / "matrix.schema.json"), str(ROOT / "matrix.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_parse_rejects_non_string_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be a string"):
        config.parse("targets:\n  70: {sm: 70}\n", tmp_path / "m.yaml")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            ["build", "cpu", "--dry-run", "--platform", "linux/arm"],
            ["--platform 'linux/arm' is not a platform", "linux/arm64"],
        ),
        (
            ["build", "cpu", "--dry-run", "--platform", "windows/amd64"],
            ["--platform 'windows/amd64' is not a platform"],
        ),
        (["explain", "cpu", "--platform", "linux/amd64,linux/arm64"], ["explain takes one platform"]),
        (["explain", "cpu", "--platform", "arm64"], ["--platform 'arm64' is not a platform"]),
        (["doctor", "--assume-arch", "ppc64le"], ["--assume-arch 'ppc64le' is not a CPU architecture"]),
    ],
)
def test_bad_platform_names_are_one_line(args: list[str], fragments: list[str]) -> None:
    assert_one_line_error(run_cli(*args), *fragments)
