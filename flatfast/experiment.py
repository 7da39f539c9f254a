"""The paper's experiment (Mingard et al., arXiv 2103.06219) as one command: ``flatfast reproduce``.

A fully connected ReLU network (2 hidden layers of 40, weights N(0, 2/fan_in), biases N(0, 1): the NNGP prior
with sigma_w2 = 2, sigma_b2 = 1) is trained on a binarised image set S (label 1 iff digit >= 5) plus an attack
set A of images with deliberately wrong labels, with one logit and sigmoid cross-entropy, until the first epoch
with 100 % accuracy on S u A. The larger A, the worse it generalises. For each trained network we record the
test error on E, log P(f) for f = (true labels on S, the network's predictions on E) by EP under both
likelihoods, and the local flatness of the training loss (trace, top eigenvalue, epsilon-sharpness); each SGD
network is also alpha-rescaled (Dinh et al.) and measured again. Rows are appended to results.csv as each run
finishes, so a killed run loses nothing and ``--resume`` continues where it stopped.
"""
from __future__ import annotations

import csv
import dataclasses
import gzip
import itertools
import json
import math
import os
import struct
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

FIELDS = ["data", "optimizer", "attack_size", "seed", "rescaled", "alpha", "epochs", "reached_zero_error",
          "train_accuracy", "test_error", "log_p_heaviside", "log_p_probit", "ep_sweeps", "trace", "trace_stderr",
          "top_eigenvalue", "top_eigenvalue_residual", "sharpness", "seconds"]
MEASURES = [("log_p", "log P(f) (nats)"), ("trace", "Hessian trace"), ("top_eigenvalue", "top Hessian eigenvalue"),
            ("sharpness", "epsilon-sharpness")]


@dataclasses.dataclass
class Config:
    data: str = "digits"
    data_dir: Optional[str] = None
    n_train: int = 500
    n_test: Optional[int] = None
    attack_sizes: List[int] = dataclasses.field(default_factory=lambda: list(range(0, 501, 50)))
    seeds: int = 5
    optimizers: List[str] = dataclasses.field(default_factory=lambda: ["sgd", "adam", "entropy-sgd"])
    width: int = 40
    lr: float = 0.01
    batch_size: int = 32
    max_epochs: int = 3000
    likelihood: str = "heaviside"
    alpha: float = 5.9
    rescale_layer: int = 0
    sharpness_eps: float = 1e-4
    trace_rtol: float = 0.02
    out: str = "flatfast-results"

    @classmethod
    def quick(cls, **overrides):
        base = dict(attack_sizes=[0, 150, 300, 500], seeds=2, max_epochs=2000)
        base.update(overrides)
        return cls(**base)


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
            raise ValueError(f"n_train + max attack size = {pool} leaves no test images of the {len(y)} digits")
        n_test = len(y) - pool if config.n_test is None else config.n_test
        return X[:pool], y[:pool], X[pool: pool + n_test], y[pool: pool + n_test]
    if config.data == "mnist":
        if not config.data_dir:
            raise ValueError("data_dir: --data mnist needs --data-dir with the MNIST IDX files")
        Xtr, ytr = _read_idx_pair(config.data_dir, "train")
        Xte, yte = _read_idx_pair(config.data_dir, "t10k")
        order = np.random.default_rng(0).permutation(len(ytr))
        pool = config.n_train + max(config.attack_sizes)
        n_test = 1000 if config.n_test is None else config.n_test
        idx = order[:pool]
        return Xtr[idx], (ytr[idx] >= 5).astype(np.int64), Xte[:n_test], (yte[:n_test] >= 5).astype(np.int64)
    raise ValueError(f"data: expected 'digits' or 'mnist', got {config.data!r}")


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


