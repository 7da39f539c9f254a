"""How often does log_prior(method="smc")'s +-2 stderr hold the exact value? A script, not a benchmark (minutes).

Equicorrelated kernels K = rho 11^T + (1 - rho) I have an exact orthant probability at any n (a 1-D integral,
tests/orthant_reference.py), and so do diagonal-plus-low-rank kernels of rank 2 (--low-rank: a 2-D integral, about
a minute each at n = 1500); NNGP kernels of uniform inputs are compared with method="tilting" (reliable up to
n ~ 500). Each row: SEEDS seeded estimates, the fraction with |SMC - exact| <= 2 stderr, the mean of
(SMC - exact) / stderr (0 for an unbiased, honest error bar), the mean stderr, EP's error, the stages, the wall
reflections per trajectory and the seconds per estimate.

    python bench/smc_coverage.py --n 100 --seeds 50 --particles 2000
    python bench/smc_coverage.py --n 1500 --seeds 50 --particles 2000 --only "rho=0.99 minority=0$"
    python bench/smc_coverage.py --n 1500 --low-rank --seeds 50 --particles 2000
    python bench/smc_coverage.py --n 300 --nngp --seeds 20 --particles 20000
"""
import argparse
import os
import re
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import flatfast  # noqa: E402
from flatfast import _smc  # noqa: E402
from orthant_reference import equicorrelated_log_orthant, low_rank_log_orthant, low_rank_problem  # noqa: E402
from smc_paper_scale import uniform_problem  # noqa: E402


def equicorrelated_cases(n):
    for rho in (0.9, 0.96, 0.99):
        for minority in (0, max(1, n // 100), n // 10):
            K = rho * np.ones((n, n)) + (1 - rho) * np.eye(n)
            y = np.ones(n)
            y[:minority] = -1
            yield f"equicorrelated rho={rho} minority={minority}", K, y, equicorrelated_log_orthant(n, minority, rho)


def low_rank_cases(n, only=None):
    for labels in ("unanimous", "minority", "rule"):
        name = f"diagonal + rank 2, {labels} labels"
        if only and not re.search(only, name):
            continue
        diagonal, U, K, y = low_rank_problem(n, labels)
        yield name, K, y, low_rank_log_orthant(diagonal, U, y)


def nngp_cases(n):
    """The uniform-input NNGP problems of bench/smc_paper_scale.py (one X, so one kernel, for every labelling)."""
    K = flatfast.nngp_kernel(uniform_problem(n, "unanimous")[0])
    for name, labelling in (("linear rule", "rule"), ("10 % flipped", "flipped"), ("unanimous", "unanimous")):
        y = uniform_problem(n, labelling)[1]
        reference = flatfast.ep_log_evidence(K, y, method="tilting", n_samples=200_000, return_info=True)
        yield f"NNGP {name} (tilting +-{reference.stderr:.3f})", K, y, reference.log_z


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--particles", type=int, default=2000, help="n_samples: all runs together")
    parser.add_argument("--nngp", action="store_true", help="NNGP kernels against tilting, not equicorrelated")
    parser.add_argument("--low-rank", action="store_true", help="diagonal-plus-rank-2 kernels, not equicorrelated")
    parser.add_argument("--moves", type=int, default=None, help="trajectories a stage (default flatfast's)")
    parser.add_argument("--only", default=None, help="run only the cases whose name this regular expression finds")
    args = parser.parse_args(argv)
    if args.moves:
        _smc.MOVES = args.moves
    cases = (nngp_cases(args.n) if args.nngp else low_rank_cases(args.n, args.only) if args.low_rank
             else equicorrelated_cases(args.n))
    print(f"n = {args.n}, {args.seeds} seeds, n_samples = {args.particles}")
    print(f"{'case':48s} {'cover':>6s} {'mean z':>7s} {'stderr':>7s} {'EP err':>7s} {'stages':>7s} {'bounce':>6s} "
          f"{'s/est':>6s}")
    for name, K, y, exact in cases:
        if args.only and not re.search(args.only, name):
            continue
        z, errors, stages, bounces, t0 = [], [], [], [], time.perf_counter()
        for seed in range(args.seeds):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = flatfast.ep_log_evidence(K, y, method="smc", n_samples=args.particles, seed=seed,
                                               return_info=True)
            z.append((res.log_z - exact) / res.stderr)
            errors.append(res.stderr)
            stages.append(res.smc_stages)
            bounces.append(res.smc_bounces)
        z = np.array(z)
        print(f"{name:48s} {np.mean(np.abs(z) <= 2):6.2f} {z.mean():+7.2f} {np.mean(errors):7.4f} "
              f"{res.ep_log_z - exact:+7.4f} {np.mean(stages):7.1f} {np.mean(bounces):6.1f} "
              f"{(time.perf_counter() - t0) / args.seeds:6.2f}", flush=True)


if __name__ == "__main__":
    main()
