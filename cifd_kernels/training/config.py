# SPDX-License-Identifier: Apache-2.0
"""Configuration: YAML files into dataclasses, dotted command-line overrides.

One schema (:class:`Config`) serves every command; a command reads the
sections it needs. ``model`` is the network a command trains (the teacher for
``train-teacher``, the student for ``distill``); ``teacher`` names the frozen
teacher that ``distill`` and ``train-rdms`` read. Example::

    cfg = load_config("fmnist_teacher", ["train.epochs=3", "data.dir=/x"])

Unknown keys and values of the wrong type raise :class:`ConfigError` naming the
dotted key. :func:`config_hash` fingerprints the sections that determine a
run's result (not paths, devices or progress bars); checkpoints store it, and
resuming from a checkpoint with another hash is refused.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid."""


def _choice(*choices: str, default: str) -> Any:
    return field(default=default, metadata={"choices": choices})


@dataclass
class DataConfig:
    name: str = _choice("fashion_mnist", "cifar100", "imagefolder", default="fashion_mnist")
    dir: str = ""                 # "" = the dataset's default directory
    val_size: int = 5000          # carved from the training set for model selection
    train_size: int = 0           # > 0: train on a fixed subset of this many (demo budgets)
    split_seed: int = 0
    augment: bool = True          # random crop (zero padding) + horizontal flip
    crop_padding: int = 2
    hflip: bool = True
    batch_size: int = 128
    eval_batch_size: int = 1000
    num_workers: int = 4          # imagefolder only
    image_size: int = 224         # imagefolder only


@dataclass
class ModelConfig:
    arch: str = "cnn10"           # see models.ARCHS
    embed_dim: int = 0            # torchvision nets: projection width; 0 = native


@dataclass
class TeacherConfig:
    arch: str = "cnn10"
    embed_dim: int = 0
    checkpoint: str = ""          # "" = <out_dir>/<name>/teacher/model.pt


@dataclass
class TrainConfig:
    epochs: int = 5
    optimizer: str = _choice("sgd", "adamw", default="sgd")
    lr: float = 0.1               # peak learning rate
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = _choice("cosine", "step", "constant", default="cosine")
    warmup_epochs: float = 0.0    # linear warm-up, fractions allowed
    milestones: list[int] = field(default_factory=list)  # step schedule, in epochs
    gamma: float = 0.1
    label_smoothing: float = 0.0
    seed: int = 0
    channels_last: bool = True


@dataclass
class KDConfig:
    """Hinton KD: ``lam_ce * CE + lam_kl * tau^2 * KL(p_T || p_S)``."""
    tau: float = 2.0
    lam_ce: float = 1.0
    lam_kl: float = 1.0


@dataclass
class RDMConfig:
    """Stage 1 (CIFD section 2): ``train-rdms`` trains ``len(rates)`` RDMs at once
    (one :class:`cifd_kernels.RDMBank`) on the cached teacher outputs."""
    rates: list[float] = field(default_factory=lambda: [1.0, 0.8, 0.6])  # R per RDM
    hidden: int = 0               # H; 0 = D
    latent: int = 0               # L; 0 = H
    distortion: str = _choice("mse", "smooth_l1", default="mse")
    lam_ce: float = 1.0
    lam_kl: float = 1.0
    tau: float = 2.0              # stage-1 KL temperature (the paper gives none)
    epochs: int = 30
    lr: float = 1e-3              # Adam, cosine to 0 over the epochs
    aux_lr: float = 1e-3          # Adam on the entropy model's quantiles (aux loss)
    batch_size: int = 256
    seed: int = 0


@dataclass
class CIFDConfig:
    """Stage 2 (CIFD sections 3-4): ``distill --method cifd``. KD-side weights
    (tau, lam_ce, lam_kl) come from the ``kd`` section; the distortion from
    ``rdm.distortion``."""
    p_drop: float = 0.25
    w_emb: float = 100.0          # the paper's units: a weight on the mean-squared error
                                  # over the D features (F.mse_loss), i.e. the loss term is
                                  # (w_emb / D) * dist (docs/METHOD.md section 4)
    emb_normalize: bool = False   # instead divide w_emb by E||X||^2 (the teacher's mean
                                  # squared embedding norm on train): scale-free terms
    lam_rdm: float = 1.0          # lam_n of every RDM target (the teacher's is 1)
    lam_I: float = 0.005
    ibm_rho: float = 0.0          # IBM mask drop probability (0 = the paper's IBM)
    ibm_s: float = 1.0            # IBM noise scale
    decoder_layers: int = 1       # U = Linear(D_s, D) (1) or Linear-ReLU-Linear (2)
    bank: str = ""                # "" = <out_dir>/<name>/rdms/bank.pt


