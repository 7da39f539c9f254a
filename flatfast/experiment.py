"""The experiment of Zhang, Reid, Valle Pérez & Louis (arXiv 2103.06219) as one command: ``flatfast reproduce``.

Their protocol (docs/protocol.md states it step by step, beside flatfast's defaults and every departure), by
default: a fully connected ReLU network d-40-40-1
(weights N(0, 2/fan_in), biases N(0, 1): the NNGP prior with sigma_w2 = 2, sigma_b2 = 1), one logit with sigmoid
cross-entropy, is trained on a binarised image set S (label 1 iff digit >= 5) together with an attack set A of
other images whose labels are flipped, until the first epoch with 100 % accuracy on S (A need not be fitted).
The larger A, the worse it generalises. For each network that gets there we record the test error on E,
log P(f) for f = (true labels on S, the network's predictions on E) by EP under both likelihoods (probit, GPy's
link, is what the published plots use), and the flatness of the mean training loss on S alone: Hessian trace,
top eigenvalue, Frobenius norm and Keskar's epsilon-sharpness (SGD ascent, their procedure). Each SGD network is
also alpha-scaled (W1, b1 / 5.9; W2 * 5.9) and measured again: same function, same log P(f), much sharper.
The PAC-Bayes bound of Valle-Pérez et al. from log P(U) of S's labels stands beside the measured error.

``--arch cnn`` is their third experiment's recipe (a CNN with a Monte Carlo NNGP kernel) on a small ReLU CNN:
conv3x3 -> ReLU -> conv3x3 -> ReLU -> 2x2 max pool -> one logit, the same prior; log P(f) from the empirical
kernel of the architecture (penultimate readout, M draws); the alpha-scale on the Conv -> ReLU -> Conv pair; the
trace exact (the network is piecewise linear in each parameter). ``--data cifar10`` reads the CIFAR-10 python
batches for their car-vs-cat task.

Rows are appended to results.csv as each network finishes, so a killed run loses nothing and ``--resume``
continues it (with the same settings only). ``--shard i/N`` runs every N-th configuration of the grid and
``--merge`` combines shard directories. ``--experiment temporal`` is the paper's Fig. 5 (flatfast.temporal).
"""
from __future__ import annotations

import csv
import dataclasses
import gzip
import itertools
import json
import math
import os
import pickle
import struct
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional

import numpy as np

OPTIMIZERS = ("sgd", "adam", "entropy-sgd")
ARCHS = ("fcn", "cnn")
DATASETS = ("digits", "mnist", "cifar10")
# (channels, height, width) of each data set's images; the networks take them flattened.
IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
# CIFAR-10 class indices of the paper's binary task (cat vs car): automobile -> label 1, cat -> label 0.
CIFAR_CLASSES = {1: 1, 3: 0}
FIELDS = ["data", "optimizer", "attack_size", "seed", "rescaled", "alpha", "weight_factors", "bias_factors",
          "epochs", "reached_100_on_S", "accuracy_S", "accuracy_A", "test_error",
          "log_p_heaviside", "log_p_probit", "ep_converged_heaviside", "ep_converged_probit", "ep_sweeps",
          "log_p_S_heaviside", "pac_bayes_bound",
          "trace", "trace_stderr", "trace_hit_budget", "top_eigenvalue", "top_eigenvalue_residual",
          "frobenius", "frobenius_stderr", "sharpness", "sharpness_sgd_ascent", "sharpness_sign_ascent",
          "warnings", "seconds"]
_TEXT_FIELDS = {"data", "optimizer", "weight_factors", "bias_factors", "warnings"}
_BOOL_FIELDS = {"rescaled", "reached_100_on_S", "ep_converged_heaviside", "ep_converged_probit", "trace_hit_budget"}
MEASURES = [("log_p", "log P(f) (nats)"), ("trace", "Hessian trace"), ("top_eigenvalue", "top Hessian eigenvalue"),
            ("frobenius", "Hessian Frobenius norm"), ("sharpness", "epsilon-sharpness")]
# Settings that may differ between a run and its --resume, or between the shards that --merge combines.
_NOT_COMPARED = {"out": "resume and merge", "shard_index": "merge"}


