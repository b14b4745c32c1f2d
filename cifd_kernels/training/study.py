# SPDX-License-Identifier: Apache-2.0
"""``cifd study``: CIFD against KD, TAKD and their controls on paired seeds.

Stages, each resumable (a finished run is read back, not redone):

1. **Teacher**: ``study.teacher_config`` trained on ``study.teacher_train_size``
   training images (0 = all of them) with the students' validation split, so the
   teacher knows more than the small-data students can learn alone.
2. **Sweep** (``study.sweep``, on ``study.sweep_seed``): each entry is an *arm*,
   ``"NAME METHOD [KEY=VALUE ...]"``, a student method with config overrides.
   Selection reads **validation** accuracy only.
3. **Final** (``study.arms`` x ``study.seeds``): an arm whose overrides are
   ``@best`` takes those of the sweep entry of its method with the highest
   validation accuracy. Seed s means the same initialisation and batch order for
   every arm (``train.seed``), so arms are compared as paired differences on
   **test** against ``study.baseline``, with a 95% t-interval.

Every arm's RDM bank (``rdm.*`` overrides) is trained once, on the students'
data, and shared. Runs go through the ``cifd`` command line in ``study.jobs``
parallel single-thread processes (``run.threads=1``): on a 2-core machine, two
runs side by side.

Outputs in ``<out_dir>/<name>/study/``: ``results.json`` (every run's summary,
the sweep table, the paired table), ``paired.png`` (paired differences with
their intervals), ``cost.png`` (accuracy against training FLOPs) and the banks'
rate-distortion curves.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .config import Config, ConfigError, apply_overrides, validate
from .engine import atomic_write_text
from .teacher import run_root

# Two-sided 95% quantiles of Student's t (t_{0.975, df}), df = 1..30.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """``t_{0.975, df}``; the normal's 1.96 past df = 30 (within 2%)."""
    if df < 1:
        return float("nan")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Arm:
    """One way of training the student: a method and the config overrides it runs with."""
    name: str
    method: str
    overrides: tuple[str, ...]
    best: bool = False  # the sweep's best entry's overrides of this method come first


def parse_arm(spec: str, where: str) -> Arm:
    """``"NAME METHOD [KEY=VALUE ...]"`` or ``"NAME METHOD @best [KEY=VALUE ...]"``: the
    best sweep entry's overrides of that method, then these."""
    from .distill import METHODS
    parts = spec.split()
    if len(parts) < 2:
        raise ConfigError(f"{where}: expected 'NAME METHOD [KEY=VALUE ...]', got {spec!r}")
    name, method, rest = parts[0], parts[1], tuple(parts[2:])
    if method not in METHODS:
        raise ConfigError(f"{where}: method must be one of {', '.join(METHODS)}, got {method!r}")
    if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ConfigError(f"{where}: arm name {name!r} must be letters, digits, '_', '-', '.'")
    best = bool(rest) and rest[0] == "@best"
    if best:
        rest = rest[1:]
    for o in rest:
        if "=" not in o:
            raise ConfigError(f"{where}: override {o!r} of arm {name!r} is not KEY=VALUE")
    return Arm(name, method, rest, best=best)


def arms_of(cfg: Config) -> tuple[list[Arm], list[Arm]]:
    """(sweep arms, final arms), checked: unique names, overrides that the config
    accepts, ``@best`` only for a method the sweep has."""
    sweep = [parse_arm(s, f"study.sweep[{i}]") for i, s in enumerate(cfg.study.sweep)]
    final = [parse_arm(s, f"study.arms[{i}]") for i, s in enumerate(cfg.study.arms)]
    for group, label in ((sweep, "study.sweep"), (final, "study.arms")):
        names = [a.name for a in group]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"{label}: arm names must be unique, repeated: {', '.join(sorted(dup))}")
        for a in group:
            if a.best and not any(s.method == a.method for s in sweep):
                raise ConfigError(f"{label}: arm {a.name!r} takes @best but study.sweep has no "
                                  f"{a.method} entry")
            if a.best and label == "study.sweep":
                raise ConfigError(f"study.sweep: arm {a.name!r}: @best is for study.arms")
            validate(apply_overrides(copy.deepcopy(cfg), list(a.overrides)))  # ConfigError if bad
    if final and cfg.study.baseline not in [a.name for a in final]:
        raise ConfigError(f"study.baseline {cfg.study.baseline!r} is not one of study.arms "
                          f"({', '.join(a.name for a in final)})")
    return sweep, final


