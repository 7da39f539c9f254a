"""Command line: ``flatfast info`` (what can run here), ``flatfast demo`` (kernel timings per backend)."""
from __future__ import annotations

import argparse
import sys
import time


def _info(args) -> int:
    import flatfast

    print(f"flatfast {flatfast.__version__}")
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
    args = parser.parse_args(argv)
    return {"info": _info, "demo": _demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
