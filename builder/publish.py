"""The publishable page of one run: image x check matrix, versions, sizes, digests, a chart.

Inputs are the JSON files the other commands leave in build/ (each optional, read tolerantly,
since a run may build without smoking or audit without building):

* build/report.json          `build`: status, seconds, size, image id, tags, pushed digests;
* build/reports/smoke.json   `smoke`: contract and smoke step per image, device, tokens/s;
* build/reports/audit.json   `audit`: kernel coverage per image and SM.

`gather` (pure over those dicts) joins them per image into rows; `render_markdown` and
`render_html` (pure) turn rows into a page; `write_pages` writes
build/reports/report-<UTC time>.{md,html} and copies them to index.{md,html}.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.errors import ConfigError
from builder.fsio import write_atomic

if TYPE_CHECKING:
    from builder.project import Project

PASS, FAIL, NOT_RUN = "pass", "FAIL", "—"


@dataclass
class Row:
    image: str
    ref: str | None = None
    target: str | None = None
    sm: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    build: str | None = None  # built | up-to-date | failed | ...
    build_s: float | None = None
    size: int | None = None
    image_id: str | None = None
    digests: dict[str, str] = field(default_factory=dict)  # remote ref -> manifest digest
    contract: str = NOT_RUN
    audit: str = NOT_RUN
    audit_detail: str = ""
    smoke_cpu: str = NOT_RUN
    smoke_gpu: str = NOT_RUN
    smoke_device: str | None = None
    tokens_per_s: dict[str, float] = field(default_factory=dict)  # model -> tokens/s
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        checks = (self.contract, self.audit, self.smoke_cpu, self.smoke_gpu)
        return self.build not in ("failed", "interrupted", "skipped") and FAIL not in checks


_NUM = (int, float)
# The fields this page reads from each report, with their types; other fields are ignored
# and any field may be null. A report of another shape is refused, not half-rendered.
_BUILD_SHAPE: dict[str, Any] = {
    "engine": str,
    "images": [
        {
            "image": str,
            "status": str,
            "seconds": _NUM,
            "size": _NUM,
            "image_id": str,
            "tags": [str],
            "pushed": {str: str},
            "error": str,
        }
    ],
}
_SMOKE_SHAPE: dict[str, Any] = {
    "host": {"gpus": [{"name": object, "sm": object}]},
    "images": [
        {
            "image": str,
            "ref": str,
            "target": str,
            "step": str,
            "steps": {str: {"ok": object}},
            "device": {"kind": object, "name": object},
            "runs": [{"model": object, "tokens_per_s": object}],
            "failed_checks": [object],
        }
    ],
}
_AUDIT_SHAPE: dict[str, Any] = {
    "images": [
        {
            "image": str,
            "ref": str,
            "target": str,
            "sm": int,
            "counts": {str: int},
            "failed": [object],
        }
    ],
}


def _shape_problem(value: Any, shape: Any, where: str) -> str | None:
    if value is None or shape is object:
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} should be a list"
        return next(
            (p for i, v in enumerate(value) if (p := _shape_problem(v, shape[0], f"{where}[{i}]"))), None
        )
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} should be an object"
        if str in shape:
            return next(
                (p for k, v in value.items() if (p := _shape_problem(v, shape[str], f"{where}.{k}"))), None
            )
        return next(
            (p for k, sub in shape.items() if (p := _shape_problem(value.get(k), sub, f"{where}.{k}"))), None
        )
    if not isinstance(value, shape) or isinstance(value, bool):
        return f"{where} has the wrong type ({type(value).__name__})"
    return None


def _load(path: Path, shape: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON report, or {} when it is missing (a run need not have every step).

    A report that is there but unreadable or of another shape is one ConfigError.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}; delete it or re-run") from None
    try:
        data = json.loads(raw)  # UTF-8, or a ValueError
    except ValueError as exc:
        raise ConfigError(
            f"{path}: not valid JSON ({exc}); delete it or re-run the step that writes it"
        ) from None
    problem = _shape_problem(data, dict(shape), path.name)
    if problem is None and not isinstance(data, dict):
        problem = f"{path.name} should be an object"
    if problem:
        raise ConfigError(f"{path}: malformed report: {problem}; delete it or re-run the step that writes it")
    assert isinstance(data, dict)
    return data


def _verdict(ok: Any) -> str:
    return PASS if ok is True else FAIL


def gather(
    build: Mapping[str, Any],
    smoke: Mapping[str, Any],
    audit: Mapping[str, Any],
    plans: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Row]:
    """Pure: one row per image named in any input, in build order, then smoke, then audit.

    `plans` maps a cell id to its `explain --json` "plan" (versions); images the matrix no
    longer has keep what the JSON files say about them.
    """
    rows: dict[str, Row] = {}

    def row(name: str) -> Row:
        if name not in rows:
            rows[name] = Row(image=name)
        return rows[name]

    for b in build.get("images") or []:
        r = row(str(b.get("image")))
        r.build = b.get("status")
        r.build_s = b.get("seconds")
        r.size = b.get("size") or None
        r.image_id = b.get("image_id")
        tags = b.get("tags") or []
        r.ref = r.ref or (tags[0] if tags else None)
        r.digests = dict(b.get("pushed") or {})
        if b.get("error"):
            r.problems.append(f"build: {b['error']}")
    for s in smoke.get("images") or []:
        r = row(str(s.get("image")))
        r.ref = r.ref or s.get("ref")
        r.target = r.target or s.get("target")
        steps = s.get("steps") or {}
        if "contract" in steps:
            r.contract = _verdict((steps["contract"] or {}).get("ok"))
        if "smoke" in steps:
            verdict = _verdict((steps["smoke"] or {}).get("ok"))
            if s.get("step") == "gpu":
                r.smoke_gpu = verdict
            else:
                r.smoke_cpu = verdict
        device = s.get("device") or {}
        r.smoke_device = " ".join(str(x) for x in (device.get("kind"), device.get("name")) if x) or None
        for run in s.get("runs") or []:
            if isinstance(run.get("tokens_per_s"), (int, float)):
                r.tokens_per_s[str(run.get("model"))] = float(run["tokens_per_s"])
        r.problems += [f"smoke: {f}" for f in s.get("failed_checks") or []]
    # The image's own SM (from its label) decides the published verdict; audits against
    # another SM (--sm) are what-ifs and stay in audit.json.
    for a in sorted(audit.get("images") or [], key=lambda a: a.get("sm_source") != "label"):
        r = row(str(a.get("image")))
        if r.audit != NOT_RUN:
            continue
        r.ref = r.ref or a.get("ref")
        r.target = r.target or a.get("target")
        r.sm = a.get("sm")
        if a.get("python"):
            r.versions.setdefault("python (in image)", str(a["python"]))
        if a.get("sm") is None:
            r.audit, r.audit_detail = "n/a", str(a.get("note") or "no target SM")
            continue
        counts = a.get("counts") or {}
        r.audit = _verdict(a.get("ok"))
        suffix = "" if a.get("sm_source") == "label" else " (--sm)"
        r.audit_detail = (
            f"sm_{a['sm']}{suffix}: {sum(counts.values())} binaries, {counts.get('ok', 0)} ok"
            + (f", {counts['waived']} waived" if counts.get("waived") else "")
            + (f", {counts['fail']} failed" if counts.get("fail") else "")
            + (f", {counts['error']} unreadable" if counts.get("error") else "")
        )
        for path in a.get("failed") or []:
            r.problems.append(f"audit: {str(path).rsplit('/', 1)[-1]} has no code for sm_{a['sm']}")
    for name, r in rows.items():
        plan = (plans or {}).get(name)
        if not plan:
            continue
        torch_info = plan.get("torch") or {}
        fa = plan.get("flash_attn") or {}
        planned = {
            "torch": torch_info.get("version"),
            "cuda": torch_info.get("cuda"),
            "python (plan)": plan.get("python"),
            "flash-attn": fa.get("version") or "none",
            "triton": plan.get("triton"),
            "dtype / attention": f"{plan.get('dtype')} / {plan.get('attn_implementation')}",
            "min driver": plan.get("min_driver"),
        }
        r.versions = {**{k: str(v) for k, v in planned.items() if v}, **r.versions}
    return list(rows.values())


def _gb(size: int | None) -> str:
    return "—" if not size else f"{size / 1e9:.2f} GB"


def _short_id(image_id: str | None) -> str:
    return image_id.split(":", 1)[-1][:12] if image_id else "—"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(rows: Sequence[Row], meta: Mapping[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(meta.get("generated") or 0))
    passed = sum(r.ok for r in rows)
    lines = [
        "# qwen-ft images: run report",
        "",
        f"{when}. {passed} of {len(rows)} images pass every check that ran. "
        f"Docker {meta.get('engine') or 'unknown'}; host GPUs: {meta.get('gpus') or 'none'}.",
        "",
        "| image | build | contract | audit | smoke CPU | smoke GPU | size | tokens/s | image id |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tps = ", ".join(f"{m} {v:.0f}" for m, v in r.tokens_per_s.items()) or "—"
        cells = [
            f"`{r.ref or r.image}`",
            r.build or NOT_RUN,
            r.contract,
            r.audit,
            r.smoke_cpu,
            r.smoke_gpu,
            _gb(r.size),
            tps,
            f"`{_short_id(r.image_id)}`",
        ]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    for r in rows:
        lines += ["", f"## {r.image}", ""]
        if r.target:
            lines.append(f"- target: {r.target}" + (f" (sm_{r.sm})" if r.sm else ""))
        for key, value in r.versions.items():
            lines.append(f"- {key}: {value}")
        if r.audit_detail:
            lines.append(f"- audit: {r.audit_detail}")
        if r.smoke_device:
            lines.append(f"- smoke ran on: {r.smoke_device}")
        if r.build_s is not None:
            lines.append(f"- build: {r.build} in {r.build_s:.0f} s")
        for remote, digest in r.digests.items():
            lines.append(f"- pushed: `{remote}@{digest}`")
        if r.image_id:
            lines.append(f"- image id: `{r.image_id}`")
        for p in r.problems:
            lines.append(f"- **{_md(p)}**")
    return "\n".join(lines) + "\n"


def bar_chart(title: str, bars: Sequence[tuple[str, float, str]], unit: str, fmt: str = ",.0f") -> str:
    """An inline SVG horizontal bar chart: (label, value, css class) per bar; no scripts."""
    if not bars:
        return f'<p class="muted">{html.escape(title)}: no data in this run.</p>'
    label_w, bar_w, row_h = 330, 360, 22
    top = max(v for _, v, _ in bars) or 1.0
    height = row_h * len(bars) + 30
    parts = [
        f'<svg role="img" aria-label="{html.escape(title)}" width="{label_w + bar_w + 110}" '
        f'height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="0" y="14" class="title">{html.escape(title)}</text>',
    ]
    for i, (label, value, css) in enumerate(bars):
        y = 24 + i * row_h
        w = max(1.0, bar_w * value / top)
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{html.escape(label)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" class="{css}"/>')
        parts.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 14}">{value:{fmt}} {html.escape(unit)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #1b1f24; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.pass { background: #dafbe1; } td.FAIL { background: #ffebe9; font-weight: bold; }
code { font-size: 12px; } .muted { color: #656d76; }
svg text { font: 12px system-ui, sans-serif; fill: #1b1f24; } svg text.title { font-weight: bold; }
rect.size { fill: #54aeff; } rect.cpu { fill: #8c959f; } rect.gpu { fill: #2da44e; }
"""