# ------------------------------------------------------------------ paired statistics
def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of ``a - b`` over paired seeds with its 95% t-interval."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    if n == 0:
        return {"n": 0}
    mean = statistics.fmean(d)
    sd = statistics.stdev(d) if n > 1 else float("nan")
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "diffs": d, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


# ------------------------------------------------------------------ running arms
class _Runner:
    """Runs ``cifd`` commands for the study, ``jobs`` at a time, one thread each."""

    def __init__(self, cfg: Config, config_name: str, base_overrides: Sequence[str], root: Path):
        self.cfg, self.config_name, self.base = cfg, config_name, list(base_overrides)
        self.root = root
        self.logs = root / "logs"

    def command(self, sub: str, extra: Sequence[str]) -> list[str]:
        return [sys.executable, "-m", "cifd_kernels", sub, "-c", self.config_name, *self.base,
                "run.threads=1", "run.progress=false", *extra]

    def run(self, key: str, sub: str, extra: Sequence[str]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / (key.replace("/", "__") + ".log")
        cmd = self.command(sub, extra)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if rc != 0:
            tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"study: {key} failed (status {rc}): {tail[0]} (log: {log})")
        print(f"study: {key} done in {time.perf_counter() - t0:.0f}s", flush=True)

    def run_all(self, jobs: Sequence[tuple[str, str, list[str]]]) -> None:
        with ThreadPoolExecutor(max(1, self.cfg.study.jobs)) as pool:
            for fut in [pool.submit(self.run, *j) for j in jobs]:
                fut.result()


def resolved(arm: Arm, chosen: dict) -> list[str]:
    """The arm's overrides, after the chosen sweep entry's when it takes ``@best``."""
    return (list(chosen.get(arm.method, ())) if arm.best else []) + list(arm.overrides)


def _rdm_overrides(overrides: Sequence[str]) -> list[str]:
    return sorted(o for o in overrides if o.split("=", 1)[0].strip().startswith("rdm."))


def _bank_key(overrides: Sequence[str]) -> str:
    rdm = _rdm_overrides(overrides)
    return "default" if not rdm else hashlib.sha256("\n".join(rdm).encode()).hexdigest()[:10]


def _arm_root(cfg: Config, arm: Arm, stage: str) -> str:
    return f"{cfg.run.name}/study/{stage}/{arm.name}"


def _student_summary(cfg: Config, arm: Arm, stage: str, seed: int) -> Path:
    from .teacher import student_run_dir
    c = copy.deepcopy(cfg)
    c.run.name = _arm_root(cfg, arm, stage)
    c.train.seed = seed
    return student_run_dir(c, arm.method) / "summary.json"


