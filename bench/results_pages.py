"""The documentation's results tables and plots, generated from the measurements stored in docs/results/.

No figure on a results page is typed by hand: a table is what this script computes from the stored estimates,
benchmark runs and experiment outputs. The tables are written into the pages themselves, between markers, and the
plots into docs/results/figures/, so that the pages read the same on GitHub as on the built site:

    python bench/results_pages.py            # regenerate every table and plot of docs/results/*.md
    python bench/results_pages.py --check    # exit 1, naming them, if a page's tables differ from the data

The test suite and the documentation build both run the check, so a page cannot fall behind its data.

Sources (each folder's README says how its data were measured):

* ``smc-coverage/*.jsonl``: one line per method="smc" estimate (bench/smc_coverage.py --out);
* ``ep-accuracy/*.jsonl``: EP against tilting on NNGP kernels and against exact values on equicorrelated
  kernels (bench/ep_accuracy.py --out), and EP's error at the paper's scale (bench/smc_paper_scale.py);
* ``benchmarks/*.json``: pytest-benchmark's --benchmark-json output of runs of bench/, each row's ratio to the
  baseline it names computed as bench/conftest.py prints it;
* ``*/correlations.json`` and ``*/results.csv``: the outputs of flatfast reproduce.
"""
import csv
import glob
import json
import math
import os
import re
import sys
from collections import OrderedDict

import numpy as np


def _write(path, text):
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- method="smc" coverage -------------------------------------------------------------------------------------

def coverage_cells(records):
    """One summary per (case, n, n_samples): the seeds, the fraction with |SMC - exact| <= 2 stderr and its
    binomial standard error, the mean z = (SMC - exact) / stderr with its standard error, the mean stderr, EP's
    error and the mean seconds of an estimate."""
    groups = OrderedDict()
    for record in records:
        groups.setdefault((record["case"], record["n"], record["n_samples"]), {})[record["seed"]] = record
    cells = []
    for (case, n, n_samples), by_seed in groups.items():
        chosen = list(by_seed.values())
        z = np.array([(r["log_z"] - r["exact"]) / r["stderr"] for r in chosen])
        covered = float(np.mean(np.abs(z) <= 2))
        cells.append(dict(case=case, n=n, n_samples=n_samples, seeds=len(chosen), covered=covered,
                          covered_se=math.sqrt(covered * (1 - covered) / len(chosen)), mean_z=float(z.mean()),
                          mean_z_se=float(z.std(ddof=1) / math.sqrt(len(z))) if len(z) > 1 else float("nan"),
                          stderr=float(np.mean([r["stderr"] for r in chosen])),
                          ep_error=chosen[0]["ep_log_z"] - chosen[0]["exact"],
                          seconds=float(np.mean([r["seconds"] for r in chosen]))))
    return cells


def smc_coverage(results_dir, out_dir):
    paths = sorted(glob.glob(os.path.join(results_dir, "smc-coverage", "*.jsonl")))
    if not paths:
        return
    cells = [cell for path in paths for cell in coverage_cells(_jsonl(path))]
    rows = [(cell["case"], cell["n"], cell["seeds"], f"{cell['covered']:.2f}",
             f"{cell['mean_z']:+.2f} ± {cell['mean_z_se']:.2f}" if cell["seeds"] > 1 else f"{cell['mean_z']:+.2f}",
             f"{cell['stderr']:.4f}", f"{cell['ep_error']:+.4f}", f"{cell['seconds']:.1f}") for cell in cells]
    _write(os.path.join(out_dir, "smc-coverage.md"), _table(
        ["case", "n", "seeds", "±2 stderr held", "mean z", "mean stderr", "EP − exact", "s / estimate"], rows))
    plt = _plt()
    shown = [cell for cell in cells if cell["seeds"] >= 20]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.2))
    positions = np.arange(len(shown))[::-1]
    ax.errorbar([c["covered"] for c in shown], positions, xerr=[1.96 * c["covered_se"] for c in shown], fmt="o",
                color="C0", capsize=3)
    ax.axvline(0.92, color="C3", linestyle="--", label="nominal for ten runs (Student's t, 9 d.o.f.)")
    ax.set_yticks(positions)
    ax.set_yticklabels([f"{c['case']}, n = {c['n']} ({c['seeds']} seeds)" for c in shown], fontsize=8)
    ax.set_xlabel("fraction of seeds whose ±2 stderr held the exact value\n(95 % binomial interval)")
    ax.set_xlim(0.6, 1.02)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "smc-coverage.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)


