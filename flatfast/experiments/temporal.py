"""The temporal experiment of Zhang et al. (2021, Fig. 5): ``flatfast reproduce --experiment temporal``.

One FCN (d-40-40-1, the main experiment's prior and loss) is trained with SGD on S alone (|A| = 0) until it
classifies S perfectly, then for ``post_epochs`` more epochs; half-way the alpha-scale (W1, b1 / alpha;
W2 * alpha) is applied to the live network and training goes on. Every ``every``-th epoch (and on both sides of
the rescale) it records the train/test loss and error, log P(f) under both likelihoods (f = the network's own
predictions on S and E, E = the first 100 test images), Keskar sharpness, Hessian trace and top eigenvalue, all
of the mean loss on S. Rows are appended to temporal.csv as they are measured, with a checkpoint beside them, so
``--resume`` continues a killed run exactly. EP starts each measurement from the previous one's sites.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

import flatfast.experiments.predictors as predictors

FIELDS = ["epoch", "phase", "rescaled", "train_loss", "train_error", "test_loss", "test_error",
          "log_p_heaviside", "log_p_probit", "ep_sweeps_heaviside", "ep_sweeps_probit", "ep_converged_heaviside",
          "ep_converged_probit", "ep_seconds", "sharpness", "trace", "trace_stderr", "top_eigenvalue",
          *predictors.COLUMNS, "warnings", "seconds"]


@dataclasses.dataclass
class TemporalConfig:
    data: str = "digits"
    data_dir: Optional[str] = None
    n_train: int = 500
    n_test: int = 100
    width: int = 40
    lr: float = 0.01
    batch_size: int = 32
    max_epochs: int = 3000
    post_epochs: int = 1000
    every: int = 1
    alpha: float = 5.9
    divided_layer: int = 0
    sharpness_eps: float = 1e-4
    sharpness_epochs: int = 100
    sharpness_lr: float = 1e-3
    trace_method: str = "auto"
    trace_rtol: float = 0.05
    frobenius_rtol: float = 0.05
    warm_start: bool = True
    measures: str = "invariant"
    seed: int = 0
    out: str = "flatfast-temporal"

    @classmethod
    def quick(cls, **overrides):
        base = dict(post_epochs=100, every=5, sharpness_epochs=10)
        base.update(overrides)
        return cls(**base)

    @property
    def rescale_epoch(self):
        return self.post_epochs // 2

    def validate(self):
        from flatfast.experiments.config import require as need

        need(self.n_train >= 1, "--n-train", f"must be >= 1, got {self.n_train}")
        need(self.n_test >= 1, "--n-test", f"must be >= 1, got {self.n_test}")
        need(self.max_epochs >= 1, "--max-epochs", f"must be >= 1, got {self.max_epochs}")
        need(self.lr > 0, "--lr", f"must be > 0, got {self.lr}")
        need(self.post_epochs >= 2, "--post-epochs", f"must be >= 2, got {self.post_epochs}")
        need(self.every >= 1, "--every", f"must be >= 1, got {self.every}")
        need(self.sharpness_epochs >= 1, "--sharpness-epochs", f"must be >= 1, got {self.sharpness_epochs}")
        predictors.chosen(self.measures)  # ValueError naming --measures


class _Measurer:
    """Everything recorded at one epoch; keeps the last EP sites of each likelihood for the next warm start."""

    def __init__(self, config, S, E, K):
        self.config, self.S, self.E, self.K = config, S, E, K
        self.warm = {"heaviside": None, "probit": None}

    def __call__(self, model, epoch, phase, rescaled, *, update_warm=True):
        import torch

        import flatfast
        from flatfast.experiments.config import recorded_warnings
        from flatfast.experiments.measurement import flatness_on

        t0 = time.perf_counter()
        bce = torch.nn.BCEWithLogitsLoss()
        row = dict(epoch=epoch, phase=phase, rescaled=rescaled)
        labels = []
        for name, (X, y) in (("train", self.S), ("test", self.E)):
            with torch.no_grad():
                row[f"{name}_loss"] = float(bce(model(torch.from_numpy(X)).reshape(-1),
                                                torch.from_numpy(y.astype(np.float64))))
            labels.append(flatfast.function_of(model, torch.from_numpy(X)))
            row[f"{name}_error"] = float(np.mean(labels[-1] != 2 * y - 1))
        f = np.concatenate(labels)  # the network's own predictions on S and E
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t_ep = time.perf_counter()
            for likelihood in ("heaviside", "probit"):
                res = flatfast.ep_log_evidence(self.K, f, likelihood=likelihood, check_psd=False, return_info=True,
                                               warm_start=self.warm[likelihood] if self.config.warm_start else None)
                row[f"log_p_{likelihood}"] = res.log_z
                row[f"ep_sweeps_{likelihood}"] = res.sweeps
                row[f"ep_converged_{likelihood}"] = res.converged
                if update_warm:
                    self.warm[likelihood] = res
            row["ep_seconds"] = round(time.perf_counter() - t_ep, 4)
            flat = flatness_on(model, self.S, self.config, self.config.seed,
                               which=("trace", "top_eigenvalue", "sharpness_sgd_ascent"))
            others = predictors.record(model, self.S, predictors.chosen(self.config.measures), self.config.seed)
        row.update(sharpness=flat["sharpness_sgd_ascent"], trace=flat["trace"], trace_stderr=flat["trace_stderr"],
                   top_eigenvalue=flat["top_eigenvalue"])
        row.update({k: v for k, v in others.items() if k in FIELDS})  # not their seconds: the row's total counts
        row["warnings"] = " | ".join(recorded_warnings(caught))
        row["seconds"] = round(time.perf_counter() - t0, 2)
        return row


def run_temporal(config: TemporalConfig, *, resume=False, log=print):
    """Run (or continue) the temporal experiment; returns the path of temporal.csv."""
    import torch

    import flatfast
    from flatfast.experiments.data import load_data
    from flatfast.experiments.table import DurableTable, prepare_output
    from flatfast.experiments.training import every_seconds, fit, make_network, train_epoch

    config.validate()
    out = Path(config.out)
    table, state_path = out / "temporal.csv", out / "temporal_state.pt"
    if table.exists() and not resume:
        raise FileExistsError(f"--out: {table} exists; pass --resume to continue it or choose another --out")
    X_pool, y_pool, X_test, y_test = load_data(config.data, config.data_dir, pool=config.n_train,
                                               n_test=config.n_test)
    prepare_output(out, dataclasses.asdict(config), resume, ignore={"out"})

    S, E = (X_pool, y_pool), (X_test, y_test)
    K = flatfast.nngp_kernel(np.concatenate([S[0], E[0]]), depth=2, sigma_w2=2.0, sigma_b2=1.0)
    measure = _Measurer(config, S, E, K)
    model = make_network(S[0].shape[1], config.width, config.seed)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    Xt, yt = torch.from_numpy(S[0]), torch.from_numpy(S[1].astype(np.float64))[:, None]
    done = set()
    if resume and table.exists() and not state_path.exists():
        with open(table, newline="") as fh:
            finished = any(int(r["epoch"]) == config.post_epochs for r in csv.DictReader(fh))
        if finished:  # a completed run removes its checkpoint: nothing to continue
            log(f"flatfast reproduce --experiment temporal: {table} is complete; summarising it")
            summarise_temporal(table, config, log=log)
            return table
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=True)  # tensors and plain values only: no code runs
        model.load_state_dict(state["model"])
        gen.set_state(state["generator"])
        measure.warm = _warm_starts_from_state(state["warm"])
        epoch, fit_epochs, rescaled = state["epoch"], state["fit_epochs"], state["rescaled"]
        with open(table, newline="") as fh:
            done = {(int(r["epoch"]), r["phase"]) for r in csv.DictReader(fh)}
        log(f"flatfast reproduce --experiment temporal: resuming after epoch {epoch} past fitting S")
    else:
        say = every_seconds(log)
        fit_epochs, reached, _ = fit(model, opt, "sgd", Xt, yt, S, config.batch_size, gen, config.max_epochs,
                                     lambda epoch, acc: say(f"  fitting S with SGD: epoch {epoch}, accuracy on S "
                                                            f"{acc:.3f}"))
        if not reached:
            raise RuntimeError(f"--max-epochs: SGD did not fit S in {config.max_epochs} epochs")
        epoch, rescaled = 0, False
        log(f"flatfast reproduce --experiment temporal: SGD fitted S (|S| = {len(S[1])}) in {fit_epochs} epochs; "
            f"{config.post_epochs} more epochs, alpha = {config.alpha} scale after epoch {config.rescale_epoch}, "
            f"measured every {config.every}; log P(f) over n = {len(K)} points")

    with DurableTable(table, FIELDS) as results:

        def record(row):
            if (row["epoch"], row["phase"]) in done:
                return
            results.append(row)
            log(f"  epoch {row['epoch']:>4} {row['phase']:<15} train/test error {row['train_error']:.3f}/"
                f"{row['test_error']:.3f}, log P(f) {row['log_p_probit']:.4f} (probit) {row['log_p_heaviside']:.4f} "
                f"(heaviside), sharpness {row['sharpness']:.3g}, trace {row['trace']:.3g}, "
                f"top eig {row['top_eigenvalue']:.3g}")
            if row["warnings"]:
                log(f"    warnings: {row['warnings']}")

        def checkpoint():
            tmp = state_path.with_suffix(".tmp")
            torch.save(dict(model=model.state_dict(), generator=gen.get_state(), warm=_warm_starts_as_state(measure.warm),
                            epoch=epoch,
                            fit_epochs=fit_epochs, rescaled=rescaled), tmp)
            os.replace(tmp, state_path)

        if epoch == 0:
            if (0, "fitted S") not in done:
                record(measure(model, 0, "fitted S", False))
            checkpoint()
        while epoch < config.post_epochs:
            train_epoch(model, opt, "sgd", Xt, yt, config.batch_size, gen)
            epoch += 1
            if epoch == config.rescale_epoch:
                # Both sides measured from the same EP warm start: any difference is the network's, not EP's.
                if (epoch, "before rescale") not in done:
                    record(measure(model, epoch, "before rescale", False, update_warm=False))
                scaled = flatfast.rescale(model, config.alpha, divided_layer=config.divided_layer)
                with torch.no_grad():
                    for p, q in zip(model.parameters(), scaled.parameters()):
                        p.copy_(q)
                rescaled = True
                record(measure(model, epoch, "after rescale", True))
            elif epoch % config.every == 0 or epoch == config.post_epochs:
                record(measure(model, epoch, "", rescaled))
            else:
                continue
            checkpoint()
    state_path.unlink(missing_ok=True)  # complete: the table holds everything, the checkpoint nothing more
    summarise_temporal(table, config, log=log)
    return table


def read_temporal(table):
    from flatfast.experiments.table import read_typed_csv

    return read_typed_csv(table, FIELDS, {"phase", "warnings"},
                          {"rescaled", "ep_converged_heaviside", "ep_converged_probit"})


def summarise_temporal(table, config, log=print):
    rows = read_temporal(table)
    before = next((r for r in rows if r["phase"] == "before rescale"), None)
    after = next((r for r in rows if r["phase"] == "after rescale"), None)
    if before and after:
        log(f"at the alpha-scale (epoch {int(before['epoch'])}): log P(f) changed by "
            f"{abs(after['log_p_probit'] - before['log_p_probit']):.2g} (probit) and "
            f"{abs(after['log_p_heaviside'] - before['log_p_heaviside']):.2g} (heaviside) nats, test error by "
            f"{abs(after['test_error'] - before['test_error']):.2g}; sharpness x{after['sharpness'] / before['sharpness']:.3g}, "
            f"trace x{after['trace'] / before['trace']:.3g}, top eigenvalue "
            f"x{after['top_eigenvalue'] / before['top_eigenvalue']:.3g}")
    sweeps = [r["ep_sweeps_probit"] + r["ep_sweeps_heaviside"] for r in rows]
    log(f"EP: {np.mean(sweeps) / 2:.1f} sweeps per likelihood on average "
        f"({'warm-started from the previous measurement' if config.warm_start else 'cold starts'})")
    plot_temporal(rows, Path(table).parent / "temporal.png", config)
    log(f"results: {table}; plot: {Path(table).parent / 'temporal.png'}")


def plot_temporal(rows, path, config):
    from flatfast.experiments.plots import pyplot

    plt = pyplot()
    epochs = np.array([r["epoch"] for r in rows])
    fig, axes = plt.subplots(5, 1, figsize=(8, 13), sharex=True)
    panels = [("error", [("train_error", "train"), ("test_error", "test")], False),
              ("loss (mean BCE)", [("train_loss", "train"), ("test_loss", "test")], True),
              ("log P(f) (nats)", [("log_p_probit", "probit"), ("log_p_heaviside", "heaviside")], False),
              ("sharpness (eps = %g)" % config.sharpness_eps, [("sharpness", "SGD ascent")], True),
              ("Hessian of the loss on S", [("trace", "trace"), ("top_eigenvalue", "top eigenvalue")], True)]
    for ax, (label, series, log_scale) in zip(axes, panels):
        for key, name in series:
            ax.plot(epochs, [r[key] for r in rows], marker=".", ms=3, lw=1, label=name)
        if log_scale:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.axvline(0, color="tab:green", lw=1.2, label="zero training error")
        ax.axvline(config.rescale_epoch, color="tab:red", lw=1.2, label=f"alpha = {config.alpha} scale")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("epochs after zero training error on S")
    fig.suptitle(f"Temporal experiment: SGD on S (|S| = {config.n_train}), log P(f) over S and {config.n_test} test "
                 "points")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_MAIN_ONLY = {"attack_sizes": "--attack-sizes", "seeds": "--seeds", "successful_runs": "--successful-runs",
              "max_seeds": "--max-seeds", "optimizers": "--optimizers", "jobs": "--jobs", "likelihood": "--likelihood",
              "sharpness_method": "--sharpness", "shard": "--shard"}


def _warm_starts_as_state(warm):
    """The EP warm starts as tensors and strings, which ``torch.load(weights_only=True)`` reads back."""
    import torch

    return {likelihood: None if res is None else {
        "site_precision": torch.from_numpy(np.asarray(res.site_precision)),
        "site_natural_mean": torch.from_numpy(np.asarray(res.site_natural_mean)),
        "labels": torch.from_numpy(np.asarray(res.labels))} for likelihood, res in warm.items()}


def _warm_starts_from_state(state):
    """The EP warm starts of a checkpoint as the EPResult records ``ep_log_evidence(warm_start=)`` takes."""
    from flatfast.results import EPResult

    def record(likelihood, sites):
        return EPResult(log_z=float("nan"), sweeps=0, converged=True, damping=1.0, max_site_change=0.0,
                        log_z_history=[], seconds=0.0, likelihood=likelihood,
                        site_precision=sites["site_precision"].numpy(),
                        site_natural_mean=sites["site_natural_mean"].numpy(), labels=sites["labels"].numpy())

    return {likelihood: None if sites is None else record(likelihood, sites) for likelihood, sites in state.items()}


def main(args) -> int:
    given = [flag for field, flag in _MAIN_ONLY.items() if getattr(args, field, None) is not None]
    if given:
        print(f"flatfast reproduce: {', '.join(given)} apply to the main experiment, not to --experiment temporal "
              "(which records both likelihoods and the SGD-ascent sharpness of one SGD network)", file=sys.stderr)
        return 2
    overrides = {}
    for field in ("data", "data_dir", "n_train", "n_test", "max_epochs", "lr", "post_epochs", "every",
                  "sharpness_epochs", "measures", "out"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value
    if "out" not in overrides:
        overrides["out"] = "flatfast-temporal"
    t0 = time.perf_counter()
    try:
        config = TemporalConfig.quick(**overrides) if args.quick else TemporalConfig(**overrides)
        run_temporal(config, resume=args.resume, log=lambda s: print(s, flush=True))
    except KeyboardInterrupt:
        from flatfast.experiments.table import interrupted_message

        print(interrupted_message(Path(overrides["out"]) / "temporal.csv", overrides["out"]), file=sys.stderr)
        return 130
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"flatfast reproduce: {exc}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0
