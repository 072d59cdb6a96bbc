"""Compare the knowledge base with upstream and say what is new or different.

Sources, all read-only and small:
- the package index pip is configured with (its simple API), for release lists,
  Python tags and upload facts of torch, triton, flash-attn, deepspeed, transformers,
  peft and accelerate;
- wheel METADATA, from the index's PEP 658 `.metadata` file when it offers one, else
  by HTTP range requests on the wheel's zip directory (never the whole wheel);
- download.pytorch.org's `whl/torch/` listing, for the CUDA variants of each release;
- the GitHub releases API, for the wheel assets of each flash-attn release.

The last two are optional: when they cannot be reached the report says what was not
compared. When the package index itself cannot be reached, `check` raises NetworkUnreachable.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, Protocol

from packaging.specifiers import SpecifierSet
from packaging.utils import parse_wheel_filename
from packaging.version import InvalidVersion, Version

from builder.errors import ConfigError, NetworkUnreachable
from builder.knowledge import Knowledge

PYTORCH_INDEX = "https://download.pytorch.org/whl/torch/"
GITHUB_RELEASE = "https://api.github.com/repos/Dao-AILab/flash-attention/releases/tags/v{version}"
WATCHED = ("torch", "triton", "flash-attn", "deepspeed", "transformers", "peft", "accelerate")
_JSON = "application/vnd.pypi.simple.v1+json"


class HttpError(Exception):
    """One request failed: unreachable host, timeout, or an HTTP error status."""


class Http(Protocol):
    def get(self, url: str, *, headers: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
        """Body and lower-cased response headers; raises HttpError."""


class UrlHttp:
    """urllib with a timeout; every failure becomes HttpError."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout

    def get(self, url: str, *, headers: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
        req = urllib.request.Request(url, headers={"User-Agent": "qwen-ft-images-drift", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read(), {k.lower(): v for k, v in resp.headers.items()}
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
            raise HttpError(f"{url}: {exc}") from exc


def index_url(run: Callable[[list[str]], str] | None = None) -> str:
    """The simple-API root pip uses: PIP_INDEX_URL, then pip's config, then pip's own default."""
    env = os.environ.get("PIP_INDEX_URL", "").strip()
    if env:
        return env.split()[0].rstrip("/") + "/"
    run = run or _pip_config
    configured = run([sys.executable, "-m", "pip", "config", "get", "global.index-url"]).strip()
    if configured:
        return configured.rstrip("/") + "/"
    try:
        from pip._internal.models.index import PyPI  # pip's default index, so no host is spelled here
    except ImportError:
        raise ConfigError(
            "pip is not installed here: set PIP_INDEX_URL to the package index to compare with"
        ) from None
    return str(PyPI.simple_url).rstrip("/") + "/"


def _pip_config(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""


# ----------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class IndexFile:
    filename: str
    url: str
    requires_python: str | None = None
    size: int | None = None
    metadata: bool = False  # the index serves <url>.metadata (PEP 658)
    yanked: bool = False


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.files: list[tuple[dict[str, str | None], str]] = []
        self._attrs: dict[str, str | None] | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._attrs, self._text = dict(attrs), ""

    def handle_data(self, data: str) -> None:
        if self._attrs is not None:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._attrs is not None:
            self.files.append((self._attrs, self._text.strip()))
            self._attrs = None


def project_files(http: Http, index: str, name: str) -> list[IndexFile]:
    """Every file of a project on a PEP 691 (JSON) or PEP 503 (HTML) simple index."""
    url = urllib.parse.urljoin(index, f"{name}/")
    body, headers = http.get(url, headers={"Accept": f"{_JSON}, text/html;q=0.1"})
    if _JSON in headers.get("content-type", ""):
        data = json.loads(body)
        return [
            IndexFile(
                filename=f["filename"],
                url=urllib.parse.urljoin(url, f["url"]),
                requires_python=f.get("requires-python"),
                size=f.get("size"),
                metadata=bool(f.get("core-metadata") or f.get("data-dist-info-metadata")),
                yanked=bool(f.get("yanked")),
            )
            for f in data.get("files", [])
        ]
    parser = _Anchors()
    parser.feed(body.decode("utf-8", "replace"))
    files = []
    for attrs, text in parser.files:
        href = attrs.get("href") or ""
        files.append(
            IndexFile(
                filename=text or href.rsplit("/", 1)[-1].split("#", 1)[0],
                url=urllib.parse.urljoin(url, href.split("#", 1)[0]),
                requires_python=attrs.get("data-requires-python"),
                metadata=bool(attrs.get("data-core-metadata") or attrs.get("data-dist-info-metadata")),
                yanked="data-yanked" in attrs,
            )
        )
    return files


def release_versions(files: Iterable[IndexFile]) -> list[Version]:
    """Final releases with at least one non-yanked file, newest first."""
    versions: set[Version] = set()
    for f in files:
        v = _file_version(f.filename)
        if v is not None and not f.yanked and not v.is_prerelease and not v.is_devrelease:
            versions.add(v)
    return sorted(versions, reverse=True)


def _file_version(filename: str) -> Version | None:
    try:
        if filename.endswith(".whl"):
            return parse_wheel_filename(filename)[1]
        m = re.match(r"^[A-Za-z0-9_.\-]+?-(\d[^-]*?)\.(?:tar\.gz|zip)$", filename)
        return Version(m.group(1)) if m else None
    except (InvalidVersion, ValueError):
        return None


def linux_pythons(files: Iterable[IndexFile], version: str) -> tuple[str, ...]:
    """CPython versions with a Linux x86_64 wheel of `version` (free-threaded builds left out)."""
    pythons: set[str] = set()
    for f in files:
        if not f.filename.endswith(".whl") or "x86_64" not in f.filename or "linux" not in f.filename:
            continue
        try:
            _, v, _, tags = parse_wheel_filename(f.filename)
        except ValueError:
            continue
        if str(v) != version:
            continue
        for tag in tags:
            m = re.fullmatch(r"cp(\d)(\d+)", tag.abi)
            if m:
                pythons.add(f"{m.group(1)}.{m.group(2)}")
    return tuple(sorted(pythons, key=Version))


# ----------------------------------------------------------------------------- METADATA


class _RangeFile(io.RawIOBase):
    """A remote file read through HTTP Range requests, so zipfile can read one member."""

    def __init__(self, http: Http, url: str, size: int | None) -> None:
        self.http, self.url, self.pos = http, url, 0
        if size is None:
            _, headers = http.get(url, headers={"Range": "bytes=0-0"})
            total = headers.get("content-range", "").rsplit("/", 1)[-1]
            if not total.isdigit():
                raise HttpError(f"{url}: the server does not answer range requests")
            size = int(total)
        self.size = size

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def readinto(self, buffer: Any) -> int:
        end = min(self.size, self.pos + len(buffer)) - 1
        if self.pos > end:
            return 0
        data, _ = self.http.get(self.url, headers={"Range": f"bytes={self.pos}-{end}"})
        data = data[: end - self.pos + 1]
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def wheel_metadata(http: Http, f: IndexFile) -> str:
    """A wheel's METADATA: the PEP 658 file when offered, else one zip member by range requests."""
    if f.metadata:
        body, _ = http.get(f.url + ".metadata")
        return body.decode("utf-8", "replace")
    try:
        z = zipfile.ZipFile(io.BufferedReader(_RangeFile(http, f.url, f.size), 1 << 16))
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode("utf-8", "replace")
    except (zipfile.BadZipFile, StopIteration) as exc:
        raise HttpError(f"{f.filename}: no readable METADATA ({exc})") from exc


def requires_dist(metadata: str, name: str) -> tuple[str, str] | None:
    """(specifier, marker) of one Requires-Dist line, e.g. ('~=3.8.0', 'python_version < "3.15"')."""
    for line in metadata.splitlines():
        if not line.lower().startswith("requires-dist:"):
            continue
        value = line.split(":", 1)[1].strip()
        m = re.match(rf"^{re.escape(name)}(?:\[[^\]]*\])?\s*\(?\s*([^;()]*)\)?\s*(?:;\s*(.*))?$", value, re.I)
        if m:
            return m.group(1).strip(), (m.group(2) or "").strip()
    return None


def torch_cuda(metadata: str) -> str | None:
    """The CUDA of a torch wheel from its runtime requirement (12.x runtime package, or 13.x cuda-toolkit)."""
    for pkg in (
        "cuda-toolkit",
        "nvidia-cuda-runtime-cu12",
        "nvidia-cuda-runtime-cu11",
        "nvidia-cuda-runtime",
    ):
        req = requires_dist(metadata, pkg)
        if req:
            m = re.search(r"(\d+)\.(\d+)", req[0])
            if m:
                return f"{m.group(1)}.{m.group(2)}"
    return None


def python_below(marker: str) -> str | None:
    m = re.search(r'python_version\s*<\s*"([\d.]+)"', marker)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Finding:
    kind: str  # new-release | new-variant | missing-variant | triton-pin | triton-resolved |
    #            python-tags | pypi-default | flash-attn-assets
    package: str
    message: str


@dataclass
class Report:
    index: str
    findings: list[Finding] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # what could not be compared, and why
    checked: list[str] = field(default_factory=list)

    @property
    def drift(self) -> bool:
        return bool(self.findings)

    def add(self, kind: str, package: str, message: str) -> None:
        self.findings.append(Finding(kind, package, message))

    def as_json(self) -> dict[str, Any]:
        return {
            "drift": self.drift,
            "findings": [f.__dict__ for f in self.findings],
            "unchecked": self.unchecked,
            "checked": self.checked,
        }

    def markdown(self) -> str:
        lines = ["## Knowledge-base drift", ""]
        if self.findings:
            lines += ["| kind | package | what changed |", "|---|---|---|"]
            lines += [f"| {f.kind} | {f.package} | {f.message.replace('|', '/')} |" for f in self.findings]
        else:
            lines.append("The knowledge base matches upstream.")
        if self.unchecked:
            lines += ["", "Not compared:", *[f"- {u}" for u in self.unchecked]]
        return "\n".join(lines) + "\n"


def check(kb: Knowledge, *, http: Http | None = None, index: str | None = None) -> Report:
    """Compare every watched package; raises NetworkUnreachable when the index cannot be read at all."""
    http = http or UrlHttp()
    index = index or index_url()
    report = Report(index=index)
    files: dict[str, list[IndexFile]] = {}
    for name in WATCHED:
        try:
            files[name] = project_files(http, index, name)
        except HttpError as exc:
            if not files:
                raise NetworkUnreachable(
                    f"the package index is not reachable ({exc}); nothing was compared. "
                    "Check the network or PIP_INDEX_URL"
                ) from None
            report.unchecked.append(f"{name}: the index did not answer ({exc})")
    if "torch" in files:
        _torch(kb, http, files["torch"], files.get("triton", []), report)
    if "flash-attn" in files:
        _flash_attn(kb, http, files["flash-attn"], report)
    _stack(kb, files, report)
    _variants(kb, http, report)
    return report


def _cp312_x86(files: Iterable[IndexFile], version: str) -> IndexFile | None:
    wheels = [
        f
        for f in files
        if f.filename.endswith(".whl")
        and "x86_64" in f.filename
        and "linux" in f.filename
        and _file_version(f.filename) == Version(version)
    ]
    wheels.sort(key=lambda f: ("-cp312-cp312-" not in f.filename, f.filename))
    return wheels[0] if wheels else None


def _torch(
    kb: Knowledge, http: Http, files: list[IndexFile], triton: list[IndexFile], report: Report
) -> None:
    oldest = min(Version(v) for v in kb.torch)
    triton_versions = release_versions(triton)
    known = [Version(k) for k in kb.torch]
    for v in release_versions(files):
        # torch.yaml keeps the newest patch of each minor: an older patch is not news.
        if v < oldest or (
            str(v) not in kb.torch and any(k.release[:2] == v.release[:2] and k > v for k in known)
        ):
            continue
        version = str(v)
        release = kb.torch.get(version)
        pythons = linux_pythons(files, version)
        wheel = _cp312_x86(files, version)
        meta = None
        if wheel is not None:
            try:
                meta = wheel_metadata(http, wheel)
            except HttpError as exc:
                report.unchecked.append(f"torch {version} METADATA: {exc}")
        pin = requires_dist(meta, "triton") if meta else None
        cuda = torch_cuda(meta) if meta else None
        if release is None:
            facts = [f"Pythons {', '.join(pythons) or '?'}"]
            if pin:
                facts.append(f"triton {pin[0]}" + (f" ({pin[1]})" if pin[1] else ""))
            if cuda:
                facts.append(f"PyPI wheel CUDA {cuda}")
            report.add("new-release", "torch", f"torch {version} is published ({'; '.join(facts)})")
            continue
        report.checked.append(f"torch {version}")
        listed = tuple(sorted({*release.python, *release.python_excluded}, key=Version))
        if pythons and pythons != listed:
            report.add(
                "python-tags",
                "torch",
                f"torch {version} publishes Linux x86_64 wheels for Python {', '.join(pythons)}; "
                f"torch.yaml lists {', '.join(listed)}",
            )
        if pin is not None:
            spec, marker = pin
            if spec.replace(" ", "") != release.triton.requires.replace(" ", ""):
                report.add(
                    "triton-pin",
                    "torch",
                    f"torch {version} requires triton {spec}; torch.yaml says {release.triton.requires}",
                )
            below = python_below(marker)
            if below != release.triton.python_below:
                report.add(
                    "triton-pin",
                    "torch",
                    f"torch {version}'s triton marker bounds Python below {below or 'nothing'}; "
                    f"torch.yaml says {release.triton.python_below or 'nothing'}",
                )
            if triton_versions:
                best = next((t for t in triton_versions if t in SpecifierSet(spec)), None)
                if best is not None and str(best) != release.triton.version:
                    report.add(
                        "triton-resolved",
                        "triton",
                        f"triton {spec} (torch {version}) now resolves to {best}; torch.yaml pins "
                        f"{release.triton.version}",
                    )
        if cuda is not None and cuda != release.pypi_default:
            report.add(
                "pypi-default",
                "torch",
                f"the index's torch {version} wheel is built with CUDA {cuda}; "
                f"torch.yaml says {release.pypi_default}",
            )


def _flash_attn(kb: Knowledge, http: Http, files: list[IndexFile], report: Report) -> None:
    newest = max(Version(v) for v in kb.flash_attn)
    for v in release_versions(files):
        if v > newest:
            report.add("new-release", "flash-attn", f"flash-attn {v} is published (newest known: {newest})")
    for version, fa in kb.flash_attn.items():
        try:
            body, _ = http.get(GITHUB_RELEASE.format(version=version), headers={"Accept": "application/json"})
            assets = {a["name"] for a in json.loads(body).get("assets", []) if a["name"].endswith(".whl")}
        except (HttpError, ValueError, KeyError) as exc:
            report.unchecked.append(f"flash-attn {version} release assets: {exc}")
            continue
        report.checked.append(f"flash-attn {version} assets")
        if not fa.wheels.known:
            if assets:
                report.add(
                    "flash-attn-assets",
                    "flash-attn",
                    f"flash-attn {version} publishes {len(assets)} wheels; flash_attn.yaml says its "
                    f"matrix is unknown (e.g. {sorted(assets)[0]})",
                )
            continue
        modelled = _modelled_assets(kb, version)
        new = sorted(a for a in assets if a not in modelled and "linux_x86_64" in a)
        if new:
            report.add(
                "flash-attn-assets",
                "flash-attn",
                f"flash-attn {version} has {len(new)} x86_64 wheels outside flash_attn.yaml's matrix, "
                f"e.g. {', '.join(new[:3])}",
            )


def _modelled_assets(kb: Knowledge, version: str) -> set[str]:
    fa = kb.flash_attn[version]
    w = fa.wheels
    names = set()
    for torch_mm in w.torch:
        for cuda in w.cuda:
            token = kb.fa_cuda_token(version, f"{cuda}.0")
            for py in w.python:
                for abi in w.abi:
                    if token and w.has(torch_mm=torch_mm, cuda_major=cuda, python=py, abi=abi):
                        names.add(
                            kb.fa_wheel_filename.format(
                                version=version,
                                cuda_token=token,
                                torch_mm=torch_mm,
                                abi=str(abi).upper(),
                                py=py.replace(".", ""),
                            )
                        )
    return names


def _stack(kb: Knowledge, files: Mapping[str, list[IndexFile]], report: Report) -> None:
    known = {name: max(Version(p.version) for p in pins) for name, pins in kb.stack.items()}
    known.update({name: Version(v) for name, (v, _) in kb.stack_watch.items()})
    for name, newest_known in known.items():
        if name not in files:
            continue
        versions = release_versions(files[name])
        if versions and versions[0] > newest_known:
            report.add(
                "new-release", name, f"{name} {versions[0]} is published (newest known: {newest_known})"
            )
        else:
            report.checked.append(f"{name} {newest_known}")


_VARIANT_FILE = re.compile(
    r"torch-(\d+\.\d+\.\d+)%2B(cu\d+|cpu)-cp\d+-cp\d+t?-(?:manylinux[^\"'<>]*x86_64|linux_x86_64)"
)


def _variants(kb: Knowledge, http: Http, report: Report) -> None:
    try:
        body, _ = http.get(PYTORCH_INDEX)
    except HttpError as exc:
        report.unchecked.append(f"CUDA variants (download.pytorch.org): {exc}")
        return
    seen: dict[str, set[str]] = {}
    for version, variant in _VARIANT_FILE.findall(body.decode("utf-8", "replace").replace("+", "%2B")):
        seen.setdefault(version, set()).add("cpu" if variant == "cpu" else f"{variant[2:-1]}.{variant[-1]}")
    for version, release in kb.torch.items():
        published = seen.get(version)
        if not published:
            continue
        report.checked.append(f"torch {version} variants")
        known = set(release.variants)
        for extra in sorted(published - known, key=_variant_key):
            report.add(
                "new-variant",
                "torch",
                f"torch {version} has a {_cu(extra)} build; torch.yaml does not list it",
            )
        for gone in sorted(known - published, key=_variant_key):
            report.add(
                "missing-variant",
                "torch",
                f"torch.yaml lists torch {version} {_cu(gone)}, which is not published",
            )


def _variant_key(v: str) -> Version:
    return Version("0") if v == "cpu" else Version(v)


def _cu(variant: str) -> str:
    return "cpu" if variant == "cpu" else "cu" + variant.replace(".", "")