# --- EP's accuracy -----------------------------------------------------------------------------------------------

def ep_accuracy(results_dir, out_dir):
    folder = os.path.join(results_dir, "ep-accuracy")
    tilting_path = os.path.join(folder, "nngp-tilting.jsonl")
    if os.path.exists(tilting_path):
        records = _jsonl(tilting_path)
        by_n = OrderedDict()
        for record in sorted(records, key=lambda r: (r["n"], r["seed"])):
            by_n.setdefault(record["n"], []).append(record)
        rows = []
        for n, group in by_n.items():
            backed = [r for r in group if r["pareto_k"] <= 0.7]
            differences = ", ".join(f"{r['ep_log_z'] - r['log_z']:+.4f}" for r in backed) or "not backed"
            stderr = f"± {max(r['stderr'] for r in backed):.4f}" if backed else ""
            ks = [r["pareto_k"] for r in group]
            rows.append((n, f"{differences} {stderr}".strip(), f"{len(backed)} of {len(group)}",
                         f"{min(ks):.2f} – {max(ks):.2f}", f"{np.mean([r['seconds'] for r in group]):.1f}"))
        _write(os.path.join(out_dir, "ep-vs-tilting.md"), _table(
            ["n", "log Z_EP − log P(f), each backed draw (± largest stderr)", "draws backed (Pareto k ≤ 0.7)",
             "Pareto k", "tilting s"], rows))
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        backed = [r for r in records if r["pareto_k"] <= 0.7]
        ax.errorbar([r["n"] for r in backed], [r["ep_log_z"] - r["log_z"] for r in backed],
                    yerr=[2 * r["stderr"] for r in backed], fmt="o", capsize=3, label="backed (±2 stderr)")
        ax.axhline(0, color="0.5", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("n")
        ax.set_ylabel("log Z_EP − log P(f)  (nats)")
        ax.set_title("EP against minimax tilting, NNGP kernels of uniform inputs", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "ep-vs-tilting.png"), dpi=110, bbox_inches="tight")
        plt.close(fig)
    equicorrelated_path = os.path.join(folder, "equicorrelated.jsonl")
    if os.path.exists(equicorrelated_path):
        records = _jsonl(equicorrelated_path)
        rows = [(r["n"], r["rho"], r["labels"], f"{r['ep_log_z'] - r['exact']:+.4f}", r["sweeps"],
                 f"{r['correction']:+.4f}", f"{r['ep_log_z'] + r['correction'] - r['exact']:+.4f}") for r in records]
        _write(os.path.join(out_dir, "ep-equicorrelated.md"), _table(
            ["n", "ρ", "labels", "EP − exact", "EP sweeps", "second-order correction", "EP + correction − exact"],
            rows))
    scale_path = os.path.join(folder, "paper-scale.jsonl")
    if os.path.exists(scale_path):
        records = _jsonl(scale_path)
        rows = [(r["n"], r["labelling"], f"{r['ep_log_z']:.4f}",
                 "; ".join(f"{e['log_z']:.4f} ± {e['stderr']:.4f} ({e['where']}, seed {e['seed']}, {e['seconds']})"
                           for e in r["smc"]),
                 ", ".join(f"{r['ep_log_z'] - e['log_z']:+.3f}" for e in r["smc"]),
                 f"{r['correction']:+.3f}") for r in records]
        _write(os.path.join(out_dir, "ep-paper-scale.md"), _table(
            ["n", "labelling", "EP log Z", "SMC ± stderr (where, seed, time)", "EP − SMC", "correction"], rows))


def empirical_kernels(results_dir, out_dir):
    path = os.path.join(results_dir, "empirical-kernels", "log-prior-by-draws.jsonl")
    if not os.path.exists(path):
        return
    records = _jsonl(path)
    fcn = [r for r in records if r["arch"] == "fcn"]
    if fcn:
        by_m = OrderedDict()
        for r in sorted(fcn, key=lambda r: (r["M"], r["seed"])):
            by_m.setdefault(r["M"], []).append(r["log_p"])
        analytic = fcn[0]["analytic"]
        _write(os.path.join(out_dir, "empirical-fcn.md"), _table(
            ["M", "seeds", "sd of log P(f) over seeds", "mean − analytic"],
            [(m, len(v), f"{np.std(v, ddof=1):.2f}", f"{np.mean(v) - analytic:+.2f}") for m, v in by_m.items()]))
    for arch in ("cnn", "bert", "lstm"):
        _labellings_table(records, arch, out_dir)


