# SPDX-License-Identifier: Apache-2.0
"""The ``fortunes`` corpus: short texts filed under ~40 topics (Debian's
``fortunes`` package, ``/usr/share/games/fortunes/<topic>``).

A topic file holds entries separated by lines that are exactly ``%``. Each entry
is cleaned (overstrike sequences ``c\\b`` removed, whitespace runs collapsed to
one space), entries shorter than ``min_chars`` are dropped, and duplicates are
removed: a text filed under one topic several times is kept once, a text filed
under several topics is dropped (its label is ambiguous). Topics with fewer than
``min_per_topic`` entries left are dropped.

The split is a function of the text alone (the first 8 bytes of its SHA-1 modulo
100: ``< train_pct`` train, then ``val_pct`` validation, the rest test), so it does
not move when topics, filters or the package version change.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..data import DatasetFormatError, DatasetNotFoundError

DEFAULT_DIR = "/usr/share/games/fortunes"
INSTALL_HINT = "install the corpus with `sudo apt-get install fortunes` (Debian/Ubuntu)"
SPLITS = ("train", "val", "test")

# Readable descriptions of the topic files, embedded by the teacher as zero-shot
# class prototypes (a topic's file name alone, e.g. "knghtbrd" or "zippy", means
# little to a sentence encoder). Topics not listed use their name.
TOPIC_PROMPTS = {
    "art": "a quotation about art and artists",
    "ascii-art": "a picture drawn with ASCII characters",
    "computers": "a joke about computers and programming",
    "cookie": "a fortune cookie saying",
    "debian": "a quote about the Debian Linux distribution",
    "definitions": "a humorous dictionary definition of a word",
    "disclaimer": "a legal disclaimer",
    "drugs": "a quote about drugs and alcohol",
    "education": "a quote about education, school and teachers",
    "ethnic": "a joke or proverb about a nationality or ethnic group",
    "food": "a quote about food and eating",
    "fortunes": "a general fortune saying",
    "goedel": "a paradox about logic and self-reference",
    "humorists": "a witty quotation from a famous humorist",
    "kids": "a quote about children and kids",
    "knghtbrd": "a quote from an IRC chat about Linux hackers",
    "law": "a humorous law or rule, like Murphy's law",
    "linux": "a quote about Linux and its developers",
    "linuxcookie": "a quote about the Linux kernel and Linus Torvalds",
    "literature": "a quotation from literature and books",
    "love": "a quote about love and romance",
    "magic": "a quote about magic",
    "medicine": "a quote about medicine and doctors",
    "men-women": "a quote about men and women",
    "miscellaneous": "a miscellaneous witty saying",
    "news": "a funny newspaper headline",
    "paradoxum": "a paradoxical saying",
    "people": "a quote about people and human nature",
    "perl": "a quote about the Perl programming language",
    "pets": "a quote about pets, cats and dogs",
    "platitudes": "a platitude or cliche",
    "politics": "a quote about politics and government",
    "pratchett": "a quote from Terry Pratchett",
    "riddles": "a riddle with its answer",
    "science": "a quote about science and scientists",
    "songs-poems": "lines from a song or a poem",
    "sports": "a quote about sports",
    "startrek": "a quote from Star Trek",
    "tao": "a passage from the Tao of programming",
    "translate-me": "a sentence in a foreign language",
    "wisdom": "a wise saying",
    "work": "a quote about work and jobs",
    "zippy": "a surreal quote from Zippy the Pinhead",
}

_OVERSTRIKE = re.compile(".\x08")
_SPACE = re.compile(r"\s+")


@dataclass
class TextCorpus:
    """Texts, their topic labels and split names (parallel lists), and the topics
    (label ``k`` is ``topics[k]``, sorted by name)."""
    texts: list[str]
    labels: list[int]
    splits: list[str]
    topics: list[str]

    def indices(self, split: str) -> list[int]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        return [i for i, s in enumerate(self.splits) if s == split]

    def prompts(self) -> list[str]:
        """One zero-shot prompt per topic (:data:`TOPIC_PROMPTS`, else the name)."""
        return [TOPIC_PROMPTS.get(t, t.replace("-", " ")) for t in self.topics]


def clean_entry(text: str) -> str:
    """Overstrikes removed, whitespace collapsed, stripped."""
    while "\x08" in text:
        new = _OVERSTRIKE.sub("", text)
        if new == text:  # a leading backspace: drop it
            new = text.replace("\x08", "")
        text = new
    return _SPACE.sub(" ", text).strip()


def split_entries(raw: str) -> list[str]:
    """A fortune file's text -> its entries (separated by lines that are ``%``)."""
    entries, cur = [], []
    for line in raw.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    entries.append("\n".join(cur))
    return entries