@dataclass
class TAKDConfig:
    """``distill --method takd``: KD down a chain of teacher assistants."""
    tas: list[str] = field(default_factory=lambda: ["cnn8", "cnn6", "cnn4"])
    ta_epochs: int = 0            # 0 = train.epochs


@dataclass
class DemoConfig:
    """``cifd demo``: teacher, RDMs, then students by each method and seed."""
    teacher_config: str = "fmnist_teacher"
    teacher_epochs: int = 0       # 0 = the teacher config's train.epochs
    teacher_train_size: int = -1  # the teacher's training images: -1 = the students'
                                  # data.train_size, 0 = all of them
    methods: list[str] = field(default_factory=lambda: ["scratch", "kd", "cifd", "takd"])
    seeds: list[int] = field(default_factory=lambda: [0])
    budget_s: float = 600.0       # TAKD is skipped when its estimate would overrun this


@dataclass
class StudyConfig:
    """``cifd study`` (training/study.py): a sweep on one seed chosen on validation,
    then arms x seeds compared on test as paired differences against ``baseline``.
    An arm is ``"NAME METHOD [KEY=VALUE ...]"``; in ``arms``, ``"NAME METHOD @best"``
    takes the overrides of the sweep entry of that method with the best val acc."""
    teacher_config: str = "fmnist_teacher"
    teacher_train_size: int = 0   # the teacher's training images (0 = all); students
                                  # use data.train_size
    teacher_epochs: int = 0       # 0 = the teacher config's train.epochs
    sweep: list[str] = field(default_factory=list)
    sweep_seed: int = 0
    arms: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    baseline: str = "kd"          # the arm that paired differences are taken against
    jobs: int = 2                 # runs side by side, one thread each


@dataclass
class RunConfig:
    name: str = "fmnist"
    out_dir: str = "runs"
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    threads: int = 0              # torch intra-op threads; 0 = torch's default
    progress: bool = True         # tqdm bars (also off when stderr is not a tty)
    stop_after: int = 0           # stop after this many epochs in this invocation
                                  # (time-limited jobs; continue with --resume); 0 = no
    dist_timeout_s: float = 1800.0  # torchrun: limit of every collective, including
                                    # waits for rank 0 (caches, the RDM bank)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    rdm: RDMConfig = field(default_factory=RDMConfig)
    cifd: CIFDConfig = field(default_factory=CIFDConfig)
    takd: TAKDConfig = field(default_factory=TAKDConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    run: RunConfig = field(default_factory=RunConfig)


# Keys that do not change a run's result: left out of config_hash.
UNHASHED = frozenset({"data.dir", "data.eval_batch_size", "data.num_workers",
                      "teacher.checkpoint", "cifd.bank", "run.name", "run.out_dir", "run.device",
                      "run.threads", "run.progress", "run.stop_after",
                      "run.dist_timeout_s"})


# ------------------------------------------------------------------ coercion
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """``value`` (from YAML or a command-line string) as type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (list, Sequence):
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError as e:
                    where = getattr(e, "problem", None) or type(e).__name__
                    raise ConfigError(f"{key}: {text!r} is not a YAML list ({where}); quote items "
                                      f"that hold brackets or commas: '[\"a b=[1]\", c]'") from None
            else:
                value = [v for v in text.split(",") if v.strip()] if text else []
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a schema bug


def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(prefix: str, name: str, known: Iterable[str]) -> ConfigError:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {prefix + name!r}{hint}; known keys: "
                       f"{', '.join(prefix + k for k in known)}")


def _set(obj, prefix: str, parts: list[str], value: Any) -> None:
    """Set ``parts`` (a dotted key split, below ``prefix``) on dataclass ``obj``."""
    name, rest = parts[0], parts[1:]
    fields = _fields(obj)
    if name not in fields:
        raise _unknown(prefix, name, fields)
    key = prefix + name
    current = getattr(obj, name)
    if dataclasses.is_dataclass(current):
        if rest:
            _set(current, key + ".", rest, value)
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: is a section; set its keys ({key}.<key>=...)")
        for k, v in value.items():
            _set(current, key + ".", [str(k)], v)
        return
    if rest:
        raise ConfigError(f"unknown config key {key + '.' + '.'.join(rest)!r}: {key!r} "
                          f"is a value, not a section")
    v = _coerce(key, _hints(type(obj))[name], value)
    choices = fields[name].metadata.get("choices")
    if choices and v not in choices:
        raise ConfigError(f"{key}: {v!r} is not one of {', '.join(choices)}")
    setattr(obj, name, v)


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set dotted ``key`` (``"train.epochs"``) to ``value``, coerced and checked."""
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"bad config key {key!r}")
    _set(cfg, "", key.split("."), value)


