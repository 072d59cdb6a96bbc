"""`knowledge check` against recorded index responses (tests/fixtures/drift/), plus one live run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from builder.errors import NetworkUnreachable
from builder.knowledge import Knowledge, drift

FIXTURES = Path(__file__).parent / "fixtures" / "drift"
INDEX = "https://index.invalid/simple/"
ROOT = Path(__file__).resolve().parent.parent


class RecordedHttp:
    """Serves the recorded responses; range requests are answered from the recorded zip."""

    def __init__(self, *, pytorch: bytes | None = None, github: Mapping[str, object] | None = None) -> None:
        self.pytorch, self.github = pytorch, dict(github or {})
        self.urls: list[tuple[str, str | None]] = []

    def get(self, url: str, *, headers: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
        rng = (headers or {}).get("Range")
        self.urls.append((url, rng))
        if url.startswith(INDEX):
            rest = url[len(INDEX) :]
            name = rest.rstrip("/")
            if "/" not in name:
                body = (FIXTURES / f"simple-{name}.json").read_bytes()
                return body, {"content-type": "application/vnd.pypi.simple.v1+json"}
            if rest.endswith("torch-2.15.0-cp312-cp312-manylinux_2_28_x86_64.whl.metadata"):
                return (FIXTURES / "torch-2.15.0-cp312.metadata").read_bytes(), {}
            if rest.endswith("torch-2.14.1-cp312-cp312-manylinux_2_28_x86_64.whl") and rng:
                data = (FIXTURES / "torch-2.14.1-cp312.whl.zip").read_bytes()
                # The JSON's size is the real wheel's; the recorded zip stands at its end.
                size = json.loads((FIXTURES / "simple-torch.json").read_text())
                real = next(
                    f["size"] for f in size["files"] if f["filename"].startswith("torch-2.14.1-cp312")
                )
                start, end = (int(x) for x in re.fullmatch(r"bytes=(\d+)-(\d+)", rng).groups())  # type: ignore[union-attr]
                padded_start = real - len(data)
                chunk = bytearray(end - start + 1)
                for i in range(start, end + 1):
                    if i >= padded_start:
                        chunk[i - start] = data[i - padded_start]
                return bytes(chunk), {"content-range": f"bytes {start}-{end}/{real}"}
            raise drift.HttpError(f"{url}: not recorded")
        if url == drift.PYTORCH_INDEX and self.pytorch is not None:
            return self.pytorch, {"content-type": "text/html"}
        if url.startswith("https://api.github.com/") and url in self.github:
            return json.dumps(self.github[url]).encode(), {}
        raise drift.HttpError(f"{url}: unreachable")


def test_current_knowledge_reports_no_drift(kb: Knowledge) -> None:
    http = RecordedHttp()
    report = drift.check(kb, http=http, index=INDEX)
    assert not report.drift, report.findings
    assert "torch 2.14.1" in report.checked and "torch 2.15.0" in report.checked
    # METADATA came through both paths: PEP 658 for 2.15.0, range requests (never a whole wheel) for 2.14.1.
    assert any(u.endswith(".whl.metadata") for u, _ in http.urls)
    ranged = [r for u, r in http.urls if u.endswith("torch-2.14.1-cp312-cp312-manylinux_2_28_x86_64.whl")]
    assert ranged and all(r is not None for r in ranged)
    assert any("download.pytorch.org" in u for u in report.unchecked)
    assert any("flash-attn 2.8.3 release assets" in u for u in report.unchecked)


def test_new_release_changed_pin_python_tags_and_default(kb: Knowledge) -> None:
    torch = dict(kb.torch)
    del torch["2.15.0"]
    r = torch["2.14.1"]
    torch["2.14.1"] = replace(
        r,
        python=("3.10", "3.11", "3.12"),
        pypi_default="12.6",
        triton=replace(r.triton, requires="==3.7.1", version="3.7.1", python_below=None),
    )
    report = drift.check(replace(kb, torch=torch), http=RecordedHttp(), index=INDEX)
    kinds = {(f.kind, f.package) for f in report.findings}
    assert kinds == {
        ("new-release", "torch"),
        ("python-tags", "torch"),
        ("pypi-default", "torch"),
        ("triton-pin", "torch"),
        ("triton-resolved", "triton"),
    }, report.findings
    new = next(f for f in report.findings if f.kind == "new-release")
    assert "torch 2.15.0" in new.message and "triton ~=3.9.0" in new.message and "CUDA 13.2" in new.message
    resolved = next(f for f in report.findings if f.kind == "triton-resolved")
    assert "~=3.8.0" in resolved.message and "3.8.0" in resolved.message
    assert "| new-release | torch |" in report.markdown()


def test_new_stack_and_flash_attn_releases(kb: Knowledge) -> None:
    stack = {
        "peft": tuple(replace(p, version="0.20.0") for p in kb.stack["peft"]),
        **{k: v for k, v in kb.stack.items() if k != "peft"},
    }
    fa = {k: v for k, v in kb.flash_attn.items() if k != "2.8.3.post2"}
    watch = {"deepspeed": ("0.19.0", "test")}
    report = drift.check(
        replace(kb, stack=stack, flash_attn=fa, stack_watch=watch), http=RecordedHttp(), index=INDEX
    )
    messages = sorted(f.message for f in report.findings if f.kind == "new-release")
    assert messages == [
        "deepspeed 0.19.8 is published (newest known: 0.19.0)",
        "flash-attn 2.8.3.post2 is published (newest known: 2.8.3.post1)",
        "peft 0.21.2 is published (newest known: 0.20.0)",
    ]


def test_cuda_variants_and_flash_attn_assets(kb: Knowledge) -> None:
    listing = (
        b'<a href="/whl/cu126/torch-2.14.1%2Bcu126-cp312-cp312-manylinux_2_28_x86_64.whl">x</a>\n'
        b'<a href="/whl/cu130/torch-2.14.1%2Bcu130-cp312-cp312-manylinux_2_28_x86_64.whl">x</a>\n'
        b'<a href="/whl/cu129/torch-2.14.1%2Bcu129-cp312-cp312-manylinux_2_28_x86_64.whl">x</a>\n'
        b'<a href="/whl/cpu/torch-2.14.1%2Bcpu-cp312-cp312-manylinux_2_28_x86_64.whl">x</a>\n'
    )
    url = drift.GITHUB_RELEASE.format(version="2.8.3")
    assets = {
        "assets": [
            {"name": "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"},
            {"name": "flash_attn-2.8.3+cu12torch2.9cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"},
        ]
    }
    report = drift.check(kb, http=RecordedHttp(pytorch=listing, github={url: assets}), index=INDEX)
    got = sorted((f.kind, f.message) for f in report.findings)
    assert got == [
        (
            "flash-attn-assets",
            "flash-attn 2.8.3 has 1 x86_64 wheels outside flash_attn.yaml's matrix, "
            "e.g. flash_attn-2.8.3+cu12torch2.9cxx11abiTRUE-cp312-cp312-linux_x86_64.whl",
        ),
        ("missing-variant", "torch.yaml lists torch 2.14.1 cu132, which is not published"),
        ("new-variant", "torch 2.14.1 has a cu129 build; torch.yaml does not list it"),
    ]


def test_unreachable_index_is_one_error(kb: Knowledge) -> None:
    with pytest.raises(NetworkUnreachable, match="package index is not reachable"):
        drift.check(kb, http=RecordedHttp(), index="https://nowhere.invalid/simple/")
    assert NetworkUnreachable.exit_code not in (0, 1)


def test_index_url_never_needs_a_spelled_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/simple")
    assert drift.index_url() == "https://mirror.example/simple/"
    monkeypatch.delenv("PIP_INDEX_URL")
    assert drift.index_url(lambda cmd: "https://conf.example/simple\n") == "https://conf.example/simple/"
    default = drift.index_url(lambda cmd: "")
    assert default.startswith("https://") and default.endswith("/simple/")


def test_requires_dist_parsing() -> None:
    meta = (
        'Requires-Dist: triton~=3.8.0; platform_system == "Linux" and python_version < "3.15"\n'
        'Requires-Dist: cuda-toolkit[cublas,cudart]==13.0.3; platform_system == "Linux"\n'
        "Requires-Dist: triton-extra==1\n"
    )
    assert drift.requires_dist(meta, "triton") == (
        "~=3.8.0",
        'platform_system == "Linux" and python_version < "3.15"',
    )
    assert drift.torch_cuda(meta) == "13.0"
    old = 'Requires-Dist: triton (==3.0.0) ; platform_system == "Linux" and python_version < "3.13"\n'
    assert drift.requires_dist(old, "triton") == (
        "==3.0.0",
        'platform_system == "Linux" and python_version < "3.13"',
    )
    assert drift.python_below(drift.requires_dist(old, "triton")[1]) == "3.13"  # type: ignore[index]


def test_live_check_runs_against_the_real_index() -> None:
    """`make test` runs this once; without a network it is skipped and says why."""
    proc = subprocess.run(
        [sys.executable, "-m", "builder", "knowledge", "check", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode == NetworkUnreachable.exit_code:
        pytest.skip(f"package index unreachable: {proc.stderr.strip()}")
    assert proc.returncode in (0, 1), proc.stderr
    data = json.loads(proc.stdout)
    assert data["drift"] == (proc.returncode == 1)
    assert any(c.startswith("torch ") for c in data["checked"]), data


def test_loader_refuses_inconsistent_new_fields() -> None:
    from builder.errors import KnowledgeError
    from builder.knowledge import _ptx_strips, _triton_pin

    with pytest.raises(KnowledgeError, match="is a range; record how"):
        _triton_pin(
            "9.9.0", {"requires": "~=3.8.0", "version": "3.8.0", "confidence": "primary", "source": "x"}
        )
    with pytest.raises(KnowledgeError, match="does not satisfy"):
        _triton_pin(
            "9.9.0",
            {"requires": "~=3.8.0", "version": "3.9.0", "resolved": "x", "confidence": "p", "source": "x"},
        )
    from builder.knowledge import load

    with pytest.raises(KnowledgeError, match="no torch"):
        _ptx_strips([{"torch": ">=2.6,<2.7", "variants": ["12.8"], "pr": "p", "source": "s"}], load().torch)
