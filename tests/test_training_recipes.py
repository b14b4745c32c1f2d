# SPDX-License-Identifier: Apache-2.0
"""Smoke runs of the paper's recipes (CIFAR-100: ResNet34 -> ResNet18;
ImageNet: ResNet50 -> MobileNet) end to end on tiny generated data in the real
formats: teacher, RDM bank, CIFD student, each for one short epoch."""
import json

import pytest

from cifd_kernels.training import data
from cifd_kernels.training.config import load_config
from cifd_kernels.training.cli import main

pytest.importorskip("torchvision")

QUIET = ["--threads", "1", "--no-progress"]


def run_recipe(teacher_cfg, student_cfg, data_dir, out, extra):
    args = ["--data-dir", str(data_dir), "--out-dir", str(out), *QUIET, *extra]
    assert main(["train-teacher", "-c", teacher_cfg, *args]) == 0
    assert main(["train-rdms", "-c", student_cfg, *args]) == 0
    assert main(["distill", "--method", "cifd", "-c", student_cfg, *args]) == 0
    root = out / load_config(student_cfg).run.name
    teacher = json.loads((root / "teacher" / "summary.json").read_text())
    rdms = json.loads((root / "rdms" / "results.json").read_text())
    arch = load_config(student_cfg).model.arch
    student = json.loads((root / f"cifd_{arch}" / "summary.json").read_text())
    return teacher, rdms, student


def test_cifar100_recipe(tmp_path):
    d = data.write_synthetic_cifar100(tmp_path / "cifar-100-python", 24, 6)
    teacher, rdms, student = run_recipe(
        "cifar100_teacher", "cifar100_student", d, tmp_path / "runs",
        ["train.epochs=1", "data.val_size=4", "data.train_size=8", "data.batch_size=4",
         "data.eval_batch_size=64", "rdm.epochs=1", "rdm.batch_size=4"])
    assert teacher["arch"] == "resnet34" and student["arch"] == "resnet18"
    assert [r["R"] for r in rdms["rdms"]] == [1.0, 0.8, 0.6]  # the paper's CIFAR-100 R
    assert rdms["teacher"]["D"] == 512
    assert student["n_rdms"] == 3 and student["steps"] == 2  # 8 images / 4
    assert 0.0 <= student["test_acc"] <= 1.0 and student["train_flops"] > 0
    cfg = json.loads(json.dumps(load_config("cifar100_student").cifd.__dict__))
    assert (cfg["w_emb"], cfg["lam_I"], cfg["p_drop"]) == (100.0, 0.005, 0.25)


def test_imagenet_recipe_on_an_image_folder(tmp_path):
    pytest.importorskip("PIL")
    d = data.write_synthetic_imagefolder(tmp_path / "imagenet", n_classes=3, n_train=8,
                                         n_val=2, size=40)
    # image_size 72 keeps the ImageNet stems (stride-2 conv and max-pool, > 64 px)
    # at a size a CPU test can afford; RDM widths shrunk from the recipe's 1024.
    teacher, rdms, student = run_recipe(
        "imagenet_teacher", "imagenet_student", d, tmp_path / "runs",
        ["train.epochs=1", "train.warmup_epochs=0", "data.val_size=6", "data.batch_size=6",
         "data.eval_batch_size=16", "data.image_size=72", "data.num_workers=0",
         "rdm.epochs=1", "rdm.batch_size=8", "rdm.hidden=32", "rdm.latent=32"])
    assert teacher["arch"] == "resnet50" and student["arch"] == "mobilenet_v2"
    assert rdms["teacher"]["D"] == 2048 and len(rdms["rdms"]) == 3
    assert rdms["units"]["distortion"].startswith("smooth_l1")
    assert student["steps"] == 3 and 0.0 <= student["test_acc"] <= 1.0  # 18 images / 6
    ds = data.load_imagefolder(d, val_size=6, image_size=72)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (18, 6, 6) and ds.num_classes == 3
    assert ds.classes[0] == "n00000000"


def test_imagefolder_batches_resume_and_shard(tmp_path):
    pytest.importorskip("PIL")
    d = data.write_synthetic_imagefolder(tmp_path / "tree", n_classes=2, n_train=5, n_val=1,
                                         size=24)
    ds = data.load_imagefolder(d, val_size=2, image_size=16)
    kw = dict(mean=ds.mean, std=ds.std, shuffle=True, augment=True, seed=3, shard="batch")
    it = data.make_batches(ds.train, 4, **kw)
    assert isinstance(it, data.FolderBatchIterator) and len(it) == 2
    list(it)
    state = it.state_dict()
    epoch2 = list(it)
    again = data.make_batches(ds.train, 4, **kw)
    again.load_state_dict(state)
    for a, b in zip(epoch2, again):
        assert a.pos.tolist() == b.pos.tolist() and a.x.shape == (a.pos.numel(), 3, 16, 16)
    shards = [list(data.make_batches(ds.train, 4, rank=r, world_size=2, **kw))
              for r in range(2)]
    assert sorted(sum((b.pos.tolist() for s in shards for b in s), [])) == list(range(8))
    assert [b.row0 for b in shards[1]] == [2, 2]


def test_imagefolder_without_dir_is_a_clear_error(tmp_path, capsys):
    rc = main(["train-teacher", "-c", "imagenet_teacher", "--out-dir", str(tmp_path), *QUIET])
    err = capsys.readouterr().err
    assert rc == 2 and "needs data.dir" in err and "Traceback" not in err
