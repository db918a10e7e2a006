"""Datasets (digits, synthetic, mnist1d, and torchvision's from files in their real on-disk formats) and the
seeded batch sampler."""

from __future__ import annotations

import os
import pickle
import socket
import struct

import numpy as np
import pytest
import torch

from bnexp.config import DataConfig
from bnexp.data import BatchSampler, DataError, load_dataset
from bnexp.engine.rundir import read_metrics, read_summary
from conftest import DEFAULT_CONFIG


def test_digits_is_the_offline_default():
    ds = load_dataset(DataConfig())
    assert ds.name == "digits" and ds.num_classes == 10
    assert len(ds.y_train) + len(ds.y_test) == 1797 and len(ds.y_test) == 360
    assert ds.input_shape == (1, 8, 8) and ds.x_train.dtype == torch.float32
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) == 1.0
    assert set(ds.y_test.tolist()) == set(range(10))  # a stratified split


def test_split_and_subsets_follow_data_seed():
    a, b = load_dataset(DataConfig()), load_dataset(DataConfig())
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    c = load_dataset(DataConfig(seed=1))
    assert not torch.equal(a.y_train, c.y_train)
    sub = load_dataset(DataConfig(train_size=100, test_size=50))
    assert len(sub.y_train) == 100 and len(sub.y_test) == 50
    with pytest.raises(DataError, match=r"data\.train_size: 5000 is more than the 1437"):
        load_dataset(DataConfig(train_size=5000))


def test_synthetic_is_seeded():
    cfg = DataConfig(dataset="synthetic", synthetic={"num_samples": 500, "num_features": 6, "num_classes": 3})
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.input_shape == (6,) and a.num_classes == 3
    assert len(a.y_train) == 400 and len(a.y_test) == 100
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, load_dataset(cfg.model_copy(update={"seed": 1})).x_train)


def test_mnist1d_is_generated_offline_and_cached(mnist1d_root, monkeypatch):
    import mnist1d.data

    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d must be generated, not downloaded")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    cfg = DataConfig(dataset="mnist1d", root=str(mnist1d_root))
    state = np.random.get_state()
    first = load_dataset(cfg)
    assert np.array_equal(np.random.get_state()[1], state[1])  # numpy's global stream is left alone
    # The published defaults: 4,000 training and 1,000 test signals of length 40, ten classes.
    assert first.input_shape == (1, 40) and len(first.y_train) == 4000 and len(first.y_test) == 1000
    assert (mnist1d_root / "mnist1d" / "mnist1d_default.npz").is_file()

    with monkeypatch.context() as m:
        m.setattr(mnist1d.data, "make_dataset", lambda *a, **k: pytest.fail("cache not used"))
        again = load_dataset(cfg)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)

    cache = mnist1d_root / "mnist1d" / "mnist1d_default.npz"
    cache.write_bytes(cache.read_bytes()[:100])  # a write cut short
    regenerated = load_dataset(cfg)
    assert torch.equal(first.x_train, regenerated.x_train)
    with np.load(cache) as z:
        assert np.array_equal(z["y_test"], first.y_test.numpy())


def test_batch_sampler_epochs_are_seeded_permutations():
    s = BatchSampler(10, 3, seed=0)
    epoch1 = torch.cat([s.next() for _ in range(3)])  # 3 batches of 3; the tail of 1 is dropped
    assert len(set(epoch1.tolist())) == 9 and s.epoch == 1
    assert len(s.next()) == 3 and s.epoch == 2
    t = BatchSampler(10, 3, seed=0)
    assert torch.equal(torch.cat([t.next() for _ in range(3)]), epoch1)


def test_batch_sampler_state_round_trips():
    s = BatchSampler(50, 7, seed=3)
    for _ in range(9):
        s.next()
    state = s.state_dict()
    expected = [s.next() for _ in range(12)]
    r = BatchSampler(50, 7, seed=99)
    r.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [r.next() for _ in range(12)]))


# --- torchvision datasets from small files in their real formats ------------------------------------------

