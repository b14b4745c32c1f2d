# SPDX-License-Identifier: Apache-2.0
"""``cifd demo``: the whole study on one small dataset, with a comparison table.

In order: the teacher (``demo.teacher_config``, ``demo.teacher_epochs``), the
RDM bank (``train-rdms``), then for each seed of ``demo.seeds`` the students
of ``demo.methods`` (scratch, kd, cifd, takd). TAKD is skipped, with a
message, when a timed estimate of its TA chain would take the demo past
``demo.budget_s``. Every run resumes if already complete, so running the demo
again only prints the table.

Outputs in ``<out_dir>/<name>/demo/``: ``results.json`` (every summary, the
per-method aggregates, wall times), ``accuracy.png`` (test accuracy per
method, error bars = std over seeds when there are several, validation
accuracy marked) and ``cost.png`` (training FLOPs relative to KD and wall
time per method: the paper's Figure 1), plus the RDM bank's ``rd_curve.png``.

Costs. ``train FLOPs``: torch.utils.flop_counter on one training step
(forward + backward, matmuls and convolutions) times the steps, plus one-off
passes (teacher and frozen bank over the train split, for the caches); for
CIFD it includes stage 1 (the RDMs), for TAKD the TA chain. The teacher's own
training is shared by every method and not counted. ``train s`` sums the
training passes of the same stages; ``wall s`` is the measured wall clock of
the method's commands (validation, caches, test included).
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from .config import Config, apply_overrides, load_config
from .distributed import barrier, broadcast_object, context
from .engine import atomic_write_text
from .teacher import run_root

METHOD_LABELS = {"scratch": "scratch", "kd": "KD", "takd": "TAKD", "cifd": "CIFD"}


def teacher_config(cfg: Config, overrides: Sequence[str] = ()) -> Config:
    """The demo's teacher: ``demo.teacher_config`` with the command line's
    ``data.*`` / ``run.*`` overrides, the student config's data split and run
    location, ``teacher.arch`` and ``demo.teacher_epochs``."""
    t = load_config(cfg.demo.teacher_config,
                    [o for o in overrides if o.split("=", 1)[0].strip().startswith(("data.", "run."))])
    t.run = copy.deepcopy(cfg.run)
    for k in ("name", "dir", "val_size", "train_size", "split_seed", "eval_batch_size"):
        setattr(t.data, k, getattr(cfg.data, k))
    t.model.arch, t.model.embed_dim = cfg.teacher.arch, cfg.teacher.embed_dim
    if cfg.demo.teacher_epochs:
        t.train.epochs = cfg.demo.teacher_epochs
    if cfg.demo.teacher_train_size >= 0:  # the study's regime: the teacher sees more
        t.data.train_size = cfg.demo.teacher_train_size
    return t


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def estimate_train_s(cfg: Config, arch: str, n_steps: int = 3) -> float:
    """Seconds to train ``arch`` for ``cfg.train.epochs`` epochs, from ``n_steps``
    timed SGD steps (after one warm-up) on a random batch of the data's shape."""
    from .engine import build_optimizer
    from .models import build_model
    from .teacher import load_data
    ds = load_data(cfg)
    m = build_model(arch, ds.num_classes, in_channels=ds.in_channels, image_size=ds.image_size)
    if cfg.train.channels_last:
        m = m.to(memory_format=torch.channels_last)
    opt = build_optimizer(m.parameters(), cfg.train)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.data.batch_size, ds.in_channels, ds.image_size, ds.image_size,
                    generator=g)
    y = torch.randint(0, ds.num_classes, (cfg.data.batch_size,), generator=g)
    rng = torch.get_rng_state()

    def one():
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    one()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        one()
    per_step = (time.perf_counter() - t0) / n_steps
    torch.set_rng_state(rng)
    steps = -(-len(ds.train) // cfg.data.batch_size) * cfg.train.epochs
    return per_step * steps


def _agg(runs: list[dict], key: str) -> tuple[float, float]:
    vals = [r[key] for r in runs if key in r]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(methods: dict) -> dict:
    """Per method: mean/std of test and val accuracy over seeds, mean method
    training time, FLOPs and wall time; FLOPs relative to KD."""
    out = {}
    for m, info in methods.items():
        runs = info.get("runs", [])
        if not runs:
            out[m] = {"skipped": info.get("skipped", "not run")}
            continue
        ta, ta_sd = _agg(runs, "test_acc")
        va, va_sd = _agg(runs, "val_acc")
        tt = statistics.fmean(r.get("method_train_time_s", r.get("total_train_time_s", 0.0))
                              for r in runs)
        fl = statistics.fmean(r.get("method_train_flops", r.get("train_flops", 0)) for r in runs)
        out[m] = {"arch": runs[0]["arch"], "seeds": [r["seed"] for r in runs],
                  "test_acc": ta, "test_acc_std": ta_sd, "val_acc": va, "val_acc_std": va_sd,
                  "train_time_s": tt, "train_flops": fl,
                  "wall_s": statistics.fmean(info["wall_s"])}
    kd = out.get("kd", {}).get("train_flops")
    for m, r in out.items():
        if kd and "train_flops" in r:
            r["flops_rel_kd"] = r["train_flops"] / kd
    return out


def format_table(teacher: dict, rdms: dict, agg: dict) -> str:
    lines = [f"{'method':<8} {'arch':<6} {'seeds':>5} {'test acc':>15} {'val acc':>8} "
             f"{'train s':>8} {'wall s':>7} {'train FLOPs':>12} {'x KD':>6}"]
    lines.append("-" * len(lines[0]))
    lines.append(f"{'teacher':<8} {teacher['arch']:<6} {1:>5} {100 * teacher['test_acc']:>15.2f} "
                 f"{100 * teacher['val_acc']:>8.2f} {teacher.get('total_train_time_s', 0):>8.1f} "
                 f"{teacher.get('wall_s', 0):>7.1f} {'(not counted)':>12}")
    for m, r in agg.items():
        if "skipped" in r:
            lines.append(f"{METHOD_LABELS.get(m, m):<8} skipped: {r['skipped']}")
            continue
        acc = f"{100 * r['test_acc']:.2f}" + (f" ± {100 * r['test_acc_std']:.2f}"
                                               if len(r["seeds"]) > 1 else "")
        lines.append(f"{METHOD_LABELS.get(m, m):<8} {r['arch']:<6} {len(r['seeds']):>5} "
                     f"{acc:>15} {100 * r['val_acc']:>8.2f} {r['train_time_s']:>8.1f} "
                     f"{r['wall_s']:>7.1f} {r['train_flops']:>12.3g} "
                     f"{r.get('flops_rel_kd', float('nan')):>6.2f}")
    if "cifd" in agg and "kd" in agg and "skipped" not in agg["cifd"] and "skipped" not in agg["kd"]:
        c, k = agg["cifd"], agg["kd"]
        shared = [s for s in c["seeds"] if s in k["seeds"]]
        line = (f"CIFD - KD: {100 * (c['test_acc'] - k['test_acc']):+.2f} points test, "
                f"{100 * (c['val_acc'] - k['val_acc']):+.2f} val")
        if len(shared) < 2:
            line += " (one seed: differences under ~0.5 points are within seed noise)"
        lines.append(line)
    if rdms:
        lines.append("RDMs (frozen, test): " + ", ".join(
            f"R={r['R']:g}: acc {100 * r['test']['acc']:.2f}, "
            f"{r['test']['rate_bits']:.1f} bits" for r in rdms["rdms"]))
    return "\n".join(lines)


def plot_accuracy(agg: dict, teacher: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ms = [m for m, r in agg.items() if "skipped" not in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(ms))
    acc = [100 * agg[m]["test_acc"] for m in ms]
    err = [100 * agg[m]["test_acc_std"] for m in ms]
    several = any(len(agg[m]["seeds"]) > 1 for m in ms)
    ax.bar(xs, acc, yerr=err if several else None, capsize=4, color="tab:blue", label="test")
    ax.plot(xs, [100 * agg[m]["val_acc"] for m in ms], "k_", ms=20, mew=2, label="val")
    ax.axhline(100 * teacher["test_acc"], color="tab:red", ls=":",
               label=f"teacher {teacher['arch']} (test)")
    ax.set_xticks(list(xs), [f"{METHOD_LABELS.get(m, m)}\n{agg[m]['arch']}" for m in ms])
    lo = min(acc + [100 * agg[m]["val_acc"] for m in ms]) - 3
    ax.set_ylim(max(lo, 0), min(100, 100 * teacher["test_acc"] + 2))
    ax.set_ylabel("accuracy (%)")
    n = max(len(agg[m]["seeds"]) for m in ms)
    ax.set_title("student accuracy per method" + (f" (mean ± std, {n} seeds)" if several else ""))
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost(agg: dict, path: Path) -> None:
    """The paper's Figure 1: training cost per method, relative to KD, with
    accuracy against cost on the right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ms = [m for m, r in agg.items() if "skipped" not in r]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = list(range(len(ms)))
    rel = [agg[m].get("flops_rel_kd", float("nan")) for m in ms]
    bars = a1.bar(xs, rel, color="tab:gray")
    for b, r, m in zip(bars, rel, ms):
        a1.annotate(f"{r:.2f}x\n{agg[m]['train_time_s']:.0f}s", (b.get_x() + b.get_width() / 2,
                    b.get_height()), ha="center", va="bottom", fontsize=8)
    a1.set_xticks(xs, [METHOD_LABELS.get(m, m) for m in ms])
    finite = [r for r in rel if r == r]
    if finite:
        a1.set_ylim(0, 1.2 * max(finite))  # room for the labels
    a1.set_ylabel("training FLOPs relative to KD")
    a1.set_title("training cost (labels: x KD, train seconds)")
    for m in ms:
        r = agg[m]
        a2.errorbar(r.get("flops_rel_kd", float("nan")), 100 * r["test_acc"],
                    yerr=100 * r["test_acc_std"] if len(r["seeds"]) > 1 else None,
                    fmt="o", capsize=3, label=METHOD_LABELS.get(m, m))
    a2.set_xlabel("training FLOPs relative to KD")
    a2.set_ylabel("test accuracy (%)")
    a2.set_title("accuracy vs training cost")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(cfg: Config, overrides: Sequence[str] = (), *, overwrite: bool = False) -> dict:
    """Run (or resume) the demo; prints the table, writes results.json and
    the plots; returns results.json's contents (``complete`` False when
    stopped early by run.stop_after)."""
    from .distill import distill
    from .rdms import train_rdms
    from .teacher import train_teacher
    t_demo = time.perf_counter()
    out_dir = run_root(cfg) / "demo"
    from .rdms import rdm_run_dir
    from .teacher import teacher_run_dir
    walls = _WallTimes(out_dir / "wall_times.json")
    tcfg = teacher_config(cfg, overrides)
    was_done = (teacher_run_dir(tcfg) / "summary.json").is_file()
    teacher, w = _timed(lambda: train_teacher(tcfg, resume=True, overwrite=overwrite))
    if not teacher["complete"]:
        print("demo: stopped early (run.stop_after); run `cifd demo` again to continue")
        return {"complete": False}
    teacher["wall_s"] = walls.record("teacher", w, was_done and not overwrite)
    rdms = None
    if "cifd" in cfg.demo.methods:
        was_done = (rdm_run_dir(cfg) / "results.json").is_file()
        rdms, w = _timed(lambda: train_rdms(cfg, resume=True, overwrite=overwrite))
        if not rdms["complete"]:
            print("demo: stopped early (run.stop_after); run `cifd demo` again to continue")
            return {"complete": False}
        rdms["wall_s"] = walls.record("rdms", w, was_done and not overwrite)
    methods: dict = {m: {"runs": [], "wall_s": []} for m in cfg.demo.methods}
    # Method-major order (every seed of scratch, then of KD, ...): a study cut
    # short still has all seeds of the cheap methods.
    for m in cfg.demo.methods:
        for seed in cfg.demo.seeds:
            scfg = copy.deepcopy(cfg)
            scfg.train.seed = seed
            if m == "takd" and methods[m]["runs"] == [] and not _takd_done(scfg):
                elapsed = time.perf_counter() - t_demo
                est = sum(estimate_train_s(scfg if not cfg.takd.ta_epochs else
                                           apply_overrides(copy.deepcopy(scfg), [
                                               f"train.epochs={cfg.takd.ta_epochs}"]), a)
                          for a in cfg.takd.tas)
                # rank 0's timing decides for every rank (under torchrun)
                if broadcast_object(elapsed + est > cfg.demo.budget_s):
                    msg = (f"TA chain {'->'.join(cfg.takd.tas)} estimated {est:.0f}s; with "
                           f"{elapsed:.0f}s spent it would pass demo.budget_s="
                           f"{cfg.demo.budget_s:.0f}s")
                    print(f"demo: skipping TAKD: {msg}", flush=True)
                    methods[m]["skipped"] = msg
                    break
            from .teacher import student_run_dir
            key = f"{m}/s{seed}"
            was_done = (student_run_dir(scfg, m) / "summary.json").is_file()
            s, w = _timed(lambda: distill(scfg, m, resume=True, overwrite=overwrite))
            if not s["complete"]:
                print("demo: stopped early (run.stop_after); run `cifd demo` again to continue")
                return {"complete": False}
            w = walls.record(key, w, was_done and not overwrite)
            s["seed"], s["wall_s"] = seed, w
            if m == "cifd" and rdms is not None:  # the bank's wall time belongs to CIFD
                w += rdms["wall_s"] / len(cfg.demo.seeds)
            methods[m]["runs"].append(s)
            methods[m]["wall_s"].append(w)
    agg = summarize(methods)
    plots = {"accuracy": str(out_dir / "accuracy.png"), "cost": str(out_dir / "cost.png")}
    if context().is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_accuracy(agg, teacher, Path(plots["accuracy"]))
        plot_cost(agg, Path(plots["cost"]))
    if rdms is not None:
        plots["rd_curve"] = rdms["plot"]
    table = format_table(teacher, rdms, agg)
    wall = time.perf_counter() - t_demo
    results = {"complete": True, "table": table, "methods": agg, "runs": methods,
               "teacher": teacher, "rdms": rdms, "plots": plots, "wall_time_s": wall,
               "threads": torch.get_num_threads(), "processes": context().world_size,
               "config": cfg.demo.__dict__, "notes": __doc__.split("Costs. ")[1].strip()}
    if context().is_main:
        atomic_write_text(json.dumps(results, indent=2, default=str) + "\n",
                          out_dir / "results.json")
    barrier()
    print("\n" + table)
    print(f"\ndemo wall time {wall:.0f}s ({torch.get_num_threads()} threads); results "
          f"{out_dir / 'results.json'}; plots: " + ", ".join(plots.values()), flush=True)
    return results


class _WallTimes:
    """Wall seconds of each finished stage, kept in ``wall_times.json`` next to
    results.json, so that a demo run again (or resumed after an interruption)
    reports the time a stage took when it ran, not the seconds spent
    re-reading it. A stage interrupted and resumed counts only the piece after
    the resume (its ``train s`` column, summed from the per-epoch logs, stays
    whole)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                self.data = {str(k): float(v) for k, v in data.items()}
            except (OSError, ValueError, AttributeError, TypeError) as e:
                # only the table's wall-clock column reads it: measure again
                print(f"demo: warning: {path} is not a readable wall-time record "
                      f"({type(e).__name__}); wall times of finished stages are re-measured",
                      flush=True)

    def record(self, key: str, seconds: float, was_done: bool) -> float:
        if was_done and key in self.data:
            return self.data[key]
        self.data[key] = seconds
        if context().is_main:
            atomic_write_text(json.dumps(self.data, indent=2) + "\n", self.path)
        return seconds


def _takd_done(cfg: Config) -> bool:
    from .teacher import student_run_dir
    return (student_run_dir(cfg, "takd") / "summary.json").is_file()
