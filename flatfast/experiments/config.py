"""The main experiment's settings: the grid, every option's default (docs/guide/protocol.md lists each beside the
authors' choice) and the checks that run before anything is trained or written."""
from __future__ import annotations

import dataclasses
from typing import List, Optional

from flatfast.experiments.data import DATASETS, load_data
from flatfast.experiments.predictors import chosen


OPTIMIZERS = ("sgd", "adam", "entropy-sgd")
ARCHS = ("fcn", "cnn")


# (channels, height, width) of each data set's images; the networks take them flattened.
IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}




# The authors' CIFAR-10 experiment (E3): what --data cifar10 takes for every setting not given.
CIFAR10_E3 = dict(n_train=5000, attack_sizes=list(range(0, 5001, 500)), n_test=2000, batch_size=128,
                  sharpness_eps=1e-5)
# Settings that may differ between a run and its --resume, or between the shards that --merge combines.
NOT_COMPARED = {"out": "resume and merge", "shard_index": "merge"}


@dataclasses.dataclass
class Config:
    """Every setting of ``flatfast reproduce``; the defaults are the authors' protocol (the documentation's
    protocol page lists each beside their choice). Each field is the command line's option of the same name.

    Attributes
    ----------
    data, data_dir : str, str or None
        "digits" (scikit-learn's, bundled), "mnist" or "cifar10" (read from ``data_dir``).
    arch, channels, kernel_samples : str, int, int or None
        "fcn" (d-``width``-``width``-1, the authors') or "cnn" (two 3x3 convolutions of ``channels``); the CNN's
        empirical NNGP kernel takes ``kernel_samples`` draws (default n / 10, the authors' rule).
    n_train, n_test, attack_sizes : int, int or None, list of int
        The sizes of the training set S and the test set E (default: all held-out images), and the attack-set
        sizes of the grid.
    seeds, successful_runs, max_seeds : int
        Seeds per optimizer and attack-set size; groups with fewer networks that fit S take further seeds up to
        ``max_seeds`` until ``successful_runs`` have (the authors kept 5 successful runs).
    optimizers, width, lr, batch_size, max_epochs, train_precision : list of str, int, float, int, int, str
        Training: "sgd", "adam", "entropy-sgd"; stop at the first epoch with 100 % accuracy on S.
    likelihood : str
        The link whose log P(f) the summary reports ("probit", GPy's, as the paper; both are recorded).
    alpha, divided_layer : float, int
        The alpha-rescaling of every SGD network (:func:`flatfast.rescale`).
    sharpness_eps, sharpness_method, sharpness_epochs, sharpness_lr : float, str, int, float
        Keskar's epsilon-sharpness (:func:`flatfast.sharpness`).
    trace_method, trace_rtol, frobenius_rtol : str, float, float
        The Hessian trace's route and the estimators' relative standard errors.
    pac_bayes_delta : float
        The confidence parameter of the PAC-Bayes bound (the authors' 2^-10).
    measures : str
        The predictors recorded: "paper" (the paper's five; the default), "invariant" (also the five that the
        alpha-rescaling cannot move), "all" (also the Laplace evidence) or a comma-separated list of names
        (``flatfast.experiments.predictors.OTHERS``).
    shard_index, shard_count, out : int, int, str
        This process's share of the grid (``--shard i/N``) and the output folder.

    Examples
    --------
    >>> from flatfast.experiments import Config
    >>> config = Config()                       # the authors' grid
    >>> config.n_train, config.attack_sizes[:3], config.optimizers
    (500, [0, 50, 100], ['sgd', 'adam', 'entropy-sgd'])
    >>> len(config.grid())                      # (optimizer, |A|, seed) configurations run first
    165
    >>> Config(n_train=0).validate()
    Traceback (most recent call last):
        ...
    ValueError: --n-train: must be >= 1, got 0
    """

    data: str = "digits"
    data_dir: Optional[str] = None
    arch: str = "fcn"
    channels: int = 16
    kernel_samples: Optional[int] = None
    n_train: int = 500
    n_test: Optional[int] = None
    attack_sizes: List[int] = dataclasses.field(default_factory=lambda: list(range(0, 501, 50)))
    seeds: int = 5
    successful_runs: int = 5
    max_seeds: int = 20
    optimizers: List[str] = dataclasses.field(default_factory=lambda: list(OPTIMIZERS))
    width: int = 40
    lr: float = 0.01
    batch_size: int = 32
    max_epochs: int = 50000
    train_precision: str = "float32"
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
    measures: str = "paper"
    shard_index: int = 0
    shard_count: int = 1
    out: str = "flatfast-results"

    @classmethod
    def quick(cls, **overrides):
        """Under 10 minutes on 2 cores. SGD at the authors' lr = 0.01 needs ~1400 epochs to fit |S| = 200 beside
        |A| = 200 with the CNN (a float64 CNN step costs ~2 ms here), and its Hessian-vector products ~4 forward+
        backward passes, so the CNN's quick run is smaller: |S| = 200, |A| in {0, 100, 200}, two seeds, the
        Frobenius norm to 10 %."""
        base = dict(attack_sizes=[0, 150, 300, 500], seeds=2, successful_runs=2, max_epochs=2000, sharpness_epochs=20)
        if overrides.get("arch") == "cnn":
            base.update(n_train=200, attack_sizes=[0, 100, 200], frobenius_rtol=0.1)
        base.update(overrides)
        return cls(**base)

    def validate(self):
        """Every setting checked before anything is trained or written; ValueError names the option."""
        need = require
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
        need(self.successful_runs >= 0, "--successful-runs", f"must be >= 0, got {self.successful_runs}")
        need(self.max_seeds >= max(self.seeds, self.successful_runs), "--max-seeds",
             f"must be >= --seeds and --successful-runs, got {self.max_seeds}")
        need(self.max_epochs >= 1, "--max-epochs", f"must be >= 1, got {self.max_epochs}")
        need(self.lr > 0, "--lr", f"must be > 0, got {self.lr}")
        need(self.train_precision in ("float32", "float64"), "--train-precision",
             f"must be float32 or float64, got {self.train_precision!r}")
        need(len(self.optimizers) >= 1, "--optimizers", "needs at least one optimizer")
        for name in self.optimizers:
            need(name in OPTIMIZERS, "--optimizers", f"unknown optimizer {name!r} ({', '.join(OPTIMIZERS)})")
        need(self.likelihood in ("heaviside", "probit"), "--likelihood", "must be heaviside or probit")
        need(self.sharpness_method in ("sgd-ascent", "sign-ascent"), "--sharpness",
             "must be sgd-ascent or sign-ascent")
        need(self.sharpness_epochs >= 1, "--sharpness-epochs", f"must be >= 1, got {self.sharpness_epochs}")
        need(self.alpha > 0, "--alpha", f"must be > 0, got {self.alpha}")
        chosen(self.measures)  # ValueError naming --measures
        need(self.shard_count >= 1 and 0 <= self.shard_index < self.shard_count, "--shard",
             f"must be i/N with 0 <= i < N, got {self.shard_index}/{self.shard_count}")

    def load_data(self):
        """(X_pool, y_pool, X_test, y_test) of this run: the pool (as many images as S and the largest attack set
        together) and the test set E."""
        return load_data(self.data, self.data_dir, pool=self.n_train + max(self.attack_sizes), n_test=self.n_test)

    def groups(self):
        """Every (optimizer, attack size) of the run, in a fixed order; a shard takes every N-th, with all of its
        seeds (so that --successful-runs can count a group's successes in one process)."""
        everything = [(o, a) for o in self.optimizers for a in self.attack_sizes]
        return everything[self.shard_index:: self.shard_count]

    def grid(self):
        """The (optimizer, attack size, seed) configurations run first: seeds 0 .. seeds-1 of each group; more
        seeds follow where --successful-runs asks for them (see flatfast.experiments.grid.run)."""
        return [(o, a, s) for o, a in self.groups() for s in range(self.seeds)]


def require(ok, option, message):
    """The settings' check: ValueError("<option>: <message>") unless ``ok``."""
    if not ok:
        raise ValueError(f"{option}: {message}")


def recorded_warnings(caught) -> List[str]:
    """The messages of warnings that bear on the results (convergence, numerics, fallbacks), once each; library
    deprecation notices say nothing about a measurement and are left to Python's own display."""
    skip = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
    return list(dict.fromkeys(str(w.message) for w in caught if not issubclass(w.category, skip)))


def config_differences(stored: dict, current: dict, ignore) -> List[str]:
    return [f"{key}: {stored.get(key)!r} there, {current.get(key)!r} here"
            for key in sorted(set(stored) | set(current)) if key not in ignore and stored.get(key) != current.get(key)]