def render_html(rows: Sequence[Row], meta: Mapping[str, Any]) -> str:
    e = html.escape
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(meta.get("generated") or 0))
    passed = sum(r.ok for r in rows)
    head = ["image", "build", "contract", "audit", "smoke CPU", "smoke GPU", "size", "tokens/s", "image id"]
    body = []
    for r in rows:
        tps = "<br>".join(f"{e(m)} {v:,.0f}" for m, v in r.tokens_per_s.items()) or "—"
        cells = [
            f"<td><code>{e(r.ref or r.image)}</code></td>",
            f"<td>{e(r.build or NOT_RUN)}</td>",
            *(f'<td class="{e(v)}">{e(v)}</td>' for v in (r.contract, r.audit, r.smoke_cpu, r.smoke_gpu)),
            f"<td>{e(_gb(r.size))}</td>",
            f"<td>{tps}</td>",
            f"<td><code>{e(_short_id(r.image_id))}</code></td>",
        ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    sizes = [(r.image, r.size / 1e9, "size") for r in rows if r.size]
    speed = [
        (f"{r.image} · {model}", value, "gpu" if r.smoke_gpu != NOT_RUN else "cpu")
        for r in rows
        for model, value in r.tokens_per_s.items()
    ]
    details = []
    for r in rows:
        items = [f"<li>{e(k)}: {e(v)}</li>" for k, v in r.versions.items()]
        if r.audit_detail:
            items.append(f"<li>audit: {e(r.audit_detail)}</li>")
        if r.smoke_device:
            items.append(f"<li>smoke ran on: {e(r.smoke_device)}</li>")
        items += [f"<li>pushed: <code>{e(k)}@{e(v)}</code></li>" for k, v in r.digests.items()]
        if r.image_id:
            items.append(f"<li>image id: <code>{e(r.image_id)}</code></li>")
        items += [f"<li><strong>{e(p)}</strong></li>" for p in r.problems]
        where = f" <span class='muted'>({e(r.target or '?')}, sm_{r.sm})</span>" if r.sm else ""
        title = e(r.image) + where
        details.append(f"<h3>{title}</h3><ul>{''.join(items)}</ul>")
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            "<title>qwen-ft images: run report</title>",
            f"<style>{_CSS}</style></head><body>",
            "<h1>qwen-ft images: run report</h1>",
            f"<p>{e(when)}. {passed} of {len(rows)} images pass every check that ran. "
            f"Docker {e(str(meta.get('engine') or 'unknown'))}; "
            f"host GPUs: {e(str(meta.get('gpus') or 'none'))}. "
            f'<span class="muted">— means the check did not run in this run.</span></p>',
            "<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead>",
            "<tbody>" + "\n".join(body) + "</tbody></table>",
            bar_chart("Image size", sizes, "GB", ".2f"),
            bar_chart("Smoke training throughput (median tokens/s; grey = CPU step)", speed, "tok/s"),
            "<h2>Images</h2>",
            *details,
            "</body></html>",
        ]
    )


