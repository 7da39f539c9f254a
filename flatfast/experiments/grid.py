"""The grid of (optimizer, |A|, seed) configurations: each trained and measured in this process or in --jobs worker
processes, its rows appended to the durable table; shards of the grid merged into one table."""
import csv
import dataclasses
import functools
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

from flatfast.experiments.config import NOT_COMPARED, Config, config_differences, recorded_warnings
from flatfast.experiments.measurement import layer_factors, measure, prior_kernel, rescalings
from flatfast.experiments.statistics import summarise
from flatfast.experiments.table import FIELDS, DurableTable, prepare_output, read_table, row_key
from flatfast.experiments.training import every_seconds, make_model, run_seed, train


def run(config: Config, *, resume=False, log=print, jobs=1):
    """``flatfast reproduce`` from Python: train and measure every (optimizer, attack size, seed) of the grid (or
    of this shard), appending one row a network to <out>/results.csv as it finishes; then correlations.json and
    the plots.

    Parameters
    ----------
    config : Config
        The settings (checked first; a bad one raises ValueError naming its option, before anything is written).
    resume : bool
        Continue the run in ``config.out`` (only with the settings it was made with), skipping finished rows.
    log : callable(str)
        Where progress lines go.
    jobs : int
        Configurations run in that many worker processes (the same rows as a serial run).

    Returns
    -------
    pathlib.Path of the results table.

    Examples
    --------
    A small grid (two minutes on 2 cores; ``Config.quick()`` is the README's quick reproduction):

    >>> from flatfast.experiments import Config, run
    >>> config = Config(n_train=60, n_test=150, attack_sizes=[0, 20], seeds=1, successful_runs=1,
    ...                 optimizers=["sgd"], lr=0.05, sharpness_epochs=3, out="tiny-results")
    >>> table = run(config)                     # doctest: +SKIP
    >>> open(table).readline().split(",")[:4]   # doctest: +SKIP
    ['data', 'optimizer', 'attack_size', 'seed']
    """
    import flatfast

    config.validate()
    table = Path(config.out) / "results.csv"
    if table.exists() and not resume:
        raise FileExistsError(f"--out: {table} exists; pass --resume to continue it or choose another --out")
    # Load the data before creating anything, so that a bad --data/--data-dir leaves no output behind.
    X_pool, y_pool, X_test, y_test = config.load_data()
    prepare_output(config.out, dataclasses.asdict(config), resume,
                   ignore={k for k, v in NOT_COMPARED.items() if "resume" in v})
    done = _rows_done(table) if resume else set()
    grid = config.grid()
    todo = [(o, a, s) for o, a, s in grid if not all((o, a, s, r) in done for r in rescalings(o))]
    if resume and table.exists():
        log(f"--resume: {len(grid) - len(todo)} of {len(grid)} configurations are in {table} already and are "
            "skipped")

    S = (X_pool[: config.n_train], y_pool[: config.n_train])
    A_X, A_y = X_pool[config.n_train:], 1 - y_pool[config.n_train:]  # deliberately wrong labels
    X_prior = np.concatenate([S[0], X_test])
    log(f"flatfast reproduce: {config.arch.upper()} on {config.data}, |S| = {len(S[1])}, |E| = {len(y_test)}, "
        f"attack sizes {config.attack_sizes}, {config.seeds} seed(s), optimizers {config.optimizers}"
        + (f", shard {config.shard_index}/{config.shard_count} ({len(grid)} runs)" if config.shard_count > 1 else "")
        + f"; log P(f) over n = {len(X_prior)} points, reported likelihood: {config.likelihood}; sharpness by "
        f"{config.sharpness_method}" + (f" ({config.sharpness_epochs} epochs; the authors use 100)"
                                        if config.sharpness_method == "sgd-ascent" else ""))
    K = prior_kernel(config, X_prior, log=log)
    n_S = len(S[1])
    log_p_S = flatfast.ep_log_evidence(K[:n_S, :n_S], 2 * S[1] - 1, likelihood="heaviside", check_psd=False)
    bound = flatfast.pac_bayes_bound(log_p_S, n_S, delta=config.pac_bayes_delta)
    log(f"PAC-Bayes bound from log P(U) = {log_p_S:.2f} nats on S (Heaviside): expected error <= {bound:.3f} "
        f"(delta = {config.pac_bayes_delta:g})")

    shared = dict(S=S, A=(A_X, A_y), X_test=X_test, y_test=y_test, K=K, log_p_S=log_p_S, bound=bound)
    short = []
    if not todo:  # a resumed run whose grid is done may have stopped among --successful-runs' extra seeds
        todo, short = _more_seeds(config, table, log)
    with DurableTable(table, FIELDS) as results:
        while todo:
            for rows in _configurations(config, shared, todo, done, jobs, log):
                for row, messages in rows:
                    results.append(row)
                    log(f"  {row['optimizer']:<11} |A| = {row['attack_size']:<4} seed {row['seed']}"
                        f"{' rescaled' if row['rescaled'] else ''}: {row['epochs']} epochs"
                        f"{'' if row['reached_100_on_S'] else ' (never 100 % on S: left out of the statistics)'}, "
                        f"test error {row['test_error']:.3f}, log P(f) {row['log_p_' + config.likelihood]:.2f}, "
                        f"trace {row['trace']:.3g}, top eig {row['top_eigenvalue']:.3g}, "
                        f"sharpness {row['sharpness']:.3g}")
                    for message in messages:
                        log(f"    warning: {message}")
            done = _rows_done(table)
            todo, short = _more_seeds(config, table, log)
    for line in short:
        log(line)
    summarise(table, config, log=log)
    return table


