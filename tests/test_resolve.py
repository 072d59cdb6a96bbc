"""Table-driven tests of the compatibility rules: each invalid cell must carry the right reason."""

from __future__ import annotations

from dataclasses import replace

import pytest
from packaging.version import Version

from builder import resolve
from builder.config import CellSpec, MatrixConfig, TargetConfig
from builder.errors import ConfigError
from builder.knowledge import Knowledge


def check(
    kb: Knowledge,
    matrix: MatrixConfig,
    target: str,
    cuda: str,
    torch: str,
    python: str,
    fa: str = "none",
    *,
    dtype: str | None = None,
    triton: str | None = None,
) -> resolve.Cell:
    t = matrix.targets[target]
    if triton is not None:
        t = replace(t, triton=triton)
    spec = CellSpec(target=target, cuda=cuda, torch=torch, python=python, flash_attn=fa)
    return resolve.check(kb, t, spec, dtype=dtype, origin="test")


INVALID = [
    # (id, target, cuda, torch, python, flash_attn, dtype, triton, expected rules)
    (
        "seed-v100-fa257",
        "v100",
        "12.1",
        "2.4.1",
        "3.10",
        "2.5.7",
        None,
        None,
        {"flash-attn-sm", "flash-attn-triton"},
    ),
    (
        "v100-fa283",
        "v100",
        "12.6",
        "2.8.0",
        "3.12",
        "2.8.3",
        None,
        None,
        {"flash-attn-sm", "flash-attn-triton"},
    ),
    ("t4-fa", "t4", "12.6", "2.8.0", "3.12", "2.8.3", None, None, {"flash-attn-sm", "flash-attn-triton"}),
    ("v100-bf16", "v100", "12.6", "2.8.0", "3.12", "none", "bf16", None, {"bf16-sm"}),
    ("t4-bf16", "t4", "12.6", "2.8.0", "3.12", "none", "bf16", None, {"bf16-sm"}),
    ("v100-cu128-torch2.7", "v100", "12.8", "2.7.1", "3.12", "none", None, None, {"torch-arch"}),
    ("v100-cu128-torch2.11", "v100", "12.8", "2.11.0", "3.12", "none", None, None, {"torch-arch"}),
    ("v100-cu130", "v100", "13.0", "2.13.0", "3.12", "none", None, None, {"torch-arch", "cuda-drops-sm"}),
    ("b200-cu126", "b200", "12.6", "2.8.0", "3.12", "none", None, None, {"torch-arch"}),
    ("torch-python", "a100", "12.8", "2.9.1", "3.8", "none", None, None, {"torch-python", "stack"}),
    ("python-os", "a100", "12.8", "2.8.0", "3.11", "none", None, None, {"python-base-os"}),
    ("variant", "a100", "12.1", "2.8.0", "3.10", "none", None, None, {"torch-variant"}),
    ("torch-unknown", "a100", "12.8", "2.2.2", "3.10", "none", None, None, {"torch-unknown"}),
    ("cuda-unknown", "a100", "11.7", "2.8.0", "3.10", "none", None, None, {"torch-variant", "cuda-unknown"}),
    ("fa-unknown", "a100", "12.8", "2.8.0", "3.12", "9.9.9", None, None, {"flash-attn-unknown"}),
    ("fa-torch", "a100", "12.1", "2.4.1", "3.10", "2.8.3", None, None, set()),  # has a wheel: valid
    ("fa-min-torch", "a100", "11.8", "2.4.1", "3.10", "2.7.4.post1", None, None, {"flash-attn-cuda"}),
    (
        "fa-python",
        "a100",
        "12.8",
        "2.8.0",
        "3.14",
        "2.8.3",
        None,
        None,
        {"torch-python", "python-base-os", "flash-attn-python"},
    ),
    ("fa-cuda13", "a100", "13.0", "2.13.0", "3.12", "2.8.3", None, None, {"flash-attn-source-cuda"}),
    ("cpu-fa", "cpu", "none", "2.13.0", "3.11", "2.8.3", None, None, {"flash-attn-cpu"}),
    ("cpu-fp16", "cpu", "none", "2.13.0", "3.11", "none", "fp16", None, {"cpu-dtype"}),
    ("cpu-python", "cpu", "none", "2.13.0", "3.10", "none", None, None, {"python-base-os"}),
    ("gpu-no-cuda", "a100", "none", "2.13.0", "3.12", "none", None, None, {"gpu-no-cuda"}),
    ("triton-keep-v100", "v100", "12.6", "2.13.0", "3.12", "none", None, "keep", {"triton-unsupported-sm"}),
    ("stack", "a100", "12.4", "2.4.1", "3.8", "none", None, None, {"stack"}),
    ("cuda-13.2-no-image", "a100", "13.2", "2.13.0", "3.12", "none", None, None, {"cuda-image"}),
]


