"""`contract` for DeepSpeed: version, installed ops, no compiler needed to load them.

A prebuilt CUDA op cannot be made on this host, so the passing cases use a stand-in deepspeed
package laid out the way DeepSpeed's setup.py installs one (build record + op libraries under
deepspeed/ops/); what is tested is the contract reading it. The real DeepSpeed in the venv, if
any (installed with DS_BUILD_OPS=0), is the genuine negative case.
"""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path
from typing import Any

import pytest
from qwen_ft_runtime import ds_contract
from qwen_ft_runtime.env import Plan, dist_version
from runtime_helpers import one_json_line, run_cli

GPU_PLAN = Plan(sm="70", deepspeed="0.19.8", ds_ops="fused_adam,cpu_adam")


def _torch_minor() -> str:
    import torch

    return ".".join(torch.__version__.split(".")[:2])


def fake_deepspeed(
    root: Path,
    *,
    installed: dict[str, bool],
    accelerator: str = "cuda",
    libraries: tuple[str, ...] = ("fused_adam", "cpu_adam"),
    torch_version: str | None = None,
    version: str = "0.19.8",
) -> Path:
    package = root / "deepspeed"
    (package / "ops" / "adam").mkdir(parents=True)
    (package / "__init__.py").write_text(f"__version__ = {version!r}\n")
    (package / "ops" / "__init__.py").write_text("")
    (package / "ops" / "adam" / "__init__.py").write_text("")
    torch_info = {"version": torch_version or _torch_minor(), "cuda_version": "0.0"}
    (package / ds_contract.RECORD).write_text(
        f"version={version!r}\ninstalled_ops={installed!r}\n"
        f"accelerator_name={accelerator!r}\ntorch_info={torch_info!r}\n"
    )
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for op in libraries:
        (package / "ops" / "adam" / f"{op}_op{suffix}").write_bytes(b"not really an ELF")
    meta = root / f"deepspeed-{version}.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: deepspeed\nVersion: {version}\n")
    return root


@pytest.fixture
def on_path(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(root: Path) -> None:
        # transformers/accelerate may have imported the real DeepSpeed already.
        for name in [m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.syspath_prepend(str(root))

    return install


def _by_name(checks: list[Any]) -> dict[str, Any]:
    return {c.name: c for c in checks}


@pytest.mark.torch
def test_prebuilt_cuda_ops_pass(tmp_path: Path, on_path: Any) -> None:
    on_path(fake_deepspeed(tmp_path, installed={"fused_adam": True, "cpu_adam": True}))
    checks = _by_name(ds_contract.checks(GPU_PLAN, _torch_minor() + ".0", None, gpu_visible=False))
    assert checks["deepspeed_version"].ok, checks["deepspeed_version"].detail
    assert checks["deepspeed_ops"].ok, checks["deepspeed_ops"].detail
    assert checks["deepspeed_no_compiler"].ok and "fused_adam_op" in checks["deepspeed_no_compiler"].detail
    assert "deepspeed_ops_load" not in checks  # only with a GPU


@pytest.mark.torch
def test_cpu_built_ops_fail_a_gpu_image(tmp_path: Path, on_path: Any) -> None:
    """The trap the issue names: no DS_ACCELERATOR=cuda on a GPU-less build host."""
    on_path(fake_deepspeed(tmp_path, installed={"fused_adam": True, "cpu_adam": True}, accelerator="cpu"))
    check = ds_contract.check_ops(GPU_PLAN, _torch_minor() + ".0", None)
    assert not check.ok and "DS_ACCELERATOR=cuda" in check.detail


@pytest.mark.torch
def test_missing_op_and_library_fail_naming_the_op(tmp_path: Path, on_path: Any) -> None:
    on_path(
        fake_deepspeed(tmp_path, installed={"fused_adam": True, "cpu_adam": False}, libraries=("fused_adam",))
    )
    ops = ds_contract.check_ops(GPU_PLAN, _torch_minor() + ".0", None)
    assert not ops.ok and "not installed: cpu_adam" in ops.detail
    prebuilt = ds_contract.check_prebuilt(GPU_PLAN)
    assert not prebuilt.ok and "cpu_adam" in prebuilt.detail and "fused_adam" not in prebuilt.detail


@pytest.mark.torch
def test_ops_built_for_another_torch_fail(tmp_path: Path, on_path: Any) -> None:
    on_path(fake_deepspeed(tmp_path, installed={"fused_adam": True, "cpu_adam": True}, torch_version="1.13"))
    check = ds_contract.check_ops(GPU_PLAN, _torch_minor() + ".0", None)
    assert not check.ok and "built against torch 1.13" in check.detail


@pytest.mark.torch
def test_load_check_reports_a_library_that_does_not_load(tmp_path: Path, on_path: Any) -> None:
    on_path(fake_deepspeed(tmp_path, installed={"fused_adam": True, "cpu_adam": True}))
    check = ds_contract.check_load(GPU_PLAN)
    assert not check.ok and "fused_adam: ImportError" in check.detail


def test_version_mismatch_and_none(tmp_path: Path, on_path: Any) -> None:
    on_path(fake_deepspeed(tmp_path, installed={}, version="0.18.0"))
    assert not ds_contract.check_version(GPU_PLAN).ok
    assert not ds_contract.check_version(Plan(deepspeed="none")).ok
    assert ds_contract.check_version(Plan()).detail.startswith("skipped")


@pytest.mark.torch
def test_cpu_image_contract_passes_end_to_end(tmp_path: Path) -> None:
    import torch

    fake_deepspeed(tmp_path, installed={"cpu_adam": True}, accelerator="cpu", libraries=("cpu_adam",))
    plan = [
        *("--target-sm", "none", "--expect-dtype", "fp32", "--expect-attn", "sdpa"),
        *("--expect-torch", torch.__version__.split("+")[0], "--expect-cuda", "none"),
        *("--expect-deepspeed", "0.19.8", "--expect-ds-ops", "cpu_adam"),
    ]
    result = run_cli(["contract", *plan], extra_pythonpath=[tmp_path])
    report = one_json_line(result.stdout)
    assert result.returncode == 0, report["failed_check"]
    assert report["plan"]["ds_ops"] == "cpu_adam" and report["versions"]["deepspeed"] == "0.19.8"


@pytest.mark.torch
def test_real_deepspeed_without_prebuilt_ops_fails() -> None:
    """The venv's DeepSpeed was installed with DS_BUILD_OPS=0: nothing prebuilt."""
    installed = dist_version("deepspeed")
    if installed is None:
        pytest.skip("deepspeed not installed")
    result = run_cli(["contract", "--expect-deepspeed", installed, "--expect-ds-ops", "fused_adam"])
    report = one_json_line(result.stdout)
    assert result.returncode == 1 and report["failed_check"] == "deepspeed_ops"
    assert (
        "not installed: fused_adam"
        in next(c for c in report["checks"] if c["name"] == "deepspeed_ops")["detail"]
    )


def test_unknown_op_in_the_plan_is_one_line() -> None:
    result = run_cli(["contract", "--expect-ds-ops", "fused_adam,fused_adm"])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("error:") == 1 and "unknown DeepSpeed op fused_adm" in result.stderr
