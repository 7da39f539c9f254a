"""The data sets: scikit-learn's digits (shipped), MNIST's IDX files and CIFAR-10's python batches (read with an
unpickler that admits numpy arrays only), each as a pool of training images (S, then the attack set) and a test
set E."""
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

DATASETS = ("digits", "mnist", "cifar10")
# CIFAR-10 class indices of the paper's binary task, as the authors label it: automobile -> 0, cat -> 1.
CIFAR_CLASSES = {1: 0, 3: 1}


def load_data(data, data_dir=None, *, pool, n_test=None):
    """(X_pool, y_pool, X_test, y_test) as float64 / {0,1} int arrays: ``pool`` training images (S, then the
    attack set; |S| + max |A|) and ``n_test`` test images (None: the data set's default), from ``data`` (digits,
    mnist or cifar10; the files in ``data_dir`` for the last two)."""
    if data == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        X = digits.data.astype(np.float64) / 16.0
        y = (digits.target >= 5).astype(np.int64)
        order = np.random.default_rng(0).permutation(len(y))
        X, y = X[order], y[order]
        if pool >= len(y):
            raise ValueError(f"--n-train + largest --attack-sizes = {pool} leaves no test images of the {len(y)} "
                             "digits")
        n_test = len(y) - pool if n_test is None else n_test
        if pool + n_test > len(y):
            raise ValueError(f"--n-test: {n_test} test images asked, but the {len(y)} digits leave {len(y) - pool} "
                             f"after |S| + max |A| = {pool}")
        return X[:pool], y[:pool], X[pool: pool + n_test], y[pool: pool + n_test]
    if data == "mnist":
        if not data_dir:
            raise ValueError("data_dir: --data mnist needs --data-dir with the MNIST IDX files")
        Xtr, ytr = _read_idx_pair(data_dir, "train")
        Xte, yte = _read_idx_pair(data_dir, "t10k")
        binary = lambda digits: (digits >= 5).astype(np.int64)  # noqa: E731
        return _pool_and_test(pool, n_test, Xtr, binary(ytr), Xte, binary(yte), default_n_test=1000, what="images")
    if data == "cifar10":
        if not data_dir:
            raise ValueError("data_dir: --data cifar10 needs --data-dir with the CIFAR-10 python batches "
                             "(data_batch_1 .. data_batch_5, test_batch)")
        Xtr, ytr = read_cifar10(data_dir, [f"data_batch_{i}" for i in range(1, 6)])
        Xte, yte = read_cifar10(data_dir, ["test_batch"])
        return _pool_and_test(pool, n_test, Xtr, ytr, Xte, yte, default_n_test=min(2000, len(yte)),
                              what="images of cats and cars")
    raise ValueError(f"data: expected one of {', '.join(DATASETS)}, got {data!r}")


def _pool_and_test(pool, n_test, Xtr, ytr, Xte, yte, default_n_test, what):
    """A file-backed data set's pool (|S| + max |A| training images in a fixed random order) and its first n_test
    test images, after checking that the files hold that many; labels are already 0/1."""
    order = np.random.default_rng(0).permutation(len(ytr))
    n_test = default_n_test if n_test is None else n_test
    if pool > len(ytr) or n_test > len(yte):
        raise ValueError(f"--n-train/--attack-sizes/--n-test: {pool} training and {n_test} test {what} asked, the "
                         f"files hold {len(ytr)} and {len(yte)}")
    idx = order[:pool]
    return Xtr[idx], ytr[idx], Xte[:n_test], yte[:n_test]


def read_cifar10(directory, names):
    """The cat and car images of the named CIFAR-10 python batches (pickled dicts with b"data", uint8 of shape
    (m, 3072) in channel-major order, and b"labels"), as float64 in [0, 1] of shape (m', 3072) and the authors'
    labels 0 (car) / 1 (cat). The files are read from ``directory`` or its ``cifar-10-batches-py`` subfolder,
    unpickled with nothing but numpy arrays allowed (a pickle naming any other callable is refused, not run)."""
    base = Path(directory)
    if not (base / names[0]).exists() and (base / "cifar-10-batches-py" / names[0]).exists():
        base = base / "cifar-10-batches-py"
    images, labels = [], []
    for name in names:
        path = base / name
        if not path.exists():
            raise FileNotFoundError(f"data_dir: no CIFAR-10 batch {name} in {directory}")
        with open(path, "rb") as fh:
            batch = _ArraysOnlyUnpickler(fh, encoding="bytes").load()
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise ValueError(f"{path}: not a CIFAR-10 python batch (a dict with b'data' and b'labels')")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        classes = np.asarray(batch[b"labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(classes) != len(data):
            raise ValueError(f"{path}: expected b'data' of shape (m, 3072) and m labels, got {data.shape} and "
                             f"{len(classes)}")
        keep = np.isin(classes, list(CIFAR_CLASSES))
        images.append(data[keep].astype(np.float64) / 255.0)
        labels.append(np.array([CIFAR_CLASSES[c] for c in classes[keep]], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays, and refuses every other global a file names."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise ValueError(f"data_dir: a CIFAR-10 batch names {module}.{name}, which a data file has no reason to "
                             "(only numpy arrays are unpickled)")
        return super().find_class(module, name)


def _read_idx_pair(directory, prefix):
    images = _read_idx(_find(directory, f"{prefix}-images-idx3-ubyte")).astype(np.float64) / 255.0
    labels = _read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    return images.reshape(images.shape[0], -1), labels


def _find(directory, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = Path(directory) / name
        if path.exists():
            return path
    raise FileNotFoundError(f"data_dir: no {stem}[.gz] in {directory}")


def _read_idx(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        zero, dtype_code, ndim = struct.unpack(">HBB", fh.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, fh.read(4 * ndim))
        return np.frombuffer(fh.read(), dtype=np.uint8).reshape(shape)