def _rows_done(table):
    """The keys of the rows a results table holds (none when it does not exist)."""
    if not Path(table).exists():
        return set()
    with open(table, newline="") as fh:
        return {row_key(r) for r in csv.DictReader(fh)}


def _more_seeds(config, table, log):
    """What --successful-runs still asks for, from the table: (configurations, short). In each (optimizer, |A|)
    group whose networks fitted S fewer than successful_runs times, as many new seeds as successes are missing
    (the lowest not yet tried, below max_seeds), and any seed whose rows are incomplete; ``short``, one line per
    group still short with nothing left to try (the lines the run ends with once nothing is left anywhere)."""
    rows = read_table(table) if Path(table).exists() else []
    todo, short = [], []
    for optimizer_name, attack in config.groups():
        mine = [r for r in rows if r["optimizer"] == optimizer_name and int(r["attack_size"]) == attack]
        flags = {}
        for r in mine:
            flags.setdefault(int(r["seed"]), set()).add(r["rescaled"])
        partial = [s for s, f in flags.items() if not f >= set(rescalings(optimizer_name))]
        fitted = sum(r["reached_100_on_S"] and not r["rescaled"] for r in mine)
        missing = config.successful_runs - fitted
        fresh = [s for s in range(config.max_seeds) if s not in flags][:max(0, missing)]
        todo += [(optimizer_name, attack, s) for s in sorted(partial) + fresh]
        if fresh:
            log(f"--successful-runs {config.successful_runs}: {optimizer_name} |A| = {attack} fitted S in {fitted} "
                f"of {len(flags)} seed(s); trying seed(s) {', '.join(map(str, fresh))}")
        elif missing > 0 and not partial:
            short.append(f"--successful-runs {config.successful_runs}: {optimizer_name} |A| = {attack} fitted S in "
                         f"only {fitted} of {len(flags)} seed(s) (--max-seeds {config.max_seeds}, --max-epochs "
                         f"{config.max_epochs})")
    return todo, short


