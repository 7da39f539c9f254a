"""How far is EP from the truth? log Z_EP - log P(f) on NNGP kernels of MNIST-like inputs, with the truth
estimated by the minimax-tilting sampler (method="tilting") and its error bar.

Inputs X ~ U[0,1)^(n x 784), labels by the linear rule sum(x[:392]) > sum(x[392:]) (a structured labelling, the
kind a trained network expresses), depth-2 NNGP kernel with sigma_w2 = 2, sigma_b2 = 1, Heaviside likelihood.
Rows whose tail diagnostic says the error bar is not backed (Pareto k > 0.7) are printed but flagged.

    python bench/ep_accuracy.py                 # the README's table (about 5 minutes on 2 cores)
    python bench/ep_accuracy.py 10 100 --seeds 2 --samples 20000
"""
import argparse
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", nargs="*", type=int, default=[10, 100, 300, 500, 700, 1000, 1500])
    parser.add_argument("--seeds", type=int, default=3, help="input draws per size (default 3)")
    parser.add_argument("--samples", type=int, default=200_000, help="tilting samples per run (default 200,000)")
    args = parser.parse_args(argv)
    print(f"{'n':>5} {'seed':>4} {'log Z_EP':>11} {'log P(f)':>11} {'stderr':>7} {'EP - P':>8} {'pareto k':>8} "
          f"{'ESS':>8} {'seconds':>7}  backed?")
    for n in args.sizes:
        for seed in range(args.seeds):
            res, seconds = row(n, seed, args.samples)
            backed = "yes" if res.pareto_k <= 0.7 else "NO (k > 0.7)"
            print(f"{n:>5} {seed:>4} {res.ep_log_z:>11.4f} {res.log_z:>11.4f} {res.stderr:>7.4f} "
                  f"{res.ep_log_z - res.log_z:>8.4f} {res.pareto_k:>8.2f} {res.ess:>8.0f} {seconds:>7.1f}  {backed}",
                  flush=True)


if __name__ == "__main__":
    main()
