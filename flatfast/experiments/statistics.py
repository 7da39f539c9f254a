"""The statistics of a results table: Kendall tau and Pearson r between test error and each measure with paired BCa
bootstrap intervals, the alpha-scale check and the PAC-Bayes bound, printed and saved beside the plots."""
import json
import warnings
from pathlib import Path

import numpy as np

from flatfast.experiments.measurement import MEASURES, rescale_label
from flatfast.experiments.plots import plot
from flatfast.experiments.table import read_table



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