def run_configuration(config, shared, optimizer_name, attack, seed, done, log=print):
    """Train the (optimizer, |A|, seed) network and measure it (and, for SGD, its alpha-scaled copy): a list of
    (row, warning messages) for the rows not in ``done``. ``shared`` holds what every configuration uses (S, the
    attack pool, the test set, the prior kernel, log P(U) and the PAC-Bayes bound). Deterministic given its
    arguments, so serial and parallel runs give the same rows."""
    import flatfast
    from flatfast.measures.flatness import weighted_layer_positions

    S, (A_X, A_y), X_test, y_test, K = shared["S"], shared["A"], shared["X_test"], shared["y_test"], shared["K"]
    t0 = time.perf_counter()
    A = (A_X[:attack], A_y[:attack])
    config_seed = run_seed(seed, attack, optimizer_name)
    model = make_model(config, S[0].shape[1], config_seed)
    if config.train_precision == "float32":  # the authors' training precision; drawn, then measured, in float64
        model = model.float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        say = every_seconds(log)
        epochs, reached, accuracy_S, accuracy_A = train(
            model, S, A, optimizer_name, config, config_seed,
            progress=lambda epoch, acc: say(f"  {optimizer_name:<11} |A| = {attack:<4} seed {seed}: training, "
                                            f"epoch {epoch}, accuracy on S {acc:.3f}"))
    training_warnings = recorded_warnings(caught)
    model = model.double()
    n_weighted = len(weighted_layer_positions(model))
    out = []
    for rescaled in rescalings(optimizer_name):
        if (optimizer_name, attack, seed, rescaled) in done:
            continue
        net = flatfast.rescale(model, config.alpha, divided_layer=config.divided_layer) if rescaled else model
        weight_factors, bias_factors = layer_factors(n_weighted, config.divided_layer,
                                                     config.alpha if rescaled else 1.0)
        row = dict(data=config.data, optimizer=optimizer_name, attack_size=attack, seed=seed,
                   rescaled=rescaled, alpha=config.alpha if rescaled else 1.0, weight_factors=weight_factors,
                   bias_factors=bias_factors, epochs=epochs, reached_100_on_S=reached,
                   accuracy_S=accuracy_S, accuracy_A=accuracy_A, log_p_S_heaviside=shared["log_p_S"],
                   pac_bayes_bound=shared["bound"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            row.update(measure(net, S, X_test, y_test, K, config, config_seed))
        messages = list(dict.fromkeys(training_warnings + recorded_warnings(caught)))
        row["warnings"] = " | ".join(messages)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        out.append((row, messages))
    return out


_WORKER = {}


def _init_worker(shared, threads):
    """A --jobs worker: the shared data once, and every thread pool (torch, BLAS, the C++ core) capped at
    ``threads``, so that N workers never oversubscribe the cores (several processes with spinning BLAS threads
    on 2 cores ran 5-50x slower)."""
    import torch
    from threadpoolctl import threadpool_limits

    import flatfast

    torch.set_num_threads(threads)
    flatfast.set_num_threads(threads)
    _WORKER["limits"] = threadpool_limits(limits=threads)
    _WORKER["shared"] = shared


def _run_in_worker(config, optimizer_name, attack, seed, done):
    return run_configuration(config, _WORKER["shared"], optimizer_name, attack, seed, done,
                             log=functools.partial(print, flush=True))


def _configurations(config, shared, todo, done, jobs, log):
    """The rows of each configuration in ``todo``: in this process (jobs = 1, in grid order), or in ``jobs``
    worker processes (as they finish; each row says which configuration it is, and the statistics do not depend on
    the order of the rows)."""
    if jobs <= 1 or len(todo) <= 1:
        for optimizer_name, attack, seed in todo:
            yield run_configuration(config, shared, optimizer_name, attack, seed, done, log)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    log(f"--jobs {jobs}: {len(todo)} configurations in {jobs} worker processes, {threads} thread(s) each")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(shared, threads)) as pool:
        futures = [pool.submit(_run_in_worker, config, o, a, s, done) for o, a, s in todo]
        for future in as_completed(futures):
            yield future.result()


def merge(directories, out, *, log=print):
    """Combine the results of shards (``--shard i/N`` runs) into ``out``: their configs must agree in everything
    but --out and the shard index; the rows of all shards are written to one table, then summarised."""
    configs, tables = [], []
    for directory in directories:
        directory = Path(directory)
        if not (directory / "config.json").exists() or not (directory / "results.csv").exists():
            raise FileNotFoundError(f"--merge: {directory} has no config.json and results.csv of a reproduce run")
        with open(directory / "config.json") as fh:
            configs.append(json.load(fh))
        tables.append(directory / "results.csv")
    ignore = set(NOT_COMPARED)
    for directory, other in zip(directories[1:], configs[1:]):
        diffs = config_differences(configs[0], other, ignore)
        if diffs:
            raise ValueError(f"--merge: {directory} was run with other settings than {directories[0]} "
                             f"({'; '.join(diffs)})")
    indices = [c.get("shard_index", 0) for c in configs]
    if len(set(indices)) != len(indices):
        raise ValueError(f"--merge: the same shard appears twice (shard indices {indices})")
    count = configs[0].get("shard_count", 1)
    missing = sorted(set(range(count)) - set(indices))
    rows, seen = [], set()
    for table in tables:
        with open(table, newline="") as fh:
            for row in csv.DictReader(fh):
                key = row_key(row)
                if key in seen:
                    raise ValueError(f"--merge: row {key} appears in more than one shard")
                seen.add(key)
                rows.append(row)
    merged = Config(**{**configs[0], "out": str(out), "shard_index": 0, "shard_count": 1})
    target = Path(out) / "results.csv"
    if target.exists():
        raise FileExistsError(f"--out: {target} exists; choose another --out for the merged table")
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "config.json", "w") as fh:
        json.dump(dataclasses.asdict(merged), fh, indent=2)
    with open(target, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    log(f"merged {len(rows)} rows from {len(tables)} shard(s) of {count}"
        + (f"; shards {missing} are MISSING, so the statistics cover part of the grid" if missing else ""))
    summarise(target, merged, log=log)
    return target