@pytest.mark.parametrize(
    ("target", "cuda", "torch", "python", "fa", "dtype", "triton", "rules"),
    [row[1:] for row in INVALID],
    ids=[row[0] for row in INVALID],
)
def test_rules(
    kb: Knowledge,
    matrix: MatrixConfig,
    target: str,
    cuda: str,
    torch: str,
    python: str,
    fa: str,
    dtype: str | None,
    triton: str | None,
    rules: set[str],
) -> None:
    cell = check(kb, matrix, target, cuda, torch, python, fa, dtype=dtype, triton=triton)
    got = {r.rule for r in cell.reasons}
    assert got == rules, [r.message for r in cell.reasons]
    assert cell.valid == (not rules)
    for r in cell.reasons:
        assert r.message and r.source, r


def test_seed_case_v100_image(kb: Knowledge, matrix: MatrixConfig) -> None:
    """The V100 image is fp16 + SDPA with neither flash-attn nor Triton, on a wheel that has sm_70."""
    res = resolve.resolve(matrix, kb)
    v100 = res.recommended("v100")
    assert v100.alias == "v100-fp16"
    plan = v100.plan
    assert plan is not None
    assert plan.dtype == "fp16"
    assert plan.attn_implementation == "sdpa"
    assert plan.flash_attn.strategy == "none"
    assert plan.triton == "remove"
    assert plan.torch.cuda is not None and plan.torch.cuda.startswith("12.")
    row = kb.arch_list(plan.torch.version, plan.torch.cuda)
    assert row is not None and 70 in row.sm


def test_ampere_images_use_bf16_and_flash_attn_wheels(kb: Knowledge, matrix: MatrixConfig) -> None:
    res = resolve.resolve(matrix, kb)
    for target in ("a100", "a10", "l4", "h100", "b200"):
        plan = res.recommended(target).plan
        assert plan is not None
        assert plan.dtype == "bf16", target
        assert plan.attn_implementation == "flash_attention_2", target
        assert plan.flash_attn.strategy == "wheel", target
        assert plan.triton == "keep", target


def test_wheel_url_follows_setup_py_naming(kb: Knowledge, matrix: MatrixConfig) -> None:
    cell = check(kb, matrix, "a100", "12.8", "2.8.0", "3.12", "2.8.3")
    assert cell.plan is not None
    assert cell.plan.flash_attn.wheel_url == (
        "https://github.com/Dao-AILab/flash-attention/releases/download/v2.8.3/"
        "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"
    )
    # torch 2.5 wheels are pre-C++11 ABI; flash-attn 2.6.3 used major.minor CUDA tokens (12.x -> 123).
    old = check(kb, matrix, "a100", "12.1", "2.4.1", "3.10", "2.6.3")
    assert old.plan is not None
    assert old.plan.flash_attn.wheel_url is not None
    assert old.plan.flash_attn.wheel_url.endswith(
        "flash_attn-2.6.3+cu123torch2.4cxx11abiFALSE-cp310-cp310-linux_x86_64.whl"
    )


def test_source_build_limits_archs_to_the_target(kb: Knowledge, matrix: MatrixConfig) -> None:
    # flash-attn 2.8.3 has no wheel for torch 2.13: compile in a devel stage for sm_90 only.
    cell = check(kb, matrix, "h100", "12.6", "2.13.0", "3.12", "2.8.3")
    assert cell.plan is not None
    fa = cell.plan.flash_attn
    assert fa.strategy == "source"
    assert fa.cuda_archs == "90"
    assert fa.builder_image == "nvidia/cuda:12.6.3-devel-ubuntu24.04"
    assert cell.plan.base_image == "nvidia/cuda:12.6.3-base-ubuntu24.04"
    l4 = check(kb, matrix, "l4", "12.6", "2.13.0", "3.12", "2.8.3")
    assert l4.plan is not None and l4.plan.flash_attn.cuda_archs == "80"  # sm_89 runs sm_80 cubins


