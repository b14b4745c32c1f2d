# SPDX-License-Identifier: Apache-2.0
"""Plot a results file written by ``pytest benchmarks/``.

    python benchmarks/plot.py RESULTS.json [--out DIR] [--baseline PROVIDER]
    python -m benchmarks.plot RESULTS.json ...

One PNG per benchmark group (op x mode x dtype): on the left the speed-up of
each provider over the group's baseline provider (the ``baseline`` field of the
records: the reference, or CompressAI for the entropy model) per shape, on the
right the median time per call. Also prints the numbers as a text table.
Needs only the standard library and matplotlib (Agg backend, no display).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import OrderedDict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _shape_label(shape) -> str:
    if len(shape) == 1 and shape[0] > 0 and shape[0] & (shape[0] - 1) == 0:
        return f"2^{shape[0].bit_length() - 1}"
    return "x".join(str(s) for s in shape)


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def load(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if "benchmarks" not in data or "header" not in data:
        raise SystemExit(f"{path}: not a cifd_kernels results file (no header/benchmarks); "
                         "pytest-benchmark's own --benchmark-json is a different format")
    return data


def groups(records: list[dict]) -> "OrderedDict[tuple, list[dict]]":
    out: OrderedDict[tuple, list[dict]] = OrderedDict()
    for r in records:
        out.setdefault((r["op"], r["mode"], r.get("dtype", "")), []).append(r)
    return out


def _table(rows: list[dict]) -> dict:
    """{shape tuple: {provider: record}} in shape-size order."""
    by_shape: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_shape.setdefault(tuple(r["shape"]), {})[r["provider"]] = r
    return dict(sorted(by_shape.items(), key=lambda kv: (_numel(kv[0]), kv[0])))


def _providers(rows: list[dict], baseline: str) -> list[str]:
    seen = list(OrderedDict.fromkeys(r["provider"] for r in rows))
    return ([baseline] if baseline in seen else []) + [p for p in seen if p != baseline]


def plot_group(key: tuple, rows: list[dict], baseline: str, header: dict, out_dir: Path) -> Path:
    op, mode, dtype = key
    table = _table(rows)
    providers = _providers(rows, baseline)
    shapes = list(table)
    x = range(len(shapes))
    width = 0.8 / max(len(providers), 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(max(9, 2.6 * len(shapes) + 4), 4.6))
    speedups = []
    for i, prov in enumerate(providers):
        xs, ys, ts, txs = [], [], [], []
        for j, shape in enumerate(shapes):
            r = table[shape].get(prov)
            if r is None:
                continue
            txs.append(j + (i - (len(providers) - 1) / 2) * width)
            ts.append(r["median_s"] * 1e3)
            b = table[shape].get(baseline)
            if b is not None:
                xs.append(txs[-1])
                ys.append(b["median_s"] / r["median_s"])
        c = colors[i % len(colors)]
        bars = ax_s.bar(xs, ys, width, label=prov, color=c)
        speedups += ys
        for bar, v in zip(bars, ys):
            ax_s.annotate(f"{v:.3g}x", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                          va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
        ax_t.bar(txs, ts, width, label=prov, color=c)

    ax_s.axhline(1.0, color="0.3", lw=0.8, ls="--")
    if speedups and max(speedups) / max(min(speedups), 1e-12) > 20:
        ax_s.set_yscale("log")
    ax_s.set_ylabel(f"speed-up over {baseline} (higher is better)")
    ax_t.set_yscale("log")
    ax_t.set_ylabel("median time per call [ms] (lower is better)")
    for ax in (ax_s, ax_t):
        ax.set_xticks(list(x))
        ax.set_xticklabels([_shape_label(s) for s in shapes])
        ax.set_xlabel("shape")
        ax.grid(axis="y", alpha=0.3, which="both")
    missing = [_shape_label(s) for s in shapes if baseline not in table[s]]
    if missing:
        ax_s.set_title(f"no {baseline} at {', '.join(missing)}", fontsize=8)
    ax_t.legend(fontsize=8, loc="best")
    commit = str(header.get("commit", "?"))
    fig.suptitle(f"{op} {mode} ({dtype}) on {header.get('device', '?')}\n"
                 f"torch {header.get('torch')}, triton {header.get('triton')}, "
                 f"commit {commit[:12]}{'-dirty' if commit.endswith('-dirty') else ''}, "
                 f"{header.get('date', '')}", fontsize=9)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{op}-{mode}-{dtype}") + ".png"
    path = out_dir / name
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def text_table(key: tuple, rows: list[dict], baseline: str) -> str:
    op, mode, dtype = key
    cols = f"{'shape':>14} {'provider':>11} {'median ms':>11} {'GB/s':>8} {'peak MiB':>9} {'speed-up':>9}"
    lines = [f"{op} {mode} {dtype} (speed-up over {baseline})", "  " + cols]
    for shape, provs in _table(rows).items():
        b = provs.get(baseline)
        for prov in _providers(rows, baseline):
            r = provs.get(prov)
            if r is None:
                continue
            sp = f"{b['median_s'] / r['median_s']:.3g}x" if b else "-"
            gbps = f"{r['gbps']:.3g}" if r.get("gbps") else "-"
            mem = f"{r['peak_mem_bytes'] / 2**20:.1f}" if r.get("peak_mem_bytes") is not None else "-"
            lines.append(f"  {_shape_label(shape):>14} {prov:>11} {r['median_s'] * 1e3:>11.4g} "
                         f"{gbps:>8} {mem:>9} {sp:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="JSON file written by pytest benchmarks/")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default: <results stem>-plots next to the file)")
    ap.add_argument("--baseline", default=None,
                    help="provider to compute speed-ups against (default: each record's baseline)")
    args = ap.parse_args(argv)

    data = load(args.results)
    out_dir = args.out or args.results.with_name(args.results.stem + "-plots")
    header = data["header"]
    print(f"{args.results}: {header.get('device')}, torch {header.get('torch')}, "
          f"commit {header.get('commit')}, {header.get('date')}")
    written = []
    for key, rows in groups(data["benchmarks"]).items():
        baseline = args.baseline or rows[0].get("baseline") or rows[0]["provider"]
        print(text_table(key, rows, baseline))
        written.append(plot_group(key, rows, baseline, header, out_dir))
    for p in written:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
