# SPDX-License-Identifier: Apache-2.0
"""Plots of a text study (matplotlib, the ``[plot]`` extra): per-arm test
metrics with their spread over seeds, and the bank's rate-distortion curve."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_text_results(res: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    paths = []
    metrics = [m for m in ("recall10", "zero_shot", "acc") if m in res["paired"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        rows = res["paired"][m]
        names = list(rows)
        means = [rows[a]["mean"] for a in names]
        sds = [rows[a]["sd"] for a in names]
        ax.bar(range(len(names)), means, yerr=sds, capsize=3, color="#4878a8")
        for i, a in enumerate(names):
            ax.plot([i] * len(rows[a]["per_seed"]), rows[a]["per_seed"], "k.", ms=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        lo = min(min(r["per_seed"]) for r in rows.values())
        hi = max(max(r["per_seed"]) for r in rows.values())
        ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9) - 0.5, hi + 0.15 * (hi - lo + 1e-9) + 0.5)
        ax.set_title(f"test {m} (x100), mean ± sd")
    fig.tight_layout()
    p = out_dir / "methods.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    b = res["bank"]["test"]
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    ax.plot(b["rate_bits"], b["dist"], "o-")
    for R, r, d in zip(res["bank"]["R"], b["rate_bits"], b["dist"]):
        ax.annotate(f"R={R:g}", (r, d), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("rate (bits per text)")
    ax.set_ylabel("distortion (sum of squared error)")
    ax.set_title("RDM bank, test")
    fig.tight_layout()
    p = out_dir / "rd_curve.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths
