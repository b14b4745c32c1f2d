# SPDX-License-Identifier: Apache-2.0
"""Roofline figure for the entropy-bottleneck kernels on a GPU.

    python benchmarks/roofline.py RESULTS.json [--shape 65536x320] [--mode full] [--out FILE.png]

Reads a results file written by ``pytest benchmarks/`` on a GPU and draws, for
one shape and mode of ``entropy_bottleneck``:

* left, a roofline: the op's useful work per element (fp32 FLOPs, and the
  minimal bytes: y read, y_hat written, and in backward grad_y_hat read and
  grad_y written) against the card's memory bandwidth, fp32 peak and
  special-function (SFU) throughput, with each provider's achieved useful
  GFLOP/s at the op's arithmetic intensity;
* right, each provider's measured time against the three floors (memory,
  SFU, fp32), with the fraction of the binding floor it reaches.

The per-element counts are the estimates in ``benchmarks/NOTES.md`` (forward:
the 1-3-3-3-3-1 density MLP at both bin edges, the bin mass and log; backward
recomputes the forward). Card figures are datasheet boost-clock numbers
(``CARDS``); all of this bounds from below, it is not a profile.
Needs matplotlib only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Per element of y, fp32 (benchmarks/NOTES.md): FLOPs, transcendentals, minimal bytes.
# Only fwd+bwd ("full") is estimated; the split between the passes is not.
WORK = {"full": dict(flop=1500.0, sfu=70.0, bytes=16.0)}
# name substring -> (memory bandwidth B/s, fp32 FLOP/s (non-tensor), SFU results/s).
# SFU: 16 results / clock / SM (sm_90) x SMs x boost clock.
CARDS = {
    "H200": (4.8e12, 66.9e12, 16 * 132 * 1.98e9),
    "H100": (3.35e12, 66.9e12, 16 * 132 * 1.98e9),
}


def card_of(name: str):
    for key, spec in CARDS.items():
        if key in name:
            return key, spec
    raise SystemExit(f"no datasheet figures for device {name!r}; add it to CARDS in {__file__}")


def floors(numel: int, mode: str, spec) -> dict[str, float]:
    bw, flops, sfu = spec
    w = WORK[mode]
    return {"memory": numel * w["bytes"] / bw, "SFU": numel * w["sfu"] / sfu,
            "fp32": numel * w["flop"] / flops}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--shape", default="65536x320")
    ap.add_argument("--mode", default="full", choices=tuple(WORK))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    data = json.loads(args.results.read_text())
    header = data["header"]
    card, spec = card_of(header["device"])
    shape = [int(s) for s in args.shape.split("x")]
    rows = [r for r in data["benchmarks"] if r["op"] == "entropy_bottleneck" and r["shape"] == shape
            and r["mode"] == args.mode and r["dtype"] == "float32"]
    if not rows:
        raise SystemExit(f"no float32 entropy_bottleneck {args.mode} records at {args.shape} in {args.results}")
    numel = 1
    for s in shape:
        numel *= s
    w = WORK[args.mode]
    fl = floors(numel, args.mode, spec)
    bound = max(fl.values())
    binding = max(fl, key=fl.get)
    intensity = w["flop"] / w["bytes"]
    bw, peak, sfu = spec
    sfu_equiv = sfu * w["flop"] / w["sfu"]  # FLOP/s at which the SFU count binds

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    xs = [2 ** (i / 4) for i in range(-8, 41)]
    ax.loglog(xs, [min(bw * x, peak) / 1e9 for x in xs], "k-", label=f"fp32 peak {peak / 1e12:.0f} TFLOP/s, "
              f"memory {bw / 1e12:.2f} TB/s")
    ax.loglog(xs, [min(bw * x, sfu_equiv) / 1e9 for x in xs], "k--",
              label=f"SFU {sfu / 1e12:.1f} T/s ({w['sfu']:.0f} per element)")
    ax.axvline(intensity, color="0.7", lw=0.8)
    print(f"{card} ({header['device']}), entropy_bottleneck {args.mode} {args.shape}, fp32")
    print(f"  floors: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in fl.items()) + f" -> {binding} binds")
    for r in sorted(rows, key=lambda r: r["median_s"]):
        t = r["median_s"]
        gflops = numel * w["flop"] / t / 1e9
        frac = bound / t
        ax.loglog([intensity], [gflops], "o", ms=8, label=f"{r['provider']}: {t * 1e3:.2f} ms, {frac:.0%} of bound")
        print(f"  {r['provider']:<11} {t * 1e3:8.3f} ms  {gflops:9.0f} useful GFLOP/s  {frac:6.1%} of the {binding} floor")
    ax.set_xlabel("arithmetic intensity, useful FLOP / minimal byte")
    ax.set_ylabel("useful GFLOP/s")
    ax.set_title(f"entropy_bottleneck {args.mode} {args.shape} fp32 on {card}")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)

    names = [r["provider"] for r in sorted(rows, key=lambda r: r["median_s"])]
    times = [r["median_s"] * 1e3 for r in sorted(rows, key=lambda r: r["median_s"])]
    bx.barh(names, times, color="tab:blue")
    for i, t in enumerate(times):
        bx.text(t, i, f" {t:.2f} ms ({bound * 1e3 / t:.0%})", va="center", fontsize=8)
    for (k, v), style in zip(fl.items(), (":", "--", "-")):
        bx.axvline(v * 1e3, color="k", ls=style, lw=1, label=f"{k} floor {v * 1e3:.2f} ms")
    bx.set_xscale("log")
    bx.set_xlabel("median time per call, ms (log)")
    bx.set_title("measured time vs floors (percent of the binding floor)")
    bx.legend(fontsize=8, loc="upper right")
    fig.text(0.01, 0.01, f"{args.results.name}; torch {header.get('torch')}, triton {header.get('triton')}; "
             f"counts per element: {w['flop']:.0f} FLOP, {w['sfu']:.0f} transcendentals, {w['bytes']:.0f} B "
             f"(estimates, benchmarks/NOTES.md)", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    out = args.out or args.results.with_name(f"{args.results.stem}-roofline-{args.mode}-{args.shape}.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
