"""Hostile matrix.yaml values and files (issue 14, findings 6 and 9): one line, exit 2, nothing written.

Every value that reaches a tag, a path or a generated file obeys an exact grammar
(builder/names.py); a file that is not UTF-8 YAML, holds a duplicate key, or asks for
an image that cannot exist is refused instead of being half-read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_config_errors import GOOD, assert_one_line_error, run_cli, write

from builder import config, names
from builder.errors import ConfigError


def _parse(text: str, tmp_path: Path) -> config.MatrixConfig:
    return config.parse(text, tmp_path / "matrix.yaml")


def _with_target(name: str) -> str:
    return GOOD.replace("  cpu:\n", f"  {json.dumps(name)}:\n    sm: 70\n  cpu:\n", 1)


# ----------------------------------------------------------------------------- finding 6: names

BAD_TARGETS = [
    "../evil",
    "/abs",
    "v100 x",
    "v100\nENV X=1",
    "$(touch pwned)",
    "a,b",
    "v100\x00",
    "x" * 300,
    "V100",
    "-v100",
]


@pytest.mark.parametrize("name", BAD_TARGETS, ids=[names.shown(n, 20) for n in BAD_TARGETS])
def test_bad_target_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=r"targets\.") as err:
        _parse(_with_target(name), tmp_path)
    assert "\n" not in err.value.message


def test_bad_target_name_is_one_line_and_writes_nothing(project_copy: Path) -> None:
    matrix = project_copy / "matrix.yaml"
    matrix.write_text(_with_target("../../escaped-by-render"))
    before = sorted(project_copy.rglob("*"))
    assert_one_line_error(run_cli("--matrix", str(matrix), "render"), "not a valid target name")
    assert sorted(project_copy.rglob("*")) == before
    assert not list(project_copy.parent.glob("escaped-by-render*"))


@pytest.mark.parametrize(
    "registry",
    [
        "ghcr.io/acme,evil.io/x",
        "ghcr.io/acme\nx",
        "ghcr.io/ac me",
        "ghcr.io/Acme",
        "https://ghcr.io/acme",
        "a/../b",
    ],
)
def test_bad_registries_are_refused(tmp_path: Path, registry: str) -> None:
    with pytest.raises(ConfigError, match="registry"):
        _parse(GOOD.replace('registry: ""', f"registry: {json.dumps(registry)}"), tmp_path)


@pytest.mark.parametrize(
    "registry", ["ghcr.io/acme", "127.0.0.1:5000/ml", "localhost:5000", "acme", "r.io:443/a/b"]
)
def test_good_registries_are_accepted(tmp_path: Path, registry: str) -> None:
    assert (
        _parse(GOOD.replace('registry: ""', f"registry: {json.dumps(registry)}"), tmp_path).registry
        == registry
    )


def test_registry_option_is_checked_too() -> None:
    assert_one_line_error(
        run_cli("ci-matrix", "--json", "--registry", "ghcr.io/a,b"), "--registry", "registry prefix"
    )


@pytest.mark.parametrize("image", ["qwen-ft\n", "Qwen", "qwen ft", "qwen-ft:latest", "../x", "q" * 300])
def test_bad_image_names_are_refused(tmp_path: Path, image: str) -> None:
    with pytest.raises(ConfigError, match="image"):
        _parse(GOOD.replace("image: qwen-ft", f"image: {json.dumps(image)}"), tmp_path)


@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        ("nvidia/cuda:*", "mirror/cuda:*\nTORCH_INDEX_URL=http://evil"),
        ("nvidia/cuda:*", "mirror/cuda:*,evil"),
        ("nvidia/cuda:*", "mirror cuda:*"),
        ("nvidia/cuda:*", "mirror/*/cuda:*"),
        ("nvidia/cuda:*\n", "mirror/cuda:*"),
    ],
)
def test_bad_base_map_rules_are_refused(tmp_path: Path, pattern: str, value: str) -> None:
    text = GOOD.replace("base_map: {}", f"base_map: {{{json.dumps(pattern)}: {json.dumps(value)}}}")
    with pytest.raises(ConfigError, match="base_map"):
        _parse(text, tmp_path)


def test_base_map_option_is_checked() -> None:
    assert_one_line_error(
        run_cli("build", "--dry-run", "cpu", "--base-map", "debian*=m/x\ny*"), "--base-map", "reference"
    )


def test_a_rule_that_splices_into_a_non_reference_is_refused() -> None:
    # Both sides are fine alone, but debian:bookworm-slim becomes m/n::bookworm-slim.
    assert_one_line_error(
        run_cli("build", "--dry-run", "cpu", "--base-map", "debian*=m/n:*"),
        "BASE_IMAGE",
        "not a Docker image reference",
    )


def test_good_base_map_rules_are_accepted(tmp_path: Path) -> None:
    text = GOOD.replace("base_map: {}", 'base_map: {"nvidia/cuda:*": "mirror.local:5000/nvidia/cuda:*"}')
    assert _parse(text, tmp_path).base_map == (("nvidia/cuda:*", "mirror.local:5000/nvidia/cuda:*"),)


@pytest.mark.parametrize(
    ("key", "value"), [("gpus", "V100|x"), ("gpus", "V100\nx"), ("runner_labels", "gpu,x")]
)
def test_gpu_names_and_runner_labels_have_a_grammar(tmp_path: Path, key: str, value: str) -> None:
    text = GOOD.replace("    gpus: [V100]\n", f"    {key}: [{json.dumps(value)}]\n")
    with pytest.raises(ConfigError, match=key):
        _parse(text, tmp_path)


def test_tags_obey_dockers_128_characters() -> None:
    names.check_tag("a" * 128, "t")
    with pytest.raises(ConfigError, match="129 characters"):
        names.check_tag("a" * 129, "t")
    with pytest.raises(ConfigError, match="not a Docker tag"):
        names.check_tag(".a", "t")


def test_every_generated_value_is_in_grammar() -> None:
    """The shipped matrix's tags and build args pass the grammar: the CI matrix carries no raw separators."""
    proc = run_cli("ci-matrix", "--json", "--registry", "127.0.0.1:5000/ml")
    assert proc.returncode == 0, proc.stderr
    for entry in json.loads(proc.stdout)["include"]:
        for tag in entry["tags"]:
            assert re.fullmatch(names.REFERENCE, tag), tag
        for line in entry["build_args"].splitlines():
            key, _, value = line.partition("=")
            assert key in {"BASE_IMAGE", "BUILDER_IMAGE", "TORCH_INDEX_URL"}
            assert "," not in value and " " not in value


