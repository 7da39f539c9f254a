"""Command line: ``flatfast info`` (what can run here), ``flatfast demo`` (kernel timings per backend)."""
from __future__ import annotations

import argparse
import sys
import time


def _info(args) -> int:
    import flatfast
    from flatfast.backend.native import cpp_build_summary

    print(f"flatfast {flatfast.__version__}")
    print(cpp_build_summary())
    for op, table in flatfast.backends().items():
        print(f"{op}:")
        for name, status in table.items():
            print(f"  {name:<10} {status}")
    return 0


def _demo(args) -> int:
    import numpy as np

    import flatfast

    rng = np.random.default_rng(args.seed)
    X = rng.random((args.n, 784))
    print(f"NNGP kernel of a depth-2 ReLU network on {args.n} random 784-d points (float64)")
    t0 = time.perf_counter()
    X @ X.T
    floor = time.perf_counter() - t0
    print(f"  {'X @ X.T (BLAS floor)':<24} {floor * 1e3:9.1f} ms")
    results = {}
    for backend, status in flatfast.backends()["nngp"].items():
        if not status.startswith("available") or backend == "triton":
            continue
        try:
            t0 = time.perf_counter()
            results[backend] = flatfast.nngp_kernel(X, depth=2, backend=backend)
            elapsed = time.perf_counter() - t0
        except flatfast.BackendUnavailableError:
            continue
        print(f"  {backend:<24} {elapsed * 1e3:9.1f} ms  ({elapsed / floor:.2f} x the floor)")
    if "cpp" in results and "reference" in results:
        err = np.max(np.abs(results["cpp"] - results["reference"]) / np.abs(results["reference"]))
        print(f"  cpp vs reference: max relative difference {err:.1e}")
    if hasattr(flatfast, "log_prior"):
        y = np.where(X[:, :392].sum(1) > X[:, 392:].sum(1), 1, -1)
        t0 = time.perf_counter()
        res = flatfast.log_prior(X, y, return_info=True)
        print(f"log P(f) of a linear-rule labelling of the {args.n} points: {res.log_z:.4f} nats "
              f"({res.sweeps} EP sweeps, {time.perf_counter() - t0:.2f} s)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flatfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list the backends that can run here, and why others cannot")
    demo = sub.add_parser("demo", help="build a kernel with every available backend and time it")
    demo.add_argument("--n", type=int, default=2000, help="number of points (default 2000)")
    demo.add_argument("--seed", type=int, default=0)
    rep = sub.add_parser("reproduce", help="the experiments of Zhang et al. (2021): train, measure, correlate, plot",
                         description="Follows the authors' protocol by default; docs/guide/protocol.md (in the "
                                     "project's source) states it step by step beside flatfast's defaults, and every "
                                     "departure from it is named there and below.")
    rep.add_argument("--experiment", choices=["main", "temporal"], default="main",
                     help="main: the attack-set grid (default); temporal: one SGD network measured every k epochs "
                          "after it fits S, alpha-scaled half-way (the paper's Fig. 5)")
    rep.add_argument("--quick", action="store_true",
                     help="a reduced run, and every value it changes: main: |A| in 0 150 300 500, 2 seeds and 2 "
                          "successful runs, an epoch cap of 2000, sharpness ascent 20 epochs instead of 100 (--arch "
                          "cnn: also |S| = 200, |A| in 0 100 200, Frobenius norm to 10 %%); temporal: 100 epochs after "
                          "fitting S, measured every 5th, sharpness ascent 10 epochs")
    rep.add_argument("--data", choices=["digits", "mnist", "cifar10"],
                     help="built-in scikit-learn digits (default), MNIST, or CIFAR-10 car (0) vs cat (1), the "
                          "paper's E3 task, with its settings unless given: |S| = 5000, |A| 0..5000 by 500, |E| = "
                          "2000, batch 128, sharpness eps 1e-5 (--quick keeps its own |S| and |A|)")
    rep.add_argument("--data-dir", dest="data_dir",
                     help="directory with the MNIST IDX files (--data mnist) or the CIFAR-10 python batches "
                          "data_batch_1..5 and test_batch (--data cifar10); nothing is downloaded")
    rep.add_argument("--arch", choices=["fcn", "cnn"],
                     help="fcn: the d-40-40-1 ReLU network with the analytic NNGP kernel (default); cnn: a small ReLU "
                          "CNN (conv-ReLU-conv-ReLU-maxpool-linear) with its empirical NNGP kernel, alpha-scale on the "
                          "conv pair")
    rep.add_argument("--channels", type=int, help="cnn: channels of both convolutions (default 16)")
    rep.add_argument("--kernel-samples", dest="kernel_samples", type=int,
                     help="cnn: draws M of the empirical NNGP kernel (default: the authors' n/10 for n = |S| + |E|)")
    rep.add_argument("--trace", dest="trace_method", choices=["auto", "exact", "hutch++"],
                     help="Hessian trace: auto (default: hessian_trace's cheapest honest route, which is the exact "
                          "trace for both networks, piecewise linear in each parameter), exact, or the Hutch++ "
                          "estimate to 2 %%")
    rep.add_argument("--n-train", dest="n_train", type=int, help="|S| (default 500)")
    rep.add_argument("--n-test", dest="n_test", type=int,
                     help="|E| (main: the rest of digits, 1000 for MNIST; temporal: 100)")
    rep.add_argument("--attack-sizes", dest="attack_sizes", type=int, nargs="+", help="|A| values (default 0..500 by 50)")
    rep.add_argument("--seeds", type=int, help="seeds tried first per optimizer and attack size (default 5)")
    rep.add_argument("--successful-runs", dest="successful_runs", type=int,
                     help="networks per optimizer and attack size that must fit S: further seeds are tried until "
                          "this many have (default 5, the authors'; 0: only --seeds, failures left out)")
    rep.add_argument("--max-seeds", dest="max_seeds", type=int,
                     help="the most seeds tried per optimizer and attack size for --successful-runs (default 20)")
    rep.add_argument("--optimizers", nargs="+",
                     help="any of sgd adam entropy-sgd (default all). Entropy-SGD's settings, which the authors did "
                          "not publish, are flatfast's: 20 inner Langevin steps of lr 0.1, gamma 0.03, noise 1e-4, "
                          "outer step 1/gamma")
    rep.add_argument("--max-epochs", dest="max_epochs", type=int,
                     help="give up on fitting S after this many epochs (default 50000, the authors'; such runs are "
                          "kept in the table, flagged, and left out of the statistics)")
    rep.add_argument("--train-precision", dest="train_precision", choices=["float32", "float64"],
                     help="the precision networks are trained in (the authors: float32); every measurement runs in "
                          "float64 (default float32, the authors')")
    rep.add_argument("--lr", type=float, help="SGD learning rate (authors: 0.01; Adam always uses 1e-3)")
    rep.add_argument("--likelihood", choices=["heaviside", "probit"],
                     help="which log P(f) the plots and correlations use (default probit, as the paper's plots; "
                          "both are always recorded)")
    rep.add_argument("--sharpness", dest="sharpness_method", choices=["sgd-ascent", "sign-ascent"],
                     help="the sharpness the plots use: the authors' minibatch SGD ascent (default) or 20 full-batch "
                          "sign-gradient steps (fast); both are recorded")
    rep.add_argument("--measures",
                     help="the generalization predictors recorded: paper (the paper's: log P(f), trace, top "
                          "eigenvalue, Frobenius norm, epsilon-sharpness; the default of the main experiment), "
                          "invariant (also adaptive sharpness, relative flatness, the Fisher-Rao norm, PAC-Bayes "
                          "flatness and the path norm, which the alpha-rescaling cannot move; the temporal "
                          "experiment's default), all (also the Laplace evidence), or a comma-separated list of "
                          "names: adaptive_sharpness, adaptive_sharpness_average, relative_flatness, "
                          "fisher_rao_norm, pac_bayes_flatness, path_norm, laplace_evidence")
    rep.add_argument("--sharpness-epochs", dest="sharpness_epochs", type=int,
                     help="epochs of the SGD ascent (authors: 100; --quick: 20)")
    rep.add_argument("--post-epochs", dest="post_epochs", type=int,
                     help="temporal: epochs after fitting S (authors: 1000; --quick: 100); alpha-scale half-way")
    rep.add_argument("--every", type=int, help="temporal: measure every k-th epoch (default 1; --quick: 5)")
    rep.add_argument("--jobs", type=int,
                     help="run the grid's configurations in N local worker processes, each with its share of the "
                          "cores' threads (default 1); the rows are those of a serial run")
    rep.add_argument("--shard", help="i/N: run every N-th (optimizer, attack size) group of the grid, starting at i, "
                                     "with all its seeds (for job arrays); "
                                     "auto: i and N from Slurm's SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT "
                                     "(docs/slurm-array.sh runs the whole grid that way and merges it)")
    rep.add_argument("--merge", nargs="+", metavar="DIR",
                     help="combine the --out directories of shard runs into --out, then correlate and plot")
    rep.add_argument("--out", help="output directory (default ./flatfast-results)")
    rep.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same settings only)")
    args = parser.parse_args(argv)
    if args.command == "reproduce":
        main_only = [flag for flag, value in (("--arch", args.arch), ("--channels", args.channels),
                                              ("--train-precision", args.train_precision),
                                              ("--kernel-samples", args.kernel_samples), ("--trace", args.trace_method))
                     if value is not None]
        if args.data == "cifar10":
            main_only.append("--data cifar10")
        if args.experiment == "temporal" and main_only:
            print(f"flatfast reproduce: {', '.join(main_only)} apply to --experiment main only (the temporal run is "
                  "the paper's FCN on digits or MNIST)", file=sys.stderr)
            return 2
        if args.experiment == "temporal" and not args.merge:
            from flatfast.experiments.temporal import main as reproduce
        else:
            from flatfast.experiments.cli import main as reproduce

        return reproduce(args)
    return {"info": _info, "demo": _demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