def run_study(cfg: Config, config_name: str, overrides: Sequence[str] = ()) -> dict:
    """Run (or resume) the study; returns results.json's contents."""
    from .demo import teacher_config
    from .teacher import default_teacher_checkpoint, train_teacher
    t_study = time.perf_counter()
    sweep, final = arms_of(cfg)
    root = run_root(cfg) / "study"
    runner = _Runner(cfg, config_name, overrides, root)

    # 1. the teacher, in this process (both threads), on the larger training set
    tcfg = teacher_config(cfg, overrides)
    tcfg.data.train_size = cfg.study.teacher_train_size
    if cfg.study.teacher_epochs:
        tcfg.train.epochs = cfg.study.teacher_epochs
    teacher = train_teacher(tcfg, resume=True)
    tpath = str(default_teacher_checkpoint(tcfg))

    def student_jobs(arms: Sequence[Arm], stage: str, seeds: Sequence[int], chosen: dict):
        jobs = []
        for arm in arms:
            ov = resolved(arm, chosen)
            bank = root / "banks" / _bank_key(ov) / "rdms" / "bank.pt"
            for seed in seeds:
                if _student_summary(cfg, arm, stage, seed).is_file():
                    continue
                extra = ["--method", arm.method, "--resume", *ov, f"teacher.checkpoint={tpath}",
                         f"cifd.bank={bank}", f"train.seed={seed}",
                         f"run.name={_arm_root(cfg, arm, stage)}"]
                jobs.append((f"{stage}/{arm.name}/s{seed}", "distill", extra))
        return jobs

    def bank_jobs(arm_overrides: Sequence[Sequence[str]]):
        jobs, seen = [], set()
        for ov in arm_overrides:
            key = _bank_key(ov)
            if key in seen or (root / "banks" / key / "rdms" / "results.json").is_file():
                continue
            seen.add(key)
            jobs.append((f"bank/{key}", "train-rdms",
                         ["--resume", *_rdm_overrides(ov), f"teacher.checkpoint={tpath}",
                          f"run.name={cfg.run.name}/study/banks/{key}"]))
        return jobs

    def needs_bank(arms, chosen):
        return [resolved(a, chosen) for a in arms if a.method == "cifd"]

    # 2. the sweep on one seed, chosen on validation
    runner.run_all(bank_jobs(needs_bank(sweep, {})))
    # teacher outputs are cached next to the teacher on first use: one run first
    jobs = student_jobs(sweep, "sweep", [cfg.study.sweep_seed], {})
    runner.run_all(jobs[:1])
    runner.run_all(jobs[1:])
    sweep_rows = []
    for arm in sweep:
        s = json.loads(_student_summary(cfg, arm, "sweep", cfg.study.sweep_seed).read_text())
        sweep_rows.append({"arm": arm.name, "method": arm.method, "overrides": list(arm.overrides),
                           "val_acc": s["val_acc"], "test_acc": s["test_acc"]})
    chosen = {}
    for method in {a.method for a in sweep}:
        rows = [r for r in sweep_rows if r["method"] == method]
        best = max(rows, key=lambda r: r["val_acc"])  # validation only
        chosen[method] = best["overrides"]
        for r in rows:
            r["chosen"] = r is best

    # 3. the final arms over every seed
    runner.run_all(bank_jobs(needs_bank(final, chosen)))
    jobs = student_jobs(final, "final", cfg.study.seeds, chosen)
    runner.run_all(jobs[:1])
    runner.run_all(jobs[1:])
    runs = {}
    for arm in final:
        runs[arm.name] = [dict(json.loads(_student_summary(cfg, arm, "final", s).read_text()), seed=s)
                          for s in cfg.study.seeds]
    table = paired_table(final, runs, cfg.study.baseline, chosen)
    banks = {}
    for p in sorted((root / "banks").glob("*/rdms/results.json")):
        banks[p.parent.parent.name] = json.loads(p.read_text())
    plots = {"paired": str(root / "paired.png"), "cost": str(root / "cost.png")}
    plot_paired(table, cfg.study.baseline, Path(plots["paired"]))
    plot_cost(table, Path(plots["cost"]))
    text = format_tables(teacher, banks, sweep_rows, table, cfg.study.baseline)
    results = {"complete": True, "text": text, "teacher": teacher, "banks": banks,
               "sweep": sweep_rows, "chosen": chosen, "paired": table,
               "runs": {k: [_slim(r) for r in v] for k, v in runs.items()},
               "seeds": list(cfg.study.seeds), "baseline": cfg.study.baseline,
               "plots": plots, "wall_time_s": time.perf_counter() - t_study,
               "config": {"study": cfg.study.__dict__}}
    atomic_write_text(json.dumps(results, indent=2, default=str) + "\n", root / "results.json")
    print("\n" + text)
    print(f"\nstudy wall time {results['wall_time_s']:.0f}s; results {root / 'results.json'}",
          flush=True)
    return results


