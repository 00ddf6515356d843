"""Datasets for the benchmarks: in-memory tensors with a fixed train/test split.

Two entries, both returning :class:`DatasetSplits`:

* ``digits`` -- scikit-learn's bundled 8x8 handwritten digits (UCI "Optical Recognition
  of Handwritten Digits", Alpaydin & Kaynak 1998), the embedded default that needs no
  files: 1797 images, a stratified 1437/360 train/test split with a fixed seed.
* ``mnist`` -- the original MNIST IDX files (LeCun, Bottou, Bengio & Haffner 1998,
  "Gradient-based learning applied to document recognition"), 60000/10000 images of
  28x28, normalised with the customary mean 0.1307 and std 0.3081.

MNIST files are looked up in ``data_dir``, else ``$PRUNELAB_DATA``, else the download
cache ``$XDG_CACHE_HOME/prunelab/mnist`` (``~/.cache/prunelab/mnist``); in each folder
either directly or in a ``mnist/`` subfolder.  Every file's sha256 is checked before it
is parsed.  Nothing is cached between calls.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from prunelab import distributed
from prunelab.bench.download import DEFAULT_MIRROR, MNIST_FILES, download_mnist, verify_sha256
from prunelab.errors import PrunelabError
from prunelab.registry import Registry

__all__ = [
    "DATASETS", "DEFAULT_MIRROR", "DatasetSplits", "MNIST_FILES", "default_cache_dir", "download_mnist",
    "find_mnist_files", "load_dataset", "load_digits", "load_mnist", "make_loaders", "read_idx_images",
    "read_idx_labels",
]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0

_IMAGES_MAGIC = 2051  # IDX: unsigned byte, 3 dimensions
_LABELS_MAGIC = 2049  # IDX: unsigned byte, 1 dimension


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset as two in-memory ``TensorDataset`` s of ``(image, label)`` pairs.

    ``input_shape`` is one sample's shape without the batch dimension, e.g. ``(1, 28, 28)``.
    """

    train: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    num_classes: int
    name: str


DatasetLoader = Callable[..., DatasetSplits]
DATASETS: Registry[DatasetLoader] = Registry("dataset")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> DatasetSplits:
    """Load the registered dataset ``name`` (see ``prunelab list``)."""
    return DATASETS.get(name)(data_dir=data_dir, download=download)


# --- digits -----------------------------------------------------------------------------
@DATASETS.register("digits", "scikit-learn 8x8 digits, 1437/360 stratified split, no files needed")
def load_digits(data_dir: str | os.PathLike | None = None, download: bool = False) -> DatasetSplits:
    """scikit-learn's bundled 8x8 digits as ``(N, 1, 8, 8)`` float tensors.

    Pixels (0..16) are scaled to [0, 1], then standardised with the *training* set's
    mean and std.  The split is stratified by class with a fixed seed, so it is identical
    on every machine.  ``data_dir`` and ``download`` are not read (the data is bundled
    with scikit-learn); they keep the signature of the other loaders.  ``prunelab prune``
    refuses ``--data-dir`` / ``--download`` with ``--dataset digits`` instead of ignoring them.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = bunch.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=DIGITS_TEST_SIZE, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    mean, std = float(x_train.mean()), float(x_train.std())
    x_train = torch.from_numpy((x_train - mean) / std).unsqueeze(1)  # (1437, 1, 8, 8)
    x_test = torch.from_numpy((x_test - mean) / std).unsqueeze(1)  # (360, 1, 8, 8)
    return DatasetSplits(
        train=TensorDataset(x_train.contiguous(), torch.from_numpy(y_train)),
        test=TensorDataset(x_test.contiguous(), torch.from_numpy(y_test)),
        input_shape=(1, 8, 8),
        num_classes=10,
        name="digits",
    )


# --- MNIST ------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """Where ``--download`` puts MNIST when no folder is given: ``~/.cache/prunelab/mnist``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(root) / "prunelab" / "mnist"


def _mnist_root(data_dir: str | os.PathLike | None) -> tuple[Path, str]:
    """The folder to search (or download into) and where that choice came from."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), "--data-dir"
    env = os.environ.get("PRUNELAB_DATA")
    if env:
        return Path(env).expanduser(), "$PRUNELAB_DATA"
    return default_cache_dir(), "the download cache"


def find_mnist_files(data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Map each MNIST file name to its path, searching ``<root>`` then ``<root>/mnist``.

    ``root`` is ``data_dir``, else ``$PRUNELAB_DATA``, else :func:`default_cache_dir`.
    Raises :class:`PrunelabError` naming the first missing file.
    """
    root, origin = _mnist_root(data_dir)
    found: dict[str, Path] = {}
    for name in MNIST_FILES:
        for folder in (root, root / "mnist"):
            if (folder / name).is_file():
                found[name] = folder / name
                break
        else:
            raise PrunelabError(
                f"MNIST file {name!r} not found in {os.fspath(root)!r} or its 'mnist/' subfolder (from {origin}); "
                f"pass --data-dir DIR or set PRUNELAB_DATA to the folder holding the four MNIST IDX .gz files, "
                f"or use --download"
            )
    return found