def test_torch_index_and_pypi_default(kb: Knowledge, matrix: MatrixConfig) -> None:
    default = check(kb, matrix, "a100", "12.8", "2.8.0", "3.12")
    assert default.plan is not None
    assert default.plan.torch.index_url is None
    assert default.plan.torch.requirement == "torch==2.8.0"
    other = check(kb, matrix, "a100", "12.6", "2.8.0", "3.12")
    assert other.plan is not None
    assert other.plan.torch.index_url == "https://download.pytorch.org/whl/cu126"
    assert other.plan.torch.requirement == "torch==2.8.0+cu126"
    cpu = check(kb, matrix, "cpu", "none", "2.13.0", "3.11")
    assert cpu.plan is not None and cpu.plan.torch.requirement == "torch==2.13.0+cpu"


@pytest.mark.parametrize(
    ("target", "cuda", "torch", "expected"),
    [
        ("v100", "12.6", "2.8.0", "525.60.13"),  # CUDA 12 minor-version floor
        ("t4", "13.0", "2.13.0", "580.65.06"),  # CUDA 13 floor
        ("b200", "12.8", "2.8.0", "570.133.20"),  # HGX B200: the GPU Operator floor, above CUDA 12
        ("a100", "11.8", "2.7.1", "450.80.02"),
    ],
)
def test_min_driver(
    kb: Knowledge, matrix: MatrixConfig, target: str, cuda: str, torch: str, expected: str
) -> None:
    python = "3.10"
    cell = check(kb, matrix, target, cuda, torch, python)
    if not cell.valid:
        cell = check(kb, matrix, target, cuda, torch, "3.12")
    assert cell.plan is not None, cell.reasons
    assert cell.plan.min_driver == expected


def test_ptx_only_coverage_needs_toolkit_driver(kb: Knowledge) -> None:
    # An sm_120 GPU (RTX 5090) on torch 2.7 cu128 runs SASS; a hypothetical sm_121 runs only PTX 12.0.
    from builder.resolve import _covered

    assert _covered(120, [75, 80, 86, 90, 100, 120], [120]) == "sass"
    assert _covered(121, [75, 80, 86, 90, 100, 120], [120]) == "sass"  # same major, higher minor
    assert _covered(130, [75, 80, 86, 90, 100, 120], [120]) == "ptx"
    assert _covered(70, [75, 80, 86, 90, 100, 120], [120]) is None
    assert _covered(89, [80, 86], []) == "sass"
    assert _covered(100, [80, 86, 90], [90]) == "ptx"


def test_tags_and_labels(kb: Knowledge, matrix: MatrixConfig) -> None:
    res = resolve.resolve(matrix, kb)
    v100 = res.recommended("v100")
    assert v100.plan is not None
    assert v100.plan.tags[0] == "qwen-ft:v100-fp16"
    assert v100.plan.tags[1].startswith("qwen-ft:v100-fp16-cu126-torch")
    assert v100.plan.labels["io.qwen-ft.dtype"] == "fp16"
    assert v100.plan.labels["io.qwen-ft.triton"] == "remove"
    cpu = res.recommended("cpu")
    assert cpu.alias == "cpu-fp32"
    assert cpu.pinned == "cpu-fp32-torch2.13.0-py3.11"
    extras = [c for c in res.cells if not c.recommended]
    assert extras and all(len(c.plan.tags) == 1 for c in extras if c.plan)


def test_recommended_policy_prefers_wheels_then_newest_torch(kb: Knowledge, matrix: MatrixConfig) -> None:
    res = resolve.resolve(matrix, kb)
    a100 = res.recommended("a100")
    candidates = [c for c in res.excluded if c.spec.target == "a100" and c.valid]
    assert candidates, "other valid cells stay as candidates"
    assert all(resolve.preference(kb, a100) >= resolve.preference(kb, c) for c in candidates)
    v100 = res.recommended("v100")
    assert v100.spec.torch == max((c.spec.torch for c in res.cells if c.spec.target == "v100"), key=Version)


def test_every_cell_invalid_is_an_error(kb: Knowledge, matrix: MatrixConfig) -> None:
    from builder.config import Axes

    t = replace(
        matrix.targets["v100"],
        axes=Axes(cuda=("13.0",), torch=("2.13.0",), python=("3.12",), flash_attn=("none",)),
    )
    bad = replace(matrix, targets={"v100": t}, include=())
    with pytest.raises(ConfigError, match="every cell is invalid"):
        resolve.resolve(bad, kb)


