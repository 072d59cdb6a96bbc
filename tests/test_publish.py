"""The run report page: joining build/smoke/audit JSON per image, and the Markdown/HTML it renders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from builder import publish
from builder.errors import ConfigError
from builder.project import Project
from builder.publish import publish as report

BUILD: dict[str, Any] = {
    "command": "build",
    "engine": "20.10.24",
    "images": [
        {
            "image": "v100-fp16",
            "status": "built",
            "seconds": 214.2,
            "size": 6_654_875_089,
            "image_id": "sha256:bd7f90fccde61949ad1cf46fe8760cdc8ba9834177a18f1a9b863868edd7e580",
            "tags": ["qwen-ft:v100-fp16", "qwen-ft:v100-abc"],
            "pushed": {"reg:5000/qwen-ft:v100-fp16": "sha256:1234"},
            "error": None,
        },
        {
            "image": "a100-bf16",
            "status": "failed",
            "seconds": 3.0,
            "size": 0,
            "tags": [],
            "error": "pip failed",
        },
    ],
}
SMOKE: dict[str, Any] = {
    "host": {"gpus": []},
    "images": [
        {
            "image": "v100-fp16",
            "ref": "qwen-ft:v100-fp16",
            "target": "v100",
            "ok": True,
            "step": "cpu",
            "device": {"kind": "cpu", "name": "x86_64"},
            "failed_checks": [],
            "runs": [
                {"model": "qwen2-tiny", "tokens_per_s": 1649.4},
                {"model": "qwen3-tiny", "tokens_per_s": None},
            ],
            "steps": {"contract": {"ok": True}, "smoke": {"ok": True}},
        },
        {
            "image": "cpu-fp32",
            "ref": "qwen-ft:cpu-fp32",
            "ok": False,
            "step": "cpu",
            "failed_checks": ["contract:triton"],
            "runs": [],
            "steps": {"contract": {"ok": False}, "smoke": {"ok": True}},
        },
    ],
}
AUDIT: dict[str, Any] = {
    "images": [
        {"image": "v100-fp16", "ref": "qwen-ft:v100-fp16", "sm": 60, "sm_source": "--sm", "ok": False,
         "counts": {"ok": 18, "waived": 1, "fail": 1}, "failed": ["/x/torch/lib/libtorch_cuda.so"]},
        {"image": "v100-fp16", "ref": "qwen-ft:v100-fp16", "sm": 70, "sm_source": "label", "ok": True,
         "python": "3.11.2", "counts": {"ok": 19, "waived": 1}, "failed": []},
        {"image": "cpu-fp32", "ref": "qwen-ft:cpu-fp32", "sm": None, "sm_source": "label", "ok": True,
         "note": "cpu image: no target SM"},
    ]
}  # fmt: skip


def rows() -> dict[str, publish.Row]:
    return {r.image: r for r in publish.gather(BUILD, SMOKE, AUDIT)}


def test_gather_joins_per_image() -> None:
    got = rows()
    assert list(got) == ["v100-fp16", "a100-bf16", "cpu-fp32"]
    v100 = got["v100-fp16"]
    assert (v100.contract, v100.audit, v100.smoke_cpu, v100.smoke_gpu) == ("pass", "pass", "pass", "—")
    assert v100.ok and v100.ref == "qwen-ft:v100-fp16" and v100.size == 6_654_875_089
    assert v100.tokens_per_s == {"qwen2-tiny": 1649.4}  # a null rate is left out, not zero
    assert v100.versions["python (in image)"] == "3.11.2"
    assert v100.audit_detail == "sm_70: 20 binaries, 19 ok, 1 waived"  # the label's SM, not the --sm what-if
    assert v100.digests == {"reg:5000/qwen-ft:v100-fp16": "sha256:1234"}


def test_failures_and_missing_steps() -> None:
    got = rows()
    assert not got["a100-bf16"].ok and got["a100-bf16"].problems == ["build: pip failed"]
    assert got["a100-bf16"].contract == "—"
    cpu = got["cpu-fp32"]
    assert cpu.contract == "FAIL" and cpu.smoke_cpu == "pass" and not cpu.ok
    assert cpu.audit == "n/a" and "cpu image" in cpu.audit_detail


def test_audit_only_against_another_sm_is_labelled() -> None:
    only_what_if = {"images": [AUDIT["images"][0]]}
    (row,) = publish.gather({}, {}, only_what_if)
    assert row.audit == "FAIL" and row.audit_detail.startswith("sm_60 (--sm): 20 binaries")
    assert row.problems == ["audit: libtorch_cuda.so has no code for sm_60"]


def test_plans_add_versions() -> None:
    plan = {
        "python": "3.10",
        "torch": {"version": "2.8.0", "cuda": "12.8"},
        "flash_attn": {"version": None},
        "triton": "remove",
        "dtype": "fp16",
        "attn_implementation": "sdpa",
        "min_driver": "525.60.13",
    }
    (row, *_) = publish.gather(BUILD, SMOKE, AUDIT, {"v100-fp16": plan})
    assert row.versions["torch"] == "2.8.0" and row.versions["python (plan)"] == "3.10"
    assert row.versions["flash-attn"] == "none" and row.versions["python (in image)"] == "3.11.2"


def test_markdown_and_html_pages() -> None:
    meta = {"generated": 0, "engine": "20.10.24", "gpus": None}
    got = list(rows().values())
    md = publish.render_markdown(got, meta)
    assert (
        "| `qwen-ft:v100-fp16` | built | pass | pass | pass | — | 6.65 GB | qwen2-tiny 1649 | `bd7f90fccde6` |"
        in md
    )
    assert "1 of 3 images pass" in md
    page = publish.render_html(got, meta)
    assert page.startswith("<!doctype html>") and "<script" not in page
    assert page.count("<svg") == 2  # sizes and tokens/s
    assert '<td class="FAIL">FAIL</td>' in page
    assert "reg:5000/qwen-ft:v100-fp16@sha256:1234" in page


def test_html_escapes_everything() -> None:
    evil = {
        "images": [{"image": "<img onerror=x>", "status": "built", "size": 1, "tags": [], "error": "<b>"}]
    }
    page = publish.render_html(publish.gather(evil, {}, {}), {"generated": 0})
    assert "<img onerror" not in page and "&lt;img onerror=x&gt;" in page


def test_bar_chart_without_data() -> None:
    assert "no data" in publish.bar_chart("Image size", [], "GB")


def test_report_writes_pages_and_index(tmp_path: Path) -> None:
    project = Project.at(tmp_path)
    with pytest.raises(ConfigError, match="nothing to report"):
        report(project)
    (tmp_path / "build" / "reports").mkdir(parents=True)
    (tmp_path / "build" / "report.json").write_text(json.dumps(BUILD))
    (tmp_path / "build" / "reports" / "smoke.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"smoke\.json: not valid JSON"):  # never read as "did not run"
        report(project)
    (tmp_path / "build" / "reports" / "smoke.json").unlink()
    md_path, html_path, got = report(project)
    assert md_path.name.startswith("report-") and md_path.suffix == ".md" and html_path.suffix == ".html"
    assert (tmp_path / "build" / "reports" / "index.html").read_text() == html_path.read_text()
    assert [r.image for r in got] == ["v100-fp16", "a100-bf16"]


def test_report_command(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from builder.commands.common import Context
    from builder.commands.report import command

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "matrix.yaml").write_text((root / "matrix.yaml").read_text())
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "report.json").write_text(json.dumps(BUILD))
    result = CliRunner().invoke(command, [], obj=Context(matrix_path=tmp_path / "matrix.yaml", debug=False))
    assert result.exit_code == 0, result.output
    assert "2 images, 1 pass every check that ran; failing: a100-bf16" in result.output
    assert (tmp_path / "build" / "reports" / "index.html").is_file()


MALFORMED = [
    ("report.json", "[1, 2]", "should be an object"),
    ("report.json", '{"images": [1]}', "images[0] should be an object"),
    ("report.json", '{"images": {"a": 1}}', "images should be a list"),
    ("report.json", '{"images": [{"image": "x", "size": "big"}]}', "images[0].size has the wrong type"),
    ("report.json", '{"images": [{"image": "x", "tags": "a,b"}]}', "images[0].tags should be a list"),
    ("report.json", "\x00\xff garbage", "not valid JSON"),
    ("reports/smoke.json", '{"images": [{"image": "x", "steps": []}]}', "steps should be an object"),
    ("reports/audit.json", '{"images": [{"image": "x", "sm": 70, "counts": {"ok": "1"}}]}', "counts.ok"),
]


@pytest.mark.parametrize(("name", "text", "fragment"), MALFORMED, ids=[f"{m[0]}:{m[2]}" for m in MALFORMED])
def test_malformed_reports_are_one_line(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    """Finding 13: a malformed report is one `error:` line naming the file, never a traceback."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "matrix.yaml").write_text((root / "matrix.yaml").read_text())
    (tmp_path / "build" / "reports").mkdir(parents=True)
    (tmp_path / "build" / name).write_text(text, encoding="latin-1")
    proc = subprocess.run(
        [sys.executable, "-m", "builder", "--matrix", str(tmp_path / "matrix.yaml"), "report"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert name.rsplit("/", 1)[-1] in lines[0] and fragment in lines[0], lines[0]