@dataclasses.dataclass
class Config:
    data: str = "digits"
    data_dir: Optional[str] = None
    arch: str = "fcn"
    channels: int = 16
    kernel_samples: Optional[int] = None
    n_train: int = 500
    n_test: Optional[int] = None
    attack_sizes: List[int] = dataclasses.field(default_factory=lambda: list(range(0, 501, 50)))
    seeds: int = 5
    optimizers: List[str] = dataclasses.field(default_factory=lambda: list(OPTIMIZERS))
    width: int = 40
    lr: float = 0.01
    batch_size: int = 32
    max_epochs: int = 3000
    likelihood: str = "probit"
    alpha: float = 5.9
    divided_layer: int = 0
    sharpness_eps: float = 1e-4
    sharpness_method: str = "sgd-ascent"
    sharpness_epochs: int = 100
    sharpness_lr: float = 1e-3
    trace_method: str = "auto"
    trace_rtol: float = 0.02
    frobenius_rtol: float = 0.05
    pac_bayes_delta: float = 2.0 ** -10
    shard_index: int = 0
    shard_count: int = 1
    out: str = "flatfast-results"

    @classmethod
    def quick(cls, **overrides):
        """Under 10 minutes on 2 cores. SGD at the authors' lr = 0.01 needs ~1400 epochs to fit |S| = 200 beside
        |A| = 200 with the CNN (a float64 CNN step costs ~2 ms here), and its Hessian-vector products ~4 forward+
        backward passes, so the CNN's quick run is smaller: |S| = 200, |A| in {0, 100, 200}, two seeds, the
        Frobenius norm to 10 %."""
        base = dict(attack_sizes=[0, 150, 300, 500], seeds=2, max_epochs=2000, sharpness_epochs=20)
        if overrides.get("arch") == "cnn":
            base.update(n_train=200, attack_sizes=[0, 100, 200], seeds=2, frobenius_rtol=0.1)
        base.update(overrides)
        return cls(**base)

    def validate(self):
        """Every setting checked before anything is trained or written; ValueError names the option."""
        def need(ok, option, message):
            if not ok:
                raise ValueError(f"{option}: {message}")

        need(self.data in DATASETS, "--data", f"expected one of {', '.join(DATASETS)}, got {self.data!r}")
        need(self.arch in ARCHS, "--arch", f"expected one of {', '.join(ARCHS)}, got {self.arch!r}")
        need(self.channels >= 1, "--channels", f"must be >= 1, got {self.channels}")
        need(self.kernel_samples is None or self.kernel_samples >= 2, "--kernel-samples",
             f"must be >= 2, got {self.kernel_samples}")
        need(self.trace_method in ("auto", "exact", "hutch++"), "--trace",
             f"must be auto, exact or hutch++, got {self.trace_method!r}")
        need(self.n_train >= 1, "--n-train", f"must be >= 1, got {self.n_train}")
        need(self.n_test is None or self.n_test >= 1, "--n-test", f"must be >= 1, got {self.n_test}")
        need(len(self.attack_sizes) >= 1, "--attack-sizes", "needs at least one size")
        need(all(a >= 0 for a in self.attack_sizes), "--attack-sizes", f"must be >= 0, got {self.attack_sizes}")
        need(len(set(self.attack_sizes)) == len(self.attack_sizes), "--attack-sizes", "has duplicates")
        need(self.seeds >= 1, "--seeds", f"must be >= 1, got {self.seeds}")
        need(self.max_epochs >= 1, "--max-epochs", f"must be >= 1, got {self.max_epochs}")
        need(self.lr > 0, "--lr", f"must be > 0, got {self.lr}")
        need(len(self.optimizers) >= 1, "--optimizers", "needs at least one optimizer")
        for name in self.optimizers:
            need(name in OPTIMIZERS, "--optimizers", f"unknown optimizer {name!r} ({', '.join(OPTIMIZERS)})")
        need(self.likelihood in ("heaviside", "probit"), "--likelihood", "must be heaviside or probit")
        need(self.sharpness_method in ("sgd-ascent", "sign-ascent"), "--sharpness",
             "must be sgd-ascent or sign-ascent")
        need(self.sharpness_epochs >= 1, "--sharpness-epochs", f"must be >= 1, got {self.sharpness_epochs}")
        need(self.alpha > 0, "--alpha", f"must be > 0, got {self.alpha}")
        need(self.shard_count >= 1 and 0 <= self.shard_index < self.shard_count, "--shard",
             f"must be i/N with 0 <= i < N, got {self.shard_index}/{self.shard_count}")

    def grid(self):
        """Every (optimizer, attack size, seed) of the run, in a fixed order; a shard takes every N-th."""
        everything = [(o, a, s) for o in self.optimizers for a in self.attack_sizes for s in range(self.seeds)]
        return everything[self.shard_index:: self.shard_count]


def recorded_warnings(caught) -> List[str]:
    """The messages of warnings that bear on the results (convergence, numerics, fallbacks), once each; library
    deprecation notices say nothing about a measurement and are left to Python's own display."""
    skip = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
    return list(dict.fromkeys(str(w.message) for w in caught if not issubclass(w.category, skip)))


def config_differences(stored: dict, current: dict, ignore) -> List[str]:
    return [f"{key}: {stored.get(key)!r} there, {current.get(key)!r} here"
            for key in sorted(set(stored) | set(current)) if key not in ignore and stored.get(key) != current.get(key)]


# --- data ------------------------------------------------------------------------------------------------

def load_data(config):
    """(X_pool, y_pool, X_test, y_test) as float64 / {0,1} int arrays; the pool supplies S and the attack set."""
    if config.data == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        X = digits.data.astype(np.float64) / 16.0
        y = (digits.target >= 5).astype(np.int64)
        order = np.random.default_rng(0).permutation(len(y))
        X, y = X[order], y[order]
        pool = config.n_train + max(config.attack_sizes)
        if pool >= len(y):
            raise ValueError(f"--n-train + largest --attack-sizes = {pool} leaves no test images of the {len(y)} "
                             "digits")
        n_test = len(y) - pool if config.n_test is None else config.n_test
        if pool + n_test > len(y):
            raise ValueError(f"--n-test: {n_test} test images asked, but the {len(y)} digits leave {len(y) - pool} "
                             f"after |S| + max |A| = {pool}")
        return X[:pool], y[:pool], X[pool: pool + n_test], y[pool: pool + n_test]
    if config.data == "mnist":
        if not config.data_dir:
            raise ValueError("data_dir: --data mnist needs --data-dir with the MNIST IDX files")
        Xtr, ytr = _read_idx_pair(config.data_dir, "train")
        Xte, yte = _read_idx_pair(config.data_dir, "t10k")
        binary = lambda digits: (digits >= 5).astype(np.int64)  # noqa: E731
        return _pool_and_test(config, Xtr, binary(ytr), Xte, binary(yte), default_n_test=1000, what="images")
    if config.data == "cifar10":
        if not config.data_dir:
            raise ValueError("data_dir: --data cifar10 needs --data-dir with the CIFAR-10 python batches "
                             "(data_batch_1 .. data_batch_5, test_batch)")
        Xtr, ytr = read_cifar10(config.data_dir, [f"data_batch_{i}" for i in range(1, 6)])
        Xte, yte = read_cifar10(config.data_dir, ["test_batch"])
        return _pool_and_test(config, Xtr, ytr, Xte, yte, default_n_test=min(2000, len(yte)),
                              what="images of cats and cars")
    raise ValueError(f"data: expected one of {', '.join(DATASETS)}, got {config.data!r}")