def _slim(summary: dict) -> dict:
    keep = ("seed", "val_acc", "test_acc", "best_epoch", "train_flops", "method_train_flops",
            "total_train_time_s", "method_train_time_s", "arch", "method")
    return {k: summary[k] for k in keep if k in summary}


def paired_table(final: Sequence[Arm], runs: dict, baseline: str, chosen: dict) -> list[dict]:
    """Per arm: test and val accuracy per seed and their mean, paired difference on
    test against ``baseline`` with its 95% t-interval, training FLOPs relative to
    the baseline's."""
    base = runs[baseline]
    base_flops = statistics.fmean(r.get("method_train_flops", r.get("train_flops", 0)) for r in base)
    rows = []
    for arm in final:
        rs = runs[arm.name]
        test = [100 * r["test_acc"] for r in rs]
        flops = statistics.fmean(r.get("method_train_flops", r.get("train_flops", 0)) for r in rs)
        rows.append({
            "arm": arm.name, "method": arm.method,
            "overrides": resolved(arm, chosen),
            "test": test, "val": [100 * r["val_acc"] for r in rs],
            "test_mean": statistics.fmean(test),
            "test_sd": statistics.stdev(test) if len(test) > 1 else 0.0,
            "vs_baseline": paired(test, [100 * r["test_acc"] for r in base]),
            "flops_rel": flops / base_flops if base_flops else float("nan")})
    return rows


def format_tables(teacher: dict, banks: dict, sweep_rows: list, table: list, baseline: str) -> str:
    out = [f"teacher {teacher['arch']}: test {100 * teacher['test_acc']:.2f}, "
           f"val {100 * teacher['val_acc']:.2f}"]
    for key, b in banks.items():
        out.append(f"bank {key}: " + ", ".join(
            f"R={r['R']:g} {100 * r['test']['acc']:.2f}% {r['test']['rate_bits']:.1f} bits"
            for r in b["rdms"]))
    if sweep_rows:
        out.append("\nsweep (one seed; chosen on validation)")
        for r in sweep_rows:
            mark = "*" if r.get("chosen") else " "
            out.append(f" {mark} {r['arm']:<22} {r['method']:<7} val {100 * r['val_acc']:6.2f}  "
                       f"{' '.join(r['overrides'])}")
    out.append(f"\npaired over seeds, test accuracy (%); difference against {baseline}, "
               f"95% t-interval")
    out.append(f"{'arm':<16} {'method':<7} {'mean':>6} {'sd':>5}   {'diff':>6} "
               f"{'95% interval':>17} {'x FLOPs':>7}   per seed")
    for r in table:
        p = r["vs_baseline"]
        iv = f"[{p['lo']:+.2f}, {p['hi']:+.2f}]" if r["arm"] != baseline else ""
        diff = f"{p['mean']:+.2f}" if r["arm"] != baseline else ""
        out.append(f"{r['arm']:<16} {r['method']:<7} {r['test_mean']:6.2f} {r['test_sd']:5.2f}   "
                   f"{diff:>6} {iv:>17} {r['flops_rel']:7.2f}   "
                   + " ".join(f"{v:.2f}" for v in r["test"]))
    return "\n".join(out)


def plot_paired(table: list, baseline: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in table if r["arm"] != baseline]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(rows)))
    ys = list(range(len(rows)))
    for y, r in zip(ys, rows):
        p = r["vs_baseline"]
        ax.plot([p["lo"], p["hi"]], [y, y], color="tab:blue", lw=2)
        ax.plot(p["mean"], y, "o", color="tab:blue")
        ax.plot(p["diffs"], [y] * len(p["diffs"]), "x", color="tab:gray", ms=4)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(ys, [r["arm"] for r in rows])
    ax.set_xlabel(f"test accuracy - {baseline} (points; paired seeds, 95% t-interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost(table: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in table:
        ax.errorbar(r["flops_rel"], r["test_mean"], yerr=r["test_sd"], fmt="o", capsize=3,
                    label=r["arm"])
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs relative to the baseline (stage 1 included)")
    ax.set_ylabel("test accuracy (%, mean ± sd over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["Arm", "parse_arm", "arms_of", "paired", "resolved", "t975", "run_study"]