def test_invalid_recommended_pin_is_an_error(kb: Knowledge, matrix: MatrixConfig) -> None:
    pin = CellSpec(target="v100", cuda="12.6", torch="2.8.0", python="3.12", flash_attn="2.8.3")
    t = replace(matrix.targets["v100"], recommended=pin)
    bad = replace(matrix, targets={"v100": t}, include=())
    with pytest.raises(
        ConfigError, match=r"targets\.v100\.recommended is invalid: flash-attn 2\.8\.3 needs sm_80"
    ):
        resolve.resolve(bad, kb)


def test_selectors(kb: Knowledge, matrix: MatrixConfig) -> None:
    res = resolve.resolve(matrix, kb)
    # each platform's recommended image: amd64 on torch 2.13.0, arm64 on PyPI's CPU build 2.10.0
    assert [c.id for c in resolve.select(res, ["cpu"])] == ["cpu-fp32", "cpu-fp32-arm64"]
    assert {c.spec.target for c in resolve.select(res, ["v100"])} == {"v100"}
    assert len(resolve.select(res, ["v100"])) == 2  # recommended + the pinned extra
    assert [c.id for c in resolve.select(res, ["a10*-bf16"])] == ["a100-bf16", "a10-bf16"]
    assert [c.id for c in resolve.select(res, ["v100-fp16"])] == ["v100-fp16"]  # the alias names one image
    with pytest.raises(ConfigError, match="selector 'x100' matches no image; valid: "):
        resolve.select(res, ["x100"])


def test_explain_any_cell(kb: Knowledge, matrix: MatrixConfig) -> None:
    cell = resolve.explain(
        matrix, kb, "v100", overrides={"torch": "2.7.1", "cuda": "11.8", "python": "3.10"}, dtype=None
    )
    assert cell.valid and not cell.recommended
    bad = resolve.explain(matrix, kb, "v100", overrides={}, dtype="bf16")
    assert not bad.valid and bad.reasons[0].rule == "bf16-sm"
    with pytest.raises(ConfigError, match="did you mean 'v100'"):
        resolve.explain(matrix, kb, "v10", overrides={}, dtype=None)


def test_gpu_name_matching(kb: Knowledge) -> None:
    def sm(name: str) -> int | None:
        g = kb.gpu_by_name(name)
        return g.sm if g else None

    assert sm("Tesla V100-SXM2-32GB") == 70
    assert sm("NVIDIA A100-SXM4-80GB") == 80
    assert sm("NVIDIA A10") == 86
    assert sm("NVIDIA A10G") == 86
    assert sm("NVIDIA H100 80GB HBM3") == 90
    assert sm("Tesla T4") == 75
    assert sm("NVIDIA L40S") == 89
    assert sm("NVIDIA B200") == 100
    assert sm("Some Future GPU") is None


# Issue #11 rules: each case names the rule it expects among the reasons (or the notes, for
# cells that stay valid), and whether the cell is valid.
ISSUE_11 = [
    # (id, target, sm override, cuda, torch, python, flash_attn, triton, rule, valid)
    # pytorch#145616: 2.6.0+cu126 release wheels lost the compute_90 PTX that would JIT on sm_100.
    ("ptx-strip", "b200", None, "12.6", "2.6.0", "3.12", "none", None, "torch-ptx-stripped", False),
    # Blackwell Ultra (sm_103) needs triton 3.5.1+; torch 2.8.0 pins 3.4.0.
    (
        "triton-floor-keep",
        "b200",
        103,
        "12.8",
        "2.8.0",
        "3.12",
        "none",
        "keep",
        "triton-too-old-for-sm",
        False,
    ),
    # flash-attn 2.6.3's TORCH_CHECK(is_sm90 || is_sm8x): a B200 source build fails at the first call.
    ("fa-runtime-sm", "b200", None, "12.8", "2.8.0", "3.12", "2.6.3", None, "flash-attn-runtime-sm", False),
    # 2.7.4.post1's wheels were built with nvcc 12.4.1: sm_80/sm_90 cubins only.
    ("fa-wheel-sm", "b200", None, "12.6", "2.6.0", "3.12", "2.7.4.post1", None, "flash-attn-wheel-sm", False),
    # The 2.8.x cxx11abiFALSE torch-2.6 wheel is a C++11-ABI build: torch 2.6.0+cu124 gets a source build.
    (
        "fa-abi-mislabelled",
        "a100",
        None,
        "12.4",
        "2.6.0",
        "3.10",
        "2.8.3",
        None,
        "flash-attn-wheel-abi",
        True,
    ),
    # post2's wheel matrix could not be read: build from source, and say so.
    (
        "fa-wheels-unknown",
        "a100",
        None,
        "12.8",
        "2.8.0",
        "3.12",
        "2.8.3.post2",
        None,
        "flash-attn-wheels-unknown",
        True,
    ),
    # A torch with no cu126 line leaves V100 nothing (2.15.0: pytorch#196249).
    ("v100-torch-2.15", "v100", None, "12.6", "2.15.0", "3.12", "none", None, "torch-variant", False),
    ("torch-2.15-python", "a100", None, "13.0", "2.15.0", "3.10", "none", None, "torch-python", False),
]


