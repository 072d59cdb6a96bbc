"""Views of a cell: the stable JSON shape (`explain --json`, `matrix --json`) and table rows.

Other tools read these field names: keep them.
"""

from __future__ import annotations

from typing import Any

from builder.resolve import Reason, Verdict


def reason_json(r: Reason) -> dict[str, str]:
    return {"rule": r.rule, "message": r.message, "source": r.source}


def cell_json(cell: Verdict) -> dict[str, Any]:
    """The `explain --json` object; `matrix --json` is a list of these."""
    out: dict[str, Any] = {
        "target": cell.spec.target,
        "sm": cell.sm,
        "id": cell.id,
        "cell": {
            "cuda": cell.spec.cuda,
            "torch": cell.spec.torch,
            "python": cell.spec.python,
            "flash_attn": cell.spec.flash_attn,
            "dtype": cell.dtype,
        },
        "origin": cell.origin,
        "recommended": cell.recommended,
        "valid": cell.valid,
        "reasons": [reason_json(r) for r in cell.reasons],
        "notes": [reason_json(r) for r in cell.notes],
        "filled": list(cell.filled),  # axes explain completed itself (the rest were given)
        "platforms": list(cell.platforms),
        # the target's other platforms: why this image is not built for them
        "platform_reasons": {p: [reason_json(r) for r in rs] for p, rs in cell.platform_reasons},
    }
    if cell.blocking:
        out["blocking"] = list(cell.blocking)
    if cell.plan is not None:
        p = cell.plan
        out["plan"] = {
            "base_image": p.base_image,
            "builder_image": p.builder_image,
            "os": p.os,
            "python": p.python,
            "torch": {
                "version": p.torch.version,
                "cuda": p.torch.cuda,
                "index_url": p.torch.index_url,
                "requirement": p.torch.requirement,
                "cxx11_abi": p.torch.cxx11_abi,
            },
            "flash_attn": {
                "strategy": p.flash_attn.strategy,
                "version": p.flash_attn.version,
                "wheel_url": p.flash_attn.wheel_url,
                "cuda_archs": p.flash_attn.cuda_archs,
            },
            "triton": p.triton,
            "triton_version": p.triton_version,
            "triton_reason": p.triton_reason,
            "dtype": p.dtype,
            "attn_implementation": p.attn_implementation,
            "torch_cuda_arch_list": p.torch_cuda_arch_list,
            "min_driver": p.min_driver,
            "min_driver_reason": p.min_driver_reason,
            "stack": dict(p.stack),
            "deepspeed": {
                "version": p.deepspeed.version,
                "ops": list(p.deepspeed.ops),
                "arch_list": p.deepspeed.arch_list,
                "build_env": dict(p.deepspeed.build_env),
                "march": p.deepspeed.march,
                "simd": p.deepspeed.simd,
                "sdist_sha256": p.deepspeed.sdist_sha256,
            },
            "tags": list(p.tags),
            "labels": dict(p.labels),
        }
    return out


def cell_row(cell: Verdict) -> list[str]:
    s = cell.spec
    if cell.plan is None:
        return [
            cell.pinned,
            s.target,
            s.cuda,
            s.torch,
            s.python,
            s.flash_attn,
            cell.dtype,
            "; ".join(f"[{r.rule}] {r.message}" for r in cell.reasons) or cell.origin,
        ]
    p = cell.plan
    fa = f"{p.flash_attn.version} ({p.flash_attn.strategy})" if p.flash_attn.version else "none"
    return [
        cell.id,
        s.target + (f" sm_{cell.sm}" if cell.sm else ""),
        p.torch.cuda or "cpu",
        p.torch.version,
        p.python,
        fa,
        p.dtype,
        f"{p.attn_implementation}, triton {p.triton}, driver {p.min_driver or '-'}",
    ]


def _deepspeed_text(ds: dict[str, Any]) -> str:
    if not ds["ops"]:
        return f"{ds['version']}, no prebuilt op (pure Python; nothing compiles at run time)"
    where = f" for sm {ds['arch_list']}" if ds["arch_list"] else ""
    host = f", host code -march={ds['march']} -D{ds['simd']}" if ds["march"] else ""
    return f"{ds['version']}, ops {', '.join(ds['ops'])} prebuilt{where}{host}"


HEADERS = ["image", "target", "cuda", "torch", "python", "flash-attn", "dtype", "details / reasons"]


def explain_text(d: dict[str, Any]) -> str:
    """The human `explain` output, from the `explain --json` object."""
    cell = d["cell"]
    head = f"{d['target']} (sm_{d['sm']})" if d["sm"] else d["target"]
    lines = [
        f"{head}: cuda {cell['cuda']}, torch {cell['torch']}, python {cell['python']}, "
        f"flash-attn {cell['flash_attn']}, {cell['dtype']}, platform {', '.join(d.get('platforms', []))}"
    ]
    filled = d.get("filled") or []
    if filled and d["valid"]:
        values = ", ".join(f"{a.replace('_', '-')} {cell[a]}" for a in filled)
        lines.append(f"filled in (not given): {values}")
    if not d["valid"]:
        blocking = ", ".join(f"--{a.replace('_', '-')}" for a in d.get("blocking", []))
        lines.append(
            f"INVALID: no completion of the other axes works; blocked by {blocking}"
            if blocking
            else "INVALID"
        )
        for r in d["reasons"]:
            lines.append(f"  [{r['rule']}] {r['message']}\n      source: {r['source']}")
        return "\n".join(lines) + "\n"
    p = d["plan"]
    lines.append(f"VALID: {d['id']}")
    rows = [
        ("base image", p["base_image"]),
        ("builder image", p["builder_image"] or "-"),
        ("torch", f"{p['torch']['requirement']} from {p['torch']['index_url'] or 'PyPI'}"),
        ("flash-attn", f"{p['flash_attn']['strategy']} {p['flash_attn']['version'] or ''}".strip()),
        ("", p["flash_attn"]["wheel_url"] or ""),
        ("triton", f"{p['triton']} ({p['triton_reason']})"),
        ("dtype / attention", f"{p['dtype']} / {p['attn_implementation']}"),
        ("TORCH_CUDA_ARCH_LIST", p["torch_cuda_arch_list"] or "-"),
        ("min driver", f"{p['min_driver'] or 'none'} ({p['min_driver_reason']})"),
        ("stack", ", ".join(f"{k}=={v}" for k, v in p["stack"].items())),
        ("deepspeed", _deepspeed_text(p["deepspeed"])),
        ("tags", ", ".join(p["tags"]) or "none (no build produces this image)"),
    ]
    lines += [f"  {k:<21} {v}" for k, v in rows if v]
    lines += [f"  note: {n['message']}" for n in d["notes"]]
    for platform, reasons in (d.get("platform_reasons") or {}).items():
        for r in reasons:
            lines.append(f"  not {platform}: [{r['rule']}] {r['message']}\n      source: {r['source']}")
    return "\n".join(lines) + "\n"