def train(model, X, y, optimizer_name, config, seed):
    """Train until the first epoch after which every training point is classified correctly (or max_epochs)."""
    import torch

    from flatfast.optim import EntropySGD

    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.astype(np.float64))[:, None]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    if optimizer_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    elif optimizer_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    elif optimizer_name == "entropy-sgd":
        # Outer step 1/gamma, i.e. x <- mu (the Langevin average) after each inner loop. With the optimizer's
        # default outer step of 1, Entropy-SGD did not reach zero training error within 2000 epochs on the digits
        # with an attack set; with 1/gamma it does in 130-250 epochs.
        gamma = 0.03
        opt = EntropySGD(model.parameters(), lr=1.0 / gamma, inner_steps=20, inner_lr=0.1, gamma=gamma, noise=1e-4,
                         seed=seed)
    else:
        raise ValueError(f"optimizers: unknown optimizer {optimizer_name!r} (sgd, adam, entropy-sgd)")
    gen = torch.Generator().manual_seed(seed)
    n = len(y)
    for epoch in range(1, config.max_epochs + 1):
        order = torch.randperm(n, generator=gen)
        batches = [order[i: i + config.batch_size] for i in range(0, n, config.batch_size)]
        if optimizer_name == "entropy-sgd":
            # One outer step consumes inner_steps minibatches; an epoch is as many outer steps as it takes to
            # draw about one pass of minibatches.
            stream = itertools.cycle(batches)

            def closure():
                idx = next(stream)
                opt.zero_grad()
                loss = loss_fn(model(Xt[idx]), yt[idx])
                loss.backward()
                return loss

            for _ in range(max(1, math.ceil(len(batches) / opt.param_groups[0]["inner_steps"]))):
                opt.step(closure)
        else:
            for idx in batches:
                opt.zero_grad()
                loss_fn(model(Xt[idx]), yt[idx]).backward()
                opt.step()
        with torch.no_grad():
            accuracy = float(((model(Xt) >= 0).double() == yt).double().mean())
        if accuracy == 1.0:
            return epoch, True, accuracy
    return config.max_epochs, False, accuracy


def measure(model, X_train, y_train, X_test, y_test, X_prior, K, n_labelled, config, seed):
    """Test error, log P(f) under both likelihoods, and the local flatness of the training loss."""
    import torch

    import flatfast

    row = {}
    test_pred = flatfast.function_of(model, torch.from_numpy(X_test))
    row["test_error"] = float(np.mean(test_pred != (2 * y_test - 1)))
    f = np.concatenate([2 * y_train[:n_labelled] - 1, test_pred])
    heaviside = flatfast.ep_log_evidence(K, f, likelihood="heaviside", check_psd=False, return_info=True)
    probit = flatfast.ep_log_evidence(K, f, likelihood="probit", check_psd=False)
    row.update(log_p_heaviside=heaviside.log_z, log_p_probit=probit, ep_sweeps=heaviside.sweeps)
    data = [(torch.from_numpy(X_train), torch.from_numpy(y_train.astype(np.float64))[:, None])]
    bce = torch.nn.BCEWithLogitsLoss()
    trace = flatfast.hessian_trace(model, data, bce, rtol=config.trace_rtol, seed=seed, progress=False)
    eig = flatfast.hessian_eigenvalues(model, data, k=1, loss_fn=bce, tol=1e-4, seed=seed)
    row.update(trace=trace.value, trace_stderr=trace.stderr, top_eigenvalue=float(eig.values[0]),
               top_eigenvalue_residual=float(eig.residuals[0]),
               sharpness=flatfast.sharpness(model, data, eps=config.sharpness_eps, loss_fn=bce, seed=seed))
    return row


# --- the experiment ----------------------------------------------------------------------------------------

def _key(row):
    return (row["optimizer"], int(row["attack_size"]), int(row["seed"]), str(row["rescaled"]) in ("True", "1"))


