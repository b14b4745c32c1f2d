# SPDX-License-Identifier: Apache-2.0
"""Configuration: YAML + dotted overrides, errors that name the key, hashes."""
import pytest

from cifd_kernels.training import config as C


@pytest.mark.parametrize("name", sorted(p.stem for p in C.CONFIG_DIR.glob("*.yaml")))
def test_packaged_configs_load(name):
    from cifd_kernels.training.text.config import is_text_config, load_text_config
    if is_text_config(name):  # the text recipes have their own schema
        assert load_text_config(name).recipe == "text"
        with pytest.raises(C.ConfigError, match="text recipe"):
            C.load_config(name)
        return
    cfg = C.load_config(name)
    assert cfg.data.name in ("fashion_mnist", "cifar100", "imagefolder")
    assert C.from_dict(C.to_dict(cfg)) == cfg


def test_overrides_are_typed():
    cfg = C.load_config("fmnist_teacher", [
        "train.epochs=3", "data.dir=/x", "train.lr=1e-3", "data.augment=false",
        "rdm.rates=[1, 0.5]", "train.milestones=3,6", "train.warmup_epochs=1",
        "run.name=abc=def"])
    assert cfg.train.epochs == 3 and cfg.data.dir == "/x" and cfg.train.lr == 1e-3
    assert cfg.data.augment is False and cfg.rdm.rates == [1.0, 0.5]
    assert cfg.train.milestones == [3, 6] and cfg.train.warmup_epochs == 1.0
    assert cfg.run.name == "abc=def"


@pytest.mark.parametrize("override,match", [
    ("train.epoch=3", r"unknown config key 'train.epoch' \(did you mean 'train.epochs'\?\)"),
    ("trian.lr=1", r"unknown config key 'trian' \(did you mean 'train'\?\)"),
    ("train.epochs=three", r"train.epochs: expected an int, got 'three'"),
    ("train.epochs=2.5", r"train.epochs: expected an int"),
    ("train.lr=fast", r"train.lr: expected a number"),
    ("data.augment=maybe", r"data.augment: expected a bool"),
    ("train.optimizer=adam", r"train.optimizer: 'adam' is not one of sgd, adamw"),
    ("train.epochs.max=1", r"'train.epochs' is a value, not a section"),
    ("train=1", r"train: is a section"),
    ("rdm.rates=[a]", r"rdm.rates\[0\]: expected a number"),
    ("epochs", r"not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(C.ConfigError, match=match):
        C.load_config(None, [override])


def test_yaml_errors_name_file_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 2\n  lr_max: 0.1\n")
    with pytest.raises(C.ConfigError, match=r"c.yaml: unknown config key 'train.lr_max'"):
        C.load_config(str(p))
    p.write_text("train: [1, 2]\n")
    with pytest.raises(C.ConfigError, match="train: is a section"):
        C.load_config(str(p))
    with pytest.raises(C.ConfigError, match="not found"):
        C.load_config(str(tmp_path / "missing.yaml"))
    p.write_text("train:\n  lr: 2e-3\n")  # YAML 1.1 reads 2e-3 as a string
    assert C.load_config(str(p)).train.lr == 2e-3
    p.write_bytes(b"train:\n  epochs: \xff\xfe\x00\x81\n")  # not UTF-8 (issue 13)
    with pytest.raises(C.ConfigError, match=r"c.yaml: not a valid YAML text file \(UnicodeDecodeError"):
        C.load_config(str(p))
    p.write_text("- 1\n- 2\n")
    with pytest.raises(C.ConfigError, match="c.yaml: expected a mapping of sections"):
        C.load_config(str(p))


def test_config_hash():
    secs = ("data", "model", "train")
    base = C.load_config("fmnist_teacher")
    h = C.config_hash(base, secs)
    same = C.load_config("fmnist_teacher", ["data.dir=/elsewhere", "run.out_dir=/o",
                                            "run.threads=2", "run.progress=false",
                                            "kd.tau=9", "run.stop_after=1"])
    assert C.config_hash(same, secs) == h  # paths, threads, other sections: not hashed
    lr = C.load_config("fmnist_teacher", ["train.lr=0.2"])
    assert C.config_hash(lr, secs) != h
    assert C.config_hash(base, secs, {"method": "kd"}) != h
    assert C.diff_items(C.hashed_items(base, secs), C.hashed_items(lr, secs)) == \
        ["train.lr: 0.1 -> 0.2"]
