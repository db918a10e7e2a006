"""Datasets as in-memory tensors on the training device, and deterministic batching by index.

These datasets are small enough to live on the device whole, so there is no DataLoader: a batch is an
index gather, and the data order is a seeded permutation that can be saved and restored exactly.
"""

from __future__ import annotations

from bnexp.errors import UserError, first_line

import math
import os
import pickle
import shutil
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from bnexp.config import DataConfig


REGRESSION = ("linear_regression",)  # datasets whose targets are vectors, fitted with an MSE loss


class DataError(UserError):
    """A user-facing data problem (missing files offline, impossible sizes): one line, exit status 2."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # float32, (N, *input_shape)
    y_train: torch.Tensor  # classification: int64 labels (N,); regression: float32 targets (N, outputs)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int  # the network's outputs: classes, or the targets' dimension for regression
    task: str = "classification"  # or "regression" (an MSE loss; no accuracy anywhere)

    @property
    def regression(self) -> bool:
        return self.task == "regression"

    @property
    def loss_function(self):
        """Cross-entropy on labels; for regression, the mean squared error over every output."""
        return torch.nn.functional.mse_loss if self.regression else torch.nn.functional.cross_entropy

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(features,) for tabular data, (C, L) for 1-D signals, (C, H, W) for images."""
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device) -> "Dataset":
        return Dataset(self.name, self.x_train.to(device), self.y_train.to(device),
                       self.x_test.to(device), self.y_test.to(device), self.num_classes, self.task)


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    # A stratified split puts at least one example of each class on each side; sklearn rounds the test
    # side up. Checked here so an extreme fraction is a one-line error, not sklearn's traceback.
    n, classes = len(y), len(np.unique(y))
    n_test = math.ceil(test_fraction * n)
    if n_test < classes or n - n_test < classes:
        side, count = ("test", n_test) if n_test < classes else ("training", n - n_test)
        raise DataError(f"data.test_fraction: {test_fraction} leaves {count} of {n} examples for the {side} "
                        f"set, fewer than the {classes} classes a stratified split needs")
    return train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)


def _digits(cfg: DataConfig):
    from sklearn.datasets import load_digits

    d = load_digits()
    # 8x8 images with values 0..16: scale to [0, 1] like image pixels, keep the image shape for the CNN.
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    x_tr, x_te, y_tr, y_te = _split(x, d.target, cfg.test_fraction, cfg.seed)
    return x_tr, y_tr, x_te, y_te, 10


def _mnist1d(cfg: DataConfig):
    from mnist1d.data import get_dataset_args, make_dataset

    # The published defaults (4,000 train / 1,000 test signals of length 40), generated, never downloaded.
    # Generation takes ~2 s, so the result is cached next to the other datasets.
    cache = Path(cfg.root) / "mnist1d" / "mnist1d_default.npz"
    cached = _read_mnist1d_cache(cache)
    if cached is not None:
        x_tr, y_tr, x_te, y_te = cached
    else:
        # make_dataset reseeds numpy's global generator: keep the caller's stream unchanged.
        saved = np.random.get_state()
        try:
            d = make_dataset(get_dataset_args())
        finally:
            np.random.set_state(saved)
        x_tr, y_tr, x_te, y_te = d["x"], d["y"], d["x_test"], d["y_test"]
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, x=x_tr, y=y_tr, x_test=x_te, y_test=y_te)
            tmp.replace(cache)
        except OSError:
            pass  # a read-only data root only costs the regeneration next time
    as_signal = lambda a: a.astype(np.float32)[:, None, :]  # noqa: E731 - (N, 1, 40) for Conv1d
    return as_signal(x_tr), y_tr, as_signal(x_te), y_te, 10


def _read_mnist1d_cache(cache: Path):
    if not cache.is_file():
        return None
    try:
        with np.load(cache) as z:
            return z["x"], z["y"], z["x_test"], z["y_test"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # a damaged cache (a killed write, a stray file) is regenerated and replaced


def _synthetic(cfg: DataConfig):
    s = cfg.synthetic
    rng = np.random.default_rng(cfg.seed)
    means = rng.normal(size=(s.num_classes, s.num_features)) * s.separation / np.sqrt(s.num_features) * 2
    y = rng.integers(0, s.num_classes, size=s.num_samples)
    x = (means[y] + rng.normal(size=(s.num_samples, s.num_features))).astype(np.float32)
    n_test = max(1, int(round(s.num_samples * cfg.test_fraction)))
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test], s.num_classes


def _linear_regression(cfg: DataConfig):
    """Santurkar et al. 2018's task for a deep linear network: x ~ N(0, I_d), y = A x with A a d x d matrix
    of N(0, 1) entries; A and the points are drawn from data.seed."""
    lr = cfg.linear_regression
    rng = np.random.default_rng(cfg.seed)
    a = rng.normal(size=(lr.num_features, lr.num_features))
    x = rng.normal(size=(lr.num_samples + lr.num_test, lr.num_features))
    y = x @ a.T
    n = lr.num_samples
    return x[:n], y[:n], x[n:], y[n:], lr.num_features


_TORCHVISION = {
    # name: (torchvision class name, folder torchvision expects under root, classes)
    "mnist": ("MNIST", "MNIST/raw", 10),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", 10),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10),
}


