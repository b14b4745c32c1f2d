# SPDX-License-Identifier: Apache-2.0
"""``cifd`` command line: train teachers and students, evaluate, cache.

    cifd train-teacher [-c CONFIG] [KEY=VALUE ...]      # default config: fmnist_teacher
    cifd distill --method {scratch,kd,takd,cifd} [-c CONFIG] [KEY=VALUE ...]
    cifd train-rdms [-c CONFIG] [KEY=VALUE ...]          # stage 1 of CIFD: the RDM bank
    cifd cache-teacher [-c CONFIG] [--splits train,val,test] [KEY=VALUE ...]
    cifd eval MODEL_OR_RUN_DIR [--split test] [KEY=VALUE ...]
    cifd demo [-c CONFIG] [KEY=VALUE ...]  # teacher, RDMs, scratch/KD/CIFD/TAKD, table
    cifd study [-c CONFIG] [KEY=VALUE ...] # sweep on one seed (val), paired arms x seeds (test)
    cifd demo -c text_minilm               # the text recipes (``recipe: text`` configs:
    cifd study -c text_topics              # text_minilm, text_topics; training/text/)

CONFIG is a YAML file or a packaged config name (fmnist_teacher,
fmnist_student, fmnist_demo, fmnist_full, cifar100_teacher, cifar100_student). KEY=VALUE overrides use
dotted keys: ``train.epochs=3 data.dir=/data/fmnist run.threads=2``.
``--data-dir``, ``--out-dir``, ``--threads``, ``--device`` and
``--no-progress`` are shorthands for data.dir, run.out_dir, run.threads,
run.device and run.progress=false. Runs go to ``<run.out_dir>/<run.name>/``
(teacher/, rdms/, scratch_<arch>/, kd_<arch>/, cifd_<arch>/, takd_ta<i>_<arch>/,
takd_<arch>/, demo/; students of train.seed != 0 end in _s<seed>); ``--resume`` continues a run from its
last checkpoint, ``--overwrite`` starts it again.

Data parallel: ``torchrun --nproc_per_node=N -m cifd_kernels {train-teacher,
distill, train-rdms, demo} ...`` runs N processes (gloo on CPUs, nccl on
GPUs; data.batch_size stays the global batch); rank 0 prints and writes.
See :mod:`cifd_kernels.training.distributed`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .config import ConfigError, load_config

DEFAULT_CONFIGS = {"train-teacher": "fmnist_teacher", "distill": "fmnist_student",
                   "train-rdms": "fmnist_student", "cache-teacher": "fmnist_student",
                   "demo": "fmnist_demo", "study": "fmnist_study"}


def _common(p: argparse.ArgumentParser, *, config: bool = True, run: bool = True) -> None:
    if config:
        p.add_argument("-c", "--config", default=None,
                       help="YAML file or packaged config name (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. train.epochs=3 data.dir=/x")
    p.add_argument("--data-dir", help="dataset directory (data.dir)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (run.threads)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (run.device)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    if run:
        p.add_argument("--out-dir", help="root of run directories (run.out_dir)")
        p.add_argument("--resume", action="store_true",
                       help="continue from the run's last checkpoint")
        p.add_argument("--overwrite", action="store_true",
                       help="start the run again, replacing an existing checkpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cifd", description="CIFD knowledge distillation recipes",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    parser.add_argument("--traceback", action="store_true",
                        help="on a user error (config, data, checkpoint, ...), raise with the "
                             "traceback instead of the one-line message (may stand anywhere)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-teacher", help="train the teacher (cross-entropy)")
    _common(p)
    p = sub.add_parser("distill", help="train a student: scratch, kd, takd or cifd")
    p.add_argument("--method", required=True, choices=("scratch", "kd", "takd", "cifd"))
    p.add_argument("--teacher", help="teacher model.pt or run directory (teacher.checkpoint)")
    _common(p)
    p = sub.add_parser("train-rdms", help="stage 1 of CIFD: train the RDM bank on the "
                                          "cached teacher outputs")
    p.add_argument("--teacher", help="teacher model.pt or run directory (teacher.checkpoint)")
    _common(p)
    p = sub.add_parser("cache-teacher", help="compute (or verify) the cached teacher "
                                             "embeddings and logits")
    p.add_argument("--teacher", help="teacher model.pt or run directory (teacher.checkpoint)")
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits")
    p.add_argument("--refresh", action="store_true", help="recompute even if valid")
    _common(p, run=False)
    p.add_argument("--out-dir", help="root of run directories (run.out_dir)")
    p = sub.add_parser("eval", help="accuracy of a saved model on a split")
    p.add_argument("model", help="a model.pt, or a run directory holding one")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    _common(p, config=False, run=False)
    p = sub.add_parser("download-data", help="download Fashion-MNIST from the official release, "
                                             "checksums verified")
    p.add_argument("--data-dir", required=True, help="where to put the four IDX .gz files")
    p.add_argument("--url", default=None, help="base URL (default: the official release)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p = sub.add_parser("demo", help="Fashion-MNIST: teacher, RDMs, students by every method, "
                                    "comparison table and plots")
    _common(p)
    p = sub.add_parser("study", help="CIFD against KD, TAKD and controls: a sweep on one seed "
                                     "chosen on validation, then paired seeds on test")
    _common(p)
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    if getattr(args, "data_dir", None):
        out.append(f"data.dir={args.data_dir}")
    if getattr(args, "out_dir", None):
        out.append(f"run.out_dir={args.out_dir}")
    if getattr(args, "threads", None) is not None:
        out.append(f"run.threads={args.threads}")
    if getattr(args, "device", None):
        out.append(f"run.device={args.device}")
    if getattr(args, "no_progress", False):
        out.append("run.progress=false")
    if getattr(args, "teacher", None):
        out.append(f"teacher.checkpoint={args.teacher}")
    return out


def _start(cfg) -> None:
    """Join the torchrun process group, if any; quiet the ranks other than 0
    (their stdout goes nowhere, no progress bars; errors still reach stderr)."""
    from .distributed import init_from_env
    ctx = init_from_env(cfg.run.device, cfg.run.dist_timeout_s)
    if not ctx.is_main:
        cfg.run.progress = False
        sys.stdout = open(os.devnull, "w")


def _single_process_only(command: str) -> None:
    from .distributed import DistributedSetupError, env_world
    env = env_world()
    if env is not None and env["WORLD_SIZE"] > 1:
        raise DistributedSetupError(f"`cifd {command}` runs in one process: launch it "
                                    f"without torchrun")


def _cmd_train_teacher(args) -> int:
    from .teacher import train_teacher
    cfg = load_config(args.config or DEFAULT_CONFIGS["train-teacher"], _overrides(args))
    _start(cfg)
    train_teacher(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


def _cmd_distill(args) -> int:
    from .distill import distill
    cfg = load_config(args.config or DEFAULT_CONFIGS["distill"], _overrides(args))
    _start(cfg)
    distill(cfg, args.method, resume=args.resume, overwrite=args.overwrite)
    return 0


def _cmd_train_rdms(args) -> int:
    from .rdms import train_rdms
    cfg = load_config(args.config or DEFAULT_CONFIGS["train-rdms"], _overrides(args))
    _start(cfg)
    train_rdms(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


def _cmd_cache_teacher(args) -> int:
    from .engine import select_device, set_threads
    from .teacher import default_teacher_checkpoint, load_data, load_model_file, teacher_outputs
    _single_process_only("cache-teacher")
    cfg = load_config(args.config or DEFAULT_CONFIGS["cache-teacher"], _overrides(args))
    set_threads(cfg.run.threads)
    device = select_device(cfg.run.device)
    model, meta = load_model_file(default_teacher_checkpoint(cfg), device)
    ds = load_data(cfg)
    cache_dir = Path(meta["path"]).parent / "cache"
    for split in [s.strip() for s in args.splits.split(",") if s.strip()]:
        out = teacher_outputs(model, meta["arch"], ds, split, cache_dir,
                              batch_size=cfg.data.eval_batch_size,
                              num_workers=cfg.data.num_workers, device=device,
                              refresh=args.refresh)
        acc = (out.logits.argmax(1) == out.labels).float().mean().item()
        print(f"{split}: embeddings {tuple(out.embeddings.shape)} logits "
              f"{tuple(out.logits.shape)} acc {acc:.4f} "
              f"({'valid cache' if out.from_cache else 'computed'}) -> "
              f"{cache_dir / f'teacher_outputs_{split}.pt'}")
    return 0


def _cmd_eval(args) -> int:
    from .config import from_dict, apply_overrides
    from .engine import evaluate, select_device, set_threads
    from .teacher import load_data, load_model_file, make_iterator, prepare_model
    _single_process_only("eval")
    model, meta = load_model_file(args.model, "cpu")
    # The model file's own config says how its data were split and normalised.
    cfg = apply_overrides(from_dict(meta["config"]), _overrides(args))
    set_threads(cfg.run.threads)
    device = select_device(args.device or "auto")  # not the training machine's
    model = prepare_model(cfg, model, device)
    ds = load_data(cfg)
    res = evaluate(model, make_iterator(cfg, ds, args.split, device, train=False),
                   progress=cfg.run.progress)
    print(json.dumps({"model": meta["path"], "arch": meta["arch"], "split": args.split,
                      "acc": res["acc"], "loss": res["loss"], "n": res["n"]}))
    return 0


def _cmd_download_data(args) -> int:
    from .data import FASHION_MNIST_URL, download_fashion_mnist
    _single_process_only("download-data")
    dest = download_fashion_mnist(args.data_dir, base_url=args.url or FASHION_MNIST_URL,
                                  timeout=args.timeout)
    print(f"Fashion-MNIST in {dest} (checksums verified); use --data-dir {dest}")
    return 0


def _text_overrides(args: argparse.Namespace) -> list[str]:
    """Overrides for a text recipe: it runs on the CPU, without progress bars, so
    ``--device`` (other than cpu/auto) is refused and ``--no-progress`` is moot."""
    dev = getattr(args, "device", None)
    if dev and dev not in ("cpu", "auto"):
        raise ConfigError(f"--device {dev}: the text recipes run on the CPU (their students "
                          f"are bag-of-word-piece models of ~1M parameters)")
    if getattr(args, "teacher", None):
        raise ConfigError("--teacher: a text recipe's teacher is teacher.model (a model folder)")
    return [o for o in _overrides(args) if not o.startswith(("run.device=", "run.progress="))]


def _cmd_text(args) -> int:
    from .text.config import load_text_config
    from .text.recipe import run_text
    _single_process_only(args.command)  # it starts its own processes (study.jobs)
    cfg = load_text_config(args.config, _text_overrides(args))
    run_text(cfg)
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    from .text.config import is_text_config
    if is_text_config(args.config):
        return _cmd_text(args)
    overrides = _overrides(args)
    cfg = load_config(args.config or DEFAULT_CONFIGS["demo"], overrides)
    _start(cfg)
    run_demo(cfg, overrides, overwrite=args.overwrite)
    return 0


def _cmd_study(args) -> int:
    from .study import run_study
    from .text.config import is_text_config
    if is_text_config(args.config):
        return _cmd_text(args)
    _single_process_only("study")  # it starts its own processes (study.jobs)
    if args.overwrite:
        raise ConfigError("cifd study always resumes (finished runs are read back): to start "
                          "again, delete <run.out_dir>/<run.name>/study")
    overrides = _overrides(args)
    config = args.config or DEFAULT_CONFIGS["study"]
    cfg = load_config(config, overrides)
    run_study(cfg, config, overrides)
    return 0


COMMANDS = {"train-teacher": _cmd_train_teacher, "distill": _cmd_distill,
            "train-rdms": _cmd_train_rdms, "cache-teacher": _cmd_cache_teacher,
            "eval": _cmd_eval, "demo": _cmd_demo, "download-data": _cmd_download_data,
            "study": _cmd_study}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse a command line; KEY=VALUE overrides may come before, between or
    after the options (``distill --teacher T cifd.bank=B --resume``), which
    argparse's one positional list alone would refuse after an option."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    traceback = "--traceback" in argv  # a global option, taken wherever it stands
    args, rest = parser.parse_known_args([a for a in argv if a != "--traceback"])
    args.traceback = traceback
    bad = [r for r in rest if r.startswith("-") or "=" not in r]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if rest:
        args.overrides = list(getattr(args, "overrides", [])) + rest
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``cifd`` and ``python -m cifd_kernels <command>``.
    Returns the exit status (0 ok, 2 for a usage, config, data, checkpoint,
    damaged-file or torchrun-environment error, which is printed on one line
    without a traceback unless ``--traceback`` is given)."""
    from .data import DatasetFormatError, DatasetNotFoundError
    from .distill import NotWiredError
    from .distributed import DistributedSetupError, context
    from .engine import CheckpointMismatchError, RunFileError
    args = parse_args(argv)
    stdout = sys.stdout
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DatasetNotFoundError, DatasetFormatError, CheckpointMismatchError,
            RunFileError, NotWiredError, DistributedSetupError, FileExistsError,
            FileNotFoundError) as e:
        if args.traceback:
            raise
        rank = context().rank
        where = f" (rank {rank})" if rank else ""
        msg = " ".join(str(e).split())  # one line
        print(f"cifd {args.command}: error{where}: {msg}", file=sys.stderr)
        return 2
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout


if __name__ == "__main__":
    sys.exit(main())
