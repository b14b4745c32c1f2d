# SPDX-License-Identifier: Apache-2.0
"""``cifd study``: arm parsing and checks, the paired statistics, and the whole
study end to end (teacher, bank, sweep chosen on validation, paired final arms)
on the tiny synthetic Fashion-MNIST."""
import json
import math

import pytest

from cifd_kernels.training import study
from cifd_kernels.training.config import ConfigError, load_config


def test_parse_arm_forms():
    a = study.parse_arm("kd_t4 kd kd.tau=4", "x")
    assert (a.name, a.method, a.overrides, a.best) == ("kd_t4", "kd", ("kd.tau=4",), False)
    b = study.parse_arm("c cifd @best cifd.lam_rdm=0", "x")
    assert b.best and b.overrides == ("cifd.lam_rdm=0",)
    assert study.resolved(b, {"cifd": ["cifd.w_emb=1"]}) == ["cifd.w_emb=1", "cifd.lam_rdm=0"]
    assert study.resolved(a, {"kd": ["kd.tau=9"]}) == ["kd.tau=4"]  # not @best: its own only


@pytest.mark.parametrize("spec,match", [
    ("lonely", "NAME METHOD"),
    ("a distil", "method must be one of"),
    ("a kd tau4", "not KEY=VALUE"),
    ("a/b kd", "arm name"),
])
def test_parse_arm_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        study.parse_arm(spec, "study.arms[0]")


def _cfg(sweep, arms, baseline="kd"):
    cfg = load_config("fmnist_study")
    cfg.study.sweep, cfg.study.arms, cfg.study.baseline = sweep, arms, baseline
    return cfg


def test_arms_checked_before_anything_runs():
    with pytest.raises(ConfigError, match="unique"):
        study.arms_of(_cfg(["a kd", "a kd kd.tau=3"], []))
    with pytest.raises(ConfigError, match="no cifd entry"):
        study.arms_of(_cfg(["a kd"], ["kd kd", "c cifd @best"]))
    with pytest.raises(ConfigError, match="baseline 'kd' is not one of"):
        study.arms_of(_cfg([], ["k2 kd"]))
    with pytest.raises(ConfigError, match="kd.tua"):  # an unknown key fails up front
        study.arms_of(_cfg([], ["kd kd kd.tua=3"]))
    with pytest.raises(ConfigError, match="kd.tau"):  # and so does a value out of range
        study.arms_of(_cfg([], ["kd kd kd.tau=-1"]))


def test_shipped_study_config_is_valid():
    sweep, final = study.arms_of(load_config("fmnist_study"))
    assert {a.method for a in sweep} == {"kd", "cifd"}
    assert [a.name for a in final if a.best] == ["kd_best", "cifd_best", "cifd_nordm"]


def test_paired_interval():
    # diffs 1, 2, 3: mean 2, sd 1, half-width t_{0.975,2} / sqrt(3)
    p = study.paired([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert p["n"] == 3 and p["mean"] == 2.0 and p["sd"] == 1.0
    assert math.isclose(p["hi"] - p["mean"], 4.303 / math.sqrt(3), rel_tol=1e-12)
    assert study.t975(4) == 2.776 and study.t975(1000) == 1.96
    one = study.paired([1.0], [0.5])
    assert one["mean"] == 0.5 and math.isnan(one["lo"])


def test_study_end_to_end(fake_dir, tmp_path, capsys):
    ov = [f"data.dir={fake_dir}", f"run.out_dir={tmp_path}", "data.val_size=40",
          "data.train_size=100", "data.batch_size=32", "train.epochs=1", "train.lr=0.05",
          "teacher.arch=cnn4", "rdm.epochs=1", "rdm.batch_size=64", "rdm.rates=[1.0,0.3]",
          "rdm.latent=8", "takd.tas=[cnn4]", "takd.ta_epochs=1", "study.teacher_epochs=1",
          "study.seeds=[0,1]"]
    cfg = load_config("fmnist_study", ov)
    cfg.study.sweep = ["kd_a kd", "c_a cifd", "c_b cifd cifd.w_emb=1 rdm.rates=[1.0]"]
    cfg.study.arms = ["kd_best kd @best", "cifd_best cifd @best", "nordm cifd @best cifd.lam_rdm=0"]
    cfg.study.baseline = "kd_best"
    res = study.run_study(cfg, "fmnist_study", ov)
    root = tmp_path / "fmnist_study" / "study"
    on_disk = json.loads((root / "results.json").read_text())
    assert on_disk["complete"] and on_disk["chosen"] == res["chosen"]
    # the choice is the best validation accuracy among the sweep's cifd entries
    rows = {r["arm"]: r for r in res["sweep"]}
    best_c = max(("c_a", "c_b"), key=lambda k: rows[k]["val_acc"])
    assert rows[best_c]["chosen"] and res["chosen"]["cifd"] == rows[best_c]["overrides"]
    # a bank per distinct rdm.* set that a cifd arm needs
    assert len(res["banks"]) == (2 if res["chosen"]["cifd"] == [] else 1)
    table = {r["arm"]: r for r in res["paired"]}
    assert table["nordm"]["overrides"][-1] == "cifd.lam_rdm=0"
    for name, r in table.items():
        assert len(r["test"]) == 2
        runs = res["runs"][name]
        assert [x["seed"] for x in runs] == [0, 1]
        base = [100 * x["test_acc"] for x in res["runs"]["kd_best"]]
        assert r["vs_baseline"]["diffs"] == pytest.approx([a - b for a, b in zip(r["test"], base)])
    assert (root / "paired.png").stat().st_size > 1000
    assert "paired over seeds" in capsys.readouterr().out
    # a second call reads every run back and gives the same table
    again = study.run_study(cfg, "fmnist_study", ov)
    assert again["paired"] == res["paired"]
