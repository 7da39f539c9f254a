"""The documentation's results pages are generated from stored measurements (bench/results_pages.py); their tables
must be what the stored data say, computed as the data's own scripts compute them."""
import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import results_pages  # noqa: E402


def test_every_stored_result_becomes_a_table(tmp_path):
    pytest.importorskip("matplotlib")
    results_pages.write_all(str(ROOT / "docs" / "results"), str(tmp_path))
    written = {p.name for p in tmp_path.iterdir()}
    assert {"smc-coverage.md", "smc-coverage.png", "ep-paper-scale.md", "experiment-fcn-digits-authors-grid.md",
            "experiment-cnn-digits-s200.md", "experiment-fcn-digits-s200.md", "benchmarks.md",
            "benchmarks.png"} <= written
    # every table a page holds is one the generator writes, and every plot it shows is in results/figures/
    import re

    for page in (ROOT / "docs" / "results").glob("*.md"):
        text = page.read_text()
        for name in re.findall(r"<!-- generated: ([\w.-]+\.md)", text):
            assert name in written, (page.name, name)
        for figure in re.findall(r"\]\(figures/([\w.-]+\.png)\)", text):
            assert figure in written and (ROOT / "docs" / "results" / "figures" / figure).exists(), (page.name, figure)


def test_every_stored_result_folder_says_how_it_was_measured():
    """Each folder of stored data has the README the results index promises (figures/ is the generator's output)."""
    folders = [d for d in (ROOT / "docs" / "results").iterdir() if d.is_dir() and d.name != "figures"]
    assert folders and [d.name for d in folders if not (d / "README.md").is_file()] == []


def test_the_pages_tables_are_what_the_stored_data_give_now():
    """The tables live in the pages (readable on GitHub without a docs build); they must match the data."""
    pytest.importorskip("matplotlib")
    assert results_pages.stale_tables(str(ROOT / "docs" / "results")) == [], \
        "run python bench/results_pages.py and commit the pages"


def test_the_coverage_table_is_the_stored_estimates():
    records = [json.loads(line) for line in open(ROOT / "docs" / "results" / "smc-coverage" / "equicorrelated.jsonl")]
    cells = {(c["case"], c["n"]): c for c in results_pages.coverage_cells(records)}
    cell = cells["equicorrelated rho=0.9 minority=0", 1500]
    chosen = {r["seed"]: r for r in records if r["case"] == "equicorrelated rho=0.9 minority=0" and r["n"] == 1500}
    z = np.array([(r["log_z"] - r["exact"]) / r["stderr"] for r in chosen.values()])
    assert cell["seeds"] == len(chosen) == 50
    assert cell["covered"] == pytest.approx(np.mean(np.abs(z) <= 2)) and cell["mean_z"] == pytest.approx(z.mean())


def test_benchmark_ratios_are_computed_as_the_bench_prints_them():
    run = {"benchmarks": [
        {"group": "g", "name": "ours", "stats": {"median": 2.0, "rounds": 3}, "extra_info": {"baseline": ["peer"]}},
        {"group": "g", "name": "peer", "stats": {"median": 4.0, "rounds": 3}, "extra_info": {}}]}
    assert results_pages.benchmark_ratios(run) == [("g", "ours", "peer", 0.5, {})]
