"""builder/knowledge/deepspeed.yaml loads into typed records and answers the resolver's questions."""

from __future__ import annotations

import pytest

from builder.errors import KnowledgeError
from builder.knowledge.deepspeed import _build, load_deepspeed


def test_every_fact_is_sourced_and_typed() -> None:
    ds = load_deepspeed()
    assert ds.release("0.19.8") is not None
    assert all(r.source and len(r.sdist_sha256) == 64 for r in ds.releases)
    assert all(o.source for o in ds.ops.values())
    assert ds.install_record == "deepspeed/git_version_info_installed.py"


def test_recipe_ops_and_sm_rules() -> None:
    ds = load_deepspeed()
    assert ds.recipe(offload_optimizer=False) == ("fused_adam",)
    assert ds.recipe(offload_optimizer=True) == ("fused_adam", "cpu_adam")
    assert ds.sm_problem("fused_adam", 70) is None  # FusedAdam builds for a V100
    assert ds.sm_problem("cpu_adam", 70) is None  # a host op
    problem = ds.sm_problem("fp_quantizer", 75)
    assert problem is not None and "SM>=80" in problem
    assert ds.sm_problem("fp_quantizer", 80) is None
    with pytest.raises(KnowledgeError, match="unknown DeepSpeed op"):
        ds.sm_problem("fused_adamw", 80)


def test_build_env_targets_only_the_sm_and_forces_cuda() -> None:
    env = load_deepspeed().build_env_for(("fused_adam", "cpu_adam"), 70)
    assert env == {
        "DS_ACCELERATOR": "cuda",
        "DS_BUILD_OPS": "0",
        "TORCH_CUDA_ARCH_LIST": "7.0",
        "DS_BUILD_FUSED_ADAM": "1",
        "DS_BUILD_CPU_ADAM": "1",
    }
    assert load_deepspeed().build_env_for(("fused_adam",), 120)["TORCH_CUDA_ARCH_LIST"] == "12.0"


def test_torch_bounds() -> None:
    ds = load_deepspeed()
    new, old = ds.release("0.19.8"), ds.release("0.15.4")
    assert new is not None and old is not None
    assert new.supports_torch("2.8.0+cu128") and not new.supports_torch("1.13.1")
    assert old.supports_torch("1.13.1")


def test_an_unsourced_fact_is_refused() -> None:
    import copy

    from builder.knowledge import read_yaml

    data = copy.deepcopy(read_yaml("deepspeed.yaml"))
    data["ops"][0]["source"] = ""
    with pytest.raises(KnowledgeError, match="has no source"):
        _build(data)


def test_host_isa_is_portable_per_machine() -> None:
    ds = load_deepspeed()
    assert (ds.isa_for("x86_64").march, ds.isa_for("x86_64").simd) == ("x86-64-v3", "__AVX256__")
    assert (ds.isa_for("aarch64").march, ds.isa_for("aarch64").simd) == ("armv8-a", "__NEON__")
    assert all(isa.source and "native" in isa.source for isa in ds.host_isa.values())
    with pytest.raises(KnowledgeError, match="no 'riscv64'"):
        ds.isa_for("riscv64")
