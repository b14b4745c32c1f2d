# SPDX-License-Identifier: Apache-2.0
"""CIFD recipes end to end on a tiny synthetic Fashion-MNIST: stage 1
(train-rdms), stage 2 (distill --method cifd) with exact resume, TAKD, the
per-step seeds, and the IBM's removal at inference."""
import json

import pytest
import torch

from cifd_kernels.training import config as C
from cifd_kernels.training import data, engine
from cifd_kernels.training.cifd import CIFDStudent
from cifd_kernels.training.cli import main
from cifd_kernels.training.models import build_model


def common(fake_dir, out):
    return ["--data-dir", str(fake_dir), "--out-dir", str(out), "--threads", "1",
            "--no-progress", "data.val_size=40", "data.batch_size=32", "train.epochs=2",
            "train.lr=0.05", "teacher.arch=cnn4", "rdm.epochs=2", "rdm.batch_size=64",
            "rdm.rates=[1.0,0.3,0.1]", "cifd.emb_normalize=true", "cifd.w_emb=1.0"]


@pytest.fixture(scope="module")
def bank_run(fake_dir, tmp_path_factory):
    """A cnn4 teacher and its RDM bank (2 epochs each)."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["train-teacher", *common(fake_dir, out), "model.arch=cnn4"]) == 0
    assert main(["train-rdms", *common(fake_dir, out)]) == 0
    return out


def ckpt_hash(run_dir):
    ck = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    return engine.weights_hash(ck["modules"]), ck


# ------------------------------------------------------------------ stage 1
def test_train_rdms_results_and_plot(bank_run):
    run = bank_run / "fmnist" / "rdms"
    res = json.loads((run / "results.json").read_text())
    assert (run / "rd_curve.png").stat().st_size > 1000
    assert (run / "bank.pt").is_file() and res["complete"]
    assert [r["R"] for r in res["rdms"]] == [1.0, 0.3, 0.1]
    for r in res["rdms"]:
        for split in ("val", "test"):
            m = r[split]
            assert set(m) >= {"distortion", "rate_bits", "acc"}
            assert m["distortion"] >= 0 and m["rate_bits"] > 0 and 0 <= m["acc"] <= 1
    assert res["teacher"]["arch"] == "cnn4" and res["train_flops"] > 0
    recs = engine.read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [1, 2] and len(recs[0]["val"]) == 3


def test_train_rdms_resume_is_exact(bank_run, fake_dir, tmp_path):
    # Same teacher, a new run name: 1 + 1 epochs against the fixture's 2. Exact:
    # one process, one thread, the same kernels and shapes, so every sum runs in
    # the same order; resume restores the RNG and batch order.
    teacher = bank_run / "fmnist" / "teacher" / "model.pt"
    args = [*common(fake_dir, tmp_path), f"teacher.checkpoint={teacher}"]
    assert main(["train-rdms", *args, "run.stop_after=1"]) == 0
    assert not (tmp_path / "fmnist" / "rdms" / "bank.pt").exists()
    assert main(["train-rdms", *args, "--resume"]) == 0
    a = torch.load(tmp_path / "fmnist" / "rdms" / "bank.pt", weights_only=False)
    b = torch.load(bank_run / "fmnist" / "rdms" / "bank.pt", weights_only=False)
    assert a["weights_hash"] == b["weights_hash"]


# ------------------------------------------------------------------ stage 2
def test_distill_cifd_end_to_end_and_exact_resume(bank_run, fake_dir, capsys):
    root = bank_run / "fmnist"
    args = common(fake_dir, bank_run)
    assert main(["distill", "--method", "cifd", *args]) == 0
    assert "(cached targets)" in capsys.readouterr().out
    s = json.loads((root / "cifd_cnn2" / "summary.json").read_text())
    assert s["method"] == "cifd" and s["n_rdms"] == 3 and s["R"] == [1.0, 0.3, 0.1]
    assert 0 <= s["test_acc"] <= 1 and s["train_flops"] > s["one_off_flops"] > 0
    assert s["method_train_flops"] > s["train_flops"]
    full_hash, full = ckpt_hash(root / "cifd_cnn2")
    # The checkpoint holds the student, the IBM and the decoder.
    assert any(k.startswith("ibm.") for k in full["modules"])
    assert any(k.startswith("decoder.") for k in full["modules"])

    # 1 + 1 epochs (stop, then resume in a new process state) == 2 epochs, bit for
    # bit: the same process, thread count and kernels sum in the same order, and
    # the per-step seeds come from the step count, not from RNG state.
    split = [*args, "run.name=split"]
    teacher = root / "teacher" / "model.pt"
    bank = root / "rdms" / "bank.pt"
    extra = [f"teacher.checkpoint={teacher}", f"cifd.bank={bank}"]
    assert main(["distill", "--method", "cifd", *split, *extra, "run.stop_after=1"]) == 0
    torch.manual_seed(12345)  # a resumed run must not depend on the global RNG
    assert main(["distill", "--method", "cifd", *split, *extra, "--resume"]) == 0
    split_hash, _ = ckpt_hash(bank_run / "split" / "cifd_cnn2")
    assert split_hash == full_hash
    s2 = json.loads((bank_run / "split" / "cifd_cnn2" / "summary.json").read_text())
    assert s2["weights_hash"] == s["weights_hash"]


def test_distill_cifd_augmented_runs_targets_per_batch(bank_run, fake_dir, capsys):
    args = [*common(fake_dir, bank_run), "train.epochs=1", "data.augment=true",
            "run.name=aug", f"teacher.checkpoint={bank_run / 'fmnist' / 'teacher'}",
            f"cifd.bank={bank_run / 'fmnist' / 'rdms' / 'bank.pt'}",
            "cifd.decoder_layers=2", "cifd.ibm_rho=0.25"]
    assert main(["distill", "--method", "cifd", *args]) == 0
    assert "(targets per batch)" in capsys.readouterr().out


def test_distill_cifd_without_bank_is_an_error(fake_dir, tmp_path, capsys, bank_run):
    args = [*common(fake_dir, tmp_path), f"teacher.checkpoint={bank_run / 'fmnist' / 'teacher'}"]
    assert main(["distill", "--method", "cifd", *args]) == 2
    assert "train-rdms" in capsys.readouterr().err


def test_takd_chain(bank_run, fake_dir):
    args = [*common(fake_dir, bank_run), "train.epochs=1", "takd.tas=[cnn6,cnn4]"]
    assert main(["distill", "--method", "takd", *args]) == 0
    root = bank_run / "fmnist"
    s = json.loads((root / "takd_cnn2" / "summary.json").read_text())
    assert s["method"] == "takd" and [st["arch"] for st in s["stages"]] == ["cnn6", "cnn4"]
    assert s["stages"][1]["model_path"].endswith("takd_ta2_cnn4/model.pt")
    assert s["method_train_flops"] > s["train_flops"] > 0
    # The student was taught by the last TA, the TA by the previous network.
    ta2 = torch.load(root / "takd_ta2_cnn4" / "model.pt", weights_only=False)
    assert ta2["config"]["teacher"]["checkpoint"].endswith("takd_ta1_cnn6/model.pt")
    st = torch.load(root / "takd_cnn2" / "model.pt", weights_only=False)
    assert st["config"]["teacher"]["checkpoint"].endswith("takd_ta2_cnn4/model.pt")


# ------------------------------------------------------------------ pieces
def test_derive_seed_is_stable():
    # Pinned: a change here silently changes every run's noise.
    assert engine.derive_seed(0, 0) == engine.derive_seed(0, 0)
    got = [engine.derive_seed(0, s) for s in range(3)] + [engine.derive_seed(7, 5, 2)]
    assert got == PINNED_SEEDS
    seeds = {engine.derive_seed(r, s, k) for r in range(3) for s in range(50) for k in range(4)}
    assert len(seeds) == 3 * 50 * 4
    assert all(0 <= s < 2 ** 62 for s in seeds)


PINNED_SEEDS = [2891389769238885931, 3935921772339056926, 1647901363935882479,
                4456152994349483321]


def test_cifd_student_ignores_ibm_at_inference():
    torch.manual_seed(0)
    student = build_model("cnn2", 10)
    w = CIFDStudent(student, 64, decoder_layers=2)
    x = torch.randn(5, 1, 28, 28)
    w.eval()
    with torch.no_grad():
        ref = student.head(student.features(x))
        assert torch.equal(w(x), ref)
        assert torch.equal(w(x, seed=3), ref)  # no seed, no noise at inference
    w.train()
    student.eval()  # BatchNorm off, so only the IBM makes a difference
    with torch.no_grad():
        noisy = w.train_outputs(x, seed=3)
        again = w.train_outputs(x, seed=3)
    assert not torch.equal(noisy[0], ref)
    assert torch.equal(noisy[0], again[0]) and noisy[1].shape == (5, 64)
    assert noisy[2].shape == (5,) and bool((noisy[2] > 0).all())


def test_config_sections_for_cifd():
    from cifd_kernels.training.demo import teacher_config
    cfg = C.load_config("fmnist_demo")
    assert cfg.rdm.rates == [3.0, 1.0, 0.3] and not cfg.cifd.emb_normalize
    assert cfg.demo.methods == ["scratch", "kd", "cifd", "takd"]
    # the study's regime: the teacher sees all training images, the students a subset
    t = teacher_config(cfg)
    assert (t.data.train_size, cfg.data.train_size, t.train.epochs) == (0, 10000, 3)
    cfg.demo.teacher_train_size = -1
    assert teacher_config(cfg).data.train_size == 10000
    full = C.load_config("fmnist_full")
    assert len(full.demo.seeds) == 3 and full.data.train_size == 0


def test_demo_table_prints_cifd_minus_kd():
    from cifd_kernels.training.demo import format_table
    teacher = {"arch": "cnn10", "test_acc": 0.91, "val_acc": 0.9}
    row = dict(arch="cnn2", train_time_s=1.0, wall_s=1.0, train_flops=1e9, test_acc_std=0.0)
    agg = {"kd": dict(row, seeds=[0], test_acc=0.8366, val_acc=0.8392),
           "cifd": dict(row, seeds=[0], test_acc=0.8336, val_acc=0.8362)}
    table = format_table(teacher, None, agg)
    assert "CIFD - KD: -0.30 points test, -0.30 val (one seed" in table
    agg["cifd"]["seeds"] = agg["kd"]["seeds"] = [0, 1]
    assert "(one seed" not in format_table(teacher, None, agg)
    agg["cifd"] = {"skipped": "not run"}
    assert "CIFD - KD" not in format_table(teacher, None, agg)
