# SPDX-License-Identifier: Apache-2.0
"""Plots of a text study (matplotlib, the ``[plot]`` extra): per-arm test
metrics with their spread over seeds (``methods.png``), the paired differences
against the baseline with their 95% intervals (``paired.png``), the bank's
rate-distortion curve (``rd_curve.png``) and, for runs with ``train.trace``, the
learning curves of the first seed against the RDMs' distance to the teacher
(``curves.png``)."""
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
    for plot in (_plot_paired, _plot_curves):
        p = plot(res, out_dir)
        if p is not None:
            paths.append(p)
    return paths


def _plot_paired(res: dict, out_dir: Path):
    """Per metric: each arm's mean paired difference against the baseline, 95% interval."""
    metrics = [m for m in res["paired"] if any("diff" in r for r in res["paired"][m].values())]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        rows = {a: r for a, r in res["paired"][m].items() if "diff" in r}
        names = list(rows)
        d = [rows[a]["diff"] for a in names]
        err = [[rows[a]["diff"] - rows[a]["lo"] for a in names], [rows[a]["hi"] - rows[a]["diff"] for a in names]]
        ax.errorbar(range(len(names)), d, yerr=err, fmt="o", capsize=4, color="#4878a8")
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        unit = "nats" if m == "kl_T" else "points"
        ax.set_title(f"test {m}: minus {res['config']['study']['baseline']} ({unit}), 95% CI", fontsize=9)
    fig.tight_layout()
    p = out_dir / "paired.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def _plot_curves(res: dict, out_dir: Path):
    """Validation KL(teacher || student) and accuracy per epoch, the first seed of each
    arm (runs with ``train.trace``), with the RDMs' KL and accuracy as dashed lines."""
    runs = {}
    for r in res["runs"]:
        if "trace" in r and r["arm"] not in runs:
            runs[r["arm"]] = r  # runs are in seed order
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    bank = res["bank"].get("val", {})
    for key, ax, title in (("val_kl_T", axes[0], "validation KL(teacher || model), nats"),
                           ("val_acc", axes[1], "validation accuracy")):
        for arm, r in runs.items():
            t = r["trace"]
            ax.plot(t["epoch"], t[key], label=f"{arm} (seed {r['seed']})", lw=1.2)
        ref = bank.get("kl_T" if key == "val_kl_T" else "acc", [])
        for v in ref:
            ax.axhline(v, ls="--", lw=0.8, color="gray")
        if ref:  # one label for the bank (its lines lie close together)
            rates = "/".join(f"{R:g}" for R in res["bank"]["R"])
            ax.annotate(f"RDMs, R = {rates}", (0.02, max(ref)), textcoords="offset points", xytext=(0, 3),
                        fontsize=7, color="gray", xycoords=("axes fraction", "data"))
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=9)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    p = out_dir / "curves.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
