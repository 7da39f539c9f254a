"""The experiment command: the table is written row by row, and a killed run resumes to the same table."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from flatfast.experiment import Config, read_table, run

TINY = ["--n-train", "60", "--n-test", "150", "--attack-sizes", "0", "20", "--seeds", "1", "--optimizers", "sgd",
        "adam", "--max-epochs", "300"]


def _tiny_config(out):
    return Config(n_train=60, n_test=150, attack_sizes=[0, 20], seeds=1, optimizers=["sgd", "adam"],
                  max_epochs=300, out=str(out))


def _rows_without_timing(table):
    with open(table, newline="") as fh:
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]
    return sorted(rows, key=lambda r: (r["optimizer"], r["attack_size"], r["seed"], r["rescaled"]))


def test_killed_run_resumes_to_the_uninterrupted_table(tmp_path):
    reference = run(_tiny_config(tmp_path / "whole"), log=lambda s: None)

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "flatfast", "reproduce", *TINY, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    table = out / "results.csv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if table.exists() and sum(1 for _ in open(table)) >= 3:  # header + two finished rows
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    killed_mid_run = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed_mid_run, "the run finished before it could be killed"
    partial = _rows_without_timing(table)
    assert 2 <= len(partial) < len(_rows_without_timing(reference))

    with pytest.raises(FileExistsError, match="--resume"):
        run(_tiny_config(out), log=lambda s: None)
    run(_tiny_config(out), resume=True, log=lambda s: None)
    assert _rows_without_timing(table) == _rows_without_timing(reference)
    for name in ("summary.png", "test_error_vs_log_p.png", "test_error_vs_trace.png",
                 "test_error_vs_top_eigenvalue.png", "test_error_vs_sharpness.png", "correlations.json",
                 "config.json"):
        assert (out / name).stat().st_size > 0


def test_table_contents(tmp_path):
    table = run(_tiny_config(tmp_path), log=lambda s: None)
    rows = read_table(table)
    assert len(rows) == 6  # sgd x 2 sizes (+ 2 rescaled), adam x 2 sizes
    pairs = {}
    for r in rows:
        if r["optimizer"] == "sgd":
            pairs.setdefault(r["attack_size"], {})[r["rescaled"]] = r
    for pair in pairs.values():
        plain, scaled = pair[False], pair[True]
        assert scaled["alpha"] == 5.9 and plain["alpha"] == 1.0
        assert scaled["test_error"] == plain["test_error"]
        assert abs(scaled["log_p_heaviside"] - plain["log_p_heaviside"]) <= 1e-8 * abs(plain["log_p_heaviside"])
        assert abs(scaled["trace"] / plain["trace"] - 1) > 0.5
    assert all(r["log_p_probit"] < 0 and r["log_p_heaviside"] < 0 for r in rows)


def test_bad_arguments_say_which(tmp_path):
    target = tmp_path / "out"
    out = subprocess.run([sys.executable, "-m", "flatfast", "reproduce", "--optimizers", "rmsprop", "--out",
                          str(target)], capture_output=True, text=True)
    assert out.returncode != 0 and "--optimizers: unknown optimizer 'rmsprop'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "flatfast", "reproduce", "--data", "mnist", "--out", str(target)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "data_dir" in out.stderr
    assert not target.exists()  # a failed start leaves nothing behind


def _write_idx(path, array, compress):
    import gzip
    import struct

    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    payload = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    payload += array.tobytes()
    opener = gzip.open if compress else open
    with opener(str(path) + (".gz" if compress else ""), "wb") as fh:
        fh.write(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files_are_read(tmp_path, compress):
    import numpy as np

    from flatfast.experiment import load_data

    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (30, 28, 28))
    train_labels = rng.integers(0, 10, 30)
    _write_idx(tmp_path / "train-images-idx3-ubyte", train_images, compress)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", train_labels, compress)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", train_images[:12], compress)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", train_labels[:12], compress)
    config = Config(data="mnist", data_dir=str(tmp_path), n_train=10, attack_sizes=[0, 5], n_test=12)
    X_pool, y_pool, X_test, y_test = load_data(config)
    assert X_pool.shape == (15, 784) and X_test.shape == (12, 784)
    assert X_pool.min() >= 0 and X_pool.max() <= 1
    np.testing.assert_array_equal(y_test, (train_labels[:12] >= 5).astype(int))
    np.testing.assert_allclose(X_test[0], train_images[0].reshape(-1) / 255.0)
    with pytest.raises(FileNotFoundError, match="data_dir: no"):
        load_data(Config(data="mnist", data_dir=str(tmp_path / "missing"), attack_sizes=[0]))
