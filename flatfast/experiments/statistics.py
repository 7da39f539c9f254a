"""The statistics of a results table: for every recorded measure, Kendall tau and Pearson r between test error and
the measure with paired BCa bootstrap intervals, the granulated Kendall coefficient, the conditional mutual
information and the robust sign error over the grid's hyperparameters; the alpha-scale check; the PAC-Bayes bound;
and the leaderboard that ranks the measures -- printed and saved beside the plots."""
import csv
import json
import warnings
from pathlib import Path

import numpy as np

import flatfast.experiments.predictors as predictors
from flatfast.experiments.measurement import rescale_label
from flatfast.experiments.plots import plot, plot_leaderboard
from flatfast.experiments.table import read_table


def _kept(rows):
    """The networks the statistics use: trained to 100 % on S, not rescaled."""
    return [r for r in rows if r["reached_100_on_S"] and not r["rescaled"]]


def recorded_measures(rows):
    """[(name, label, direction, invariant)] of every measure the table holds a value of (the paper's always)."""
    everything = {**predictors.PAPER, **predictors.OTHERS}
    return [(name, *everything[name]) for name in everything
            if name in predictors.PAPER or any(np.isfinite(r.get(name, np.nan)) for r in rows)]


def _measure_values(rows, name, likelihood):
    """A measure's values as the statistics take them: log P(f) and the Laplace evidence (log probabilities) as
    they are, every other measure on log10 scale, as the paper plots the flatness measures (no rank changes)."""
    key = f"log_p_{likelihood}" if name == "log_p" else name
    values = np.array([r.get(key, np.nan) for r in rows], dtype=float)
    if name not in ("log_p", "laplace_evidence"):
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)
    return values