@pytest.mark.parametrize(
    ("target", "sm", "cuda", "torch", "python", "fa", "triton", "rule", "valid"),
    [row[1:] for row in ISSUE_11],
    ids=[row[0] for row in ISSUE_11],
)
def test_issue_11_rules(
    kb: Knowledge,
    matrix: MatrixConfig,
    target: str,
    sm: int | None,
    cuda: str,
    torch: str,
    python: str,
    fa: str,
    triton: str | None,
    rule: str,
    valid: bool,
) -> None:
    t = matrix.targets[target]
    t = replace(t, sm=sm if sm is not None else t.sm, triton=triton or t.triton)
    spec = CellSpec(target=target, cuda=cuda, torch=torch, python=python, flash_attn=fa)
    cell = resolve.check(kb, t, spec, origin="test")
    rules = {r.rule for r in (*cell.reasons, *cell.notes)}
    assert rule in rules, [r.message for r in (*cell.reasons, *cell.notes)]
    assert cell.valid == valid


def test_release_ptx_counts_only_where_not_stripped(kb: Knowledge, matrix: MatrixConfig) -> None:
    # Before the strip, the 2.6.0 cu126 row's compute_90 PTX made a B200 cell valid (with the JIT driver).
    unstripped = replace(kb, ptx_strips=())
    cell = resolve.check(
        unstripped,
        matrix.targets["b200"],
        CellSpec(target="b200", cuda="12.6", torch="2.6.0", python="3.12", flash_attn="none"),
        origin="test",
    )
    assert cell.valid and cell.plan is not None
    q = resolve.Query(matrix.targets["b200"], cell.spec, "bf16")
    assert resolve._coverage(unstripped, q) == "ptx" and resolve._coverage(kb, q) is None


def test_triton_floor_removes_with_reason_under_auto(kb: Knowledge, matrix: MatrixConfig) -> None:
    b300 = replace(matrix.targets["b200"], sm=103)
    cell = resolve.check(
        kb,
        b300,
        CellSpec(target="b200", cuda="12.8", torch="2.8.0", python="3.12", flash_attn="none"),
        origin="t",
    )
    assert cell.plan is not None
    assert cell.plan.triton == "remove" and "triton 3.5.1+" in cell.plan.triton_reason
    newer = resolve.check(
        kb,
        b300,
        CellSpec(target="b200", cuda="13.0", torch="2.14.1", python="3.12", flash_attn="none"),
        origin="t",
    )
    assert newer.plan is not None and newer.plan.triton == "keep"


def test_source_build_needs_an_nvcc_that_compiles_the_sm(kb: Knowledge, matrix: MatrixConfig) -> None:
    fa = kb.flash_attn["2.8.3"]
    later = replace(fa, compiled_sm=((80, "11.7"), (90, "11.8"), (100, "12.9"), (120, "12.9")))
    kb2 = replace(kb, flash_attn={**kb.flash_attn, "2.8.3": later})
    # torch 2.13.0 has no 2.8.3 wheel, so it is compiled: the cu129 devel image's nvcc 12.9.1 reaches sm_100,
    ok = resolve.check(
        kb2,
        matrix.targets["b200"],
        CellSpec(target="b200", cuda="12.9", torch="2.13.0", python="3.12", flash_attn="2.8.3"),
        origin="t",
    )
    assert ok.plan is not None and ok.plan.flash_attn.strategy == "source"
    # while a devel image whose nvcc predates the SM does not.
    kb3 = replace(kb2, cuda={**kb.cuda, "12.9": replace(kb.cuda["12.9"], latest_patch="12.8.2")})
    bad = resolve.check(
        kb3,
        matrix.targets["b200"],
        CellSpec(target="b200", cuda="12.9", torch="2.13.0", python="3.12", flash_attn="2.8.3"),
        origin="t",
    )
    assert "flash-attn-source-sm" in {r.rule for r in bad.reasons}


