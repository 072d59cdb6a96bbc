"""The compatibility knowledge base: sourced facts loaded from the YAML files beside this module.

Everything the resolver knows about GPUs, CUDA, torch, Triton and flash-attn comes
from here; the rules in `builder.resolve` are pure functions over these records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from builder import contract
from builder.errors import KnowledgeError

try:  # the C loader is ~10x faster; start-up time matters for `explain`
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

if TYPE_CHECKING:  # deepspeed.py reads YAML through this package: imported at load time
    from .deepspeed import DeepSpeedKnowledge


@dataclass(frozen=True)
class Gpu:
    name: str
    match: tuple[str, ...]
    sm: int
    source: str


@dataclass(frozen=True)
class Arch:
    sm: int
    family: str
    bf16: bool
    min_driver: str | None
    source: str


@dataclass(frozen=True)
class TritonPin:
    """torch's Requires-Dist on triton: `requires` as published, `version` what pip picks for it."""

    version: str
    python_below: str | None
    confidence: str
    source: str
    requires: str = ""
    resolved: str | None = None

    @property
    def is_range(self) -> bool:
        """True when the published requirement leaves pip a choice (`~=3.8.0`), not `==X`."""
        return not self.requires.startswith("==")


@dataclass(frozen=True)
class TorchRelease:
    version: str
    variants: tuple[str, ...]
    pypi_default: str
    python: tuple[str, ...]
    triton: TritonPin
    cxx11_abi: dict[str, bool]
    source: str
    python_excluded: tuple[str, ...] = ()  # published, deliberately not offered (see `source`)

    def abi(self, variant: str) -> bool:
        return self.cxx11_abi[variant]


@dataclass(frozen=True)
class ArchList:
    torch: SpecifierSet
    variants: tuple[str, ...]
    sm: tuple[int, ...]
    ptx: tuple[int, ...]
    source: str
    conflict: str | None = None


@dataclass(frozen=True)
class PtxStrip:
    """A release-only removal of "+PTX": release wheels of these carry no PTX."""

    torch: SpecifierSet
    variants: tuple[str, ...]
    pr: str
    source: str


@dataclass(frozen=True)
class Mislabelled:
    """Prebuilt wheels whose cxx11abi name does not match the ABI they were built with."""

    torch: str
    abi: bool
    why: str
    source: str


@dataclass(frozen=True)
class WheelMatrix:
    torch: tuple[str, ...]
    cuda: tuple[str, ...]
    python: tuple[str, ...]
    abi: tuple[bool, ...]
    excluded: tuple[dict[str, str], ...] = ()
    nvcc: str | None = None
    known: bool = True
    mislabelled: tuple[Mislabelled, ...] = ()

    def mislabel(self, *, torch_mm: str, abi: bool) -> Mislabelled | None:
        return next((m for m in self.mislabelled if m.torch == torch_mm and m.abi == abi), None)

    def has(self, *, torch_mm: str, cuda_major: str, python: str, abi: bool) -> bool:
        if torch_mm not in self.torch or cuda_major not in self.cuda:
            return False
        if python not in self.python or abi not in self.abi:
            return False
        cell = {"torch": torch_mm, "cuda": cuda_major, "python": python}
        return not any(all(cell[k] == v for k, v in ex.items()) for ex in self.excluded)


@dataclass(frozen=True)
class FlashAttnRelease:
    version: str
    min_sm: int
    min_cuda: str
    min_torch: str
    python: tuple[str, ...]
    cuda_archs_env: bool
    wheels: WheelMatrix
    source: str
    conflict: str | None = None
    runtime_sm: tuple[tuple[int, int | None], ...] = ((80, None),)
    compiled_sm: tuple[tuple[int, str], ...] = ()

    def runs_on(self, sm: int) -> bool:
        """Whether flash_api.cpp's capability check accepts this GPU."""
        return any(lo <= sm and (hi is None or sm <= hi) for lo, hi in self.runtime_sm)

    def compiled_for(self, nvcc: str) -> tuple[int, ...]:
        """The SMs setup.py compiles cubins for with this nvcc (the FLASH_ATTN_CUDA_ARCHS default)."""
        v = Version(nvcc)
        return tuple(sm for sm, floor in self.compiled_sm if v >= Version(floor))


