# SPDX-License-Identifier: Apache-2.0
"""Checkpoints, exact resume, the metrics log, the teacher-output cache, KD loss."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cifd_kernels.training import config as C
from cifd_kernels.training import data, engine, teacher
from cifd_kernels.training.distill import kd_loss


def tiny_cfg(fake_dir, out, *extra):
    return C.load_config("fmnist_teacher", [
        f"data.dir={fake_dir}", f"run.out_dir={out}", "data.val_size=32",
        "data.batch_size=32", "data.eval_batch_size=64", "model.arch=cnn4",
        "train.epochs=2", "run.threads=1", "run.progress=false", *extra])


def state_of(path):
    return torch.load(path, map_location="cpu", weights_only=False)


# ------------------------------------------------------------- atomic save
def test_atomic_save_never_leaves_a_torn_file(tmp_path, monkeypatch):
    p = tmp_path / "ck.pt"
    engine.atomic_save({"v": torch.arange(3)}, p)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        engine.atomic_save({"v": torch.arange(5)}, p)
    monkeypatch.undo()
    assert torch.equal(torch.load(p)["v"], torch.arange(3))  # old file intact
    assert [q.name for q in tmp_path.iterdir()] == ["ck.pt"]  # no temp left


def test_weights_hash_tracks_values():
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    h = engine.weights_hash(m)
    assert engine.weights_hash(m.state_dict()) == h
    with torch.no_grad():
        m[0].weight[0, 0] += 1e-6
    assert engine.weights_hash(m) != h


def test_lr_schedule():
    s = engine.LRSchedule("cosine", total=10, warmup=2)
    assert [s(0), s(1)] == [0.5, 1.0] and s(2) == 1.0 and math.isclose(s(6), 0.5)
    assert s(10) == 0.0
    st = engine.LRSchedule("step", total=10, milestones=[3, 6], gamma=0.1)
    assert [st(2), st(3), st(6)] == [1.0, 0.1, pytest.approx(0.01)]


# ------------------------------------------------------------ exact resume
def test_resume_gives_the_same_weights(fake_dir, tmp_path):
    a = teacher.train_teacher(tiny_cfg(fake_dir, tmp_path / "a"))
    cfg_b = tiny_cfg(fake_dir, tmp_path / "b", "run.stop_after=1")
    part = teacher.train_teacher(cfg_b)
    assert part["complete"] is False and part["epochs_done"] == 1
    ck_b = Path(part["checkpoint_path"])
    assert state_of(ck_b)["epoch"] == 1
    b = teacher.train_teacher(tiny_cfg(fake_dir, tmp_path / "b"), resume=True)

    ca, cb = state_of(a["checkpoint_path"]), state_of(ck_b)
    assert ca["epoch"] == cb["epoch"] == 2
    for k, v in ca["modules"].items():
        assert torch.equal(v, cb["modules"][k]), k
    assert torch.equal(ca["data"]["order_gen"], cb["data"]["order_gen"])
    assert a["weights_hash"] == b["weights_hash"] and a["test_acc"] == b["test_acc"]
    recs = engine.read_metrics(Path(b["metrics_path"]))
    assert [r["epoch"] for r in recs if "val_acc" in r and "event" not in r] == [1, 2]
    assert sum(r.get("event") == "test" for r in recs) == 1
    ra = [r for r in engine.read_metrics(Path(a["metrics_path"])) if "train_loss" in r]
    rb = [r for r in recs if "train_loss" in r]
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]


def test_resume_refuses_another_config(fake_dir, tmp_path):
    teacher.train_teacher(tiny_cfg(fake_dir, tmp_path, "run.stop_after=1"))
    with pytest.raises(FileExistsError, match="--resume"):
        teacher.train_teacher(tiny_cfg(fake_dir, tmp_path))
    with pytest.raises(engine.CheckpointMismatchError, match=r"train.lr: 0.1 -> 0.05"):
        teacher.train_teacher(tiny_cfg(fake_dir, tmp_path, "train.lr=0.05"), resume=True)
    # Unhashed keys (threads, progress, data location) do not block resuming.
    out = teacher.train_teacher(tiny_cfg(fake_dir, tmp_path, "run.threads=2"), resume=True)
    assert out["complete"]


def test_metrics_log_drops_records_past_the_checkpoint(tmp_path):
    log = engine.MetricsLog(tmp_path / "m.jsonl")
    for e in (1, 2, 3):
        log.log(epoch=e, val_acc=0.1 * e)
    engine.MetricsLog(tmp_path / "m.jsonl", keep_through=2)
    assert [r["epoch"] for r in engine.read_metrics(tmp_path / "m.jsonl")] == [1, 2]


def test_metrics_log_drops_a_torn_last_line_and_refuses_a_damaged_one(tmp_path):
    p = tmp_path / "m.jsonl"
    log = engine.MetricsLog(p)
    for e in (1, 2):
        log.log(epoch=e)
    with open(p, "a") as f:
        f.write('{"epoch": 3, "val_')  # a crash while logging epoch 3
    assert [r["epoch"] for r in engine.read_metrics(p)] == [1, 2]
    engine.MetricsLog(p, keep_through=2)
    assert [r["epoch"] for r in engine.read_metrics(p)] == [1, 2]
    p.write_text(p.read_text().replace('"epoch": 1', '"epo\x00'))
    before = p.read_bytes()
    with pytest.raises(engine.RunFileError, match=r"m.jsonl: line 1 is not a JSON record"):
        engine.MetricsLog(p, keep_through=2)
    assert p.read_bytes() == before


# ------------------------------------------------------------ damaged files
class NotAllowed:  # weights_only=True refuses to build it: no code runs on load
    pass


def _torch_bytes(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


GOOD = {"format_version": engine.FORMAT_VERSION, "modules": {}, "optimizer": {}, "scheduler": {}, "data": {},
        "epoch": 1, "config_hash": "x"}


@pytest.mark.parametrize("blob,needles", [
    (bytes(range(256)) * 4, ["is not a readable checkpoint ("]),
    (b"model: cnn4\nepochs: 3\n", ["is not a readable checkpoint ("]),
    (b"", ["is not a readable checkpoint (an empty file)"]),
    (_torch_bytes(GOOD)[:300], ["is not a readable checkpoint ("]),  # truncated
    (_torch_bytes([1, 2, 3]), ["is not a checkpoint (it holds a list)"]),
    (_torch_bytes({"state_dict": {}}), ["is not a checkpoint (no modules, optimizer"]),
    (_torch_bytes({"x": NotAllowed()}), ["(UnpicklingError: Unsupported global", "NotAllowed"]),
    (_torch_bytes({**GOOD, "format_version": engine.FORMAT_VERSION + 1}),
     [f"written by a newer cifd_kernels (checkpoint format {engine.FORMAT_VERSION + 1}; this "
      f"one reads up to {engine.FORMAT_VERSION})",
      "upgrade cifd_kernels"]),
])
def test_load_file_names_a_damaged_or_foreign_file(tmp_path, blob, needles):
    p = tmp_path / "checkpoint.pt"
    p.write_bytes(blob)
    with pytest.raises(engine.RunFileError) as e:
        engine.load_checkpoint(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and "\n" not in msg and len(msg) < 500, msg
    for n in needles:
        assert n in msg, (n, msg)
    assert p.read_bytes() == blob
    if "newer" not in msg:
        assert "--overwrite" in msg


def test_files_without_a_version_are_read(tmp_path):
    p = tmp_path / "checkpoint.pt"
    torch.save({k: v for k, v in GOOD.items() if k != "format_version"}, p)
    assert engine.load_checkpoint(p)["epoch"] == 1


def test_resume_from_a_damaged_checkpoint_changes_nothing(fake_dir, tmp_path):
    """Neither a truncated checkpoint nor one from a newer version is replaced
    by a fresh run when resuming."""
    part = teacher.train_teacher(tiny_cfg(fake_dir, tmp_path, "run.stop_after=1"))
    ck = Path(part["checkpoint_path"])
    good, state = ck.read_bytes(), state_of(ck)
    assert state["format_version"] == engine.FORMAT_VERSION
    assert state_of(part["model_path"])["format_version"] == engine.FORMAT_VERSION
    run = ck.parent
    for blob, match in ((good[:len(good) // 2], "is not a readable checkpoint"),
                        (_torch_bytes({**state, "format_version": 99}), "newer")):
        ck.write_bytes(blob)
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        with pytest.raises(engine.RunFileError, match=match):
            teacher.train_teacher(tiny_cfg(fake_dir, tmp_path), resume=True)
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # A checkpoint whose tensors do not fit the model: refused the same way.
    ck.write_bytes(_torch_bytes({**state, "modules": {"w": torch.zeros(1)}}))
    with pytest.raises(engine.RunFileError, match="checkpoint.pt is not a readable "
                                                   "checkpoint \\(RuntimeError"):
        teacher.train_teacher(tiny_cfg(fake_dir, tmp_path), resume=True)


# ------------------------------------------------------------- output cache
def test_teacher_output_cache(fake_dir, tmp_path):
    torch.manual_seed(0)
    ds = data.load_fashion_mnist(fake_dir, val_size=32)
    model = teacher.build_model("cnn4", 10).eval()
    cache = tmp_path / "cache"
    first = teacher.teacher_outputs(model, "cnn4", ds, "val", cache, batch_size=10)
    assert not first.from_cache and first.embeddings.shape == (32, model.embed_dim)
    assert first.logits.shape == (32, 10) and torch.equal(first.labels, ds.val.labels)
    with torch.no_grad():
        x = data.normalize(ds.val.images, ds.mean, ds.std)
        torch.testing.assert_close(first.embeddings, model.features(x))
        torch.testing.assert_close(first.logits, model(x))

    again = teacher.teacher_outputs(model, "cnn4", ds, "val", cache)
    assert again.from_cache and torch.equal(again.logits, first.logits)

    with torch.no_grad():  # other weights
        model.head.bias += 1.0
    changed = teacher.teacher_outputs(model, "cnn4", ds, "val", cache)
    assert not changed.from_cache and not torch.equal(changed.logits, first.logits)
    assert teacher.teacher_outputs(model, "cnn4", ds, "val", cache).from_cache

    other_split = data.load_fashion_mnist(fake_dir, val_size=32, split_seed=1)  # other data
    assert not teacher.teacher_outputs(model, "cnn4", other_split, "val", cache).from_cache

    ds.mean = (0.3,)  # other transform
    assert not teacher.teacher_outputs(model, "cnn4", ds, "val", cache).from_cache
    assert teacher.teacher_outputs(model, "cnn4", ds, "val", cache).from_cache
    assert not teacher.teacher_outputs(model, "cnn4", ds, "val", cache,
                                       refresh=True).from_cache
    # Damaged: refused (it may say the disk is failing), kept; --refresh recomputes.
    (cache / "teacher_outputs_val.pt").write_bytes(b"garbage")
    with pytest.raises(engine.RunFileError, match="teacher_outputs_val.pt is not a readable "
                                                   "teacher-output cache .*--refresh"):
        teacher.teacher_outputs(model, "cnn4", ds, "val", cache)
    assert (cache / "teacher_outputs_val.pt").read_bytes() == b"garbage"
    assert not teacher.teacher_outputs(model, "cnn4", ds, "val", cache,
                                       refresh=True).from_cache
    assert teacher.teacher_outputs(model, "cnn4", ds, "val", cache).from_cache


# ---------------------------------------------------------------- KD loss
def test_kd_loss_formula():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    tau = 3.0
    p_t = F.softmax(t.double() / tau, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s.float().double() / tau, 1))).sum(1).mean()
    want = 0.5 * F.cross_entropy(s, y) + 2.0 * tau ** 2 * kl
    got = kd_loss(s, t, y, tau=tau, lam_ce=0.5, lam_kl=2.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # Matches torch's KL with the teacher as target, and vanishes for equal logits.
    ref = F.kl_div(F.log_softmax(s.float() / tau, 1), F.log_softmax(t / tau, 1),
                   reduction="batchmean", log_target=True) * tau ** 2
    torch.testing.assert_close(kd_loss(s, t, y, tau=tau, lam_ce=0.0), ref)
    assert kd_loss(t, t, y, tau=tau, lam_ce=0.0).abs().item() < 1e-6


def test_optimizers_are_fused_where_torch_has_the_kernels():
    """build_optimizer (and the RDM bank's Adam) take torch's fused kernels for CPU/CUDA
    float parameters, and the fused step equals the for-loop step (to rounding)."""
    lin = torch.nn.Linear(6, 3)
    assert engine.fused_kwargs(lin.parameters()) == {"fused": True}
    assert engine.fused_kwargs([{"params": list(lin.parameters())}]) == {"fused": True}
    assert engine.fused_kwargs([torch.zeros(2, device="meta", requires_grad=True)]) == {}
    assert engine.fused_kwargs([]) == {}
    for name in ("sgd", "adamw"):
        cfg = C.TrainConfig(optimizer=name, lr=0.1)
        models = [torch.nn.Linear(6, 3) for _ in range(2)]
        models[1].load_state_dict(models[0].state_dict())
        opts = [engine.build_optimizer(models[0].parameters(), cfg),
                torch.optim.SGD(models[1].parameters(), lr=0.1, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
                if name == "sgd" else
                torch.optim.AdamW(models[1].parameters(), lr=0.1, weight_decay=cfg.weight_decay)]
        assert opts[0].param_groups[0]["fused"] is True
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            for m, o in zip(models, opts):
                o.zero_grad()
                m(x).square().sum().backward()
                o.step()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
