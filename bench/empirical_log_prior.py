"""How the Monte Carlo error of an empirical NNGP kernel moves log P(f): log P(f) (EP) from kernels of M draws,
four seeds each, against the analytic arc-cosine kernel's value, for an FCN 784-512-512-1 (width 512, depth 2)
on n MNIST-like inputs with linear-rule labels.

    python bench/empirical_log_prior.py            # n = 200, M = 8..256 (about 1 minute on 2 cores)
"""
import argparse
import warnings

import numpy as np
import torch

import flatfast


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--draws", type=int, nargs="*", default=[8, 16, 32, 64, 128, 256])
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    X = rng.random((args.n, 784))
    y = np.where(X[:, :392].sum(1) > X[:, 392:].sum(1), 1, -1)
    analytic = flatfast.log_prior(X, y)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, args.width), torch.nn.ReLU(),
                              torch.nn.Linear(args.width, args.width), torch.nn.ReLU(),
                              torch.nn.Linear(args.width, 1)).double()
    print(f"n = {args.n}, width {args.width}: analytic-kernel log P(f) = {analytic:.3f}")
    print(f"{'M':>5} {'mean log P(f)':>14} {'spread (sd over seeds)':>23} {'mean - analytic':>16}")
    for M in args.draws:
        values = []
        for seed in range(args.seeds):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                values.append(flatfast.log_prior(X, y, model=net, samples=M, seed=seed))
        values = np.array(values)
        print(f"{M:>5} {values.mean():>14.3f} {values.std(ddof=1):>23.3f} {values.mean() - analytic:>16.3f}",
              flush=True)


if __name__ == "__main__":
    main()
