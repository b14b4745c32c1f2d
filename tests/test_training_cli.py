# SPDX-License-Identifier: Apache-2.0
"""The ``cifd`` commands end to end on a tiny synthetic Fashion-MNIST."""
import json
from pathlib import Path

import pytest

from cifd_kernels.training import data, engine
from cifd_kernels.training.cli import main


def common(fake_dir, out):
    return ["--data-dir", str(fake_dir), "--out-dir", str(out), "--threads", "1",
            "--no-progress", "data.val_size=40", "data.batch_size=32", "train.epochs=2",
            "train.lr=0.05"]


@pytest.fixture(scope="module")
def teacher_run(fake_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["train-teacher", *common(fake_dir, out), "model.arch=cnn4"]) == 0
    return out


def test_train_teacher_end_to_end(teacher_run):
    run = teacher_run / "fmnist" / "teacher"
    for f in ("config.yaml", "checkpoint.pt", "model.pt", "metrics.jsonl", "summary.json"):
        assert (run / f).is_file(), f
    summary = json.loads((run / "summary.json").read_text())
    assert summary["arch"] == "cnn4" and 0.0 <= summary["test_acc"] <= 1.0
    recs = engine.read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [1, 2, 2] and recs[-1]["event"] == "test"
    assert "epoch_time_s" in recs[0] and "val_acc" in recs[0]
    assert "model:\n  arch: cnn4" in (run / "config.yaml").read_text()


