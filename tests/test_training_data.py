# SPDX-License-Identifier: Apache-2.0
"""Data layer: IDX parsing, dataset loaders, augmentation, batch iteration.

All data here is tiny and generated in tmp dirs; the real datasets are never read.
"""
import gzip
import pickle
import struct

import pytest
import torch

from cifd_kernels.training import data


def idx_bytes(type_code: int, shape, payload: bytes) -> bytes:
    """An IDX file built by hand from the format's definition."""
    return bytes([0, 0, type_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + payload


def write_fake_fmnist(d, n_train=120, n_test=40, gz=True, seed=0):
    return data.write_synthetic_fashion_mnist(d, n_train, n_test, seed=seed, gz=gz)


# ------------------------------------------------------------------ IDX
def test_parse_idx_uint8_images():
    payload = bytes(range(2 * 3 * 4))
    t = data.parse_idx(idx_bytes(0x08, (2, 3, 4), payload))
    assert t.dtype == torch.uint8 and t.shape == (2, 3, 4)
    assert t.flatten().tolist() == list(range(24))


def test_parse_idx_big_endian_multibyte():
    ints = [1, -2, 70000]
    t = data.parse_idx(idx_bytes(0x0C, (3,), struct.pack(">3i", *ints)))
    assert t.dtype == torch.int32 and t.tolist() == ints
    floats = [0.5, -1.25]
    t = data.parse_idx(idx_bytes(0x0D, (1, 2), struct.pack(">2f", *floats)))
    assert t.dtype == torch.float32 and t.tolist() == [floats]
    t = data.parse_idx(idx_bytes(0x0B, (2,), struct.pack(">2h", -3, 515)))
    assert t.tolist() == [-3, 515]


@pytest.mark.parametrize("blob,msg", [
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", "bad magic"),
    (b"\x00\x00\x42\x01", "bad magic"),
    (idx_bytes(0x08, (2, 2), b"\x00\x01\x02"), "holds 3"),
])
def test_parse_idx_rejects_bad_files(blob, msg):
    with pytest.raises(ValueError, match=msg):
        data.parse_idx(blob)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_write_read_idx_roundtrip(tmp_path, suffix):
    for t in (torch.randint(0, 255, (3, 5, 7), dtype=torch.uint8),
              torch.tensor([[-1, 2], [3, 123456]], dtype=torch.int32),
              torch.randn(4, 2, dtype=torch.float64)):
        p = tmp_path / f"x{suffix}"
        data.write_idx(t, p)
        assert torch.equal(data.read_idx(p), t)
    raw = (tmp_path / "x").read_bytes() if suffix == "" else gzip.decompress(p.read_bytes())
    assert raw[:4] == bytes([0, 0, 0x0E, 2])  # float64, 2 dims


# --------------------------------------------------------------- loaders
@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist(tmp_path, gz):
    write_fake_fmnist(tmp_path, gz=gz)
    ds = data.load_fashion_mnist(tmp_path, val_size=20, split_seed=3)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (100, 20, 40)
    assert ds.train.images.shape == (100, 1, 28, 28) and ds.train.images.dtype == torch.uint8
    assert ds.num_classes == 10 and ds.in_channels == 1 and ds.image_size == 28
    # The split partitions the training file, deterministically.
    idx = torch.cat([ds.train.source_index, ds.val.source_index]).sort().values
    assert torch.equal(idx, torch.arange(120))
    full = data.read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    assert torch.equal(ds.val.images[:, 0], full[ds.val.source_index])
    again = data.load_fashion_mnist(tmp_path, val_size=20, split_seed=3)
    assert torch.equal(again.val.source_index, ds.val.source_index)
    assert again.train.fingerprint() == ds.train.fingerprint()
    other = data.load_fashion_mnist(tmp_path, val_size=20, split_seed=4)
    assert not torch.equal(other.val.source_index, ds.val.source_index)
    assert other.train.fingerprint() != ds.train.fingerprint()


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load_fashion_mnist(tmp_path)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert "t10k-labels-idx1-ubyte" in msg and str(tmp_path) in msg
    with pytest.raises(data.DatasetNotFoundError):
        data.load_fashion_mnist(tmp_path / "does-not-exist")


def test_load_cifar100_pickles(tmp_path):
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    for name, n in (("train", 30), ("test", 10)):
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"fine_labels": rng.integers(0, 100, n).tolist(),
             b"coarse_labels": rng.integers(0, 20, n).tolist()}
        with open(tmp_path / name, "wb") as f:
            pickle.dump(d, f)
        if name == "test":
            test_d = d
    with open(tmp_path / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    ds = data.load_cifar100(tmp_path, val_size=5)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (25, 5, 10)
    assert ds.test.images.shape == (10, 3, 32, 32) and ds.num_classes == 100
    # channel-major rows: the first 1024 bytes are the red plane
    assert torch.equal(ds.test.images[2, 0].flatten(),
                       torch.from_numpy(test_d[b"data"][2, :1024].copy()))
    assert ds.test.labels.tolist() == test_d[b"fine_labels"] and ds.classes[1] == "c1"
    with pytest.raises(data.DatasetNotFoundError, match="cifar-100-python"):
        data.load_cifar100(tmp_path / "nope")


def test_imagefolder(tmp_path):
    pytest.importorskip("torchvision")
    Image = pytest.importorskip("PIL.Image")
    for c, cls in enumerate(("ant", "bee")):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (20 + i, 18), (40 * c, 10 * i, 0)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "bee" / "notes.txt").write_text("not an image")
    ds = data.ImageFolderDataset(tmp_path, train=False, image_size=16)
    assert ds.classes == ("ant", "bee") and len(ds) == 6
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    fp = ds.fingerprint()
    Image.new("RGB", (9, 9)).save(tmp_path / "ant" / "new.png")
    assert data.ImageFolderDataset(tmp_path, train=True, image_size=16).fingerprint() != fp
    loader = data.load_imagefolder_loader(tmp_path, train=True, batch_size=2, image_size=16,
                                          num_workers=0)
    xb, yb = next(iter(loader))
    assert xb.shape == (2, 3, 16, 16) and yb.shape == (2,)
    with pytest.raises(data.DatasetNotFoundError):
        data.ImageFolderDataset(tmp_path / "missing", train=True)


# ----------------------------------------------------------- damaged files
def snapshot(d):
    """{relative path: bytes} of every file under ``d``: what must stay as it was."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _truncate(p):
    p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])


@pytest.mark.parametrize("name,damage,needle", [
    ("train-images-idx3-ubyte.gz", _truncate, "EOFError"),  # cut short mid-download
    ("t10k-labels-idx1-ubyte.gz", lambda p: p.write_bytes(b"\x1f\x8b\x08garbage"), "("),
    ("train-labels-idx1-ubyte.gz", lambda p: p.write_bytes(b"not gzip at all"), "BadGzipFile"),
    ("t10k-images-idx3-ubyte.gz", lambda p: p.write_bytes(b""), "bad magic"),
    ("train-images-idx3-ubyte", _truncate, "but the file holds"),
])
def test_damaged_idx_file_is_named(tmp_path, name, damage, needle):
    write_fake_fmnist(tmp_path, gz=name.endswith(".gz"))
    damage(tmp_path / name)
    before = snapshot(tmp_path)
    with pytest.raises(data.DatasetFormatError) as e:
        data.load_fashion_mnist(tmp_path, val_size=20)
    msg = str(e.value)
    assert str(tmp_path / name) in msg and needle in msg, msg
    assert f"cifd download-data --data-dir {tmp_path}" in msg and "\n" not in msg
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name,blob,needle", [
    ("train", None, "UnpicklingError"),  # truncated
    ("test", b"", "(an empty file)"),
    ("train", pickle.dumps([1, 2, 3]), "TypeError"),  # a pickle of something else
    ("test", "rows of 100 bytes", "RuntimeError: shape '[-1, 3, 32, 32]' is invalid"),
    ("meta", b"\x80\x04junk", "("),
])
def test_damaged_cifar100_pickle_is_named(tmp_path, name, blob, needle):
    d = data.write_synthetic_cifar100(tmp_path / "c", 20, 10)
    p = d / name
    if blob == "rows of 100 bytes":
        import numpy as np
        blob = pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [1, 2]})
    p.write_bytes(p.read_bytes()[:200] if blob is None else blob)
    before = snapshot(d)
    with pytest.raises(data.DatasetFormatError) as e:
        data.load_cifar100(d, val_size=5)
    msg = str(e.value)
    assert f"{p} is not a readable CIFAR-100 pickle" in msg and needle in msg, msg
    assert "cifar-100-python.tar.gz" in msg and "\n" not in msg
    assert snapshot(d) == before


@pytest.mark.parametrize("num_workers", [0, 1])
def test_damaged_image_is_named(tmp_path, num_workers):
    pytest.importorskip("torchvision")
    root = data.write_synthetic_imagefolder(tmp_path / "inet", 2, 4, 1, size=12)
    bad = sorted((root / "train" / "n00000001").iterdir())[0]
    _truncate(bad)
    (root / "val" / "n00000000" / "fake.png").write_text("not an image")
    before = snapshot(root)
    ds = data.load_imagefolder(root, val_size=0, image_size=8)
    it = data.make_batches(ds.train, 4, mean=ds.mean, std=ds.std, num_workers=num_workers)
    with pytest.raises(data.DatasetFormatError) as e:
        list(it)
    msg = str(e.value)
    assert msg.startswith(f"{bad} is not a readable image (") and "Replace or delete" in msg
    assert "\n" not in msg and "Traceback" not in msg, msg
    with pytest.raises(data.DatasetFormatError, match="fake.png is not a readable image"):
        data.ImageFolderDataset(root / "val", train=False, image_size=8)[0]
    assert snapshot(root) == before


# ----------------------------------------------------------- augmentation
def test_random_crop_flip_is_a_crop_of_the_padded_image():
    x = torch.randint(1, 255, (16, 2, 7, 9), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = data.random_crop_flip(x, 2, True, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    # Replay the draws: offsets first, then flips.
    g2 = torch.Generator().manual_seed(0)
    off = torch.randint(0, 5, (16, 2), generator=g2)
    flips = torch.rand(16, generator=g2) < 0.5
    for i in range(16):
        r, c = off[i].tolist()
        want = padded[i, :, r:r + 7, c:c + 9]
        if flips[i]:
            want = want.flip(-1)
        assert torch.equal(out[i], want)
    assert flips.any() and (~flips).any()
    assert torch.equal(data.random_crop_flip(x, 0, False, g), x)


def test_normalize():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    y = data.normalize(x, (0.5,), (0.25,))
    torch.testing.assert_close(y, torch.tensor([[[[-2.0, 2.0]]]]))


# --------------------------------------------------------------- iteration
def make_split(n=50):
    return data.Split(torch.randint(0, 255, (n, 1, 6, 6), dtype=torch.uint8),
                      torch.arange(n) % 10, torch.arange(n))


def test_batch_iterator_covers_each_sample_once():
    sp = make_split(50)
    it = data.BatchIterator(sp, 16, mean=(0.5,), std=(0.5,), shuffle=True, augment=True,
                            crop_padding=1, hflip=True, channels_last=True)
    batches = list(it)
    assert len(batches) == len(it) == 4 and batches[-1].x.shape[0] == 2
    pos = torch.cat([b.pos for b in batches])
    assert torch.equal(pos.sort().values, torch.arange(50))
    assert not torch.equal(pos, torch.arange(50))  # shuffled
    for b in batches:
        assert b.x.dtype == torch.float32 and torch.equal(b.y, sp.labels[b.pos])
    plain = list(data.BatchIterator(sp, 16, mean=(0.5,), std=(0.5,)))
    assert torch.equal(torch.cat([b.pos for b in plain]), torch.arange(50))
    assert len(data.BatchIterator(sp, 16, mean=(0.,), std=(1.,), drop_last=True)) == 3


def test_batch_iterator_state_resumes_exactly():
    sp = make_split(40)
    kw = dict(mean=(0.5,), std=(0.5,), shuffle=True, augment=True, crop_padding=2,
              hflip=True, seed=7)
    a = data.BatchIterator(sp, 8, **kw)
    list(a)
    state = a.state_dict()
    epoch2 = list(a)
    b = data.BatchIterator(sp, 8, **kw)
    b.load_state_dict(state)
    for u, v in zip(epoch2, b):
        assert torch.equal(u.pos, v.pos) and torch.equal(u.x, v.x)
    c = data.BatchIterator(sp, 8, **kw)  # a fresh iterator replays epoch 1, not 2
    assert not torch.equal(next(iter(c)).pos, epoch2[0].pos)


@pytest.mark.parametrize("n,world", [(50, 4), (48, 3), (7, 2)])
def test_sharding_matches_distributed_sampler(n, world):
    sp = make_split(n)
    shards = []
    for rank in range(world):
        it = data.BatchIterator(sp, 5, mean=(0.,), std=(1.,), rank=rank, world_size=world)
        shards.append(torch.cat([b.pos for b in it]))
        ref = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank,
                                                  shuffle=False)
        assert shards[-1].tolist() == list(ref)
    assert len({s.numel() for s in shards}) == 1
    assert set(torch.cat(shards).tolist()) == set(range(n))
    # shuffled: every rank sees the same permutation, so the shards still partition it
    orders = [torch.cat([b.pos for b in data.BatchIterator(
        sp, 5, mean=(0.,), std=(1.,), shuffle=True, seed=3, rank=r, world_size=world)])
        for r in range(world)]
    assert set(torch.cat(orders).tolist()) == set(range(n))


def test_sharded_sampler_state():
    s = data.ShardedSampler(20, shuffle=True, seed=1, rank=1, world_size=3)
    list(s)
    st = s.state_dict()
    nxt = list(s)
    s2 = data.ShardedSampler(20, shuffle=True, seed=1, rank=1, world_size=3)
    s2.load_state_dict(st)
    assert list(s2) == nxt and len(nxt) == len(s) == 7
