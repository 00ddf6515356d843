"""Datasets: digits split, MNIST parsing and checks, checksum-verified download, loaders."""

from __future__ import annotations

import gzip
import shutil
import struct

import pytest
import torch

from prunelab.bench import datasets
from prunelab.bench.datasets import (
    DATASETS, MNIST_FILES, download_mnist, find_mnist_files, load_dataset, load_digits, load_mnist, make_loaders,
    read_idx_images, read_idx_labels,
)
from prunelab.bench.download import fetch, sha256_file
from prunelab.errors import PrunelabError


def write_gz(path, payload: bytes):
    with gzip.open(path, "wb") as handle:
        handle.write(payload)
    return path


def fake_mnist_dir(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        (folder / name).write_bytes(b"not mnist")
    return folder


# --- digits -----------------------------------------------------------------------------
def test_digits_shapes_split_and_standardisation():
    splits = load_dataset("digits")
    x_train, y_train = splits.train.tensors
    x_test, y_test = splits.test.tensors
    assert (splits.name, splits.input_shape, splits.num_classes) == ("digits", (1, 8, 8), 10)
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert abs(float(x_train.mean())) < 1e-5 and abs(float(x_train.std()) - 1.0) < 1e-3
    # stratified: each class has 35-37 test images (class sizes 174..183, 20% of them)
    counts = torch.bincount(y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37 and int(counts.sum()) == 360


def test_digits_is_deterministic():
    a, b = load_digits(), load_digits()
    for ta, tb in zip(a.train.tensors + a.test.tensors, b.train.tensors + b.test.tensors):
        assert torch.equal(ta, tb)


def test_unknown_dataset_lists_valid_names():
    assert DATASETS.names() == ["digits", "mnist"]
    with pytest.raises(PrunelabError, match="unknown dataset 'cifar'; valid names: digits, mnist"):
        load_dataset("cifar")


# --- MNIST: locating and parsing ---------------------------------------------------------
def test_mnist_loads_with_exact_shapes_and_labels(mnist_dir):
    splits = load_mnist(mnist_dir)
    x_train, y_train = splits.train.tensors
    x_test, y_test = splits.test.tensors
    assert (splits.name, splits.input_shape, splits.num_classes) == ("mnist", (1, 28, 28), 10)
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert y_train.tolist()[:5] == [5, 0, 4, 1, 9] and y_test.tolist()[:3] == [7, 2, 1]
    assert torch.bincount(y_train).tolist()[:2] == [5923, 6742] and set(y_test.unique().tolist()) == set(range(10))
    # normalised with (0.1307, 0.3081): pixel 0 maps to -0.4242, pixel 255 to 2.8215
    assert float(x_train.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert float(x_train.max()) == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)
    assert abs(float(x_train.mean())) < 1e-3 and abs(float(x_train.std()) - 1.0) < 1e-3


def test_mnist_files_found_directly_or_in_mnist_subfolder(tmp_path, monkeypatch):
    fake_mnist_dir(tmp_path / "root" / "mnist")
    found = find_mnist_files(tmp_path / "root")
    assert found == {name: tmp_path / "root" / "mnist" / name for name in MNIST_FILES}
    fake_mnist_dir(tmp_path / "flat")
    assert find_mnist_files(tmp_path / "flat")["t10k-labels-idx1-ubyte.gz"] == tmp_path / "flat" / "t10k-labels-idx1-ubyte.gz"
    monkeypatch.setenv("PRUNELAB_DATA", str(tmp_path / "root"))
    assert find_mnist_files() == found


def test_missing_mnist_dir_names_the_file_and_the_fixes(tmp_path, monkeypatch):
    with pytest.raises(PrunelabError, match=r"'train-images-idx3-ubyte.gz' not found .*--data-dir.*PRUNELAB_DATA.*--download"):
        load_mnist(tmp_path / "nowhere")
    monkeypatch.delenv("PRUNELAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(PrunelabError, match="from the download cache"):
        load_dataset("mnist")


def test_sha256_mismatch_on_corrupt_copy(mnist_dir, tmp_path):
    for name in MNIST_FILES:
        shutil.copy(mnist_dir / name, tmp_path / name)
    corrupt = tmp_path / "t10k-labels-idx1-ubyte.gz"
    corrupt.write_bytes(corrupt.read_bytes()[:-10])
    with pytest.raises(PrunelabError, match=r"t10k-labels-idx1-ubyte.gz: sha256 mismatch \(file corrupt or truncated\); delete it and re-download"):
        load_mnist(tmp_path)


def test_idx_parser_reads_valid_files_exactly(tmp_path):
    pixels = bytes(range(2 * 3 * 4))
    images = read_idx_images(write_gz(tmp_path / "i.gz", struct.pack(">IIII", 2051, 2, 3, 4) + pixels))
    assert images.shape == (2, 3, 4) and images.tobytes() == pixels
    labels = read_idx_labels(write_gz(tmp_path / "l.gz", struct.pack(">II", 2049, 3) + bytes([7, 0, 9])))
    assert labels.tolist() == [7, 0, 9]


def test_idx_parser_rejects_bad_magic_size_and_format(tmp_path):
    labels_file = write_gz(tmp_path / "l.gz", struct.pack(">II", 2049, 3) + bytes(3))
    with pytest.raises(PrunelabError, match="IDX magic number 2049, expected 2051"):
        read_idx_images(labels_file)
    with pytest.raises(PrunelabError, match="IDX magic number 2051, expected 2049"):
        read_idx_labels(write_gz(tmp_path / "i.gz", struct.pack(">IIII", 2051, 1, 2, 2) + bytes(4)))
    with pytest.raises(PrunelabError, match="11 bytes after gunzip, expected 13"):
        read_idx_labels(write_gz(tmp_path / "t.gz", struct.pack(">II", 2049, 5) + bytes(3)))
    with pytest.raises(PrunelabError, match="too short for an IDX header"):
        read_idx_images(write_gz(tmp_path / "h.gz", b"\x00\x00"))
    (tmp_path / "plain").write_bytes(b"not gzip at all")
    with pytest.raises(PrunelabError, match="not a readable gzip file"):
        read_idx_labels(tmp_path / "plain")


# --- download (file:// only: no network in tests) ---------------------------------------
def test_download_via_file_url_verifies_and_keeps_nothing_else(mnist_dir, tmp_path):
    dest = download_mnist(tmp_path / "dest", base_url=mnist_dir.as_uri())
    assert sorted(p.name for p in dest.iterdir()) == sorted(MNIST_FILES)
    for name, digest in MNIST_FILES.items():
        assert sha256_file(dest / name) == digest


def test_download_of_corrupt_source_leaves_no_file(tmp_path):
    source = fake_mnist_dir(tmp_path / "mirror")
    dest = tmp_path / "dest"
    with pytest.raises(PrunelabError, match="sha256 mismatch.*it was deleted"):
        download_mnist(dest, base_url=source.as_uri() + "/")
    assert list(dest.iterdir()) == []


def test_download_from_unreachable_mirror_is_a_clear_error(tmp_path):
    dest = tmp_path / "dest"
    with pytest.raises(PrunelabError, match="cannot download .*train-images-idx3-ubyte.gz"):
        download_mnist(dest, base_url=(tmp_path / "missing").as_uri())
    assert list(dest.iterdir()) == []


def test_load_with_download_fetches_missing_files_into_data_dir(mnist_dir, tmp_path, monkeypatch):
    calls = []

    def offline_download(dest_dir):
        calls.append(dest_dir)
        return download_mnist(dest_dir, base_url=mnist_dir.as_uri())

    monkeypatch.setattr(datasets, "download_mnist", offline_download)
    splits = load_dataset("mnist", tmp_path / "data", download=True)
    assert calls == [tmp_path / "data"]
    assert len(splits.train) == 60000 and len(splits.test) == 10000


# --- loaders ----------------------------------------------------------------------------
def _order(loader):
    return torch.cat([y for _, y in loader]).tolist()


def test_make_loaders_shuffle_deterministically():
    splits = load_digits()
    train_a, test_a = make_loaders(splits, batch_size=100, seed=3)
    train_b, _ = make_loaders(splits, batch_size=100, seed=3)
    train_c, _ = make_loaders(splits, batch_size=100, seed=4)
    assert len(train_a) == 15 and len(test_a) == 1
    first = _order(train_a)
    assert first == _order(train_b) and first != _order(train_c)
    assert _order(train_a) != first  # the next epoch has a new order
    assert _order(test_a) == splits.test.tensors[1].tolist()  # test set never shuffled


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_make_loaders_rejects_bad_batch_size(batch_size):
    with pytest.raises(PrunelabError, match="batch_size must be a positive integer"):
        make_loaders(load_digits(), batch_size=batch_size, seed=0)


def test_download_from_a_mirror_that_is_not_a_url_is_a_clear_error(tmp_path):
    dest = tmp_path / "dest"
    with pytest.raises(PrunelabError, match=r"cannot download .*train-images-idx3-ubyte.gz .*file:// URL"):
        download_mnist(dest, base_url=str(tmp_path / "mirror"))  # a plain path, no scheme
    assert list(dest.iterdir()) == []
    with pytest.raises(PrunelabError, match="cannot write into .*writable --data-dir"):
        fetch((tmp_path / "x").as_uri(), tmp_path / "missing" / "x", "0" * 64)


def test_downloaded_file_gets_the_umask_mode_not_mkstemps_0600(tmp_path):
    import hashlib
    import os

    source = tmp_path / "mirror.bin"
    source.write_bytes(b"payload")
    old = os.umask(0o022)
    try:
        fetch(source.as_uri(), tmp_path / "copy.bin", hashlib.sha256(b"payload").hexdigest())
    finally:
        os.umask(old)
    assert (tmp_path / "copy.bin").read_bytes() == b"payload"
    assert (tmp_path / "copy.bin").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.bin", "mirror.bin"]


# --- review fixes -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", ["0", None, 1.5, True, -1, 2**32])
def test_make_loaders_rejects_a_bad_seed_in_one_line(seed):
    with pytest.raises(PrunelabError, match="seed must be an integer in \\[0, 2\\*\\*32\\)") as exc:  # was RuntimeError
        make_loaders(load_digits(), 32, seed)
    assert "\n" not in str(exc.value)


def test_make_loaders_accepts_the_whole_seed_range():
    for seed in (0, 2**32 - 1):
        train_loader, _ = make_loaders(load_digits(), 32, seed)
        assert len(next(iter(train_loader))[1]) == 32


def test_empty_idx_files_are_a_clear_error_not_a_torch_traceback(tmp_path):
    images = write_gz(tmp_path / "i.gz", struct.pack(">IIII", 2051, 0, 28, 28))
    labels = write_gz(tmp_path / "l.gz", struct.pack(">II", 2049, 0))
    with pytest.raises(PrunelabError, match="holds no labels") as exc:  # was RuntimeError from max() of nothing
        datasets._mnist_part(images, labels)
    assert "\n" not in str(exc.value)