def _pool_and_test(config, Xtr, ytr, Xte, yte, default_n_test, what):
    """A file-backed data set's pool (|S| + max |A| training images in a fixed random order) and its first n_test
    test images, after checking that the files hold that many; labels are already 0/1."""
    order = np.random.default_rng(0).permutation(len(ytr))
    pool = config.n_train + max(config.attack_sizes)
    n_test = default_n_test if config.n_test is None else config.n_test
    if pool > len(ytr) or n_test > len(yte):
        raise ValueError(f"--n-train/--attack-sizes/--n-test: {pool} training and {n_test} test {what} asked, the "
                         f"files hold {len(ytr)} and {len(yte)}")
    idx = order[:pool]
    return Xtr[idx], ytr[idx], Xte[:n_test], yte[:n_test]


def read_cifar10(directory, names):
    """The cat and car images of the named CIFAR-10 python batches (pickled dicts with b"data", uint8 of shape
    (m, 3072) in channel-major order, and b"labels"), as float64 in [0, 1] of shape (m', 3072) and labels 1 (car)
    / 0 (cat). The files are read from ``directory`` or its ``cifar-10-batches-py`` subfolder, unpickled with
    nothing but numpy arrays allowed (a pickle naming any other callable is refused, not run)."""
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


# --- one run -----------------------------------------------------------------------------------------------

