"""How far is EP from the truth? log Z_EP - log P(f) on NNGP kernels of MNIST-like inputs, with the truth
estimated by the minimax-tilting sampler (method="tilting") and its error bar.

Inputs X ~ U[0,1)^(n x 784), labels by the linear rule sum(x[:392]) > sum(x[392:]) (a structured labelling, the
kind a trained network expresses), depth-2 NNGP kernel with sigma_w2 = 2, sigma_b2 = 1, Heaviside likelihood.
Rows whose tail diagnostic says the error bar is not backed (Pareto k > 0.7) are printed but flagged.

    python bench/ep_accuracy.py                 # the documentation's table (about 5 minutes on 2 cores)
    python bench/ep_accuracy.py 10 100 --seeds 2 --samples 20000
    python bench/ep_accuracy.py --equicorrelated   # EP and its correction against exact values (a minute)

--out FILE appends one JSON line per row, which bench/results_pages.py turns into the results page's tables
(docs/results/ep-accuracy/ holds the stored rows).
"""
import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

import flatfast


def row(n, seed, samples):
    rng = np.random.default_rng(seed)
    X = rng.random((n, 784))
    y = np.where(X[:, :392].sum(1) > X[:, 392:].sum(1), 1, -1)
    K = flatfast.nngp_kernel(X)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", flatfast.UnreliableEstimateWarning)
        res = flatfast.ep_log_evidence(K, y, method="tilting", n_samples=samples, seed=seed + 1, return_info=True)
    return res, time.perf_counter() - start


def equicorrelated(out=None):
    """EP, its sweeps and its second-order correction against the exact orthant probability of equicorrelated
    kernels K = rho 11^T + (1 - rho) I, at n = 100 and 1500, for unanimous labels and 1 % and 10 % of them the
    other way (tests/orthant_reference.py computes the exact value, a 1-D integral)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from orthant_reference import equicorrelated_log_orthant

    print(f"{'n':>5} {'rho':>5} {'labels':>13} {'EP - exact':>11} {'sweeps':>6} {'correction':>11}")
    for n in (100, 1500):
        for rho in (0.9, 0.96, 0.99):
            for labels, minority in (("unanimous", 0), ("1 % minority", max(1, n // 100)),
                                     ("10 % minority", n // 10)):
                K = rho * np.ones((n, n)) + (1 - rho) * np.eye(n)
                y = np.ones(n)
                y[:minority] = -1
                res = flatfast.ep_log_evidence(K, y, correction=True, return_info=True)
                exact = equicorrelated_log_orthant(n, minority, rho)
                record = dict(n=n, rho=rho, labels=labels, minority=minority, ep_log_z=res.log_z, sweeps=res.sweeps,
                              correction=res.correction, exact=exact)
                print(f"{n:>5} {rho:>5} {labels:>13} {res.log_z - exact:>+11.4f} {res.sweeps:>6} "
                      f"{res.correction:>+11.4f}", flush=True)
                _append(out, record)


def _append(out, record):
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", nargs="*", type=int, default=[10, 100, 300, 500, 700, 1000, 1500])
    parser.add_argument("--seeds", type=int, default=3, help="input draws per size (default 3)")
    parser.add_argument("--samples", type=int, default=200_000, help="tilting samples per run (default 200,000)")
    parser.add_argument("--equicorrelated", action="store_true",
                        help="EP and its correction against exact values on equicorrelated kernels instead")
    parser.add_argument("--out", default=None, help="append one JSON line per row to this file")
    args = parser.parse_args(argv)
    if args.equicorrelated:
        return equicorrelated(args.out)
    print(f"{'n':>5} {'seed':>4} {'log Z_EP':>11} {'log P(f)':>11} {'stderr':>7} {'EP - P':>8} {'pareto k':>8} "
          f"{'ESS':>8} {'seconds':>7}  backed?")
    for n in args.sizes:
        for seed in range(args.seeds):
            res, seconds = row(n, seed, args.samples)
            backed = "yes" if res.pareto_k <= 0.7 else "NO (k > 0.7)"
            print(f"{n:>5} {seed:>4} {res.ep_log_z:>11.4f} {res.log_z:>11.4f} {res.stderr:>7.4f} "
                  f"{res.ep_log_z - res.log_z:>8.4f} {res.pareto_k:>8.2f} {res.ess:>8.0f} {seconds:>7.1f}  {backed}",
                  flush=True)
            _append(args.out, dict(n=n, seed=seed, samples=args.samples, ep_log_z=res.ep_log_z, log_z=res.log_z,
                                   stderr=res.stderr, pareto_k=res.pareto_k, ess=res.ess, seconds=seconds))


if __name__ == "__main__":
    main()
