"""DeepSpeed in the plan: the release per cell, the ops per SM (table-driven), the ENV, labels,
`explain`, the builder image's base mapping and the rendered stages."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from builder import cellview, contract, resolve
from builder import jobs as jobplan
from builder.config import CellSpec, MatrixConfig
from builder.knowledge import Knowledge
from builder.render import dockerfile, environment

ROOT = Path(__file__).resolve().parent.parent
V100 = CellSpec(target="v100", cuda="12.8", torch="2.8.0", python="3.10", flash_attn="none")


def check(
    kb: Knowledge, matrix: MatrixConfig, spec: CellSpec, ops: tuple[str, ...] | None, sm: int | None = None
) -> resolve.Verdict:
    target = replace(matrix.targets[spec.target], deepspeed_ops=ops)
    if sm is not None:
        target = replace(target, sm=sm)
    return resolve.check(kb, target, spec, origin="test")


A100 = replace(V100, target="a100")
CPU = CellSpec(target="cpu", cuda="none", torch="2.13.0", python="3.11", flash_attn="none")

OPS = [
    # (id, spec, sm override, asked ops (None = default), expected rules, planned ops, arch list)
    ("v100-default", V100, None, None, set(), ("fused_adam", "cpu_adam"), "7.0"),
    ("a100-default", A100, None, None, set(), ("fused_adam", "cpu_adam"), "8.0"),
    ("t4-sm75", replace(V100, target="t4"), None, None, set(), ("fused_adam", "cpu_adam"), "7.5"),
    ("v100-no-ops", V100, None, (), set(), (), None),
    ("v100-host-only", V100, None, ("cpu_adam",), set(), ("cpu_adam",), None),
    ("v100-fp-quantizer", V100, None, ("fused_adam", "fp_quantizer"), {"deepspeed-op-sm"}, None, None),
    ("t4-fp-quantizer", replace(V100, target="t4"), None, ("fp_quantizer",), {"deepspeed-op-sm"}, None, None),
    # min_sm 80 is met, but nothing records the module `contract` would look for
    ("a100-fp-quantizer", A100, None, ("fp_quantizer",), {"deepspeed-op-unchecked"}, None, None),
    ("a100-evoformer", A100, None, ("evoformer_attn",), {"deepspeed-op-unchecked"}, None, None),
    ("a100-lamb", A100, None, ("fused_lamb",), set(), ("fused_lamb",), "8.0"),
    ("unknown-op", V100, None, ("fused_adamw",), {"deepspeed-op-unknown"}, None, None),
    ("cpu-default", CPU, None, None, set(), (), None),
    ("cpu-asks-ops", CPU, None, ("cpu_adam",), {"deepspeed-op-cpu"}, None, None),
]


@pytest.mark.parametrize(
    ("spec", "sm", "asked", "rules", "ops", "arch"), [r[1:] for r in OPS], ids=[r[0] for r in OPS]
)
def test_ops_per_sm(
    kb: Knowledge,
    matrix: MatrixConfig,
    spec: CellSpec,
    sm: int | None,
    asked: tuple[str, ...] | None,
    rules: set[str],
    ops: tuple[str, ...] | None,
    arch: str | None,
) -> None:
    cell = check(kb, matrix, spec, asked, sm)
    assert {r.rule for r in cell.reasons} == rules, [r.message for r in cell.reasons]
    if rules:
        assert cell.plan is None
        for reason in cell.reasons:
            assert reason.source and "deepspeed" in reason.message.lower()
        return
    assert isinstance(cell, resolve.Cell)
    ds = cell.plan.deepspeed
    assert ds.version == "0.19.8" and ds.ops == ops and ds.arch_list == arch
    if ops:
        assert ds.build_env["DS_ACCELERATOR"] == "cuda"  # a GPU-less builder must not pick CPU ops
        assert ds.builder_image is not None and "-devel-" in ds.builder_image
        assert ds.build_env.get("TORCH_CUDA_ARCH_LIST") == arch  # the target's SM only
    else:
        assert ds.builder_image is None and ds.build_env == {}
    host = "cpu_adam" in ops if ops else False
    assert (ds.march, ds.simd) == (("x86-64-v3", "__AVX256__") if host else (None, None))


def test_sm_reason_names_the_floor_and_the_fix(kb: Knowledge, matrix: MatrixConfig) -> None:
    cell = check(kb, matrix, V100, ("fp_quantizer",))
    (reason,) = cell.reasons
    assert "sm_70" in reason.message and "sm_80+" in reason.message
    assert "deepspeed_ops" in reason.message and "fp_quantizer.py" in reason.source


def test_release_follows_torch_and_python(kb: Knowledge, matrix: MatrixConfig) -> None:
    ds = kb.deepspeed
    assert ds.choose("2.8.0", "3.10") is not None and ds.choose("2.8.0", "3.10").version == "0.19.8"
    # 0.19.8 declares torch>=2.0.0; older releases take any torch and Python up to their classifiers
    old = ds.choose("1.13.1", "3.10")
    assert old is not None and old.version == "0.17.6"
    assert ds.choose("2.8.0", "3.99") is None
    cell = resolve.check(
        kb,
        matrix.targets["v100"],
        V100,
        origin="test",
    )
    assert isinstance(cell, resolve.Cell)


def test_no_release_rejects_the_cell(kb: Knowledge, matrix: MatrixConfig) -> None:
    no_releases = replace(kb, deepspeed=replace(kb.deepspeed, releases=()))
    cell = resolve.check(no_releases, matrix.targets["v100"], V100, origin="test")
    assert {r.rule for r in cell.reasons} == {"deepspeed-release"}


def test_env_labels_and_explain(kb: Knowledge, matrix: MatrixConfig) -> None:
    resolution = resolve.resolve(matrix, kb)
    v100 = resolve.select_one(resolution, "v100-fp16-cu128-torch2.8.0-py3.10")
    cpu = resolve.select_one(resolution, "cpu")
    assert v100 is not None and cpu is not None
    assert v100.plan.env["QWEN_FT_DEEPSPEED"] == "0.19.8"
    assert v100.plan.env["QWEN_FT_DS_OPS"] == "fused_adam,cpu_adam"
    assert cpu.plan.env["QWEN_FT_DS_OPS"] == "none" and cpu.plan.env["QWEN_FT_DEEPSPEED"] == "0.19.8"
    assert list(v100.plan.env)[: len(contract.ENV_VARS)] == list(contract.ENV_VARS.values())
    labels = v100.plan.labels
    assert labels[contract.DEEPSPEED] == "0.19.8" and labels[contract.DS_OPS] == "fused_adam,cpu_adam"
    assert json.loads(labels[contract.SPEC])["deepspeed"] == {
        "version": "0.19.8",
        "ops": ["fused_adam", "cpu_adam"],
        "arch_list": "7.0",
        "march": "x86-64-v3",
    }
    shown = cellview.cell_json(v100)
    assert shown["plan"]["deepspeed"]["ops"] == ["fused_adam", "cpu_adam"]
    assert shown["plan"]["builder_image"] == "nvidia/cuda:12.8.2-devel-ubuntu22.04"
    text = cellview.explain_text(shown)
    assert "deepspeed             0.19.8, ops fused_adam, cpu_adam prebuilt for sm 7.0" in text
    assert "no prebuilt op" in cellview.explain_text(cellview.cell_json(cpu))


def test_builder_image_is_base_mapped_and_hashed(kb: Knowledge, matrix: MatrixConfig) -> None:
    resolution = resolve.resolve(matrix, kb)
    v100 = resolve.select_one(resolution, "v100-fp16-cu128-torch2.8.0-py3.10")
    cpu = resolve.select_one(resolution, "cpu")
    assert v100 is not None and cpu is not None
    rules = jobplan.parse_base_map(["nvidia/cuda:*base*=local/trixie:1", "nvidia/cuda:*devel*=local/devel:1"])
    args = jobplan.build_args(v100, rules)
    assert args["BASE_IMAGE"] == "local/trixie:1" and args["BUILDER_IMAGE"] == "local/devel:1"
    assert jobplan.build_args(v100, ())["BUILDER_IMAGE"] == "nvidia/cuda:12.8.2-devel-ubuntu22.04"
    assert "BUILDER_IMAGE" not in jobplan.build_args(cpu, rules)


def _stages(text: str) -> dict[str, str]:
    """Rendered Dockerfile -> {stage name: its text}; the last, unnamed stage is 'image'."""
    stages: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if line.startswith("FROM "):
            parts = line.split()
            name = parts[3] if len(parts) > 3 else "image"
            stages[name] = ""
        if name is not None:
            stages[name] += line + "\n"
    return stages


def test_template_prebuilds_in_a_devel_stage_and_ships_only_the_wheel(
    kb: Knowledge, matrix: MatrixConfig
) -> None:
    resolution = resolve.resolve(matrix, kb)
    env = environment(ROOT / "templates")
    v100 = resolve.select_one(resolution, "v100-fp16-cu128-torch2.8.0-py3.10")
    assert v100 is not None
    stages = _stages(dockerfile(env, kb, v100, "qwen-ft"))
    assert list(stages) == ["stack", "ds-build", "image"]
    assert stages["stack"].startswith("FROM ${BASE_IMAGE} AS stack")
    build = stages["ds-build"]
    assert build.startswith("FROM ${BUILDER_IMAGE} AS ds-build")
    assert "COPY --from=stack /opt/venv /opt/venv" in build
    assert (
        "DS_ACCELERATOR=cuda DS_BUILD_OPS=0 TORCH_CUDA_ARCH_LIST=7.0 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1"
        in build
    )
    assert "pip wheel -v --no-deps --no-build-isolation --wheel-dir /dist" in build
    assert kb.deepspeed.release("0.19.8").sdist_sha256 in build  # type: ignore[union-attr]
    assert 'export CUDA_HOME="${nvcc%/bin/nvcc}"' in build
    assert "-march=x86-64-v3" in build and "fused_adam_op" in build and "cpu_adam_op" in build
    # --wheelhouse and --ca-bundle reach the builder too: its apt and pip steps trust the secret,
    # and the sdist is taken from the wheelhouse when it holds it (air-gapped builds)
    assert build.count("--mount=type=secret,id=ca_bundle") == 3
    assert build.count("--mount=type=bind,source=wheelhouse,target=/wheelhouse") == 2
    assert "sdist=/wheelhouse/deepspeed-0.19.8.tar.gz" in build
    image = stages["image"]
    assert image.startswith("FROM stack\n")
    assert "--mount=type=bind,from=ds-build,source=/dist,target=/dist" in image
    assert "BUILDER_IMAGE" not in image and "nvcc" not in image and "apt-get" not in image
    assert "QWEN_FT_DS_OPS=fused_adam,cpu_adam" in image


def test_cpu_template_builds_pure_python_deepspeed(kb: Knowledge, matrix: MatrixConfig) -> None:
    resolution = resolve.resolve(matrix, kb)
    cpu = resolve.select_one(resolution, "cpu")
    assert cpu is not None
    stages = _stages(dockerfile(environment(ROOT / "templates"), kb, cpu, "qwen-ft"))
    assert list(stages) == ["stack", "ds-build", "image"]
    assert stages["ds-build"].startswith("FROM stack AS ds-build")
    assert "DS_BUILD_OPS=0 " in stages["ds-build"] and "DS_ACCELERATOR" not in stages["ds-build"]
    assert "BUILDER_IMAGE" not in "".join(stages.values())
    assert "QWEN_FT_DS_OPS=none" in stages["image"]


def test_gpu_images_carry_the_infiniband_verbs_libraries(kb: Knowledge, matrix: MatrixConfig) -> None:
    resolution = resolve.resolve(matrix, kb)
    env = environment(ROOT / "templates")
    assert kb.deepspeed.ib_packages == ("libibverbs1", "ibverbs-providers") and kb.deepspeed.ib_source
    for cell in resolution.cells:
        stack = _stages(dockerfile(env, kb, cell, "qwen-ft"))["stack"]
        install = next(line for line in stack.splitlines() if "apt-get install" in line)
        has = "libibverbs1" in install and "ibverbs-providers" in install
        assert has == (cell.sm is not None), cell.id