def _labellings_table(records, arch, out_dir):
    """M, seeds, log P(f_true) and log P(f_true) - log P(f_20 %) (mean +- sd over seeds) of one architecture."""
    chosen = [r for r in records if r["arch"] == arch]
    if chosen:
        by_m = OrderedDict()
        for r in sorted(chosen, key=lambda r: (r["M"], r["seed"])):
            by_m.setdefault(r["M"], []).append((r["log_p_true"], r["log_p_flipped"]))
        rows = []
        for m, pairs in by_m.items():
            true = np.array([a for a, _ in pairs])
            difference = np.array([a - b for a, b in pairs])
            rows.append((m, len(pairs), f"{true.mean():.1f} ± {true.std(ddof=1):.1f}",
                         f"{difference.mean():.1f} ± {difference.std(ddof=1):.1f}"))
        _write(os.path.join(out_dir, f"empirical-{arch}.md"), _table(
            ["M", "seeds", "log P(f_true) (mean ± sd)", "log P(f_true) − log P(f_20 %) (mean ± sd)"], rows))


# --- benchmarks ----------------------------------------------------------------------------------------------

def benchmark_ratios(run):
    """[(group, benchmark, baseline, median / median of the baseline, extra information)] of one stored
    pytest-benchmark run, as bench/conftest.py prints them."""
    medians = {b["name"]: b["stats"]["median"] for b in run["benchmarks"]}
    rows = []
    for bench in run["benchmarks"]:
        baselines = bench["extra_info"].get("baseline") or []
        baselines = [baselines] if isinstance(baselines, str) else baselines
        extra = {k: v for k, v in bench["extra_info"].items() if k != "baseline"}
        for base in baselines:
            if base in medians:
                rows.append((bench["group"], bench["name"], base, medians[bench["name"]] / medians[base], extra))
    return rows


def benchmarks(results_dir, out_dir):
    paths = sorted(glob.glob(os.path.join(results_dir, "benchmarks", "*.json")))
    if not paths:
        return
    sections = []
    series = OrderedDict()  # (benchmark, baseline) -> [(index of the run in titles, ratio)]
    titles = []  # the runs with ratios, each its own colour in the plot: a row's protocol may change between runs
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        machine = run.get("machine_info", {})
        commit = run.get("commit_info", {})
        title = os.path.splitext(os.path.basename(path))[0]
        sections.append(f"**{title}** -- {run.get('datetime', '')[:16].replace('T', ' ')} UTC, "
                        f"{machine.get('cpu', {}).get('brand_raw', machine.get('processor', ''))}, "
                        f"{machine.get('flatfast_cpus', '?')} CPUs, commit {commit.get('id', '?')[:7]}"
                        f"{' (uncommitted changes)' if commit.get('dirty') else ''}\n")
        medians = [(b["group"], b["name"], b["stats"]["median"], b["stats"]["rounds"]) for b in run["benchmarks"]]
        sections.append(_table(["group", "benchmark", "median s", "rounds"],
                               [(g, n, f"{m:.3f}", r) for g, n, m, r in medians]))
        ratios = benchmark_ratios(run)
        if ratios:
            sections.append("")
            sections.append(_table(["benchmark", "÷ baseline", "ratio"],
                                   [(name, base, f"{ratio:.3f}") for _, name, base, ratio, _ in ratios]))
            for _, name, base, ratio, _ in ratios:
                series.setdefault((name, base), []).append((len(titles), ratio))
            titles.append(title)
        extras = [(b["name"], k, v) for b in run["benchmarks"] for k, v in sorted(b["extra_info"].items())
                  if k != "baseline"]
        if extras:
            sections.append("")
            sections.append(_table(["benchmark", "recorded", "value"], extras))
        sections.append("")
    _write(os.path.join(out_dir, "benchmarks.md"), "\n".join(sections))
    if series:
        _plot_benchmarks(series, titles, os.path.join(out_dir, "benchmarks.png"))


PEERS = ("pyhessian", "curvlinops", "backpack")
FLOORS = ("floor", "cholesky", "forward-backward", "forward-fcn", "forward-cnn")


def comparison_kind(baseline):
    """"peer" (another library, same inputs), "floor" (a GEMM, a Cholesky, a forward+backward pass: what the
    operation cannot beat) or "within" (flatfast against its own reference or another of its routes)."""
    if any(peer in baseline for peer in PEERS):
        return "peer"
    if any(floor in baseline for floor in FLOORS):
        return "floor"
    return "within"