def page_meta(build: Mapping[str, Any], smoke: Mapping[str, Any], audit: Mapping[str, Any]) -> dict[str, Any]:
    host_gpus = (smoke.get("host") or {}).get("gpus") or []
    gpus = ", ".join(f"{g.get('name')} (sm_{g.get('sm')})" for g in host_gpus)
    return {
        "generated": time.time(),
        "engine": build.get("engine") or smoke.get("engine") or audit.get("engine"),
        "gpus": gpus or None,
    }


def write_pages(
    build_dir: Path, plans: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[Path, Path, list[Row]]:
    """Read the run's JSON reports, write report-<time>.{md,html} and index.{md,html}."""
    build = _load(build_dir / "report.json", _BUILD_SHAPE)
    smoke = _load(build_dir / "reports" / "smoke.json", _SMOKE_SHAPE)
    audit = _load(build_dir / "reports" / "audit.json", _AUDIT_SHAPE)
    rows = gather(build, smoke, audit, plans)
    meta = page_meta(build, smoke, audit)
    folder = build_dir / "reports"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(meta["generated"]))
    md_path, html_path = folder / f"report-{stamp}.md", folder / f"report-{stamp}.html"
    texts = {md_path: render_markdown(rows, meta), html_path: render_html(rows, meta)}
    for path, text in texts.items():
        for target in (path, folder / f"index{path.suffix}"):
            write_atomic(target, text)
    return md_path, html_path, rows


def publish(project: Project, plans: dict[str, dict[str, Any]] | None = None) -> tuple[Path, Path, list[Row]]:
    """Write build/reports/report-<UTC time>.{md,html} (and index.{md,html}); returns both paths.

    `plans` (cell id -> `explain --json` plan) adds the planned versions; without it the page
    shows what the JSON reports say. Raises ConfigError when no report exists yet.
    """
    reports = project.reports
    sources = [project.build / "report.json", reports / "smoke.json", reports / "audit.json"]
    if not any(p.is_file() for p in sources):
        raise ConfigError(
            "nothing to report: no build/report.json, build/reports/smoke.json or audit.json; "
            "run qwen-ft-images build, smoke or audit first"
        )
    return write_pages(project.build, plans)