def test_range_triton_pin_is_resolved_data_and_pinned_in_the_image(
    kb: Knowledge, matrix: MatrixConfig
) -> None:
    pin = kb.torch["2.14.1"].triton
    assert pin.requires == "~=3.8.0" and pin.version == "3.8.0" and pin.is_range and pin.resolved
    assert not kb.torch["2.13.0"].triton.is_range
    kept = check(kb, matrix, "h100", "13.0", "2.14.1", "3.12")
    assert kept.plan is not None and kept.plan.triton == "keep" and kept.plan.triton_pin == "triton==3.8.0"
    exact = check(kb, matrix, "h100", "13.0", "2.13.0", "3.12")
    assert exact.plan is not None and exact.plan.triton_pin is None  # torch's own == pin decides


def test_python_hint_offers_only_values_that_pass_every_rule(kb: Knowledge, matrix: MatrixConfig) -> None:
    cell = check(kb, matrix, "a100", "12.4", "2.4.1", "3.12")
    hint = next(r.message for r in cell.reasons if r.rule == "python-base-os")
    # Ubuntu 20.04's Python 3.8 passes the base-OS rule but fails the stack rule: not offered.
    assert hint.endswith("use Python 3.10"), hint


def test_explain_completes_unspecified_axes(kb: Knowledge, matrix: MatrixConfig) -> None:
    cell = resolve.explain(matrix, kb, "v100", overrides={"torch": "2.4.1", "cuda": "12.1"}, dtype=None)
    assert cell.valid and cell.spec.python == "3.10" and cell.spec.flash_attn == "none"
    assert cell.filled == ("python", "flash_attn") and not cell.recommended
    # Values outside the matrix axes come from the knowledge base when the axes have none.
    old = resolve.explain(matrix, kb, "a100", overrides={"torch": "2.5.1"}, dtype=None)
    assert old.valid and old.spec.cuda in kb.torch["2.5.1"].variants and "cuda" in old.filled
    rec = resolve.explain(matrix, kb, "v100", overrides={}, dtype=None)
    assert rec.recommended and rec.filled == ("cuda", "torch", "python", "flash_attn")


def test_explain_invalid_names_the_blocking_axis(kb: Knowledge, matrix: MatrixConfig) -> None:
    cell = resolve.explain(matrix, kb, "v100", overrides={"torch": "2.15.0"}, dtype=None)
    assert not cell.valid and cell.blocking == ("torch",)
    bf16 = resolve.explain(matrix, kb, "v100", overrides={}, dtype="bf16")
    assert not bf16.valid and bf16.blocking == ("dtype",)


@pytest.mark.parametrize(("target", "dtype"), [("v100", "fp32"), ("a100", "fp16")])
def test_explain_dtype_never_invents_an_image(
    kb: Knowledge, matrix: MatrixConfig, target: str, dtype: str
) -> None:
    cell = resolve.explain(matrix, kb, target, overrides={}, dtype=dtype)
    assert cell.valid and not cell.recommended and cell.plan is not None
    assert cell.plan.tags == () and f"{target}-{dtype}" not in str(cell.plan.tags)
    assert "dtype-not-built" in {n.rule for n in cell.notes}
    same = resolve.explain(matrix, kb, "v100", overrides={}, dtype="fp16")
    assert same.recommended


def test_wheel_policy_is_explained_on_ampere_images(kb: Knowledge, matrix: MatrixConfig) -> None:
    a100 = resolve.resolve(matrix, kb).recommended("a100")
    note = next(n for n in a100.notes if n.rule == "flash-attn-wheel-policy")
    assert f"torch {a100.spec.torch} only because" in note.message


# ----------------------------------------------------------------------------- platforms (#12)


def _target(matrix: MatrixConfig, name: str) -> TargetConfig:
    return matrix.targets[name]