def test_eval_and_resume_of_a_finished_run(teacher_run, fake_dir, capsys):
    run = teacher_run / "fmnist" / "teacher"
    capsys.readouterr()
    assert main(["eval", str(run), "--data-dir", str(fake_dir), "--split", "val",
                 "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((run / "summary.json").read_text())
    assert res["split"] == "val" and res["n"] == 40 and res["acc"] == summary["val_acc"]
    # A finished run resumed: nothing to train, same model.
    assert main(["train-teacher", *common(fake_dir, teacher_run), "model.arch=cnn4",
                 "--resume"]) == 0
    assert json.loads((run / "summary.json").read_text())["weights_hash"] == \
        summary["weights_hash"]


def test_distill_scratch_and_kd(teacher_run, fake_dir, capsys):
    args = [*common(fake_dir, teacher_run), "teacher.arch=cnn4", "train.epochs=1"]
    assert main(["distill", "--method", "scratch", *args]) == 0
    # Augmented inputs: the teacher runs on each batch.
    assert main(["distill", "--method", "kd", *args, "data.augment=true"]) == 0
    assert "(cached logits)" not in capsys.readouterr().out
    root = teacher_run / "fmnist"
    for method in ("scratch", "kd"):
        s = json.loads((root / f"{method}_cnn2" / "summary.json").read_text())
        assert s["method"] == method and s["arch"] == "cnn2"
    # Unaugmented KD (the student config's default) reads the cached logits.
    assert main(["distill", "--method", "kd", *args, "--overwrite"]) == 0
    assert "(cached logits)" in capsys.readouterr().out
    assert (root / "teacher" / "cache" / "teacher_outputs_train.pt").is_file()


def test_cache_teacher_command(teacher_run, fake_dir, capsys):
    args = ["--data-dir", str(fake_dir), "--out-dir", str(teacher_run), "--threads", "1",
            "data.val_size=40", "--splits", "val,test"]
    assert main(["cache-teacher", *args]) == 0
    assert main(["cache-teacher", *args]) == 0
    out = capsys.readouterr().out
    assert out.count("computed") == 2 and out.count("valid cache") == 2
    assert "embeddings (40, 64)" in out


def test_errors_are_reported_not_raised(tmp_path, fake_dir, capsys):
    assert main(["train-teacher", "--data-dir", str(tmp_path / "nothing"),
                 "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "Traceback" not in err
    assert main(["train-teacher", "train.epoch=1"]) == 2
    assert "did you mean 'train.epochs'" in capsys.readouterr().err
    assert main(["distill", "--method", "kd", *common(fake_dir, tmp_path)]) == 2
    assert "model file" in capsys.readouterr().err  # no teacher trained there
    with pytest.raises(SystemExit):
        main(["distill", "--method", "dgkd"])


def test_demo(fake_dir, tmp_path, capsys):
    args = [*common(fake_dir, tmp_path), "train.epochs=1", "demo.teacher_epochs=1",
            "rdm.epochs=1", "data.train_size=0", "takd.tas=[cnn4]", "demo.seeds=[0,1]",
            "teacher.arch=cnn4"]
    assert main(["demo", *args]) == 0
    out = capsys.readouterr().out
    table = out[out.index("method   arch"):]
    for row in ("teacher", "scratch", "KD", "CIFD", "TAKD", "RDMs (frozen, test)"):
        assert row in table, row
    root = tmp_path / "fmnist_demo" / "demo"
    res = json.loads((root / "results.json").read_text())
    assert set(res["methods"]) == {"scratch", "kd", "cifd", "takd"}
    kd, cifd = res["methods"]["kd"], res["methods"]["cifd"]
    assert kd["seeds"] == [0, 1] and kd["flops_rel_kd"] == 1.0
    assert cifd["train_flops"] > kd["train_flops"] and cifd["wall_s"] > 0
    assert 0 <= cifd["test_acc"] <= 1 and cifd["test_acc_std"] >= 0
    assert res["teacher"]["arch"] == "cnn4" and len(res["rdms"]["rdms"]) == 3
    for p in res["plots"].values():
        assert Path(p).stat().st_size > 1000
    assert res["table"] in out
    assert main(["demo", *args]) == 0  # again: every run is already complete
    assert "epoch 1/1:" not in capsys.readouterr().out


def test_demo_skips_takd_over_budget(fake_dir, tmp_path, capsys):
    args = [*common(fake_dir, tmp_path), "train.epochs=1", "demo.teacher_epochs=1",
            "data.train_size=0", "teacher.arch=cnn4", "demo.methods=[kd,takd]",
            "demo.budget_s=0"]
    assert main(["demo", *args]) == 0
    out = capsys.readouterr().out
    assert "skipping TAKD" in out and "TAKD     skipped" in out
    res = json.loads((tmp_path / "fmnist_demo" / "demo" / "results.json").read_text())
    assert "skipped" in res["methods"]["takd"] and res["rdms"] is None


def one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.mark.parametrize("override,needles", [
    ("train.epoch=1", ["unknown config key 'train.epoch'", "did you mean 'train.epochs'"]),
    ("train.epochs=abc", ["train.epochs: expected an int"]),
    ("train.epochs=0", ["train.epochs: 0 must be >= 1"]),
    ("model.arch=cnn3", ["model.arch: unknown architecture 'cnn3'"]),
    ("rdm.rates=[]", ["rdm.rates: [] must be a non-empty list"]),
    ("cifd.p_drop=1.5", ["cifd.p_drop: 1.5 must be in [0, 1)"]),
    ("cifd.decoder_layers=3", ["cifd.decoder_layers: 3 must be 1 or 2"]),
    ("data.name=mnist", ["data.name: 'mnist' is not one of"]),
    ("data.val_size=500", ["data.val_size=500 must be in [0, 200)"]),
])
def test_bad_config_values_are_one_line_errors(override, needles, fake_dir, tmp_path, capsys):
    rc = main(["distill", "--method", "scratch", *common(fake_dir, tmp_path), override])
    one_line_error(capsys, rc, *needles)


@pytest.mark.parametrize("where", ["first", "after the command", "last"])
def test_traceback_option_raises_instead(where, fake_dir, tmp_path, capsys):
    """``--traceback``, wherever it stands, turns the one-line message into the exception."""
    from cifd_kernels.training.config import ConfigError
    argv = ["distill", "--method", "scratch", *common(fake_dir, tmp_path), "train.epoch=1"]
    argv.insert({"first": 0, "after the command": 1, "last": len(argv)}[where], "--traceback")
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        main(argv)
    assert capsys.readouterr().err == ""


def test_missing_dataset_is_a_one_line_error(tmp_path, capsys):
    rc = main(["train-teacher", "--data-dir", str(tmp_path / "nothing"), "--out-dir",
               str(tmp_path), "--no-progress"])
    one_line_error(capsys, rc, "Fashion-MNIST not found", "apt-get install")
    rc = main(["train-teacher", "-c", "cifar100_teacher", "--data-dir",
               str(tmp_path / "nothing"), "--out-dir", str(tmp_path), "--no-progress"])
    one_line_error(capsys, rc, "CIFAR-100 not found", "cifar-100-python")


def test_corrupt_dataset_is_a_one_line_error(tmp_path, fake_dir, capsys):
    import shutil
    d = tmp_path / "bad"
    shutil.copytree(fake_dir, d)
    (d / "train-labels-idx1-ubyte.gz").unlink()
    (d / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    rc = main(["train-teacher", *common(d, tmp_path)])
    one_line_error(capsys, rc, "IDX header says")


def test_checkpoint_of_another_config_is_a_one_line_error(teacher_run, fake_dir, capsys):
    rc = main(["train-teacher", *common(fake_dir, teacher_run), "model.arch=cnn4",
               "train.lr=0.07", "--resume"])
    one_line_error(capsys, rc, "another configuration", "train.lr: 0.05 -> 0.07")


def test_bank_of_another_teacher_is_a_one_line_error(teacher_run, fake_dir, tmp_path, capsys):
    """An RDM bank trained on teacher A, a student distilled from teacher B."""
    a = teacher_run / "fmnist" / "teacher" / "model.pt"
    assert main(["train-rdms", *common(fake_dir, tmp_path), "--teacher", str(a),
                 "rdm.epochs=1"]) == 0
    b_out = tmp_path / "b"
    assert main(["train-teacher", *common(fake_dir, b_out), "model.arch=cnn2",
                 "train.epochs=1"]) == 0
    capsys.readouterr()
    rc = main(["distill", "--method", "cifd", *common(fake_dir, b_out),
               "--teacher", str(b_out / "fmnist" / "teacher"),
               f"cifd.bank={tmp_path / 'fmnist' / 'rdms' / 'bank.pt'}"])
    one_line_error(capsys, rc, "trained on another teacher", "train-rdms")


def test_teacher_of_another_dataset_is_a_one_line_error(teacher_run, tmp_path, capsys):
    from cifd_kernels.training import data as data_mod
    d = data_mod.write_synthetic_cifar100(tmp_path / "c100", 30, 10)
    rc = main(["distill", "--method", "kd", "-c", "cifar100_student", "--data-dir", str(d),
               "--out-dir", str(tmp_path), "--no-progress", "data.val_size=10",
               "--teacher", str(teacher_run / "fmnist" / "teacher")])
    one_line_error(capsys, rc, "trained on fashion_mnist (10 classes), not cifar100")


# ------------------------------------------------- damaged and foreign files
def _torch_bytes(obj):
    import io
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def files_of(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("blob,needle", [
    (bytes(range(256)) * 8, "is not a readable cifd model file ("),
    (b"just some text\n", "is not a readable cifd model file ("),
    (b"", "is not a readable cifd model file (an empty file)"),
    (_torch_bytes({"weights": [1, 2]}), "is not a cifd model file (no arch, state_dict"),
    (_torch_bytes(["a", "list"]), "is not a cifd model file (it holds a list)"),
    (_torch_bytes({"format_version": 7, "arch": "cnn99"}), "newer cifd_kernels"),
])
def test_eval_of_a_file_that_is_not_a_model(tmp_path, fake_dir, capsys, blob, needle):
    p = tmp_path / "junk.pt"
    p.write_bytes(blob)
    rc = main(["eval", str(p), "--data-dir", str(fake_dir), "--no-progress"])
    one_line_error(capsys, rc, f"cifd eval: error: {p} ", needle)
    assert p.read_bytes() == blob


def test_eval_of_a_checkpoint_says_to_pass_the_model(teacher_run, fake_dir, capsys):
    ck = teacher_run / "fmnist" / "teacher" / "checkpoint.pt"
    rc = main(["eval", str(ck), "--data-dir", str(fake_dir), "--no-progress"])
    one_line_error(capsys, rc, f"{ck} is not a cifd model file", "not a checkpoint.pt")


def test_truncated_dataset_is_a_one_line_error(tmp_path, fake_dir, capsys):
    import shutil
    d = tmp_path / "bad"
    shutil.copytree(fake_dir, d)
    gz = d / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:1000])
    before = files_of(d)
    rc = main(["train-teacher", *common(d, tmp_path / "out")])
    one_line_error(capsys, rc, f"{gz} is not a readable IDX file (EOFError",
                   "cifd download-data")
    assert files_of(d) == before and not (tmp_path / "out").exists()


def test_resume_of_a_damaged_run_changes_nothing(teacher_run, fake_dir, tmp_path, capsys):
    """A truncated checkpoint, then a truncated teacher-output cache, then a
    damaged RDM bank: each refused with one line naming it; no file changes."""
    import shutil
    out = tmp_path / "runs"
    shutil.copytree(teacher_run, out)
    root = out / "fmnist"
    ck = root / "teacher" / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:5000])
    before = files_of(out)
    rc = main(["train-teacher", *common(fake_dir, out), "model.arch=cnn4", "--resume"])
    one_line_error(capsys, rc, f"{ck} is not a readable checkpoint", "--overwrite")
    assert files_of(out) == before

    assert main(["cache-teacher", "--data-dir", str(fake_dir), "--out-dir", str(out),
                 "--threads", "1", "data.val_size=40", "--splits", "train"]) == 0
    cache = root / "teacher" / "cache" / "teacher_outputs_train.pt"
    cache.write_bytes(cache.read_bytes()[:4000])
    before = files_of(out)
    rc = main(["train-rdms", *common(fake_dir, out), "rdm.epochs=1"])
    one_line_error(capsys, rc, f"{cache} is not a readable teacher-output cache",
                   "cifd cache-teacher --refresh")
    assert files_of(out) == before

    bank = tmp_path / "bank.pt"
    bank.write_bytes(_torch_bytes({"hparams": {"n": 1}, "state_dict": {}, "weights_hash": "h",
                                   "teacher_weights": "t"}))
    rc = main(["distill", "--method", "cifd", *common(fake_dir, out), "teacher.arch=cnn4",
               f"cifd.bank={bank}"])
    one_line_error(capsys, rc, f"{bank} is not a readable RDM bank file (KeyError",
                   "cifd train-rdms --overwrite")
    assert files_of(out) == before