def _write_idx(path, array: np.ndarray) -> None:
    """The idx format MNIST ships in: magic (0, 0, type 0x08 = ubyte, ndim), big-endian sizes, the bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def _write_mnist_like(root, folder: str, n_train: int = 64, n_test: int = 32):
    rng = np.random.default_rng(0)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        _write_idx(raw / f"{split}-images-idx3-ubyte", images)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        arrays[split] = (images, labels)
    return arrays


def _write_cifar10(root, n_per_batch: int = 10):
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3 * 32 * 32), dtype=np.uint8)  # rows: R, G, B planes
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        batches[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, f)
    return batches


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_datasets_load_through_torchvision_and_train(cli, write_config, tmp_path, dataset, folder):
    arrays = _write_mnist_like(tmp_path / "data", folder)
    ds = load_dataset(DataConfig(dataset=dataset, root=str(tmp_path / "data"), batch_size=16))
    assert ds.input_shape == (1, 28, 28) and len(ds.y_train) == 64 and len(ds.y_test) == 32
    images, labels = arrays["train"]
    assert torch.allclose(ds.x_train[:, 0], torch.from_numpy(images.astype(np.float32) / 255.0))
    assert torch.equal(ds.y_train, torch.from_numpy(labels.astype(np.int64)))

    path = write_config({"device": "cpu", "data": {"dataset": dataset, "batch_size": 16},
                         "model": {"norm": "torch", "hidden": [16]},
                         "train": {"steps": 3, "eval_every": 3, "log_every": 1}, "probes": {"enabled": False}})
    r = cli("train", "--config", path, "--out", "run", "--quiet")
    assert r.code == 0, r.err
    assert read_summary(tmp_path / "run")["status"] == "completed"
    assert [row["step"] for row in read_metrics(tmp_path / "run") if "test/accuracy" in row] == [0, 3]


def test_cifar10_loads_from_pickle_batches_and_trains(cli, write_config, tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    # The files are real CIFAR pickle batches but not the published ones: torchvision's md5 check would
    # reject them, so only that check is replaced (by "the file exists"); all loading code is torchvision's.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    batches = _write_cifar10(tmp_path / "data")
    ds = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path / "data"), batch_size=8))
    assert ds.input_shape == (3, 32, 32) and len(ds.y_train) == 50 and len(ds.y_test) == 10
    data, labels = batches["test_batch"]
    expected = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    assert torch.allclose(ds.x_test, expected) and ds.y_test.tolist() == labels

    path = write_config({"device": "cpu", "data": {"dataset": "cifar10", "batch_size": 8},
                         "model": {"kind": "cnn", "norm": "torch", "channels": [4]},
                         "train": {"steps": 3, "eval_every": 3, "log_every": 1}, "probes": {"enabled": False}})
    r = cli("train", "--config", path, "--out", "run", "--quiet")
    assert r.code == 0, r.err
    assert read_summary(tmp_path / "run")["status"] == "completed"


def test_unreadable_idx_file_is_a_one_line_error(cli, write_config, tmp_path):
    _write_mnist_like(tmp_path / "data", "MNIST")
    images = tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])  # truncated
    path = write_config({"data": {"dataset": "mnist"}})
    r = cli("train", "--config", path, "--quiet")
    assert r.code == 2 and r.out == "" and "Traceback" not in r.err
    assert r.err.startswith(f"error: cannot read mnist files in {os.path.join('data', 'MNIST', 'raw')}: ")
    assert len(r.err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"),
                                             ("cifar10", "cifar-10-batches-py")])
def test_missing_torchvision_dataset_offline(cli, write_config, tmp_path, dataset, folder):
    path = write_config({"data": {"dataset": dataset, "root": "datasets", "download": False}})
    r = cli("train", "--config", path, "--quiet")
    assert r.code == 2 and r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.err
    assert lines[0].startswith(f"error: {dataset} not found") and os.path.join("datasets", folder) in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]  # no data root, no runs/


@pytest.mark.parametrize("fraction, side", [(0.001, "test"), (0.005, "test"), (0.995, "training")])
def test_test_fraction_that_leaves_a_side_without_every_class(cli, tmp_path, fraction, side):
    r = cli("train", "--config", DEFAULT_CONFIG, "--set", f"data.test_fraction={fraction}",
            "--set", "data.batch_size=2", "--out", "o", "--quiet")
    assert r.code == 2 and r.out == "" and "Traceback" not in r.err
    assert r.err.strip().splitlines() == [r.err.strip()]
    assert "data.test_fraction" in r.err and f"for the {side} set" in r.err
    assert os.listdir(tmp_path) == []


def test_a_failed_download_leaves_no_folder_behind(cli, write_config, tmp_path, monkeypatch):
    """Offline (urlopen fails at once here, as with no network), data.download: true is one line, and the
    data/MNIST/raw/ that torchvision makes before fetching anything is removed again."""
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "keep.txt").write_text("the user's")
    path = write_config({"data": {"dataset": "mnist", "root": "datasets", "download": True}})
    r = cli("train", "--config", path, "--quiet")
    assert r.code == 2 and r.out == "" and "Traceback" not in r.err
    assert r.err.startswith(f"error: could not download mnist into {os.path.join('datasets', 'MNIST', 'raw')}")
    assert r.err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "datasets"]
    assert os.listdir(tmp_path / "datasets") == ["keep.txt"]