@pytest.mark.parametrize(
    ("target", "cell", "platform", "rules"),
    [
        # PyPI's aarch64 torch: CPU up to 2.10, CUDA 13.0 for 2.11-2.14.1 (read from the wheels)
        ("cpu", ("none", "2.10.0", "3.11", "none"), "linux/arm64", []),
        ("cpu", ("none", "2.13.0", "3.11", "none"), "linux/arm64", ["platform-torch-wheel"]),
        ("cpu", ("none", "2.13.0", "3.11", "none"), "linux/amd64", []),
        ("h100", ("13.0", "2.14.1", "3.12", "none"), "linux/arm64", []),
        ("h100", ("12.6", "2.14.1", "3.12", "none"), "linux/arm64", ["platform-torch-wheel"]),
        # torch 2.8.0's aarch64 wheel is the CPU build, and its triton 3.4.0 has no aarch64 wheel
        (
            "h100",
            ("12.8", "2.8.0", "3.12", "none"),
            "linux/arm64",
            ["platform-torch-wheel", "platform-triton"],
        ),
        # the aarch64 wheels start at sm_80: nothing runs on a T4 (sm_75) there
        ("t4", ("13.0", "2.14.1", "3.12", "none"), "linux/arm64", ["platform-torch-arch"]),
        ("t4", ("13.0", "2.14.1", "3.12", "none"), "linux/amd64", []),
        # no flash-attn wheel on aarch64: a source build, which 2.8.3 never had for CUDA 13
        ("h100", ("13.0", "2.14.1", "3.12", "2.8.3"), "linux/arm64", ["flash-attn-source-cuda"]),
    ],
)
def test_platform_rules(
    kb: Knowledge,
    matrix: MatrixConfig,
    target: str,
    cell: tuple[str, str, str, str],
    platform: str,
    rules: list[str],
) -> None:
    cuda, torch_v, python, fa = cell
    spec = CellSpec(target=target, cuda=cuda, torch=torch_v, python=python, flash_attn=fa)
    verdict = resolve.check(kb, _target(matrix, target), spec, origin="axes", platform=platform)
    assert sorted({r.rule for r in verdict.reasons}) == sorted(rules)
    assert all(r.source for r in verdict.reasons)
    if not rules:
        assert verdict.plan is not None and verdict.platforms == (platform,)


def test_arm64_plans_take_pypi_aarch64_builds(kb: Knowledge, matrix: MatrixConfig) -> None:
    spec = CellSpec(target="cpu", cuda="none", torch="2.10.0", python="3.11", flash_attn="none")
    arm = resolve.check(kb, _target(matrix, "cpu"), spec, origin="axes", platform="linux/arm64")
    amd = resolve.check(kb, _target(matrix, "cpu"), spec, origin="axes", platform="linux/amd64")
    assert arm.plan is not None and amd.plan is not None
    assert (arm.plan.torch.requirement, arm.plan.torch.index_url) == ("torch==2.10.0", None)
    assert amd.plan.torch.requirement == "torch==2.10.0+cpu" and amd.plan.torch.index_url
    h = CellSpec(target="h100", cuda="13.0", torch="2.14.1", python="3.12", flash_attn="none")
    gh = resolve.check(kb, _target(matrix, "h100"), h, origin="axes", platform="linux/arm64")
    assert (
        gh.plan is not None
        and gh.plan.torch.index_url is None
        and gh.plan.torch.requirement == "torch==2.14.1"
    )


def test_each_platform_gets_its_recommended_image(kb: Knowledge, matrix: MatrixConfig) -> None:
    res = resolve.resolve(matrix, kb)
    by_id = {c.id: c for c in res.cells}
    assert by_id["h100-bf16"].platforms == ("linux/amd64",)
    gh = by_id["h100-bf16-arm64"]
    assert gh.platforms == ("linux/arm64",) and gh.recommended and gh.alias == "h100-bf16"
    assert gh.plan.tags == ("qwen-ft:h100-bf16", "qwen-ft:h100-bf16-cu130-torch2.14.1-py3.12")
    assert [r.rule for p, rs in by_id["h100-bf16"].platform_reasons for r in rs] == ["platform-other-image"]
    # targets without the axis stay amd64-only
    assert by_id["a100-bf16"].platforms == ("linux/amd64",) and "a100-bf16-arm64" not in by_id
