"""The durable results table: one CSV row per measured network, flushed as it is written, so a killed run loses
no finished row; the config.json beside it that --resume and --merge compare against."""
import csv
import json
import os
from pathlib import Path

import flatfast.experiments.predictors as predictors
from flatfast.experiments.config import config_differences


FIELDS = ["data", "optimizer", "attack_size", "seed", "rescaled", "alpha", "weight_factors", "bias_factors",
          "epochs", "reached_100_on_S", "accuracy_S", "accuracy_A", "test_error",
          "log_p_heaviside", "log_p_probit", "ep_converged_heaviside", "ep_converged_probit", "ep_sweeps",
          "log_p_S_heaviside", "pac_bayes_bound",
          "trace", "trace_stderr", "trace_hit_budget", "top_eigenvalue", "top_eigenvalue_residual",
          "frobenius", "frobenius_stderr", "sharpness", "sharpness_sgd_ascent", "sharpness_sign_ascent",
          *predictors.COLUMNS, *predictors.SECONDS_COLUMNS, "warnings", "seconds"]
_TEXT_FIELDS = {"data", "optimizer", "weight_factors", "bias_factors", "warnings"}
_BOOL_FIELDS = {"rescaled", "reached_100_on_S", "ep_converged_heaviside", "ep_converged_probit", "trace_hit_budget"}


def row_key(row):
    return (row["optimizer"], int(row["attack_size"]), int(row["seed"]), str(row["rescaled"]) in ("True", "1"))


def prepare_output(out, settings, resume, ignore):
    """Make the output folder and write its config.json (``settings``); with ``resume``, first refuse to continue
    a run made with other settings (any key but those in ``ignore`` differing), naming each difference."""
    out = Path(out)
    stored_path = out / "config.json"
    if resume and stored_path.exists():
        with open(stored_path) as fh:
            stored = json.load(fh)
        diffs = config_differences(stored, settings, ignore)
        if diffs:
            raise ValueError("--resume: the run in " + str(out) + " was made with other settings, so its rows cannot "
                             "be continued here (" + "; ".join(diffs) + "); use those settings or another --out")
    out.mkdir(parents=True, exist_ok=True)
    with open(stored_path, "w") as fh:
        json.dump(settings, fh, indent=2)


class DurableTable:
    """A CSV table opened for appending (header written when new); every row is flushed and fsynced as it is
    appended, so a killed run loses no finished row."""

    def __init__(self, path, fields):
        new_file = not Path(path).exists()
        self._fh = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=fields)
        if new_file:
            self._writer.writeheader()
            self._fh.flush()

    def append(self, row):
        self._writer.writerow(row)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def read_typed_csv(table, fields, text_fields, bool_fields):
    """The rows of a results table with numbers as floats, flags as bools and text left as text."""
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in fields:  # a column a table was written without (an earlier version's) reads as not measured
            value = r.get(k) or ""
            if k in text_fields:
                r[k] = value
            elif k in bool_fields:
                r[k] = value in ("True", "1")
            else:
                r[k] = float(value) if value != "" else float("nan")
    return rows


def read_table(table):
    return read_typed_csv(table, FIELDS, _TEXT_FIELDS, _BOOL_FIELDS)


def interrupted_message(table, out):
    """The one line Ctrl-C leaves: what was kept and how to go on (every finished row is already on disk)."""
    rows = 0
    if Path(table).exists():
        with open(table, newline="") as fh:
            rows = sum(1 for _ in csv.DictReader(fh))
    return (f"flatfast reproduce: interrupted; {rows} finished row(s) are kept in {table}; continue with "
            f"`flatfast reproduce --resume --out {out}`")
