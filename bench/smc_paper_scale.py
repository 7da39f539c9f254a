"""EP's error at the paper's scale: log Z_EP - log P(f) +- stderr by log_prior(method="smc") on NNGP kernels of
MNIST-like inputs (X ~ U[0, 1)^(n x 784), depth 2, sigma_w2 = 2, sigma_b2 = 1). A script, not a benchmark: an
estimate takes minutes on a GPU and hours on 2 CPU cores for the mixed labellings.

Labellings: "rule" (sign of the first half of the pixels' sum minus the second half's, the documentation's), "flipped"
(the rule with a fixed 10 % of the points the other way), "unanimous" (all +1), and "network": one
network's f from the quick reproduction on digits (true labels on S, the SGD network's predictions on E; |S| = 500,
|E| = 797, so n = 1297 whatever --n says, and the kernel is digits', as flatfast reproduce computes it).

Estimates run by n_samples, then by n (the network's at its n), then labelling and seed. Every finished estimate
is printed and appended as one JSON line to --out; --deadline (seconds) skips an estimate that would start after
it or, projected from the last one's time as n^2.5 x n_samples, end after it: a time-limited machine returns
every estimate it finished.

    python bench/smc_paper_scale.py --n 1000 1500 3000 --labellings rule flipped network --n-samples 2000
    python bench/smc_paper_scale.py --device cuda --n 1000 --labellings rule --n-samples 20000 --seeds 0 1
"""
import argparse
import json
import time
import traceback
import warnings

import numpy as np

import flatfast

LABELLINGS = ("rule", "flipped", "unanimous", "network")
NETWORK_N = 1297  # |S| + |E| of the quick reproduction on digits


def uniform_problem(n, labelling):
    """X ~ U[0, 1)^(n x 784) (the generator seeded 0, as the documentation's tables) and the labelling's y."""
    X = np.random.default_rng(0).random((n, 784))
    y = np.where(X[:, :392].sum(1) > X[:, 392:].sum(1), 1.0, -1.0)
    if labelling == "unanimous":
        y = np.ones(n)
    elif labelling == "flipped":
        flip = np.random.default_rng(1).choice(n, size=n // 10, replace=False)
        y[flip] *= -1
    return X, y


def network_problem():
    """(X over S u E, f) of the quick reproduction's first SGD network with |A| = 0, seed 0, on digits."""
    import torch

    from flatfast.experiments.config import Config
    from flatfast.experiments.training import make_model, run_seed, train

    config = Config.quick()
    X_pool, y_pool, X_test, _ = config.load_data()
    S = (X_pool[:config.n_train], y_pool[:config.n_train])
    seed = run_seed(0, 0, "sgd")
    model = make_model(config, S[0].shape[1], seed)
    if config.train_precision == "float32":
        model = model.float()
    epochs, reached, _, _ = train(model, S, (X_pool[:0], y_pool[:0]), "sgd", config, seed)
    if not reached:
        raise RuntimeError(f"the network did not fit S in {epochs} epochs")
    predictions = flatfast.function_of(model.double(), torch.from_numpy(X_test))
    X = np.concatenate([S[0], X_test])
    if len(X) != NETWORK_N:
        raise RuntimeError(f"the quick reproduction has n = {len(X)}, not {NETWORK_N}")
    return X, np.concatenate([2.0 * S[1] - 1.0, predictions]), epochs


def estimate(X, y, n_samples, seed, device):
    if device != "cpu":
        import torch

        X = torch.from_numpy(X).to(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        res = flatfast.log_prior(X, y, method="smc", n_samples=n_samples, seed=seed, return_info=True)
        seconds = time.perf_counter() - t0
    return res, seconds, [str(w.message)[:160] for w in caught]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 1500, 3000])
    parser.add_argument("--labellings", nargs="+", choices=LABELLINGS, default=["rule", "flipped", "network"])
    parser.add_argument("--n-samples", type=int, nargs="+", default=[2000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the kernel, EP and SMC on the GPU")
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="seconds after start beyond which no new estimate starts")
    parser.add_argument("--out", default=None, help="append one JSON line per estimate to this file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    network, last = None, None
    jobs = [(n_samples, n, labelling, seed) for n_samples in args.n_samples
            for n in sorted(set(args.n) | ({NETWORK_N} if "network" in args.labellings else set()))
            for labelling in args.labellings if (labelling == "network") == (n == NETWORK_N)
            for seed in args.seeds]
    for n_samples, n, labelling, seed in jobs:
        left = args.deadline - (time.perf_counter() - start)
        projected = 0.0 if last is None else last[0] * (n / last[1]) ** 2.5 * n_samples / last[2]
        if left <= projected:
            print(f"deadline: {labelling} n={n} n_samples={n_samples} seed={seed} not started ({left:.0f} s left, "
                  f"about {projected:.0f} s needed)", flush=True)
            continue
        if labelling == "network":
            if network is None:
                network = network_problem()
                print(f"network: fitted S in {network[2]} epochs; f has {int(np.sum(network[1] > 0))} of "
                      f"{len(network[1])} positive", flush=True)
            X, y = network[0], network[1]
        else:
            X, y = uniform_problem(n, labelling)
        try:
            res, seconds, caught = estimate(X, y, n_samples, seed, args.device)
        except Exception:  # one failed estimate (a device out of memory, say) does not lose the others
            print(f"{labelling} n={n} n_samples={n_samples} seed={seed} FAILED:", flush=True)
            traceback.print_exc()
            continue
        last = (seconds, n, n_samples)
        row = dict(labelling=labelling, n=n, n_samples=n_samples, seed=seed, device=args.device,
                   ep=res.ep_log_z, smc=res.log_z, stderr=res.stderr, ep_minus_smc=res.ep_log_z - res.log_z,
                   runs_spread=float(np.std(res.smc_runs)), stages=res.smc_stages, reflections=res.smc_bounces,
                   seconds=round(seconds, 1), warnings=caught)
        print(f"{labelling:9} n={n:5d} samples={n_samples:6d} seed={seed}: EP {res.ep_log_z:10.3f} "
              f"SMC {res.log_z:10.3f} +- {res.stderr:.3f}  EP - SMC {row['ep_minus_smc']:+.3f}  "
              f"spread {row['runs_spread']:.3f} stages {res.smc_stages} reflections {res.smc_bounces:.0f}  "
              f"{seconds:.1f} s  {len(caught)} warnings", flush=True)
        for message in caught:
            print("    warning:", message, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

if __name__ == "__main__":
    main()