def merge_dict(cfg: Config, d: dict, prefix: str = "") -> Config:
    """Apply a nested mapping (a parsed YAML file) onto ``cfg``."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(d).__name__}")
    for k, v in d.items():
        set_key(cfg, f"{prefix}{k}", v)
    return cfg


def parse_override(text: str) -> tuple[str, str]:
    """``"train.epochs=3"`` -> ``("train.epochs", "3")``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value "
                          f"(e.g. train.epochs=3)")
    key, value = text.split("=", 1)
    return key.strip(), value


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    for text in overrides:
        key, value = parse_override(text)
        set_key(cfg, key, value)
    return cfg


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a packaged config (``fmnist_teacher``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    packaged = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} not found: not a file, nor one of the "
                      f"packaged configs ({', '.join(packaged)})")


# (dotted key, test, what it must be): values that type coercion lets through
# but no run can use; checked by validate() so that the error names the key
# instead of surfacing as a traceback deep in a run.
_RULES = [
    ("data.val_size", lambda v: v >= 0, ">= 0"),
    ("data.train_size", lambda v: v >= 0, ">= 0 (0 = the whole training split)"),
    ("data.crop_padding", lambda v: v >= 0, ">= 0"),
    ("data.batch_size", lambda v: v >= 1, ">= 1"),
    ("data.eval_batch_size", lambda v: v >= 1, ">= 1"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    ("data.image_size", lambda v: v >= 8, ">= 8"),
    ("model.embed_dim", lambda v: v >= 0, ">= 0"),
    ("teacher.embed_dim", lambda v: v >= 0, ">= 0"),
    ("train.epochs", lambda v: v >= 1, ">= 1"),
    ("train.lr", lambda v: v > 0, "> 0"),
    ("train.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.weight_decay", lambda v: v >= 0, ">= 0"),
    ("train.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("train.milestones", lambda v: all(m >= 0 for m in v), "epochs >= 0"),
    ("train.gamma", lambda v: v > 0, "> 0"),
    ("train.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("kd.tau", lambda v: v > 0, "> 0"),
    ("kd.lam_ce", lambda v: v >= 0, ">= 0"),
    ("kd.lam_kl", lambda v: v >= 0, ">= 0"),
    ("rdm.rates", lambda v: len(v) > 0 and all(r > 0 for r in v),
     "a non-empty list of R > 0, one per RDM (e.g. [1,0.3,0.1])"),
    ("rdm.hidden", lambda v: v >= 0, ">= 0 (0 = the teacher's width)"),
    ("rdm.latent", lambda v: v >= 0, ">= 0 (0 = rdm.hidden)"),
    ("rdm.tau", lambda v: v > 0, "> 0"),
    ("rdm.epochs", lambda v: v >= 1, ">= 1"),
    ("rdm.lr", lambda v: v > 0, "> 0"),
    ("rdm.aux_lr", lambda v: v >= 0, ">= 0"),
    ("rdm.batch_size", lambda v: v >= 1, ">= 1"),
    ("cifd.p_drop", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("cifd.w_emb", lambda v: v >= 0, ">= 0"),
    ("cifd.lam_rdm", lambda v: v >= 0, ">= 0"),
    ("cifd.lam_I", lambda v: v >= 0, ">= 0"),
    ("cifd.ibm_rho", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("cifd.ibm_s", lambda v: v > 0, "> 0"),
    ("cifd.decoder_layers", lambda v: v in (1, 2), "1 or 2"),
    ("takd.ta_epochs", lambda v: v >= 0, ">= 0 (0 = train.epochs)"),
    ("demo.seeds", lambda v: len(v) > 0, "a non-empty list"),
    ("demo.teacher_train_size", lambda v: v >= -1, ">= -1 (-1 = data.train_size, 0 = all)"),
    ("study.teacher_train_size", lambda v: v >= 0, ">= 0 (0 = the whole training split)"),
    ("study.teacher_epochs", lambda v: v >= 0, ">= 0 (0 = the teacher config's)"),
    ("study.seeds", lambda v: len(v) > 0 and len(set(v)) == len(v), "a non-empty list of distinct seeds"),
    ("study.jobs", lambda v: v >= 1, ">= 1"),
    ("run.threads", lambda v: v >= 0, ">= 0 (0 = torch's default)"),
    ("run.stop_after", lambda v: v >= 0, ">= 0"),
    ("run.dist_timeout_s", lambda v: v > 0, "> 0"),
]


def validate(cfg: Config) -> Config:
    """Raise :class:`ConfigError`, naming the key, for a value no run can use:
    out of range (:data:`_RULES`), an unknown architecture or method."""
    from .models import ARCHS, CNN_STAGES
    flat = flatten(to_dict(cfg))
    for key, ok, what in _RULES:
        if not ok(flat[key]):
            raise ConfigError(f"{key}: {flat[key]!r} must be {what}")
    for key in ("model.arch", "teacher.arch"):
        if flat[key] not in ARCHS:
            close = difflib.get_close_matches(flat[key], ARCHS, n=1)
            raise ConfigError(f"{key}: unknown architecture {flat[key]!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; known: {', '.join(ARCHS)}")
    for key in ("model", "teacher"):
        if flat[f"{key}.arch"] in CNN_STAGES and flat[f"{key}.embed_dim"]:
            raise ConfigError(f"{key}.embed_dim: {flat[key + '.arch']} has a fixed width; "
                              f"leave it 0")
    for i, a in enumerate(cfg.takd.tas):
        if a not in ARCHS:
            raise ConfigError(f"takd.tas[{i}]: unknown architecture {a!r}; known: "
                              f"{', '.join(ARCHS)}")
    methods = ("scratch", "kd", "takd", "cifd")
    for i, m in enumerate(cfg.demo.methods):
        if m not in methods:
            raise ConfigError(f"demo.methods[{i}]: unknown method {m!r}; known: "
                              f"{', '.join(methods)}")
    return cfg


def read_config_file(name_or_path: str) -> tuple[Path, dict]:
    """``(path, mapping)`` of a YAML config (a path or a packaged name); a file that
    cannot be read, is not YAML text or is not a mapping raises :class:`ConfigError`
    naming it."""
    path = resolve_config_path(name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a valid YAML text file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); fix or replace it") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data:, train:, ...), "
                          f"got {type(d).__name__}")
    return path, d


def load_config(name_or_path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then ``overrides`` in order;
    checked by :func:`validate`."""
    cfg = Config()
    if name_or_path:
        path, d = read_config_file(name_or_path)
        if d.get("recipe") == "text":
            raise ConfigError(f"{path}: a text recipe (recipe: text); run it with `cifd demo -c "
                              f"{name_or_path}` or `cifd study -c {name_or_path}`")
        try:
            merge_dict(cfg, d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return validate(apply_overrides(cfg, overrides))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    return merge_dict(Config(), d)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def hashed_items(cfg: Config, sections: Sequence[str]) -> dict[str, Any]:
    """The (dotted key -> value) pairs of ``sections`` that config_hash covers."""
    d = to_dict(cfg)
    out = {}
    for s in sections:
        if s not in d:
            raise ConfigError(f"unknown config section {s!r}")
        for k, v in flatten(d[s], f"{s}.").items():
            if k not in UNHASHED:
                out[k] = v
    return out


def config_hash(cfg: Config, sections: Sequence[str], extra: dict | None = None) -> str:
    """sha256 (16 hex chars) of the result-determining keys of ``sections``,
    plus ``extra`` (e.g. the method, the teacher's weights hash)."""
    payload = {"config": hashed_items(cfg, sections), "extra": extra or {}}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def diff_items(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable differences between two hashed_items() dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}")
    return out
