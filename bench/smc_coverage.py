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
import json
import os
import re
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import flatfast  # noqa: E402
from flatfast.prior import smc as _smc  # noqa: E402
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


def _seeds(count):
    return f"{count} seed" + ("" if count == 1 else "s")


def coverage_row(records):
    """One printed row from one case's estimates (--out's records): the fraction with |SMC - exact| <= 2 stderr,
    the mean z, the mean stderr, EP's error, the mean stages, reflections per trajectory and seconds."""
    first = records[0]

    def mean(key):
        return np.mean([record[key] for record in records])

    z = np.array([(record["log_z"] - record["exact"]) / record["stderr"] for record in records])
    return (f"{first['case']:48s} {np.mean(np.abs(z) <= 2):6.2f} {z.mean():+7.2f} {mean('stderr'):7.4f} "
            f"{first['ep_log_z'] - first['exact']:+7.4f} {mean('stages'):7.1f} {mean('bounces'):6.1f} "
            f"{mean('seconds'):6.2f}")


def runs_summary(records):
    """What the runs kept by --out say about P-hat itself, or "" when no record kept them: the mean and standard
    error of every run's estimate of P over the exact value (1 for an unbiased estimator, whatever the lean of the
    log of a mean of ten), and the standard deviation of the runs' log estimates."""
    kept = [record for record in records if "runs" in record]
    if not kept:
        return ""
    logs = np.concatenate([np.asarray(record["runs"]) - record["exact"] for record in kept])
    ratios = np.exp(logs)
    return (f"; their {logs.size} runs' P / exact {ratios.mean():.3f} +- {ratios.std(ddof=1) / np.sqrt(logs.size):.3f}"
            f" ({_seeds(len(kept))}), log spread {logs.std():.3f}")


HEADER = (f"{'case':48s} {'cover':>6s} {'mean z':>7s} {'stderr':>7s} {'EP err':>7s} {'stages':>7s} {'bounce':>6s} "
          f"{'s/est':>6s}")


def pool(path):
    """Rows from the estimates that earlier runs appended to PATH (--out), grouped by case, n and n_samples."""
    groups = {}
    with open(path) as lines:
        for line in lines:
            record = json.loads(line)
            groups.setdefault((record["case"], record["n"], record["n_samples"]), {})[record["seed"]] = record
    print(HEADER)
    for (_, n, n_samples), by_seed in groups.items():
        records = list(by_seed.values())
        print(f"n = {n}, n_samples = {n_samples}, {_seeds(len(by_seed))}{runs_summary(records)}")
        print(coverage_row(records))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST_SEED .. FIRST_SEED + SEEDS - 1")
    parser.add_argument("--particles", type=int, default=2000, help="n_samples: all runs together")
    parser.add_argument("--nngp", action="store_true", help="NNGP kernels against tilting, not equicorrelated")
    parser.add_argument("--low-rank", action="store_true", help="diagonal-plus-rank-2 kernels, not equicorrelated")
    parser.add_argument("--moves", type=int, default=None, help="trajectories a stage (default flatfast's)")
    parser.add_argument("--only", default=None, help="run only the cases whose name this regular expression finds")
    parser.add_argument("--out", default=None,
                        help="append one JSON line per estimate (with its runs' log estimates) to this file, so "
                             "separate runs can be pooled")
    parser.add_argument("--pool", metavar="FILE", default=None,
                        help="print the rows of the estimates stored in FILE by --out (one per seed) and exit")
    args = parser.parse_args(argv)
    if args.pool:
        return pool(args.pool)
    if args.moves:
        _smc.MOVES = args.moves
    cases = (nngp_cases(args.n) if args.nngp else low_rank_cases(args.n, args.only) if args.low_rank
             else equicorrelated_cases(args.n))
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    print(f"n = {args.n}, seeds {seeds.start}..{seeds.stop - 1}, n_samples = {args.particles}")
    print(HEADER)
    for name, K, y, exact in cases:
        if args.only and not re.search(args.only, name):
            continue
        records = []
        for seed in seeds:
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = flatfast.ep_log_evidence(K, y, method="smc", n_samples=args.particles, seed=seed,
                                               return_info=True)
            records.append(dict(case=name, n=args.n, n_samples=args.particles, seed=seed, log_z=res.log_z,
                                stderr=res.stderr, exact=exact, ep_log_z=res.ep_log_z, stages=res.smc_stages,
                                bounces=res.smc_bounces, seconds=time.perf_counter() - started,
                                runs=res.smc_runs))
            if args.out:
                with open(args.out, "a") as out:
                    out.write(json.dumps(records[-1]) + "\n")
        print(coverage_row(records), flush=True)

if __name__ == "__main__":
    main()