def run_seed(seed, attack, optimizer_name):
    """The seed of one configuration (initialisation, shuffling, probes), derived by numpy's SeedSequence from
    (seed, |A|, optimizer): distinct configurations get independent streams at any grid size (the earlier
    1000 * seed + |A| gave seed 1 with |A| = 0 and seed 0 with |A| = 1000 the same network and batches)."""
    import zlib

    entropy = [int(seed), int(attack), zlib.crc32(optimizer_name.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def make_model(config, d, seed):
    """The network of ``config.arch`` for d-dimensional (flattened) inputs, drawn from the paper's prior."""
    if config.arch == "cnn":
        return make_cnn(IMAGE_SHAPES[config.data], config.channels, seed)
    return make_network(d, config.width, seed)


def make_cnn(image_shape, channels, seed):
    """A small ReLU CNN on flattened images of ``image_shape`` (c, h, w): unflatten -> conv3x3(c -> channels) ->
    ReLU -> conv3x3(channels -> channels) -> ReLU -> 2x2 max pool -> flatten -> Linear(-> 1), padding 1, float64;
    weights N(0, 2/fan_in), biases N(0, 1) (one draw of the prior its empirical NNGP kernel averages over).
    The two convolutions are the Conv -> ReLU -> Conv pair the alpha-scale acts on."""
    import torch
    import torch.nn as nn

    from flatfast.empirical import _draw_from_prior

    c, h, w = image_shape
    model = nn.Sequential(nn.Unflatten(1, image_shape), nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(channels * (h // 2) * (w // 2), 1)).double()
    with torch.no_grad():
        _draw_from_prior(model, torch.Generator().manual_seed(seed), 2.0, 1.0)
    return model


def make_network(d, width, seed):
    """d-width-width-1 ReLU network, weights N(0, 2/fan_in), biases N(0, 1) (float64)."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                torch.nn.ReLU(), torch.nn.Linear(width, 1)).double()
    with torch.no_grad():
        for m in model:
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, math.sqrt(2.0 / m.in_features))
                m.bias.normal_(0.0, 1.0)
    return model


def make_optimizer(model, optimizer_name, config, seed):
    import torch

    from flatfast.optim import EntropySGD

    if optimizer_name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr)
    if optimizer_name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    if optimizer_name == "entropy-sgd":
        # The authors do not publish their Entropy-SGD settings. Outer step 1/gamma, i.e. x <- mu (the Langevin
        # average) after each inner loop: with an outer step of 1 it did not reach 100 % training accuracy within
        # 2000 epochs on the digits with an attack set.
        gamma = 0.03
        return EntropySGD(model.parameters(), lr=1.0 / gamma, inner_steps=20, inner_lr=0.1, gamma=gamma, noise=1e-4,
                          seed=seed)
    raise ValueError(f"--optimizers: unknown optimizer {optimizer_name!r} ({', '.join(OPTIMIZERS)})")


def train_epoch(model, opt, optimizer_name, Xt, yt, batch_size, gen):
    """One pass of minibatches (Entropy-SGD: as many outer steps as take about one pass of minibatches)."""
    import torch

    loss_fn = torch.nn.BCEWithLogitsLoss()
    order = torch.randperm(len(yt), generator=gen)
    batches = [order[i: i + batch_size] for i in range(0, len(yt), batch_size)]
    if optimizer_name == "entropy-sgd":
        stream = itertools.cycle(batches)

        def closure():
            idx = next(stream)
            opt.zero_grad()
            loss = loss_fn(model(Xt[idx]), yt[idx])
            loss.backward()
            return loss

        for _ in range(max(1, math.ceil(len(batches) / opt.param_groups[0]["inner_steps"]))):
            opt.step(closure)
        return
    for idx in batches:
        opt.zero_grad()
        loss_fn(model(Xt[idx]), yt[idx]).backward()
        opt.step()


def accuracy(model, X, y):
    """Fraction of X the one-logit model classifies as y (prediction: logit >= 0); NaN for an empty set."""
    import torch

    if len(y) == 0:
        return float("nan")
    with torch.no_grad():
        pred = (model(torch.from_numpy(X)) >= 0).reshape(-1).numpy()
    return float(np.mean(pred == (y == 1)))


def train(model, S, A, optimizer_name, config, seed):
    """Train on S u A until the first epoch after which every point of S is classified correctly (the authors'
    rule: A need not be fitted), or max_epochs. Returns (epochs, reached, accuracy on S, accuracy on A)."""
    import torch

    X = np.concatenate([S[0], A[0]])
    y = np.concatenate([S[1], A[1]])
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.astype(np.float64))[:, None]
    opt = make_optimizer(model, optimizer_name, config, seed)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(1, config.max_epochs + 1):
        train_epoch(model, opt, optimizer_name, Xt, yt, config.batch_size, gen)
        accuracy_S = accuracy(model, *S)
        if accuracy_S == 1.0:
            return epoch, True, accuracy_S, accuracy(model, *A)
    return config.max_epochs, False, accuracy_S, accuracy(model, *A)


FLATNESS_MEASURES = ("trace", "top_eigenvalue", "frobenius", "sharpness_sgd_ascent", "sharpness_sign_ascent")


def flatness_on(model, S, config, seed, which=FLATNESS_MEASURES):
    """Trace, top eigenvalue, Frobenius norm and both sharpness ascents of the mean BCE loss on S alone -- or only
    the measures named in ``which`` (the others are not computed: the temporal run needs three of the five).

    ``config`` supplies batch_size, trace_method (auto, exact, or Hutch++ to trace_rtol), frobenius_rtol and the
    sharpness_* settings (a Config or a TemporalConfig)."""
    import torch

    import flatfast

    Xs, ys = torch.from_numpy(S[0]), torch.from_numpy(S[1].astype(np.float64))[:, None]
    whole = [(Xs, ys)]
    bce = torch.nn.BCEWithLogitsLoss()
    unknown = set(which) - set(FLATNESS_MEASURES)
    if unknown:
        raise ValueError(f"which: unknown measures {sorted(unknown)}; choose from {FLATNESS_MEASURES}")
    out = {}
    if "trace" in which:
        trace = flatfast.hessian_trace(model, whole, loss_fn=bce, method=config.trace_method, rtol=config.trace_rtol,
                                       seed=seed, progress=False)
        out.update(trace=trace.value, trace_stderr=trace.stderr,
                   trace_hit_budget=bool(trace.stderr > config.trace_rtol * abs(trace.value)))
    if "top_eigenvalue" in which:
        eig = flatfast.hessian_eigenvalues(model, whole, k=1, loss_fn=bce, tol=1e-4, seed=seed)
        out.update(top_eigenvalue=float(eig.values[0]), top_eigenvalue_residual=float(eig.residuals[0]))
    if "frobenius" in which:
        frob = flatfast.frobenius_norm(model, whole, loss_fn=bce, rtol=config.frobenius_rtol, seed=seed)
        out.update(frobenius=frob.value, frobenius_stderr=frob.stderr)
    if "sharpness_sgd_ascent" in which:
        minibatches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xs, ys),
                                                  batch_size=config.batch_size, shuffle=True,
                                                  generator=torch.Generator().manual_seed(seed))
        out["sharpness_sgd_ascent"] = flatfast.sharpness(model, minibatches, eps=config.sharpness_eps, loss_fn=bce,
                                                         method="sgd-ascent", epochs=config.sharpness_epochs,
                                                         lr=config.sharpness_lr)
    if "sharpness_sign_ascent" in which:
        out["sharpness_sign_ascent"] = flatfast.sharpness(model, whole, eps=config.sharpness_eps, loss_fn=bce,
                                                          method="sign-ascent", seed=seed)
    return out


def measure(model, S, X_test, y_test, K, config, seed):
    """Test error, log P(f) under both likelihoods (f = true labels on S, the network's predictions on E), and
    the flatness of the training loss on S."""
    import torch

    import flatfast

    row = {}
    test_pred = flatfast.function_of(model, torch.from_numpy(X_test))
    row["test_error"] = float(np.mean(test_pred != (2 * y_test - 1)))
    f = np.concatenate([2 * S[1] - 1, test_pred])
    heaviside = flatfast.ep_log_evidence(K, f, likelihood="heaviside", check_psd=False, return_info=True)
    probit = flatfast.ep_log_evidence(K, f, likelihood="probit", check_psd=False, return_info=True)
    row.update(log_p_heaviside=heaviside.log_z, log_p_probit=probit.log_z, ep_sweeps=heaviside.sweeps,
               ep_converged_heaviside=heaviside.converged, ep_converged_probit=probit.converged)
    row.update(flatness_on(model, S, config, seed))
    chosen = "sharpness_sgd_ascent" if config.sharpness_method == "sgd-ascent" else "sharpness_sign_ascent"
    row["sharpness"] = row[chosen]
    return row


def layer_factors(n_weighted, divided_layer, alpha):
    """Per weighted (Linear or Conv) layer, the factor the alpha-scale applied to its weight and to its bias, as
    ';'-joined text."""
    weights, biases = [1.0] * n_weighted, [1.0] * n_weighted
    if alpha != 1.0:
        weights[divided_layer] = biases[divided_layer] = 1.0 / alpha
        weights[divided_layer + 1] = alpha
    text = lambda values: ";".join(f"{v:.6g}" for v in values)  # noqa: E731
    return text(weights), text(biases)


# --- the experiment ----------------------------------------------------------------------------------------

def _key(row):
    return (row["optimizer"], int(row["attack_size"]), int(row["seed"]), str(row["rescaled"]) in ("True", "1"))


def prepare_output(config, table, resume):
    """Refuse to append to a table made with other settings; write config.json."""
    out = Path(config.out)
    current = dataclasses.asdict(config)
    stored_path = out / "config.json"
    if resume and stored_path.exists():
        with open(stored_path) as fh:
            stored = json.load(fh)
        diffs = config_differences(stored, current, {k for k, v in _NOT_COMPARED.items() if "resume" in v})
        if diffs:
            raise ValueError("--resume: the run in " + str(out) + " was made with other settings, so its rows cannot "
                             "be continued here (" + "; ".join(diffs) + "); use those settings or another --out")
    out.mkdir(parents=True, exist_ok=True)
    with open(stored_path, "w") as fh:
        json.dump(current, fh, indent=2)


def kernel_draws(config, n):
    """M, the empirical kernel's draws: --kernel-samples, or the authors' n/10 (at least 2)."""
    return config.kernel_samples if config.kernel_samples is not None else max(2, round(n / 10))


def prior_kernel(config, X_prior, log=print):
    """The NNGP kernel over S u E that log P(f) is computed with: for the FCN the closed-form arc-cosine kernel of
    depth 2 (sigma_w2 = 2, sigma_b2 = 1); for the CNN the authors' Monte Carlo estimate, M draws of the same
    prior with the penultimate readout (bench/empirical_log_prior.py --arch cnn measures its error)."""
    import flatfast

    if config.arch == "fcn":
        return flatfast.nngp_kernel(X_prior, depth=2, sigma_w2=2.0, sigma_b2=1.0)
    draws = kernel_draws(config, len(X_prior))
    net = make_cnn(IMAGE_SHAPES[config.data], config.channels, seed=0)
    K, stderr = flatfast.empirical_nngp_kernel(net, X_prior, samples=draws, seed=0, return_stderr=True)
    off_diagonal = ~np.eye(len(K), dtype=bool)
    log(f"empirical NNGP kernel of the CNN: M = {draws} draws (penultimate readout), Monte Carlo standard error "
        f"of its entries {np.median(stderr[off_diagonal] / np.abs(K[off_diagonal])):.2%} of their size (median)")
    return K


def run(config: Config, *, resume=False, log=print, jobs=1):
    """Run every (optimizer, attack size, seed) of the grid (or of this shard), appending rows to
    <out>/results.csv; then correlations and plots. ``jobs``: configurations run in that many worker processes
    (the same rows as a serial run, appended as they finish). Returns the path of the results table."""
    import flatfast

    config.validate()
    table = Path(config.out) / "results.csv"
    if table.exists() and not resume:
        raise FileExistsError(f"--out: {table} exists; pass --resume to continue it or choose another --out")
    # Load the data before creating anything, so that a bad --data/--data-dir leaves no output behind.
    X_pool, y_pool, X_test, y_test = load_data(config)
    prepare_output(config, table, resume)
    done = set()
    if resume and table.exists():
        with open(table, newline="") as fh:
            done = {_key(r) for r in csv.DictReader(fh)}
    grid = config.grid()
    todo = [(o, a, s) for o, a, s in grid if not all((o, a, s, r) in done for r in rescalings(o))]
    if resume and table.exists():
        log(f"--resume: {len(grid) - len(todo)} of {len(grid)} configurations are in {table} already and are "
            "skipped")

    S = (X_pool[: config.n_train], y_pool[: config.n_train])
    A_X, A_y = X_pool[config.n_train:], 1 - y_pool[config.n_train:]  # deliberately wrong labels
    X_prior = np.concatenate([S[0], X_test])
    log(f"flatfast reproduce: {config.arch.upper()} on {config.data}, |S| = {len(S[1])}, |E| = {len(y_test)}, "
        f"attack sizes {config.attack_sizes}, {config.seeds} seed(s), optimizers {config.optimizers}"
        + (f", shard {config.shard_index}/{config.shard_count} ({len(grid)} runs)" if config.shard_count > 1 else "")
        + f"; log P(f) over n = {len(X_prior)} points, reported likelihood: {config.likelihood}; sharpness by "
        f"{config.sharpness_method}" + (f" ({config.sharpness_epochs} epochs; the authors use 100)"
                                        if config.sharpness_method == "sgd-ascent" else ""))
    K = prior_kernel(config, X_prior, log=log)
    n_S = len(S[1])
    log_p_S = flatfast.ep_log_evidence(K[:n_S, :n_S], 2 * S[1] - 1, likelihood="heaviside", check_psd=False)
    bound = flatfast.pac_bayes_bound(log_p_S, n_S, delta=config.pac_bayes_delta)
    log(f"PAC-Bayes bound from log P(U) = {log_p_S:.2f} nats on S (Heaviside): expected error <= {bound:.3f} "
        f"(delta = {config.pac_bayes_delta:g})")

    shared = dict(S=S, A=(A_X, A_y), X_test=X_test, y_test=y_test, K=K, log_p_S=log_p_S, bound=bound)
    with DurableTable(table, FIELDS) as results:
        for rows in _configurations(config, shared, todo, done, jobs, log):
            for row, messages in rows:
                results.append(row)
                log(f"  {row['optimizer']:<11} |A| = {row['attack_size']:<4} seed {row['seed']}"
                    f"{' rescaled' if row['rescaled'] else ''}: {row['epochs']} epochs"
                    f"{'' if row['reached_100_on_S'] else ' (never 100 % on S: left out of the statistics)'}, "
                    f"test error {row['test_error']:.3f}, log P(f) {row['log_p_' + config.likelihood]:.2f}, "
                    f"trace {row['trace']:.3g}, top eig {row['top_eigenvalue']:.3g}, "
                    f"sharpness {row['sharpness']:.3g}")
                for message in messages:
                    log(f"    warning: {message}")
    summarise(table, config, log=log)
    return table


def rescalings(optimizer_name):
    """The rows one configuration has, by ``rescaled``: SGD networks are measured as trained and alpha-scaled,
    the other optimizers' as trained."""
    return [False, True] if optimizer_name == "sgd" else [False]


def run_configuration(config, shared, optimizer_name, attack, seed, done):
    """Train the (optimizer, |A|, seed) network and measure it (and, for SGD, its alpha-scaled copy): a list of
    (row, warning messages) for the rows not in ``done``. ``shared`` holds what every configuration uses (S, the
    attack pool, the test set, the prior kernel, log P(U) and the PAC-Bayes bound). Deterministic given its
    arguments, so serial and parallel runs give the same rows."""
    import flatfast
    from flatfast.measures import weighted_layer_positions

    S, (A_X, A_y), X_test, y_test, K = shared["S"], shared["A"], shared["X_test"], shared["y_test"], shared["K"]
    t0 = time.perf_counter()
    A = (A_X[:attack], A_y[:attack])
    config_seed = run_seed(seed, attack, optimizer_name)
    model = make_model(config, S[0].shape[1], config_seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epochs, reached, accuracy_S, accuracy_A = train(model, S, A, optimizer_name, config, config_seed)
    training_warnings = recorded_warnings(caught)
    n_weighted = len(weighted_layer_positions(model))
    out = []
    for rescaled in rescalings(optimizer_name):
        if (optimizer_name, attack, seed, rescaled) in done:
            continue
        net = flatfast.rescale(model, config.alpha, divided_layer=config.divided_layer) if rescaled else model
        weight_factors, bias_factors = layer_factors(n_weighted, config.divided_layer,
                                                     config.alpha if rescaled else 1.0)
        row = dict(data=config.data, optimizer=optimizer_name, attack_size=attack, seed=seed,
                   rescaled=rescaled, alpha=config.alpha if rescaled else 1.0, weight_factors=weight_factors,
                   bias_factors=bias_factors, epochs=epochs, reached_100_on_S=reached,
                   accuracy_S=accuracy_S, accuracy_A=accuracy_A, log_p_S_heaviside=shared["log_p_S"],
                   pac_bayes_bound=shared["bound"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            row.update(measure(net, S, X_test, y_test, K, config, config_seed))
        messages = list(dict.fromkeys(training_warnings + recorded_warnings(caught)))
        row["warnings"] = " | ".join(messages)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        out.append((row, messages))
    return out


_WORKER = {}


def _init_worker(shared, threads):
    """A --jobs worker: the shared data once, and every thread pool (torch, BLAS, the C++ core) capped at
    ``threads``, so that N workers never oversubscribe the cores (several processes with spinning BLAS threads
    on 2 cores ran 5-50x slower)."""
    import torch
    from threadpoolctl import threadpool_limits

    import flatfast

    torch.set_num_threads(threads)
    flatfast.set_num_threads(threads)
    _WORKER["limits"] = threadpool_limits(limits=threads)
    _WORKER["shared"] = shared


def _run_in_worker(config, optimizer_name, attack, seed, done):
    return run_configuration(config, _WORKER["shared"], optimizer_name, attack, seed, done)


def _configurations(config, shared, todo, done, jobs, log):
    """The rows of each configuration in ``todo``: in this process (jobs = 1, in grid order), or in ``jobs``
    worker processes (as they finish; each row says which configuration it is, and the statistics do not depend on
    the order of the rows)."""
    if jobs <= 1 or len(todo) <= 1:
        for optimizer_name, attack, seed in todo:
            yield run_configuration(config, shared, optimizer_name, attack, seed, done)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    log(f"--jobs {jobs}: {len(todo)} configurations in {jobs} worker processes, {threads} thread(s) each")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(shared, threads)) as pool:
        futures = [pool.submit(_run_in_worker, config, o, a, s, done) for o, a, s in todo]
        for future in as_completed(futures):
            yield future.result()


class DurableTable:
    """A CSV table opened for appending (header written when new); every row is flushed and fsynced as it is
    appended, so a killed run loses no finished row."""

    def __init__(self, path, fields):
        new_file = not Path(path).exists()
        self._fh = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=fields)
        if new_file:
            self._writer.writeheader()
            self._fh.flush()

    def append(self, row):
        self._writer.writerow(row)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def read_typed_csv(table, fields, text_fields, bool_fields):
    """The rows of a results table with numbers as floats, flags as bools and text left as text."""
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in fields:
            if k in text_fields:
                continue
            if k in bool_fields:
                r[k] = r[k] in ("True", "1")
            else:
                r[k] = float(r[k]) if r[k] != "" else float("nan")
    return rows


def read_table(table):
    return read_typed_csv(table, FIELDS, _TEXT_FIELDS, _BOOL_FIELDS)


def merge(directories, out, *, log=print):
    """Combine the results of shards (``--shard i/N`` runs) into ``out``: their configs must agree in everything
    but --out and the shard index; the rows of all shards are written to one table, then summarised."""
    configs, tables = [], []
    for directory in directories:
        directory = Path(directory)
        if not (directory / "config.json").exists() or not (directory / "results.csv").exists():
            raise FileNotFoundError(f"--merge: {directory} has no config.json and results.csv of a reproduce run")
        with open(directory / "config.json") as fh:
            configs.append(json.load(fh))
        tables.append(directory / "results.csv")
    ignore = set(_NOT_COMPARED)
    for directory, other in zip(directories[1:], configs[1:]):
        diffs = config_differences(configs[0], other, ignore)
        if diffs:
            raise ValueError(f"--merge: {directory} was run with other settings than {directories[0]} "
                             f"({'; '.join(diffs)})")
    indices = [c.get("shard_index", 0) for c in configs]
    if len(set(indices)) != len(indices):
        raise ValueError(f"--merge: the same shard appears twice (shard indices {indices})")
    count = configs[0].get("shard_count", 1)
    missing = sorted(set(range(count)) - set(indices))
    rows, seen = [], set()
    for table in tables:
        with open(table, newline="") as fh:
            for row in csv.DictReader(fh):
                key = _key(row)
                if key in seen:
                    raise ValueError(f"--merge: row {key} appears in more than one shard")
                seen.add(key)
                rows.append(row)
    merged = Config(**{**configs[0], "out": str(out), "shard_index": 0, "shard_count": 1})
    target = Path(out) / "results.csv"
    if target.exists():
        raise FileExistsError(f"--out: {target} exists; choose another --out for the merged table")
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "config.json", "w") as fh:
        json.dump(dataclasses.asdict(merged), fh, indent=2)
    with open(target, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    log(f"merged {len(rows)} rows from {len(tables)} shard(s) of {count}"
        + (f"; shards {missing} are MISSING, so the statistics cover part of the grid" if missing else ""))
    summarise(target, merged, log=log)
    return target


def _kept(rows):
    """The networks the statistics use: trained to 100 % on S, not rescaled."""
    return [r for r in rows if r["reached_100_on_S"] and not r["rescaled"]]


def _measure_values(rows, name, likelihood):
    key = f"log_p_{likelihood}" if name == "log_p" else name
    values = np.array([r[key] for r in rows], dtype=float)
    if name != "log_p":  # the flatness measures are compared on log10 scale, as the paper plots them
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)
    return values


def correlations(rows, likelihood="probit", n_resamples=1000, seed=0):
    """Kendall tau and Pearson r between test error and each measure (log10 of the flatness measures) over the
    networks that reached 100 % on S (rescaled copies excluded), with paired BCa bootstrap 95 % intervals
    (scipy.stats.bootstrap, resampling networks). The rows are put in configuration order first, so that the
    intervals do not depend on the order the table holds them in (a --jobs run appends rows as they finish)."""
    from scipy.stats import bootstrap, kendalltau, pearsonr

    kept = sorted(_kept(rows), key=lambda r: (str(r.get("optimizer")), float(r.get("attack_size", 0)),
                                              float(r.get("seed", 0)), str(r.get("rescaled"))))
    result = {}
    for name, _ in MEASURES:
        err = np.array([r["test_error"] for r in kept])
        values = _measure_values(kept, name, likelihood)
        ok = np.isfinite(values)
        err, values = err[ok], values[ok]
        entry = dict(kendall_tau=float("nan"), pearson_r=float("nan"), n=int(len(err)))
        if len(err) >= 3 and np.ptp(err) > 0 and np.ptp(values) > 0:
            for label, stat in (("kendall_tau", lambda a, b: kendalltau(a, b)[0]),
                                ("pearson_r", lambda a, b: pearsonr(a, b)[0])):
                entry[label] = float(stat(err, values))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # degenerate resamples give NaN statistics; BCa copes
                    try:
                        ci = bootstrap((err, values), stat, paired=True, vectorized=False, method="BCa",
                                       n_resamples=n_resamples, random_state=seed).confidence_interval
                        entry[label + "_ci"] = [float(ci.low), float(ci.high)]
                    except Exception:  # too few distinct networks for BCa's jackknife
                        entry[label + "_ci"] = [float("nan"), float("nan")]
        result[name] = entry
    return result


def rescale_label(config):
    """The alpha-scale in words: which layers were divided and multiplied."""
    k = config.divided_layer + 1
    name = "conv" if config.arch == "cnn" else "W"
    return f"{name}{k} weight and bias / {config.alpha:g}; {name}{k + 1} weight * {config.alpha:g}"


def _left_out_phrase(count):
    """' (1 that did not is left out)', ' (3 that did not are left out)', or '' for none."""
    if not count:
        return ""
    return f" ({count} that did not {'is' if count == 1 else 'are'} left out)"


def summarise(table, config, log=print):
    """Correlations (printed and saved to correlations.json), the rescaling check, and the PNG plots."""
    rows = read_table(table)
    out = Path(table).parent
    failed = [r for r in rows if not r["reached_100_on_S"] and not r["rescaled"]]
    corr = correlations(rows, config.likelihood)
    with open(out / "correlations.json", "w") as fh:
        json.dump({"likelihood": config.likelihood, "flatness_scale": "log10",
                   "networks_left_out_never_100_on_S": len(failed),
                   "correlations_with_test_error": corr}, fh, indent=2)
    log(f"correlation with test error over {corr['log_p']['n']} networks that reached 100 % on S"
        f"{_left_out_phrase(len(failed))}; log P(f) with the {config.likelihood} "
        "likelihood, flatness as log10; 95 % paired BCa bootstrap intervals:")
    for name, label in MEASURES:
        c = corr[name]
        if "kendall_tau_ci" in c:
            log(f"  {label:<24} Kendall tau {c['kendall_tau']:+.3f} [{c['kendall_tau_ci'][0]:+.2f}, "
                f"{c['kendall_tau_ci'][1]:+.2f}]   Pearson r {c['pearson_r']:+.3f} [{c['pearson_r_ci'][0]:+.2f}, "
                f"{c['pearson_r_ci'][1]:+.2f}]")
        else:
            log(f"  {label:<24} not enough networks with distinct values (n = {c['n']})")
    pairs = {}
    for r in rows:
        if r["optimizer"] == "sgd":
            pairs.setdefault((r["attack_size"], r["seed"]), {})[r["rescaled"]] = r
    # only networks that fitted S: the others are out of every statistic, this one too
    checks = [(p[False], p[True]) for p in pairs.values() if True in p and False in p and p[False]["reached_100_on_S"]]
    if checks:
        lp = f"log_p_{config.likelihood}"
        dlogp = max(abs(a[lp] - b[lp]) for a, b in checks)
        derr = max(abs(a["test_error"] - b["test_error"]) for a, b in checks)
        growth = {name: [b[name] / a[name] for a, b in checks if a[name] > 0]
                  for name in ("trace", "top_eigenvalue", "sharpness")}
        log(f"alpha-scale ({rescale_label(config)}) of {len(checks)} SGD networks, each "
            f"measured again from scratch: max |d test error| = {derr:.2g}, max |d log P(f)| = {dlogp:.2g} (log P(f) "
            "recomputed from the rescaled network's own predictions: the equality is checked, not assumed); "
            + ", ".join(f"{name} x{min(v):.3g} .. x{max(v):.3g}" for name, v in growth.items() if v))
    bounds = sorted({r["pac_bayes_bound"] for r in rows})
    kept = _kept(rows)
    if kept and bounds:
        worst = max(r["test_error"] for r in kept)
        log(f"PAC-Bayes bound (delta = {config.pac_bayes_delta:g}) from log P(U) on S: {bounds[0]:.3f}; measured test "
            f"errors {min(r['test_error'] for r in kept):.3f} .. {worst:.3f} (the bound is for a learner trained on S "
            "alone, the same for every network fitted to S)")
    plot(rows, out, config.likelihood)
    log(f"results: {table}; plots and correlations.json in {out}")


def plot(rows, out, likelihood):
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"sgd": "tab:blue", "adam": "tab:orange", "entropy-sgd": "tab:green"}
    shown = [r for r in rows if r["reached_100_on_S"]]
    left_out = sum(not r["reached_100_on_S"] and not r["rescaled"] for r in rows)
    note = f" ({left_out} network(s) that never reached 100 % on S not shown)" if left_out else ""
    fig_all, axes = plt.subplots(2, 3, figsize=(15, 9))
    for ax_all, (name, label) in zip(axes.flat, MEASURES):
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        for target in (ax, ax_all):
            for opt in sorted({r["optimizer"] for r in shown}):
                for rescaled in (False, True):
                    pts = [r for r in shown if r["optimizer"] == opt and r["rescaled"] == rescaled]
                    if not pts:
                        continue
                    key = f"log_p_{likelihood}" if name == "log_p" else name
                    target.scatter([r[key] for r in pts], [r["test_error"] for r in pts],
                                   c=colours.get(opt, "tab:gray"), marker="x" if rescaled else "o",
                                   s=45 if rescaled else 25, alpha=0.85,
                                   label=f"{opt}{' (alpha-scaled)' if rescaled else ''}")
            if name != "log_p":
                target.set_xscale("log")
                target.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            target.set_xlabel(label + (f" [{likelihood} likelihood]" if name == "log_p" else " (loss on S)"))
            target.set_ylabel("test error")
            target.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title((f"log P(f), {likelihood} likelihood" if name == "log_p" else f"{label} of the loss on S")
                     + f", against test error{note}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"test_error_vs_{name}.png", dpi=110)
        plt.close(fig)
    _plot_bound(axes.flat[len(MEASURES)], shown, colours)
    axes.flat[0].legend(fontsize=8)
    fig_all.suptitle(f"Which measure predicts generalization? (each point: one trained network; log P(f) with the "
                     f"{likelihood} likelihood){note}")
    fig_all.tight_layout()
    fig_all.savefig(out / "summary.png", dpi=110)
    plt.close(fig_all)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    _plot_bound(ax, shown, colours)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pac_bayes_bound.png", dpi=110)
    plt.close(fig)


def _plot_bound(ax, rows, colours):
    for opt in sorted({r["optimizer"] for r in rows}):
        pts = [r for r in rows if r["optimizer"] == opt and not r["rescaled"]]
        ax.scatter([r["test_error"] for r in pts], [r["pac_bayes_bound"] for r in pts], c=colours.get(opt, "tab:gray"),
                   s=25, alpha=0.85, label=opt)
    ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--", label="bound = measured")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("measured test error")
    ax.set_ylabel("PAC-Bayes bound (log P(U) on S, Heaviside)")
    ax.grid(alpha=0.3)


def _parse_shard(text):
    """"i/N", or "auto": Slurm's job array (SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT tasks, ids from 0)."""
    if text == "auto":
        try:
            return int(os.environ["SLURM_ARRAY_TASK_ID"]), int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        except (KeyError, ValueError):
            raise ValueError("--shard: auto reads SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT, which are not set "
                             "(run it inside a Slurm job array, or give i/N)") from None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected i/N (e.g. 0/4), got {text!r}") from None
    return index, count


def interrupted_message(table, out):
    """The one line Ctrl-C leaves: what was kept and how to go on (every finished row is already on disk)."""
    rows = 0
    if Path(table).exists():
        with open(table, newline="") as fh:
            rows = sum(1 for _ in csv.DictReader(fh))
    return (f"flatfast reproduce: interrupted; {rows} finished row(s) are kept in {table}; continue with "
            f"`flatfast reproduce --resume --out {out}`")


def main(args) -> int:
    temporal_only = [flag for field, flag in (("post_epochs", "--post-epochs"), ("every", "--every"))
                     if getattr(args, field, None) is not None]
    if temporal_only:
        print(f"flatfast reproduce: {', '.join(temporal_only)} apply to --experiment temporal only", file=sys.stderr)
        return 2
    try:
        if getattr(args, "merge", None):
            t0 = time.perf_counter()
            merge(args.merge, args.out or "flatfast-results", log=lambda s: print(s, flush=True))
            print(f"done in {time.perf_counter() - t0:.0f} s")
            return 0
        overrides = {}
        for field in ("data", "data_dir", "arch", "channels", "kernel_samples", "trace_method", "n_train", "n_test",
                      "attack_sizes", "seeds", "optimizers", "max_epochs", "lr", "likelihood", "out",
                      "sharpness_method", "sharpness_epochs"):
            value = getattr(args, field, None)
            if value is not None:
                overrides[field] = value
        if getattr(args, "shard", None):
            overrides["shard_index"], overrides["shard_count"] = _parse_shard(args.shard)
        jobs = getattr(args, "jobs", None) or 1
        if jobs < 1:
            raise ValueError(f"--jobs: must be >= 1, got {jobs}")
        saved = Path(args.out or Config.out) / "config.json"
        if args.resume and saved.exists() and not args.quick:
            # continue with the settings the run was made with; only options typed now count as changes (and
            # a change is refused by prepare_output, naming it)
            config = Config(**{**json.loads(saved.read_text()), **overrides})
        else:
            config = Config.quick(**overrides) if args.quick else Config(**overrides)
        t0 = time.perf_counter()
        run(config, resume=args.resume, log=lambda s: print(s, flush=True), jobs=jobs)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"flatfast reproduce: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = args.out or Config.out
        print(interrupted_message(Path(out) / "results.csv", out), file=sys.stderr)
        return 130
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0
