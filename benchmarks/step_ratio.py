# SPDX-License-Identifier: Apache-2.0
"""Paired measurement of CIFD's stage-2 step cost over KD (the ratio the paper puts at 1.08x).

    python -m benchmarks.step_ratio [--rounds 40] [--threads 1] [--device cpu|cuda]

``benchmarks/bench_cifd_step.py`` times the KD and the CIFD step one after the
other; on a shared machine the load drifts between the two and their ratio,
a few percent either way, drowns in it. This script runs the same two steps
(same models, batch and scenarios, from that benchmark's ``_setup``)
*interleaved*, KD then CIFD in every round, and reports the median of the
per-round ratios alongside each median time. Writes a results JSON (device,
versions, commit) like the pytest benchmarks, op ``cifd_step_paired``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.bench_cifd_step import SHAPES, _setup
from benchmarks.utils import script_args, synchronize, write_results


def measure(batch: int, online: bool, device: torch.device, rounds: int, warmup: int = 3):
    kd, cifd = _setup("kd", batch, online, device), _setup("cifd", batch, online, device)
    for _ in range(warmup):
        kd()
        cifd()
    synchronize(device)
    t_kd, t_cifd = [], []
    for _ in range(rounds):
        for fn, acc in ((kd, t_kd), (cifd, t_cifd)):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            acc.append(time.perf_counter() - t0)
    ratios = [c / k for k, c in zip(t_kd, t_cifd)]
    return t_kd, t_cifd, ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--batch", type=int, action="append", default=None,
                    help="only these batch sizes (repeatable; default: all of the benchmark's)")
    args, device = script_args(ap, argv, "rounds", 5)
    records = []
    for batch, scenario in SHAPES:
        if args.batch and batch not in args.batch:
            continue
        if scenario == 1 and batch > 128 and device.type != "cuda":
            continue  # as the benchmark: the online scenario at large B on GPUs only
        t_kd, t_cifd, ratios = measure(batch, scenario == 1, device, args.rounds)
        med = statistics.median(ratios)
        q = statistics.quantiles(ratios, n=4)
        name = "cached" if scenario == 0 else "online"
        print(f"B={batch} {name}: KD {statistics.median(t_kd) * 1e3:.2f} ms, CIFD "
              f"{statistics.median(t_cifd) * 1e3:.2f} ms, paired ratio median {med:.3f} "
              f"(quartiles {q[0]:.3f}-{q[2]:.3f}, {args.rounds} rounds)")
        for provider, ts in (("kd", t_kd), ("cifd", t_cifd)):
            records.append({
                "name": f"step_ratio[{batch}x{scenario}-{provider}]", "op": "cifd_step_paired",
                "provider": provider, "shape": [batch, scenario], "mode": "full", "dtype": "float32",
                "baseline": "kd", "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                "mean_s": statistics.fmean(ts), "stddev_s": statistics.pstdev(ts), "rounds": len(ts),
                "paired_ratio_median": med if provider == "cifd" else 1.0,
                "paired_ratio_quartiles": [q[0], q[2]] if provider == "cifd" else [1.0, 1.0],
                "threads": torch.get_num_threads() if device.type == "cpu" else None,
            })
    path = write_results(records, device, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