def split_of(text: str, train_pct: int = 80, val_pct: int = 10) -> str:
    """The split of ``text`` from its SHA-1 (stable across runs and machines)."""
    h = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") % 100
    if h < train_pct:
        return "train"
    return "val" if h < train_pct + val_pct else "test"


def topic_files(root: Path) -> list[Path]:
    """The topic files under ``root``: regular files (or links to them) without the
    ``.dat`` index or ``.u8`` suffix, sorted by name."""
    out = []
    for p in sorted(root.iterdir()):
        if p.suffix in (".dat", ".u8") or p.name.startswith(".") or not p.is_file():
            continue
        out.append(p)
    return out


def load_fortunes(root: Optional[str] = None, *, exclude: Sequence[str] = ("ascii-art", "translate-me"),
                  min_per_topic: int = 50, min_chars: int = 10, train_pct: int = 80,
                  val_pct: int = 10) -> TextCorpus:
    """Read, clean, deduplicate and split the corpus (module docstring).

    Raises :class:`DatasetNotFoundError` (naming the install command) when ``root``
    has no topic files, :class:`DatasetFormatError` when nothing usable is left.
    """
    if min_per_topic < 1 or min_chars < 0:
        raise ValueError(f"min_per_topic must be >= 1 and min_chars >= 0, got {min_per_topic}, {min_chars}")
    if not (0 < train_pct and 0 <= val_pct and train_pct + val_pct < 100):
        raise ValueError(f"train_pct, val_pct must leave a test split: got {train_pct}, {val_pct}")
    path = Path(root or DEFAULT_DIR)
    if not path.is_dir():
        raise DatasetNotFoundError(f"fortunes corpus not found at {path}: {INSTALL_HINT}, or set "
                                   f"data.dir to a folder of fortune files")
    files = [p for p in topic_files(path) if p.name not in set(exclude)]
    if not files:
        raise DatasetNotFoundError(f"no fortune files in {path}: {INSTALL_HINT}, or set data.dir")
    owner: dict[str, set[str]] = {}
    for p in files:
        try:
            raw = p.read_bytes().decode("utf-8", errors="replace")
        except OSError as e:
            raise DatasetFormatError(f"{p}: cannot be read ({e.strerror or e})") from None
        for entry in split_entries(raw):
            t = clean_entry(entry)
            if len(t) >= min_chars:
                owner.setdefault(t, set()).add(p.name)
    by_topic: dict[str, list[str]] = {}
    for t, names in owner.items():
        if len(names) == 1:
            by_topic.setdefault(next(iter(names)), []).append(t)
    topics = sorted(n for n, ts in by_topic.items() if len(ts) >= min_per_topic)
    if len(topics) < 2:
        raise DatasetFormatError(f"{path}: fewer than 2 topics with >= {min_per_topic} entries; "
                                 f"not a fortunes corpus? ({INSTALL_HINT})")
    texts, labels, splits = [], [], []
    for k, name in enumerate(topics):
        for t in sorted(by_topic[name]):
            texts.append(t)
            labels.append(k)
            splits.append(split_of(t, train_pct, val_pct))
    return TextCorpus(texts, labels, splits, topics)