def _plot_benchmarks(series, titles, path):
    """Two panels: flatfast's time over each peer's (left of 1 flatfast is faster), and each kernel's time over its
    floor (1 would be the floor itself); one dot per stored run, the newest filled."""
    plt = _plt()
    panels = [("peer", "flatfast's time ÷ the peer's, same run and inputs\n(< 1: flatfast is faster)"),
              ("floor", "time ÷ its floor, same run\n(a GEMM, a Cholesky, one forward+backward pass)")]
    keys = {kind: [key for key in series if comparison_kind(key[1]) == kind] for kind, _ in panels}
    height = max(len(keys["peer"]), len(keys["floor"]), 1)
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.32 * height + 1.8))
    for ax, (kind, xlabel) in zip(axes, panels):
        rows = keys[kind][::-1]
        for i, key in enumerate(rows):
            points = series[key]
            newest = max(run for run, _ in points)
            for run, ratio in points:
                colour = ("tab:green" if ratio < 1.0 else "tab:red") if kind == "peer" else "tab:blue"
                ax.plot([ratio], [i], "o", color=colour, markersize=6 if run == newest else 4,
                        fillstyle="full" if run == newest else "none")
            latest = [ratio for run, ratio in points if run == newest][0]
            ax.annotate(f"{latest:.2f}", (latest, i), xytext=(6, -3), textcoords="offset points", fontsize=6)
        ax.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{name} ÷ {base}" for name, base in rows], fontsize=6)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_title("against the peers: green where flatfast is faster", fontsize=9)
    axes[1].set_title("against the floors: 1 is the floor itself", fontsize=9)
    fig.suptitle(f"one dot per stored run ({len(titles)} runs; the newest filled, its ratio printed)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# --- the experiment ----------------------------------------------------------------------------------------------

MEASURES = OrderedDict([("log_p", "log P(f) (probit)"), ("trace", "Hessian trace"),
                        ("top_eigenvalue", "top eigenvalue"), ("frobenius", "Frobenius norm"),
                        ("sharpness", "ε-sharpness")])


def alpha_ratios(results_csv, column):
    """(smallest, largest) ratio of ``column`` between each alpha-scaled SGD network and the network itself."""
    with open(results_csv) as f:
        rows = list(csv.DictReader(f))
    base = {(r["optimizer"], r["attack_size"], r["seed"]): r for r in rows if r["rescaled"] == "False"}
    ratios = []
    for r in rows:
        if r["rescaled"] == "True":
            original = base.get((r["optimizer"], r["attack_size"], r["seed"]))
            if original and original[column] not in ("", "nan") and float(original[column]) != 0:
                ratios.append(float(r[column]) / float(original[column]))
    return (min(ratios), max(ratios)) if ratios else None


def experiment(results_dir, out_dir):
    runs = sorted(glob.glob(os.path.join(results_dir, "*", "correlations.json")))
    for path in runs:
        folder = os.path.dirname(path)
        name = os.path.basename(folder)
        with open(path) as f:
            correlations = json.load(f)["correlations_with_test_error"]
        rows = []
        for key, label in MEASURES.items():
            if key not in correlations:
                continue
            c = correlations[key]
            ratio = alpha_ratios(os.path.join(folder, "results.csv"), key if key != "log_p" else "log_p_probit")
            rows.append((label, f"{c['kendall_tau']:+.3f} [{c['kendall_tau_ci'][0]:+.2f}, "
                                f"{c['kendall_tau_ci'][1]:+.2f}]", c["n"],
                         "×{:.3g} – ×{:.3g}".format(*ratio) if ratio else ""))
        _write(os.path.join(out_dir, f"experiment-{name}.md"), _table(
            ["measure", "Kendall τ with test error [95 % BCa interval]", "networks", "α-scaled ÷ original"], rows))


def leaderboards(results_dir, out_dir):
    """The leaderboard of every run that recorded more than the paper's measures (flatfast reproduce --measures):
    its table, as the run's leaderboard.csv gives it, and its figure."""
    import shutil

    for path in sorted(glob.glob(os.path.join(results_dir, "*", "leaderboard.csv"))):
        folder = os.path.dirname(path)
        name = os.path.basename(folder)
        with open(path) as f:
            board = list(csv.DictReader(f))

        def interval(text):
            low, high = (float(v) for v in text.split(";"))
            return f"[{low:+.2f}, {high:+.2f}]" if math.isfinite(low) else ""

        rows = [(b["label"], "yes" if b["invariant"] == "True" else "no", f"{float(b['kendall_tau']):+.3f} "
                 f"{interval(b['kendall_tau_ci'])}", f"{float(b['granulated_kendall']):+.3f} "
                 f"{interval(b['granulated_kendall_ci'])}", f"{float(b['conditional_mutual_information']):.3f}",
                 f"{float(b['robust_sign_error']):.2f} (mean {float(b['mean_sign_error']):.2f})",
                 f"×{1 + float(b['rescaling_changed_it_by']):.3g}", f"{float(b['seconds_per_network']):.3g}")
                for b in board]
        _write(os.path.join(out_dir, f"leaderboard-{name}.md"), _table(
            ["measure", "invariant", "Kendall τ (oriented)", "granulated Kendall Ψ", "CMI", "robust sign error",
             "α-rescaling moved it by", "s / network"], rows))
        figure = os.path.join(folder, "leaderboard.png")
        if os.path.exists(figure):
            shutil.copy(figure, os.path.join(out_dir, f"leaderboard-{name}.png"))


def write_all(results_dir, out_dir):
    """Every generated table (Markdown) and plot (PNG) of the results pages, into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    for section in (smc_coverage, ep_accuracy, empirical_kernels, benchmarks, experiment, leaderboards):
        section(results_dir, out_dir)


def _pages(results_dir):
    """The pages that hold generated tables: every results page, and the guide's page on which predictor."""
    guide = os.path.join(os.path.dirname(os.path.abspath(results_dir)), "guide", "which-predictor.md")
    return sorted(glob.glob(os.path.join(results_dir, "*.md"))) + ([guide] if os.path.exists(guide) else [])


# --- the tables inside the pages -------------------------------------------------------------------------------

_BLOCK = re.compile(r"<!-- generated: (?P<name>[\w.-]+\.md)[^>]*-->\n\n?(?P<body>.*?)\n?<!-- end of (?P=name) -->",
                    re.S)


def _begin(name):
    return f"<!-- generated: {name} by bench/results_pages.py from the stored data; do not edit -->\n\n"


def _generated(results_dir):
    """{table name: its Markdown} and the folder holding the plots, computed afresh from the stored data."""
    import tempfile

    out_dir = tempfile.mkdtemp(prefix="flatfast-results-")
    write_all(results_dir, out_dir)
    tables = {}
    for path in glob.glob(os.path.join(out_dir, "*.md")):
        with open(path) as f:
            tables[os.path.basename(path)] = f.read().rstrip() + "\n"
    return tables, out_dir


def stale_tables(results_dir="docs/results"):
    """[(page, table)] of every generated table in docs/results/*.md that differs from what the stored data give
    now (or that the data no longer give); empty when every page is up to date."""
    import shutil

    tables, out_dir = _generated(results_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    stale = []
    for page in _pages(results_dir):
        with open(page) as f:
            for block in _BLOCK.finditer(f.read()):
                if tables.get(block["name"]) != block["body"]:
                    stale.append((os.path.basename(page), block["name"]))
    return stale


def update_pages(results_dir="docs/results"):
    """Write every generated table into its page, between its markers, and every plot into results/figures/."""
    import shutil

    tables, out_dir = _generated(results_dir)
    figures = os.path.join(results_dir, "figures")
    os.makedirs(figures, exist_ok=True)
    for png in glob.glob(os.path.join(out_dir, "*.png")):
        shutil.copy(png, os.path.join(figures, os.path.basename(png)))
    shutil.rmtree(out_dir, ignore_errors=True)
    for page in _pages(results_dir):
        with open(page) as f:
            text = f.read()
        updated = _BLOCK.sub(lambda m: _begin(m["name"]) + tables.get(m["name"], "(no stored data)\n")
                             + f"\n<!-- end of {m['name']} -->", text)
        if updated != text:
            _write(page, updated)


if __name__ == "__main__":
    folder = next((a for a in sys.argv[1:] if not a.startswith("--")), "docs/results")
    if "--check" in sys.argv:
        stale = stale_tables(folder)
        for page, table in stale:
            print(f"{page}: the table {table} differs from the stored data; run python bench/results_pages.py")
        sys.exit(1 if stale else 0)
    update_pages(folder)