def _kendall_tau_b(x, y, axis=-1):
    """Kendall's tau-b (scipy's kendalltau) of the last axis, for a whole batch of resamples at once."""
    x, y = np.moveaxis(np.asarray(x), axis, -1), np.moveaxis(np.asarray(y), axis, -1)
    dx = np.sign(x[..., :, None] - x[..., None, :])
    dy = np.sign(y[..., :, None] - y[..., None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (dx * dy).sum((-2, -1)) / np.sqrt(np.abs(dx).sum((-2, -1)) * np.abs(dy).sum((-2, -1)))


def _pearson_r(x, y, axis=-1):
    """Pearson's r of the last axis, for a whole batch of resamples at once."""
    x, y = np.moveaxis(np.asarray(x), axis, -1), np.moveaxis(np.asarray(y), axis, -1)
    x = x - x.mean(-1, keepdims=True)
    y = y - y.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(-1) / np.sqrt((x * x).sum(-1) * (y * y).sum(-1))


def correlations(rows, likelihood="probit", n_resamples=1000, seed=0):
    """For every recorded measure over the networks that reached 100 % on S (rescaled copies excluded): Kendall
    tau and Pearson r between test error and the measure (log10 of the positive ones) with paired BCa bootstrap
    95 % intervals (scipy.stats.bootstrap, resampling networks); and the granulated Kendall coefficient, the
    conditional mutual information and the robust sign error over the grid's axes (optimizer, attack-set size,
    seed), each with its bootstrap interval (:mod:`flatfast.measures.ranking`, the measure oriented by the
    direction in which it should predict). The rows are put in configuration order first, so that the intervals
    do not depend on the order the table holds them in (a --jobs run appends rows as they finish)."""
    from scipy.stats import bootstrap

    import flatfast

    kept = sorted(_kept(rows), key=lambda r: (str(r.get("optimizer")), float(r.get("attack_size", 0)),
                                              float(r.get("seed", 0)), str(r.get("rescaled"))))
    result = {}
    for name, _, direction, _ in recorded_measures(rows):
        err = np.array([r["test_error"] for r in kept])
        values = _measure_values(kept, name, likelihood)
        ok = np.isfinite(values)
        err, values = err[ok], values[ok]
        entry = dict(kendall_tau=float("nan"), pearson_r=float("nan"), n=int(len(err)), direction=direction)
        if len(err) >= 3 and np.ptp(err) > 0 and np.ptp(values) > 0:
            for label, stat in (("kendall_tau", _kendall_tau_b), ("pearson_r", _pearson_r)):
                entry[label] = float(stat(err, values))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # degenerate resamples give NaN statistics; BCa copes
                    try:
                        ci = bootstrap((err, values), stat, paired=True, vectorized=True, batch=50, method="BCa",
                                       n_resamples=n_resamples, random_state=seed).confidence_interval
                        entry[label + "_ci"] = [float(ci.low), float(ci.high)]
                    except Exception:  # too few distinct networks for BCa's jackknife
                        entry[label + "_ci"] = [float("nan"), float("nan")]
            hyper = {axis: [r.get(axis, 0) for r, keep in zip(kept, ok) if keep]
                     for axis in ("optimizer", "attack_size", "seed")}
            for metric, fn, resamples in (("granulated_kendall", flatfast.granulated_kendall, n_resamples // 5),
                                          ("conditional_mutual_information",
                                           flatfast.conditional_mutual_information, n_resamples // 5),
                                          ("robust_sign_error", flatfast.robust_sign_error, n_resamples // 5)):
                try:
                    ranking = fn(values, err, hyper, direction=direction, n_resamples=resamples, seed=seed)
                except ValueError:  # a grid of one setting has no environment to compare
                    continue
                entry[metric] = ranking.value
                entry[metric + "_ci"] = list(ranking.interval)
                if metric == "granulated_kendall":  # which axes carry Psi
                    entry["granulated_kendall_per_axis"] = ranking.info["per_axis"]
                if metric == "robust_sign_error":
                    entry["mean_sign_error"] = ranking.info["mean"]
        result[name] = entry
    return result


def rescaled_pairs(rows):
    """[(SGD network, its alpha-scaled copy)] of the networks that fitted S (the others are out of every statistic,
    this one too)."""
    pairs = {}
    for r in rows:
        if r["optimizer"] == "sgd":
            pairs.setdefault((r["attack_size"], r["seed"]), {})[r["rescaled"]] = r
    return [(p[False], p[True]) for p in pairs.values() if True in p and False in p and p[False]["reached_100_on_S"]]


def rescaling_effect(rows, likelihood):
    """{measure: the largest relative change between an SGD network and its alpha-scaled copy} over the networks
    that fitted S (0 for a measure the rescaling cannot move, to rounding)."""
    checks = rescaled_pairs(rows)
    effect = {}
    for name, _, _, _ in recorded_measures(rows):
        key = f"log_p_{likelihood}" if name == "log_p" else name
        changes = [abs(b[key] - a[key]) / abs(a[key]) for a, b in checks
                   if np.isfinite(a.get(key, np.nan)) and np.isfinite(b.get(key, np.nan)) and a[key] != 0]
        effect[name] = float(max(changes)) if changes else float("nan")
    return effect


LEADERBOARD_FIELDS = ["measure", "label", "invariant", "kendall_tau", "kendall_tau_ci", "granulated_kendall",
                      "granulated_kendall_ci", "conditional_mutual_information", "conditional_mutual_information_ci",
                      "robust_sign_error", "robust_sign_error_ci", "mean_sign_error", "rescaling_changed_it_by",
                      "seconds_per_network", "networks"]


def leaderboard(rows, corr, likelihood):
    """One row per measure, best first by the granulated Kendall coefficient (oriented: 1 is a perfect predictor):
    its Kendall tau (oriented), Psi, the conditional mutual information, the robust sign error, the largest
    relative change the alpha-rescaling made to it, and its median cost in seconds per network."""
    effect = rescaling_effect(rows, likelihood)
    kept = _kept(rows)
    board = []
    for name, label, direction, invariant in recorded_measures(rows):
        c = corr.get(name, {})
        seconds = [r.get(f"seconds_{name}", np.nan) for r in kept]
        seconds = [v for v in seconds if np.isfinite(v)]
        oriented = direction * c.get("kendall_tau", np.nan)
        ci = [direction * v for v in c.get("kendall_tau_ci", [np.nan, np.nan])]
        board.append(dict(measure=name, label=label, invariant=invariant, kendall_tau=oriented,
                          kendall_tau_ci=sorted(ci), granulated_kendall=c.get("granulated_kendall", np.nan),
                          granulated_kendall_ci=c.get("granulated_kendall_ci", [np.nan, np.nan]),
                          conditional_mutual_information=c.get("conditional_mutual_information", np.nan),
                          conditional_mutual_information_ci=c.get("conditional_mutual_information_ci",
                                                                  [np.nan, np.nan]),
                          robust_sign_error=c.get("robust_sign_error", np.nan),
                          robust_sign_error_ci=c.get("robust_sign_error_ci", [np.nan, np.nan]),
                          mean_sign_error=c.get("mean_sign_error", np.nan),
                          rescaling_changed_it_by=effect.get(name, np.nan),
                          seconds_per_network=float(np.median(seconds)) if seconds else np.nan,
                          networks=c.get("n", 0)))
    board.sort(key=lambda b: -b["granulated_kendall"] if np.isfinite(b["granulated_kendall"]) else np.inf)
    return board


def write_leaderboard(board, out):
    with open(out / "leaderboard.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LEADERBOARD_FIELDS)
        writer.writeheader()
        for b in board:
            writer.writerow({k: (";".join(f"{v:.4g}" for v in b[k]) if isinstance(b[k], list) else
                                 (f"{b[k]:.6g}" if isinstance(b[k], float) else b[k])) for k in LEADERBOARD_FIELDS})
    plot_leaderboard(board, out)


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
    board = leaderboard(rows, corr, config.likelihood)
    write_leaderboard(board, out)
    log(f"correlation with test error over {corr['log_p']['n']} networks that reached 100 % on S"
        f"{_left_out_phrase(len(failed))}; log P(f) with the {config.likelihood} "
        "likelihood, flatness as log10; 95 % paired BCa bootstrap intervals:")
    for name, label, _, _ in recorded_measures(rows):
        c = corr[name]
        if "kendall_tau_ci" in c:
            log(f"  {label:<24} Kendall tau {c['kendall_tau']:+.3f} [{c['kendall_tau_ci'][0]:+.2f}, "
                f"{c['kendall_tau_ci'][1]:+.2f}]   Pearson r {c['pearson_r']:+.3f} [{c['pearson_r_ci'][0]:+.2f}, "
                f"{c['pearson_r_ci'][1]:+.2f}]")
        else:
            log(f"  {label:<24} not enough networks with distinct values (n = {c['n']})")
    checks = rescaled_pairs(rows)
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
    log("leaderboard (by the granulated Kendall coefficient, oriented so that 1 is a perfect predictor; robust sign "
        "error: 0 is perfect; how much the alpha-rescaling moved it):")
    for b in board:
        log(f"  {b['label']:<36} Psi {b['granulated_kendall']:+.3f}  tau {b['kendall_tau']:+.3f}  CMI "
            f"{b['conditional_mutual_information']:.3f}  sign error {b['robust_sign_error']:.2f}  rescaling "
            f"x{1 + b['rescaling_changed_it_by']:.3g}  {b['seconds_per_network']:.3g} s")
    plot(rows, out, config.likelihood)
    log(f"results: {table}; plots, correlations.json and leaderboard.csv in {out}")