# ----------------------------------------------------------------------------- finding 9: input files


@pytest.mark.parametrize(
    ("encoding", "fragment"),
    [("utf-16", "UTF-16"), ("utf-16-be", "NUL bytes"), ("latin-1", "not UTF-8")],
)
def test_non_utf8_matrix_is_one_line(tmp_path: Path, encoding: str, fragment: str) -> None:
    path = tmp_path / "matrix.yaml"
    path.write_bytes(("# café\n" + GOOD).encode(encoding))
    assert_one_line_error(run_cli("--matrix", str(path), "matrix"), str(path), fragment, "UTF-8")


def test_binary_matrix_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "matrix.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    assert_one_line_error(run_cli("--matrix", str(path), "matrix"), str(path))


def test_utf8_bom_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "matrix.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert config.load(path).image == "qwen-ft"


def test_duplicate_top_level_key_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "image: evil\n")
    assert_one_line_error(run_cli("--matrix", str(path), "matrix"), "image: duplicate key")


def test_duplicate_nested_key_is_refused_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r":\d+:\d+: targets\.v100\.sm: duplicate key"):
        _parse(GOOD.replace("    sm: 70\n", "    sm: 70\n    sm: 80\n"), tmp_path)


def test_aliases_are_walked_once(tmp_path: Path) -> None:
    # A billion-laughs shape: fine to load (PyYAML shares the nodes), and must not explode here.
    lol = "a: &a [x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    with pytest.raises(ConfigError, match="unknown key"):
        _parse(lol + GOOD, tmp_path)


INVALID_INCLUDE = GOOD.replace(
    '- {target: v100, cuda: "12.8", torch: "2.8.0", python: "3.10", flash_attn: "none"}',
    '- {target: v100, cuda: "12.8", torch: "2.8.0", python: "3.10", flash_attn: "2.8.3"}',
)


def test_invalid_include_is_an_error_naming_why(tmp_path: Path) -> None:
    assert INVALID_INCLUDE != GOOD
    path = write(tmp_path, INVALID_INCLUDE)
    assert_one_line_error(run_cli("--matrix", str(path), "matrix"), "include[0]", "is invalid", "flash-attn")


def test_render_never_deletes_an_image_whose_include_went_bad(project_copy: Path) -> None:
    images = project_copy / "images"
    before = {p: p.read_bytes() for p in images.rglob("*") if p.is_file()}
    (project_copy / "matrix.yaml").write_text(INVALID_INCLUDE)
    assert_one_line_error(run_cli("--matrix", str(project_copy / "matrix.yaml"), "render"), "include[0]")
    assert {p: p.read_bytes() for p in images.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "rule",
    ['{target: v100, python: "3.9"}', '{cuda: "11.*"}', '{target: cpu, flash_attn: "2.8.3"}'],
)
def test_exclude_matching_no_cell_is_refused(tmp_path: Path, rule: str) -> None:
    with pytest.raises(ConfigError, match=r"exclude\[0\].*matches no"):
        _parse(GOOD.replace("exclude: []", f"exclude: [{rule}]"), tmp_path)


def test_exclude_matching_a_cell_is_accepted(tmp_path: Path) -> None:
    cfg = _parse(GOOD.replace("exclude: []", 'exclude: [{target: "*", python: "3.10"}]'), tmp_path)
    assert cfg.exclude == ({"target": "*", "python": "3.10"},)


@pytest.mark.parametrize(
    "change",
    [
        ('torch: ["2.8.0", ', 'torch: ["2.8.0\\n", '),
        ('python: ["3.10", "3.12"]', 'python: ["3.10", "3.12\\n"]'),
        ('cuda: ["12.6", "12.8", "13.0"]', 'cuda: ["12.6\\n", "12.8"]'),
        ('flash_attn: ["2.8.3", "none"]', 'flash_attn: ["2.8.3", "none\\n"]'),
    ],
)
def test_versions_with_a_trailing_newline_are_refused(tmp_path: Path, change: tuple[str, str]) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD
    with pytest.raises(ConfigError, match="not a valid version"):
        _parse(text, tmp_path)