def _read_idx(path: str | os.PathLike, magic: int, header: str) -> tuple[tuple[int, ...], bytes]:
    """Gunzip an IDX file and check its magic number and size; returns (dims, payload)."""
    path = os.fspath(path)
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise PrunelabError(f"{path}: not a readable gzip file ({exc}); delete it and re-download (--download)") from None
    size = struct.calcsize(header)
    found = struct.unpack_from(">I", data)[0] if len(data) >= 4 else None
    if found is not None and found != magic:
        kind = "images" if magic == _IMAGES_MAGIC else "labels"
        raise PrunelabError(
            f"{path}: IDX magic number {found}, expected {magic} (MNIST {kind}); pass the original "
            f"MNIST {kind} file (images 2051, labels 2049)"
        )
    if len(data) < size:
        raise PrunelabError(f"{path}: {len(data)} bytes is too short for an IDX header of {size} bytes; delete it and re-download")
    _, *dims = struct.unpack_from(header, data)
    expected = size + math.prod(dims)
    if len(data) != expected:
        raise PrunelabError(
            f"{path}: {len(data)} bytes after gunzip, expected {expected} for dimensions {tuple(dims)}; "
            f"the file is corrupt or truncated, delete it and re-download"
        )
    return tuple(dims), data[size:]


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Parse a gzipped IDX3 image file (magic 2051, header ``>IIII``) to ``uint8 (N, rows, cols)``."""
    dims, payload = _read_idx(path, _IMAGES_MAGIC, ">IIII")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def read_idx_labels(path: str | os.PathLike) -> np.ndarray:
    """Parse a gzipped IDX1 label file (magic 2049, header ``>II``) to ``uint8 (N,)``."""
    dims, payload = _read_idx(path, _LABELS_MAGIC, ">II")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def _mnist_part(images_path: Path, labels_path: Path) -> TensorDataset:
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise PrunelabError(
            f"{images_path} holds {images.shape} images but {labels_path} holds {labels.shape[0]} labels; "
            f"expected N x 28 x 28 images with N labels, use the original MNIST files"
        )
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)  # (N, 1, 28, 28) in [0, 255]
    x.mul_(1.0 / 255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    y = torch.from_numpy(labels.astype(np.int64))
    if y.numel() == 0:
        raise PrunelabError(f"{labels_path}: holds no labels (and {images_path} no images); use the original MNIST files")
    if int(y.max()) > 9:
        raise PrunelabError(f"{labels_path}: label {int(y.max())} out of range 0..9; use the original MNIST files")
    return TensorDataset(x, y)


@DATASETS.register("mnist", "MNIST 28x28, 60000/10000, original IDX files (--data-dir / PRUNELAB_DATA / --download)")
def load_mnist(data_dir: str | os.PathLike | None = None, download: bool = False) -> DatasetSplits:
    """MNIST (LeCun et al. 1998) as ``(N, 1, 28, 28)`` float tensors, normalised (0.1307, 0.3081).

    With ``download=True`` missing files are fetched (checksum-verified) into ``data_dir``,
    ``$PRUNELAB_DATA`` or :func:`default_cache_dir`.  Each file's sha256 is verified
    before parsing; a mismatch raises :class:`PrunelabError`.
    """
    try:
        files = find_mnist_files(data_dir)
    except PrunelabError:
        if not download:
            raise
        download_mnist(_mnist_root(data_dir)[0])
        files = find_mnist_files(data_dir)
    for name, path in files.items():
        verify_sha256(path, MNIST_FILES[name])
    return DatasetSplits(
        train=_mnist_part(files["train-images-idx3-ubyte.gz"], files["train-labels-idx1-ubyte.gz"]),
        test=_mnist_part(files["t10k-images-idx3-ubyte.gz"], files["t10k-labels-idx1-ubyte.gz"]),
        input_shape=(1, 28, 28),
        num_classes=10,
        name="mnist",
    )


# --- loaders ----------------------------------------------------------------------------
def make_loaders(
    splits: DatasetSplits, batch_size: int, seed: int, test_batch_size: int = 1000
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` with deterministic shuffling of the training set.

    Single process: the train loader shuffles with a ``torch.Generator`` seeded by
    ``seed``, so the batch order of every epoch is reproducible.  Under
    ``torch.distributed`` it uses a seeded ``DistributedSampler`` (one shard per rank;
    :func:`prunelab.bench.training.train` calls ``set_epoch``).  The test loader is
    never shuffled nor sharded: every rank evaluates the full test set, and it draws from a
    generator of its own, so an evaluation leaves torch's global RNG as it was.
    """
    for label, value in (("batch_size", batch_size), ("test_batch_size", test_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PrunelabError(f"{label} must be a positive integer, got {value!r}; pass e.g. --batch-size 128")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise PrunelabError(f"seed must be an integer in [0, 2**32), got {seed!r}; pass e.g. --seed 0")
    if distributed.is_distributed():
        sampler = DistributedSampler(splits.train, shuffle=True, seed=seed)
        train_loader = DataLoader(splits.train, batch_size=batch_size, sampler=sampler)
    else:
        generator = torch.Generator().manual_seed(seed)
        train_loader = DataLoader(splits.train, batch_size=batch_size, shuffle=True, generator=generator)
    # its own generator: each pass draws a worker base seed, which must not come from (and
    # shift) torch's global RNG -- an evaluation would change every later random draw
    test_loader = DataLoader(splits.test, batch_size=test_batch_size, shuffle=False,
                             generator=torch.Generator().manual_seed(seed))
    return train_loader, test_loader