def run(config: Config, *, resume=False, log=print):
    """Run every (optimizer, attack size, seed), appending rows to <out>/results.csv; then plots and
    correlations. Returns the path of the results table."""
    import warnings

    import flatfast

    out = Path(config.out)
    table = out / "results.csv"
    if table.exists() and not resume:
        raise FileExistsError(f"out: {table} exists; pass --resume to continue it or choose another --out")
    # Load the data first, so that a bad --data/--data-dir leaves no half-made output directory behind.
    X_pool, y_pool, X_test, y_test = load_data(config)
    out.mkdir(parents=True, exist_ok=True)
    done = set()
    if resume and table.exists():
        with open(table, newline="") as fh:
            done = {_key(r) for r in csv.DictReader(fh)}
    with open(out / "config.json", "w") as fh:
        json.dump(dataclasses.asdict(config), fh, indent=2)

    S_X, S_y = X_pool[: config.n_train], y_pool[: config.n_train]
    A_X, A_y = X_pool[config.n_train:], 1 - y_pool[config.n_train:]  # deliberately wrong labels
    X_prior = np.concatenate([S_X, X_test])
    log(f"flatfast reproduce: {config.data}, |S| = {len(S_y)}, |E| = {len(y_test)}, attack sizes "
        f"{config.attack_sizes}, {config.seeds} seed(s), optimizers {config.optimizers}; log P(f) over "
        f"n = {len(X_prior)} points, reported likelihood: {config.likelihood}")
    K = flatfast.nngp_kernel(X_prior, depth=2, sigma_w2=2.0, sigma_b2=1.0)

    new_file = not table.exists()
    with open(table, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
            fh.flush()
        for optimizer_name in config.optimizers:
            for attack in config.attack_sizes:
                for seed in range(config.seeds):
                    keys = [(optimizer_name, attack, seed, False)]
                    if optimizer_name == "sgd":
                        keys.append((optimizer_name, attack, seed, True))
                    if all(k in done for k in keys):
                        continue
                    t0 = time.perf_counter()
                    X_train = np.concatenate([S_X, A_X[:attack]])
                    y_train = np.concatenate([S_y, A_y[:attack]])
                    run_seed = 1000 * seed + attack
                    model = make_network(X_train.shape[1], config.width, run_seed)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", flatfast.ConvergenceWarning)
                        epochs, reached, accuracy = train(model, X_train, y_train, optimizer_name, config, run_seed)
                        variants = [(False, model)]
                        if optimizer_name == "sgd":
                            variants.append((True, flatfast.rescale(model, config.alpha, layer=config.rescale_layer)))
                        for rescaled, net in variants:
                            if (optimizer_name, attack, seed, rescaled) in done:
                                continue
                            row = dict(data=config.data, optimizer=optimizer_name, attack_size=attack, seed=seed,
                                       rescaled=rescaled, alpha=config.alpha if rescaled else 1.0, epochs=epochs,
                                       reached_zero_error=reached, train_accuracy=accuracy)
                            row.update(measure(net, X_train, y_train, X_test, y_test, X_prior, K, len(S_y), config,
                                               run_seed))
                            row["seconds"] = round(time.perf_counter() - t0, 2)
                            writer.writerow(row)
                            fh.flush()
                            os.fsync(fh.fileno())
                            log(f"  {optimizer_name:<11} |A| = {attack:<4} seed {seed}{' rescaled' if rescaled else ''}:"
                                f" {epochs} epochs, test error {row['test_error']:.3f}, log P(f) "
                                f"{row['log_p_' + config.likelihood]:.2f}, trace {row['trace']:.3g}, "
                                f"top eig {row['top_eigenvalue']:.3g}, sharpness {row['sharpness']:.3g}")
    summarise(table, config, log=log)
    return table


def read_table(table):
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in FIELDS:
            if k in ("data", "optimizer"):
                continue
            if k in ("rescaled", "reached_zero_error"):
                r[k] = r[k] in ("True", "1")
            else:
                r[k] = float(r[k])
    return rows


def correlations(rows, likelihood="heaviside", n_boot=1000, seed=0):
    """Kendall tau and Pearson r between test error and each measure over the un-rescaled networks, with
    bootstrap 95% intervals (resampling networks)."""
    from scipy.stats import kendalltau, pearsonr

    base = [r for r in rows if not r["rescaled"]]
    err = np.array([r["test_error"] for r in base])
    rng = np.random.default_rng(seed)
    result = {}
    for name, _ in MEASURES:
        key = f"log_p_{likelihood}" if name == "log_p" else name
        values = np.array([r[key] for r in base])
        if len(base) < 3 or np.ptp(err) == 0 or np.ptp(values) == 0:
            result[name] = dict(kendall_tau=float("nan"), pearson_r=float("nan"), n=len(base))
            continue
        tau, r = kendalltau(err, values)[0], pearsonr(err, values)[0]
        boot_tau, boot_r = [], []
        for _ in range(n_boot):
            idx = rng.integers(0, len(base), len(base))
            if np.ptp(err[idx]) == 0 or np.ptp(values[idx]) == 0:
                continue
            boot_tau.append(kendalltau(err[idx], values[idx])[0])
            boot_r.append(pearsonr(err[idx], values[idx])[0])
        result[name] = dict(kendall_tau=float(tau), kendall_tau_ci=[float(np.nanpercentile(boot_tau, 2.5)),
                                                                     float(np.nanpercentile(boot_tau, 97.5))],
                            pearson_r=float(r), pearson_r_ci=[float(np.nanpercentile(boot_r, 2.5)),
                                                              float(np.nanpercentile(boot_r, 97.5))], n=len(base))
    return result


def summarise(table, config, log=print):
    """Correlations (printed and saved to correlations.json), the rescaling check, and the PNG plots."""
    rows = read_table(table)
    out = Path(table).parent
    corr = correlations(rows, config.likelihood)
    with open(out / "correlations.json", "w") as fh:
        json.dump({"likelihood": config.likelihood, "correlations_with_test_error": corr}, fh, indent=2)
    log(f"correlation with test error over {corr['log_p']['n']} networks (log P(f): {config.likelihood} likelihood; "
        "95% bootstrap intervals):")
    for name, label in MEASURES:
        c = corr[name]
        if "kendall_tau_ci" in c:
            log(f"  {label:<24} Kendall tau {c['kendall_tau']:+.3f} [{c['kendall_tau_ci'][0]:+.2f}, "
                f"{c['kendall_tau_ci'][1]:+.2f}]   Pearson r {c['pearson_r']:+.3f} [{c['pearson_r_ci'][0]:+.2f}, "
                f"{c['pearson_r_ci'][1]:+.2f}]")
    pairs = {}
    for r in rows:
        if r["optimizer"] == "sgd":
            pairs.setdefault((r["attack_size"], r["seed"]), {})[r["rescaled"]] = r
    checks = [(p[False], p[True]) for p in pairs.values() if True in p and False in p]
    if checks:
        dlogp = max(abs(a[f"log_p_{config.likelihood}"] - b[f"log_p_{config.likelihood}"]) for a, b in checks)
        derr = max(abs(a["test_error"] - b["test_error"]) for a, b in checks)
        ratios = [b["trace"] / a["trace"] for a, b in checks]
        eig_ratios = [b["top_eigenvalue"] / a["top_eigenvalue"] for a, b in checks]
        log(f"alpha = {config.alpha} rescaling of {len(checks)} SGD networks: max |d test error| = {derr:.2g}, "
            f"max |d log P(f)| = {dlogp:.2g}; trace x{min(ratios):.3g} .. x{max(ratios):.3g}, top eigenvalue "
            f"x{min(eig_ratios):.3g} .. x{max(eig_ratios):.3g}")
    plot(rows, out, config.likelihood)
    log(f"results: {table}; plots and correlations.json in {out}")


def plot(rows, out, likelihood):
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"sgd": "tab:blue", "adam": "tab:orange", "entropy-sgd": "tab:green"}
    fig_all, axes = plt.subplots(2, 2, figsize=(11, 9))
    for ax_all, (name, label) in zip(axes.flat, MEASURES):
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        for target in (ax, ax_all):
            for opt in sorted({r["optimizer"] for r in rows}):
                for rescaled in (False, True):
                    pts = [r for r in rows if r["optimizer"] == opt and r["rescaled"] == rescaled]
                    if not pts:
                        continue
                    key = f"log_p_{likelihood}" if name == "log_p" else name
                    target.scatter([r[key] for r in pts], [r["test_error"] for r in pts],
                                   c=colours.get(opt, "tab:gray"), marker="x" if rescaled else "o",
                                   s=45 if rescaled else 25, alpha=0.85,
                                   label=f"{opt}{' (alpha-rescaled)' if rescaled else ''}")
            if name != "log_p":
                target.set_xscale("log")
                target.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            target.set_xlabel(label + (f" [{likelihood}]" if name == "log_p" else ""))
            target.set_ylabel("test error")
            target.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"test_error_vs_{name}.png", dpi=110)
        plt.close(fig)
    axes.flat[0].legend(fontsize=8)
    fig_all.suptitle("Which measure predicts generalization? (each point: one trained network)")
    fig_all.tight_layout()
    fig_all.savefig(out / "summary.png", dpi=110)
    plt.close(fig_all)


def main(args) -> int:
    overrides = {}
    for field in ("data", "data_dir", "n_train", "n_test", "attack_sizes", "seeds", "optimizers", "max_epochs",
                  "likelihood", "out"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value
    config = Config.quick(**overrides) if args.quick else Config(**overrides)
    for name in config.optimizers:
        if name not in ("sgd", "adam", "entropy-sgd"):
            raise SystemExit(f"flatfast reproduce: --optimizers: unknown optimizer {name!r} (sgd, adam, entropy-sgd)")
    if config.likelihood not in ("heaviside", "probit"):
        raise SystemExit("flatfast reproduce: --likelihood must be heaviside or probit")
    t0 = time.perf_counter()
    try:
        run(config, resume=args.resume, log=lambda s: print(s, flush=True))
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"flatfast reproduce: {exc}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0