@dataclass(frozen=True)
class CudaTokenRule:
    flash_attn: SpecifierSet
    mode: str
    map: dict[str, str]
    source: str


@dataclass(frozen=True)
class TritonModule:
    module: str
    since: str
    used_by: str
    source: str


@dataclass(frozen=True)
class CudaVersion:
    cuda: str
    latest_patch: str | None
    toolkit_driver: str
    ubuntu: tuple[str, ...]
    cudnn_tag: str | None
    no_sm: tuple[int, ...]
    source: str
    eol: bool = False
    conflict: str | None = None


@dataclass(frozen=True)
class CudaMajor:
    major: str
    floor: str
    source: str
    conflict: str | None = None


@dataclass(frozen=True)
class Distro:
    os: str
    version: str
    python: str
    source: str
    codename: str | None = None
    image: str | None = None


@dataclass(frozen=True)
class StackPin:
    version: str
    python: SpecifierSet
    torch: SpecifierSet
    source: str


@dataclass(frozen=True)
class Knowledge:
    gpus: tuple[Gpu, ...]
    archs: dict[int, Arch]
    torch: dict[str, TorchRelease]
    torch_index_url: str
    arch_lists: tuple[ArchList, ...]
    ptx_strips: tuple[PtxStrip, ...]
    triton_rows: tuple[tuple[SpecifierSet, int, str], ...]
    triton_sm_min: tuple[tuple[int, str, str], ...]
    triton_auto_remove_below: int
    triton_auto_remove_source: str
    flash_attn: dict[str, FlashAttnRelease]
    fa_wheel_url: str
    fa_wheel_filename: str
    fa_wheel_source: str
    fa_cuda_tokens: tuple[CudaTokenRule, ...]
    fa_triton_modules: tuple[TritonModule, ...]
    fa_source_archs: tuple[int, ...]
    fa_source_archs_source: str
    fa_build_gb_per_job: int
    fa_einops: str
    cuda: dict[str, CudaVersion]
    cuda_majors: dict[str, CudaMajor]
    cuda_image_repo: str
    cuda_image_tag: str
    cuda_image_source: str
    distros: tuple[Distro, ...]
    stack: dict[str, tuple[StackPin, ...]]
    stack_minimums: dict[str, tuple[str, str]]
    stack_watch: dict[str, tuple[str, str]]
    deepspeed: DeepSpeedKnowledge
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    # -- lookups used by the resolver -------------------------------------------------
    def arch(self, sm: int) -> Arch:
        """The properties of a compute capability; unknown minors fall back to the major's base."""
        if sm in self.archs:
            return self.archs[sm]
        same_major = [a for a in self.archs.values() if a.sm != sm and contract.runs_on(a.sm, sm)]
        if same_major:
            return max(same_major, key=lambda a: a.sm)
        raise KnowledgeError(f"compute capability sm_{sm} is not in builder/knowledge/gpus.yaml")

    def arch_list(self, torch_version: str, variant: str) -> ArchList | None:
        v = Version(torch_version)
        for row in self.arch_lists:
            if variant in row.variants and v in row.torch:
                return row
        return None

    def ptx_strip(self, torch_version: str, variant: str) -> PtxStrip | None:
        v = Version(torch_version)
        return next((s for s in self.ptx_strips if variant in s.variants and v in s.torch), None)

    def triton_min_version(self, sm: int) -> tuple[str, str] | None:
        """The lowest Triton whose ptxas knows `sm` (same major, highest listed minor <= sm)."""
        rows = [r for r in self.triton_sm_min if r[0] // 10 == sm // 10 and r[0] <= sm]
        if not rows:
            return None
        _, version, source = max(rows, key=lambda r: r[0])
        return version, source

    def triton_min_sm(self, triton_version: str) -> tuple[int, str]:
        v = Version(triton_version)
        for spec, sm, source in self.triton_rows:
            if v in spec:
                return sm, source
        raise KnowledgeError(f"no Triton row in triton.yaml covers {triton_version}")

    def fa_cuda_token(self, fa_version: str, cuda: str) -> str | None:
        v = Version(fa_version)
        major = cuda.split(".")[0]
        for rule in self.fa_cuda_tokens:
            if v in rule.flash_attn:
                return rule.map.get(major)
        return None

    def gpu_by_name(self, name: str) -> Gpu | None:
        """Longest matching pattern wins, so 'A100' is not taken for 'A10'."""
        upper = name.upper()
        best: tuple[int, Gpu] | None = None
        for gpu in self.gpus:
            for pattern in gpu.match:
                if _word_in(pattern.upper(), upper) and (best is None or len(pattern) > best[0]):
                    best = (len(pattern), gpu)
        return best[1] if best else None

    def stack_pin(self, package: str, python: str, torch_version: str) -> StackPin | None:
        py = Version(python)
        tv = Version(Version(torch_version).base_version)
        for pin in self.stack[package]:
            if py in pin.python and tv in pin.torch:
                return pin
        return None


def _word_in(pattern: str, text: str) -> bool:
    """'A10' matches 'NVIDIA A10' and 'A10G' is its own pattern, but not 'A100'."""
    start = text.find(pattern)
    while start != -1:
        end = start + len(pattern)
        before_ok = start == 0 or not text[start - 1].isalnum()
        after_ok = end == len(text) or not text[end].isdigit()
        if before_ok and after_ok:
            return True
        start = text.find(pattern, start + 1)
    return False


def read_yaml(name: str) -> dict[str, Any]:
    """One knowledge file, parsed (every loader in this package reads through here)."""
    text = resources.files("builder.knowledge").joinpath(name).read_text(encoding="utf-8")
    data = yaml.load(text, Loader=_Loader)
    if not isinstance(data, dict):
        raise KnowledgeError(f"builder/knowledge/{name} is not a mapping")
    return data


def _strs(items: Any) -> tuple[str, ...]:
    return tuple(str(i) for i in items)


def _ptx_strips(rows: list[dict[str, Any]], releases: dict[str, TorchRelease]) -> tuple[PtxStrip, ...]:
    """Each strip must name a variant some release it covers publishes, or it is a typo."""
    strips = []
    for s in rows:
        strip = PtxStrip(
            torch=SpecifierSet(str(s["torch"])),
            variants=_strs(s["variants"]),
            pr=str(s["pr"]),
            source=str(s["source"]),
        )
        published = {v for r in releases.values() if Version(r.version) in strip.torch for v in r.variants}
        if not set(strip.variants) & published:
            raise KnowledgeError(
                f"ptx_strips {strip.pr}: no torch {strip.torch} release publishes {strip.variants}"
            )
        strips.append(strip)
    return tuple(strips)


def _triton_pin(torch_version: str, t: dict[str, Any]) -> TritonPin:
    """torch's triton requirement; the chosen version must satisfy it (a range is resolved as data)."""
    version = str(t["version"])
    requires = str(t.get("requires") or f"=={version}")
    if Version(version) not in SpecifierSet(requires):
        raise KnowledgeError(
            f"torch {torch_version}: triton {version} does not satisfy its requirement {requires}"
        )
    if not requires.startswith("==") and not t.get("resolved"):
        raise KnowledgeError(
            f"torch {torch_version}: triton {requires} is a range; "
            f"record how {version} was chosen in `resolved`"
        )
    return TritonPin(
        version=version,
        python_below=t.get("python_below"),
        confidence=str(t["confidence"]),
        source=str(t["source"]),
        requires=requires,
        resolved=t.get("resolved"),
    )


@cache
def load() -> Knowledge:
    """Load and type-check every knowledge file once per process."""
    from .deepspeed import load_deepspeed

    try:
        return _build(
            deepspeed=load_deepspeed(),
            gpus=read_yaml("gpus.yaml"),
            torch=read_yaml("torch.yaml"),
            triton=read_yaml("triton.yaml"),
            fa=read_yaml("flash_attn.yaml"),
            cuda=read_yaml("cuda.yaml"),
            stack=read_yaml("stack.yaml"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise KnowledgeError(f"builder/knowledge is malformed: {exc!r}") from exc


def _build(
    *,
    deepspeed: DeepSpeedKnowledge,
    gpus: dict[str, Any],
    torch: dict[str, Any],
    triton: dict[str, Any],
    fa: dict[str, Any],
    cuda: dict[str, Any],
    stack: dict[str, Any],
) -> Knowledge:
    torch_releases: dict[str, TorchRelease] = {}
    for r in torch["releases"]:
        variants = _strs(r["variants"])
        abi = r["cxx11_abi"]
        abi_map = (
            {v: bool(abi) for v in variants}
            if isinstance(abi, bool)
            else {str(k): bool(v) for k, v in abi.items()}
        )
        if set(abi_map) != set(variants):
            raise KnowledgeError(f"torch {r['version']}: cxx11_abi must cover every variant")
        pin = _triton_pin(str(r["version"]), r["triton"])
        if set(_strs(r.get("python_excluded", []))) & set(_strs(r["python"])):
            raise KnowledgeError(
                f"torch {r['version']}: a Python cannot be both in python and python_excluded"
            )
        if str(r["pypi_default"]) not in variants:
            raise KnowledgeError(f"torch {r['version']}: pypi_default {r['pypi_default']} is not a variant")
        torch_releases[str(r["version"])] = TorchRelease(
            version=str(r["version"]),
            variants=variants,
            pypi_default=str(r["pypi_default"]),
            python=_strs(r["python"]),
            triton=pin,
            python_excluded=_strs(r.get("python_excluded", [])),
            cxx11_abi=abi_map,
            source=str(r["source"]),
        )
    fa_releases = {}
    for r in fa["releases"]:
        w = r["wheels"]
        runtime_sm = tuple(
            (int(lo), None if hi is None else int(hi))
            for lo, hi in r.get("runtime_sm", [[r["min_sm"], None]])
        )
        if any(hi is not None and hi < lo for lo, hi in runtime_sm) or min(lo for lo, _ in runtime_sm) != int(
            r["min_sm"]
        ):
            raise KnowledgeError(
                f"flash-attn {r['version']}: runtime_sm must start at min_sm and be [lo, hi]"
            )
        compiled_sm = tuple((int(c["sm"]), str(Version(str(c["nvcc"])))) for c in r.get("compiled_sm", []))
        known = bool(w.get("known", True))
        if known and w.get("nvcc") is None:
            raise KnowledgeError(
                f"flash-attn {r['version']}: wheels.nvcc (the CUDA publish.yml built with) is required"
            )
        fa_releases[str(r["version"])] = FlashAttnRelease(
            version=str(r["version"]),
            min_sm=int(r["min_sm"]),
            min_cuda=str(r["min_cuda"]),
            min_torch=str(r["min_torch"]),
            python=_strs(r["python"]),
            cuda_archs_env=bool(r["cuda_archs_env"]),
            wheels=WheelMatrix(
                torch=_strs(w["torch"]),
                cuda=_strs(w["cuda"]),
                python=_strs(w["python"]),
                abi=tuple(bool(a) for a in w["abi"]),
                excluded=tuple({str(k): str(v) for k, v in ex.items()} for ex in w.get("except", [])),
                nvcc=None if w.get("nvcc") is None else str(Version(str(w["nvcc"]))),
                known=known,
                mislabelled=tuple(
                    Mislabelled(
                        torch=str(m["torch"]), abi=bool(m["abi"]), why=str(m["why"]), source=str(m["source"])
                    )
                    for m in w.get("mislabelled", [])
                ),
            ),
            source=str(r["source"]),
            conflict=r.get("conflict"),
            runtime_sm=runtime_sm,
            compiled_sm=compiled_sm,
        )
    return Knowledge(
        gpus=tuple(
            Gpu(name=str(g["name"]), match=_strs(g["match"]), sm=int(g["sm"]), source=str(g["source"]))
            for g in gpus["gpus"]
        ),
        archs={
            int(a["sm"]): Arch(
                sm=int(a["sm"]),
                family=str(a["family"]),
                bf16=bool(a["bf16"]),
                min_driver=a["min_driver"],
                source=str(a["source"]),
            )
            for a in gpus["archs"]
        },
        torch=torch_releases,
        torch_index_url=str(torch["index_url"]),
        arch_lists=tuple(
            ArchList(
                torch=SpecifierSet(str(a["torch"])),
                variants=_strs(a["variants"]),
                sm=tuple(int(s) for s in a["sm"]),
                ptx=tuple(int(s) for s in a["ptx"]),
                source=str(a["source"]),
                conflict=a.get("conflict"),
            )
            for a in torch["arch_lists"]
        ),
        ptx_strips=_ptx_strips(torch.get("ptx_strips", []), torch_releases),
        triton_rows=tuple(
            (SpecifierSet(str(r["version"])), int(r["sm"]), str(r["source"])) for r in triton["min_sm"]
        ),
        triton_sm_min=tuple(
            (int(r["sm"]), str(Version(str(r["version"]))), str(r["source"]))
            for r in triton.get("sm_min_version", [])
        ),
        triton_auto_remove_below=int(triton["auto_remove_below_sm"]),
        triton_auto_remove_source=str(triton["auto_remove_source"]),
        flash_attn=fa_releases,
        fa_wheel_url=str(fa["wheel_url"]),
        fa_wheel_filename=str(fa["wheel_filename"]),
        fa_wheel_source=str(fa["wheel_source"]),
        fa_cuda_tokens=tuple(
            CudaTokenRule(
                flash_attn=SpecifierSet(str(r["flash_attn"])),
                mode=str(r["mode"]),
                map={str(k): str(v) for k, v in r["map"].items()},
                source=str(r["source"]),
            )
            for r in fa["wheel_cuda_token"]
        ),
        fa_triton_modules=tuple(
            TritonModule(
                module=str(m["module"]),
                since=str(m["since"]),
                used_by=str(m["used_by"]),
                source=str(m["source"]),
            )
            for m in fa["triton_modules"]
        ),
        fa_source_archs=tuple(int(a) for a in fa["source_archs"]),
        fa_source_archs_source=str(fa["source_archs_source"]),
        fa_build_gb_per_job=int(fa["build_memory_per_job_gb"]),
        fa_einops=str(fa["einops"]["version"]),
        cuda={
            str(c["cuda"]): CudaVersion(
                cuda=str(c["cuda"]),
                latest_patch=c["latest_patch"],
                toolkit_driver=str(c["toolkit_driver"]),
                ubuntu=_strs(c["ubuntu"]),
                cudnn_tag=c["cudnn_tag"],
                no_sm=tuple(int(s) for s in c["no_sm"]),
                source=str(c["source"]),
                eol=bool(c.get("eol", False)),
                conflict=c.get("conflict"),
            )
            for c in cuda["versions"]
        },
        cuda_majors={
            str(m["major"]): CudaMajor(
                major=str(m["major"]),
                floor=str(m["floor"]),
                source=str(m["source"]),
                conflict=m.get("conflict"),
            )
            for m in cuda["majors"]
        },
        cuda_image_repo=str(cuda["images"]["repository"]),
        cuda_image_tag=str(cuda["images"]["tag"]),
        cuda_image_source=str(cuda["images"]["source"]),
        distros=tuple(
            Distro(
                os=str(d["os"]),
                version=str(d["version"]),
                python=str(d["python"]),
                source=str(d["source"]),
                codename=d.get("codename"),
                image=d.get("image"),
            )
            for d in cuda["distros"]
        ),
        stack={
            name: tuple(
                StackPin(
                    version=str(p["version"]),
                    python=SpecifierSet(str(p["python"])),
                    torch=SpecifierSet(str(p["torch"])),
                    source=str(p["source"]),
                )
                for p in pins
            )
            for name, pins in stack["packages"].items()
        },
        stack_minimums={name: (str(m["version"]), str(m["source"])) for name, m in stack["minimums"].items()},
        stack_watch={
            name: (str(m["version"]), str(m["source"])) for name, m in stack.get("watch", {}).items()
        },
        deepspeed=deepspeed,
        raw={"torch": torch, "gpus": gpus, "triton": triton, "flash_attn": fa, "cuda": cuda},
    )
