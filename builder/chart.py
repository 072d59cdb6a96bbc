"""The `compare` chart: loss per step (left), memory and tokens/s bars (right).

matplotlib is an optional extra (`pip install 'qwen-ft-images[plot]'`), imported only here and
only when a chart is drawn, with the Agg backend, so no display is needed. The image runtime
never plots: it prints numbers, and the host draws them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WIDTH_IN, HEIGHT_IN, DPI = 9.0, 4.0, 100  # 900 x 400 px
# Colour per dtype, line style per method: fp32 is always the same blue reference.
COLORS = {"fp32": "#1f77b4", "fp16": "#d62728", "bf16": "#2ca02c"}
STYLES = {"lora": "-", "full": "--"}
# Curves that agree lie on top of each other: the fp32 reference is drawn widest and faint,
# each half precision narrower on top of it, so agreement shows as nested lines.
WIDTHS = {"fp32": 4.0, "bf16": 2.2, "fp16": 1.0}


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


@dataclass(frozen=True)
class Chart:
    path: Path
    series: tuple[str, ...]  # the loss lines drawn, in order
    bars: tuple[str, ...]  # the combinations with memory/speed bars
    memory_metric: str  # peak_mem_bytes | train_state_bytes


def memory_metric(combos: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """Which memory figure the bars show, and its axis title.

    On a GPU the allocator's peak. On the CPU the only peak is the process's RSS, which the
    torch import dominates (the same ~0.4 GiB whatever is trained on a small model), so the
    bars show the exact weights + gradients + optimizer state instead.
    """
    kinds = {c.get("peak_mem_kind") for c in combos if c.get("peak_mem_bytes")}
    if kinds == {"cuda_max_memory_allocated"}:
        return "peak_mem_bytes", "peak CUDA memory (MiB)"
    return "train_state_bytes", "weights+grads+optimizer (MiB)"


def plot(report: Mapping[str, Any], path: Path) -> Chart:
    """Draw the chart for a compare report (its JSON form) into `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    combos: list[Mapping[str, Any]] = list(report["combinations"])
    fig = plt.figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    try:
        grid = fig.add_gridspec(2, 2, width_ratios=(1.7, 1.0), hspace=0.55, wspace=0.28)
        loss_ax = fig.add_subplot(grid[:, 0])
        mem_ax = fig.add_subplot(grid[0, 1])
        speed_ax = fig.add_subplot(grid[1, 1])
        series: list[str] = []
        for c in combos:
            losses = c.get("losses") or []
            if not losses:
                continue
            label = f"{c['dtype']} {c['method']}"
            if c.get("nan_step"):
                label += f" (NaN at step {c['nan_step']})"
            loss_ax.plot(
                range(1, len(losses) + 1),
                losses,
                STYLES.get(c["method"], "-"),
                color=COLORS.get(c["dtype"], "gray"),
                marker="x" if c.get("status") != "ok" else None,
                linewidth=WIDTHS.get(c["dtype"], 1.4),
                alpha=0.45 if c["dtype"] == "fp32" else 0.95,
                label=label,
            )
            series.append(label)
        loss_ax.set_xlabel("step")
        loss_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        loss_ax.set_ylabel("training loss")
        hw = report.get("hardware") or {}
        title = f"{report.get('name')}: {report.get('model')} on {hw.get('device', '?')}"
        loss_ax.set_title(f"{title}, seed {report.get('seed')}", fontsize=9)
        if series:
            loss_ax.legend(fontsize=7, frameon=False)
        loss_ax.grid(alpha=0.3)
        metric, title = memory_metric(combos)
        ran = [c for c in combos if c.get("status") == "ok"]
        names = [f"{c['dtype']}\n{c['method']}" for c in ran]
        colors = [COLORS.get(c["dtype"], "gray") for c in ran]
        hatches = ["" if c["method"] == "lora" else "//" for c in ran]
        mem = [(c.get(metric) or 0) / 2**20 for c in ran]
        speed = [c.get("tokens_per_s") or 0 for c in ran]
        for ax, values, heading in ((mem_ax, mem, title), (speed_ax, speed, "tokens/s (median step)")):
            bars = ax.bar(names, values, color=colors, edgecolor="black", linewidth=0.5)
            for bar, hatch in zip(bars, hatches, strict=True):
                bar.set_hatch(hatch)
            ax.set_title(heading, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(axis="y", alpha=0.3)
        rss = [c["peak_mem_bytes"] / 2**20 for c in ran if c.get("peak_mem_kind") == "process_max_rss"]
        bottom = 0.14
        if metric == "train_state_bytes" and rss:
            fig.text(
                0.5,
                0.01,
                f"CPU: each run's process peak RSS is {min(rss):.0f}-{max(rss):.0f} MiB, nearly all torch "
                "itself; the bars show the exact weights + gradients + AdamW state instead",
                ha="center",
                fontsize=7,
                color="dimgray",
            )
            bottom = 0.17
        fig.subplots_adjust(left=0.07, right=0.98, top=0.92, bottom=bottom)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return Chart(path, tuple(series), tuple(n.replace("\n", " ") for n in names), metric)