def _torchvision(cfg: DataConfig):
    import torchvision.datasets as tvd

    cls_name, folder, classes = _TORCHVISION[cfg.dataset]
    cls = getattr(tvd, cls_name)
    try:
        with _removed_on_failure(Path(cfg.root) / folder):
            train = cls(cfg.root, train=True, download=cfg.download)
            test = cls(cfg.root, train=False, download=cfg.download)
    except (RuntimeError, OSError, ValueError, TypeError, EOFError, KeyError, IndexError,
            pickle.UnpicklingError) as err:
        where = Path(cfg.root) / folder
        first = first_line(err)
        if cfg.download:  # no network, a refused or interrupted download
            raise DataError(f"could not download {cfg.dataset} into {where}: {first}") from None
        # torchvision says "Dataset not found" when a file is missing (CIFAR10: "... or corrupted");
        # anything else means files with the right names but the wrong contents (truncated, another format).
        if isinstance(err, RuntimeError) and "not found" in first:
            raise DataError(f"{cfg.dataset} not found: expected its files in {where} "
                            f"(set data.download: true to fetch them)") from None
        raise DataError(f"cannot read {cfg.dataset} files in {where}: {first}") from None

    def images(ds) -> np.ndarray:
        x = np.asarray(ds.data, dtype=np.float32) / 255.0
        # MNIST is (N, H, W); CIFAR is (N, H, W, C): both become (N, C, H, W).
        return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)

    return images(train), np.asarray(train.targets), images(test), np.asarray(test.targets), classes


@contextmanager
def _removed_on_failure(folder: Path) -> Iterator[None]:
    """A download that fails (offline, say) leaves nothing behind: torchvision creates the dataset's folder
    before it fetches anything, so the folders of `folder`'s path that did not exist before are removed,
    with whatever the failed attempt put in them."""
    new = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
    try:
        yield
    except BaseException:
        if new:
            shutil.rmtree(new[-1], ignore_errors=True)
        raise


_LOADERS = {"digits": _digits, "mnist1d": _mnist1d, "synthetic": _synthetic, "linear_regression": _linear_regression,
            **{name: _torchvision for name in _TORCHVISION}}


def _subset(x: np.ndarray, y: np.ndarray, size: int | None, seed: int, what: str):
    if size is None:
        return x, y
    if size > len(y):
        raise DataError(f"data.{what}_size: {size} is more than the {len(y)} examples available")
    keep = np.random.default_rng(seed).permutation(len(y))[:size]
    return x[keep], y[keep]


def load_dataset(cfg: DataConfig, device: torch.device | str = "cpu") -> Dataset:
    x_tr, y_tr, x_te, y_te, classes = _LOADERS[cfg.dataset](cfg)
    x_tr, y_tr = _subset(x_tr, y_tr, cfg.train_size, cfg.seed, "train")
    x_te, y_te = _subset(x_te, y_te, cfg.test_size, cfg.seed + 1, "test")
    if cfg.batch_size > len(y_tr):
        raise DataError(f"data.batch_size: {cfg.batch_size} is larger than the training set ({len(y_tr)})")
    as_t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a), dtype=dt)  # noqa: E731
    task = "regression" if cfg.dataset in REGRESSION else "classification"
    y_type = torch.float32 if task == "regression" else torch.int64
    ds = Dataset(cfg.dataset, as_t(x_tr, torch.float32), as_t(y_tr, y_type),
                 as_t(x_te, torch.float32), as_t(y_te, y_type), classes, task)
    return ds.to(torch.device(device))


class BatchSampler:
    """Batches of exactly `batch_size` indices, a fresh seeded permutation each epoch.

    The tail of an epoch that does not fill a batch is dropped, so every batch has the same m: BN's
    statistics (and the probes' population estimate) assume a fixed batch size.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device | str = "cpu"):
        self.n, self.batch_size, self.device = n, batch_size, torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._perm: torch.Tensor | None = None
        self._pos = 0

    def _new_epoch(self) -> None:
        self._perm = torch.randperm(self.n, generator=self.generator).to(self.device)
        self._pos = 0
        self.epoch += 1

    def next(self) -> torch.Tensor:
        if self._perm is None or self._pos + self.batch_size > self.n:
            self._new_epoch()
        idx = self._perm[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "epoch": self.epoch, "pos": self._pos,
                "perm": None if self._perm is None else self._perm.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.epoch, self._pos = state["epoch"], state["pos"]
        self._perm = None if state["perm"] is None else state["perm"].to(self.device)


class CropFlip:
    """CIFAR-style augmentation of training batches (`data.augment: crop_flip`): each image zero-padded by 4
    pixels, a random crop of its original size taken, and the crop flipped horizontally with probability
    1/2 (the augmentation of He et al. 2016's CIFAR experiments).

    The draws come from a generator of their own, seeded from the run's seed (training's data order and
    torch's RNG never draw from it) and saved in checkpoints, so augmented runs are deterministic and resume
    bit-identically. `draw(n)` gives each of n images its (row offset, column offset, flip); the draws of a
    global batch can be split like its indices across processes.
    """

    PAD = 4

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, n: int) -> torch.Tensor:
        offsets = torch.randint(0, 2 * self.PAD + 1, (n, 2), generator=self.generator)
        flips = (torch.rand(n, 1, generator=self.generator) < 0.5).long()
        return torch.cat([offsets, flips], 1)

    @classmethod
    def apply(cls, x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """x (n, C, H, W) cropped and flipped as `draws` (n, 3) say, by one gather from the padded batch."""
        n, c, h, w = x.shape
        p = cls.PAD
        draws = draws.to(x.device)
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        rows = draws[:, :1] + torch.arange(h, device=x.device)  # (n, h)
        cols = draws[:, 1:2] + torch.arange(w, device=x.device)
        cols = torch.where(draws[:, 2:].bool(), cols.flip(1), cols)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        channel = torch.arange(c, device=x.device).view(1, c, 1, 1)
        return padded[batch, channel, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
