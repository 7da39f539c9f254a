"""`flatfast reproduce`: the authors' protocol (rescale direction, stopping on S, measures on S), the table written
row by row, resume only with the same settings, shards merging to the unsharded table, and the temporal run."""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import flatfast
from flatfast.experiments import Config, correlations, measure, merge, read_table, run, train

TINY = ["--n-train", "60", "--n-test", "150", "--attack-sizes", "0", "20", "--seeds", "1", "--successful-runs", "1",
        "--optimizers", "sgd", "adam", "--max-epochs", "300", "--lr", "0.05", "--sharpness-epochs", "3"]


def _tiny_config(out, **overrides):
    # |S| = 60: 2 SGD steps an epoch
    settings = dict(n_train=60, n_test=150, attack_sizes=[0, 20], seeds=1, successful_runs=1,
                    optimizers=["sgd", "adam"], max_epochs=300, lr=0.05, sharpness_epochs=3, out=str(out))
    settings.update(overrides)
    return Config(**settings)


def _rows_without_timing(table):
    with open(table, newline="") as fh:
        rows = [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in csv.DictReader(fh)]
    return sorted(rows, key=lambda r: (r["optimizer"], r["attack_size"], r["seed"], r["rescaled"]))


def _kill_after_rows(command, table, rows):
    """Start ``command`` in its own session and SIGKILL it once ``table`` has ``rows`` lines (header included)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if table.exists() and sum(1 for _ in open(table)) >= rows:
            break
        time.sleep(0.05)
    killed_mid_run = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed_mid_run, "the run finished before it could be killed"


@pytest.fixture(scope="module")
def reference_table(tmp_path_factory):
    """One uninterrupted, unsharded tiny run that several tests compare against."""
    return run(_tiny_config(tmp_path_factory.mktemp("whole")), log=lambda s: None)


@pytest.mark.slow  # run by .ci/run after the default suite (pytest -m slow)
def test_killed_run_resumes_to_the_uninterrupted_table(tmp_path, reference_table):
    out = tmp_path / "killed"
    table = out / "results.csv"
    _kill_after_rows([sys.executable, "-m", "flatfast", "reproduce", *TINY, "--out", str(out)], table, 3)
    partial = _rows_without_timing(table)
    assert 2 <= len(partial) < len(_rows_without_timing(reference_table))

    with pytest.raises(FileExistsError, match="--resume"):
        run(_tiny_config(out), log=lambda s: None)
    run(_tiny_config(out), resume=True, log=lambda s: None)
    assert _rows_without_timing(table) == _rows_without_timing(reference_table)
    for name in ("summary.png", "test_error_vs_log_p.png", "test_error_vs_trace.png", "test_error_vs_frobenius.png",
                 "test_error_vs_top_eigenvalue.png", "test_error_vs_sharpness.png", "pac_bayes_bound.png",
                 "correlations.json", "config.json"):
        assert (out / name).stat().st_size > 0


def test_resume_with_other_settings_is_refused(tmp_path, reference_table):
    out = reference_table.parent
    before = reference_table.read_bytes()
    rows_before = _rows_without_timing(reference_table)
    for change in (dict(seeds=2), dict(likelihood="heaviside"), dict(sharpness_epochs=4)):
        with pytest.raises(ValueError, match="--resume: .* other settings.*" + next(iter(change))):
            run(_tiny_config(out, **change), resume=True, log=lambda s: None)
    assert reference_table.read_bytes() == before
    run(_tiny_config(out), resume=True, log=lambda s: None)  # the same settings (and any --out) continue
    assert _rows_without_timing(reference_table) == rows_before  # a finished run: nothing redone, nothing added


def test_rescaled_rows_keep_the_function_and_get_sharper(reference_table):
    rows = read_table(reference_table)
    assert len(rows) == 6  # sgd x 2 sizes (+ 2 rescaled), adam x 2 sizes
    pairs = {}
    for r in rows:
        if r["optimizer"] == "sgd":
            pairs.setdefault(r["attack_size"], {})[r["rescaled"]] = r
    for pair in pairs.values():
        plain, scaled = pair[False], pair[True]
        assert scaled["alpha"] == 5.9 and plain["alpha"] == 1.0
        assert scaled["weight_factors"] == f"{1 / 5.9:.6g};5.9;1" and scaled["bias_factors"] == f"{1 / 5.9:.6g};1;1"
        assert plain["weight_factors"] == "1;1;1"
        assert scaled["test_error"] == plain["test_error"]
        for likelihood in ("heaviside", "probit"):
            key = f"log_p_{likelihood}"
            assert abs(scaled[key] - plain[key]) <= 1e-8 * abs(plain[key])
        # W1 (the large first layer) divided by alpha: its Hessian block grows by alpha^2 = 34.8
        assert scaled["trace"] > 10 * plain["trace"]
        assert scaled["top_eigenvalue"] > 10 * plain["top_eigenvalue"]
        assert scaled["sharpness_sgd_ascent"] > plain["sharpness_sgd_ascent"]
    for r in rows:
        assert r["reached_100_on_S"] and r["accuracy_S"] == 1.0
        assert r["ep_converged_heaviside"] and r["ep_converged_probit"]
        assert r["log_p_probit"] < 0 and r["log_p_heaviside"] < 0
        assert 0 < r["pac_bayes_bound"] < 1 and r["pac_bayes_bound"] == rows[0]["pac_bayes_bound"]
        assert r["sharpness"] == r["sharpness_sgd_ascent"]  # the authors' ascent is the default


def test_training_stops_when_S_is_fitted_even_if_A_is_not():
    """A holds S's own first ten images with flipped labels: S u A cannot be fitted, S can. The old rule (stop at
    100 % on S u A) would run to max_epochs; the authors' rule stops as soon as S is right."""
    from flatfast.experiments import make_network

    config = _tiny_config("unused", max_epochs=400)
    X_pool, y_pool, _, _ = config.load_data()
    S = (X_pool[:60], y_pool[:60])
    A = (X_pool[:10], 1 - y_pool[:10])
    model = make_network(64, 40, seed=3)
    epochs, reached, accuracy_S, accuracy_A = train(model, S, A, "sgd", config, seed=3)
    assert reached and accuracy_S == 1.0 and epochs < config.max_epochs
    assert accuracy_A == 0.0  # the same images, so every flipped label is wrong


def test_flatness_is_of_the_loss_on_S_alone(reference_table):
    from flatfast.experiments import make_network

    config = _tiny_config("unused")
    X_pool, y_pool, X_test, y_test = config.load_data()
    S, A = (X_pool[:60], y_pool[:60]), (X_pool[60:80], 1 - y_pool[60:80])
    model = make_network(64, 40, seed=1)
    train(model, S, A, "sgd", config, seed=1)
    K = flatfast.nngp_kernel(np.concatenate([S[0], X_test]))
    row = measure(model, S, X_test, y_test, K, config, seed=1)
    bce = torch.nn.BCEWithLogitsLoss()
    on_S = [(torch.from_numpy(S[0]), torch.from_numpy(S[1].astype(np.float64))[:, None])]
    XA, yA = np.concatenate([S[0], A[0]]), np.concatenate([S[1], A[1]])
    on_SA = [(torch.from_numpy(XA), torch.from_numpy(yA.astype(np.float64))[:, None])]
    trace_S = flatfast.hessian_trace(model, on_S, loss_fn=bce, method="exact").value
    trace_SA = flatfast.hessian_trace(model, on_SA, loss_fn=bce, method="exact").value
    assert row["trace"] == trace_S and row["trace_stderr"] == 0.0 and abs(trace_SA - trace_S) > 0.1 * trace_S
    estimate = flatfast.hessian_trace(model, on_S, loss_fn=bce, method="hutch++", rtol=config.trace_rtol, seed=1,
                                      progress=False)
    assert abs(estimate.value - trace_S) <= 4 * estimate.stderr  # the exact trace is what Hutch++ estimates
    from scipy.sparse.linalg import eigsh  # ARPACK: an eigensolver independent of flatfast's Lanczos

    top = eigsh(flatfast.hessian_operator(model, on_S, loss_fn=bce), k=1, which="LA", tol=1e-8,
                return_eigenvectors=False)[0]
    assert row["top_eigenvalue"] == pytest.approx(top, rel=1e-3)
    in_three = [(x[i::3], t[i::3]) for x, t in on_S for i in range(3)]  # S again, in three batches
    assert row["sharpness_sign_ascent"] == pytest.approx(
        flatfast.sharpness(model, in_three, eps=config.sharpness_eps, loss_fn=bce, method="sign-ascent", seed=1),
        rel=1e-9)  # of S (not S + A), with the experiment's eps and loss


@pytest.mark.slow  # run by .ci/run after the default suite (pytest -m slow)
def test_shards_merge_to_the_unsharded_table(tmp_path, reference_table):
    shards = [run(_tiny_config(tmp_path / f"shard{i}", shard_index=i, shard_count=2), log=lambda s: None).parent
              for i in range(2)]
    parts = [_rows_without_timing(s / "results.csv") for s in shards]
    assert all(parts) and len(parts[0]) + len(parts[1]) == 6
    merged = merge(shards, tmp_path / "merged", log=lambda s: None)
    assert _rows_without_timing(merged) == _rows_without_timing(reference_table)
    assert json.loads((tmp_path / "merged" / "correlations.json").read_text())["likelihood"] == "probit"
    with pytest.raises(ValueError, match="same shard appears twice"):
        merge([shards[0], shards[0]], tmp_path / "twice", log=lambda s: None)
    with pytest.raises(ValueError, match="other settings"):
        merge([shards[0], reference_table.parent], tmp_path / "mixed", log=lambda s: None)


def test_runs_that_never_fit_S_are_left_out_of_the_statistics():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        err = 0.05 * i
        rows.append(dict(optimizer="sgd", rescaled=False, reached_100_on_S=True, test_error=err,
                         log_p_probit=-100 - 50 * err - 10 * rng.random(), log_p_heaviside=-90 - 50 * err,
                         trace=10 + rng.random(),
                         top_eigenvalue=1 + rng.random(), frobenius=2 + rng.random(), sharpness=1 + rng.random()))
    clean = correlations(rows)
    assert clean["log_p"]["kendall_tau"] < -0.7 and clean["log_p"]["n"] == 12
    for stat in ("kendall_tau", "pearson_r"):
        lo, hi = clean["log_p"][stat + "_ci"]
        assert lo <= clean["log_p"][stat] <= hi
    spoiled = rows + [dict(rows[0], reached_100_on_S=False, test_error=0.9, log_p_probit=-10.0),
                      dict(rows[1], rescaled=True, test_error=0.95, log_p_probit=-5.0)]
    assert json.dumps(correlations(spoiled), sort_keys=True) == json.dumps(clean, sort_keys=True)


@pytest.mark.parametrize("args,message", [
    (["--max-epochs", "0"], "--max-epochs: must be >= 1"),
    (["--attack-sizes", "0", "-5"], "--attack-sizes: must be >= 0"),
    (["--n-test", "5000"], "--n-test: 5000 test images asked"),
    (["--n-train", "2000"], "leaves no test images"),
    (["--optimizers", "rmsprop"], "--optimizers: unknown optimizer 'rmsprop'"),
    (["--shard", "2/2"], "--shard: must be i/N"),
    (["--data", "mnist"], "data_dir"),
    (["--data", "cifar10"], "data_dir: --data cifar10 needs --data-dir"),
    (["--arch", "cnn", "--kernel-samples", "1"], "--kernel-samples: must be >= 2"),
    (["--arch", "cnn", "--channels", "0"], "--channels: must be >= 1"),
    (["--experiment", "temporal", "--arch", "cnn"], "--arch apply to --experiment main only"),
    (["--post-epochs", "10"], "--post-epochs apply to --experiment temporal only"),
    (["--experiment", "temporal", "--attack-sizes", "100"], "--attack-sizes apply to the main experiment"),
    (["--experiment", "temporal", "--successful-runs", "2"], "--successful-runs apply to the main experiment"),
    (["--experiment", "temporal", "--every", "0"], "--every: must be >= 1"),
])
def test_bad_arguments_say_which_and_write_nothing(tmp_path, capsys, args, message):
    """In process (main(argv)): argparse's exit status 2 and the message on stderr, nothing written."""
    from flatfast.__main__ import main

    target = tmp_path / "out"
    try:
        status = main(["reproduce", *args, "--out", str(target)])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status == 2
    stderr = capsys.readouterr().err
    assert message in stderr, stderr
    assert not target.exists()


def test_bad_argument_exit_status_from_the_command_line(tmp_path):
    """One real process: what a shell sees."""
    target = tmp_path / "out"
    out = subprocess.run([sys.executable, "-m", "flatfast", "reproduce", "--max-epochs", "0", "--out", str(target)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--max-epochs: must be >= 1" in out.stderr, out.stderr
    assert not target.exists()


def test_pac_bayes_bound_formula_and_arguments():
    m, delta, log_p = 500, 2.0 ** -10, -123.4
    eps = flatfast.pac_bayes_bound(log_p, m, delta)
    assert -np.log(1 - eps) == pytest.approx((-log_p + np.log(2 * m / delta)) / (m - 1), rel=1e-12)
    assert flatfast.pac_bayes_bound(-1e6, m) == pytest.approx(1.0)
    assert flatfast.pac_bayes_bound(-10.0, 5000) < flatfast.pac_bayes_bound(-10.0, 500)
    for kwargs, match in ((dict(log_p_train=0.5, m=10), "log_p_train: is a log probability"),
                          (dict(log_p_train=-1.0, m=1), "m: must be >= 2"),
                          (dict(log_p_train=-1.0, m=10, delta=1.0), "delta: must be in"),
                          (dict(log_p_train=float("nan"), m=10), "log_p_train: must be finite")):
        with pytest.raises(ValueError, match=match):
            flatfast.pac_bayes_bound(**kwargs)


@pytest.mark.slow  # run by .ci/run after the default suite (pytest -m slow)
def test_temporal_run_rescales_half_way_and_resumes(tmp_path):
    from flatfast.experiments.temporal import TemporalConfig, read_temporal, run_temporal

    def config(out, **overrides):
        settings = dict(n_train=60, n_test=40, post_epochs=6, every=2, sharpness_epochs=2, out=str(out))
        settings.update(overrides)
        return TemporalConfig(**settings)

    whole = run_temporal(config(tmp_path / "whole"), log=lambda s: None)
    rows = read_temporal(whole)
    assert [(int(r["epoch"]), r["phase"]) for r in rows] == [
        (0, "fitted S"), (2, ""), (3, "before rescale"), (3, "after rescale"), (4, ""), (6, "")]
    before, after = rows[2], rows[3]
    for likelihood in ("heaviside", "probit"):
        assert abs(after[f"log_p_{likelihood}"] - before[f"log_p_{likelihood}"]) <= 1e-8
    assert after["test_error"] == before["test_error"] and rows[0]["train_error"] == 0.0
    assert after["trace"] > 10 * before["trace"] and after["sharpness"] > before["sharpness"]
    assert (tmp_path / "whole" / "temporal.png").stat().st_size > 0
    assert not (tmp_path / "whole" / "temporal_state.pt").exists()  # a completed run leaves no checkpoint
    finished = (tmp_path / "whole" / "temporal.csv").read_bytes()
    run_temporal(config(tmp_path / "whole"), resume=True, log=lambda s: None)  # complete: summarised, not re-run
    assert (tmp_path / "whole" / "temporal.csv").read_bytes() == finished

    # killed after three rows, then resumed: the same table as the uninterrupted run
    out = tmp_path / "killed"
    script = ("import sys\nfrom flatfast.experiments.temporal import TemporalConfig, run_temporal\n"
              "def log(s):\n    print(s, flush=True)\n"
              f"run_temporal(TemporalConfig(n_train=60, n_test=40, post_epochs=6, every=2, sharpness_epochs=2, "
              f"out={str(out)!r}), log=log)\n")
    table = out / "temporal.csv"
    _kill_after_rows([sys.executable, "-c", script], table, 4)
    import torch

    # the checkpoint holds tensors and plain values only, so it loads without unpickling code
    state = torch.load(out / "temporal_state.pt", weights_only=True)
    assert state["warm"]["probit"]["site_precision"].shape == (100,)
    with pytest.raises(ValueError, match="other settings"):
        run_temporal(config(out, every=3), resume=True, log=lambda s: None)
    run_temporal(config(out), resume=True, log=lambda s: None)

    def strip(rows):  # timings differ; NaN (a measure's stderr it could not estimate) equals NaN here
        return [{k: ("nan" if v != v else v) for k, v in r.items() if k not in ("seconds", "ep_seconds")}
                for r in rows]

    assert strip(read_temporal(table)) == strip(rows)


def test_nothing_in_the_repository_unpickles_code_on_load():
    """A torch.load that is not weights_only runs whatever code a checkpoint carries; flatfast's checkpoints hold
    only tensors and plain values, so every load is weights_only=True."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parent.parent
    pattern = "weights_only" + "=False"  # split, so that this test does not find itself
    found = [str(p.relative_to(root)) for p in root.rglob("*.py")
             if ".git" not in p.parts and re.search(pattern, p.read_text(errors="ignore"))]
    assert not found, found


# --- the CNN experiment and CIFAR-10 ------------------------------------------------------------------------------

@pytest.mark.slow  # run by .ci/run after the default suite (pytest -m slow)
def test_cnn_run_rescales_the_conv_pair_keeps_log_p_and_traces_exactly(tmp_path):
    lines = []
    config = _tiny_config(tmp_path / "cnn", arch="cnn", channels=4, optimizers=["sgd"], kernel_samples=16)
    rows = read_table(run(config, log=lines.append))
    assert len(rows) == 4
    assert any("empirical NNGP kernel of the CNN: M = 16 draws" in line for line in lines)
    assert any("alpha-scale (conv1 weight and bias / 5.9; conv2 weight * 5.9)" in line for line in lines)
    pairs = {}
    for r in rows:
        assert r["data"] == "digits" and r["trace_stderr"] == 0.0
        pairs.setdefault(r["attack_size"], {})[r["rescaled"]] = r
    for pair in pairs.values():
        plain, scaled = pair[False], pair[True]
        assert scaled["weight_factors"] == f"{1 / 5.9:.6g};5.9;1" and scaled["bias_factors"] == f"{1 / 5.9:.6g};1;1"
        assert scaled["test_error"] == plain["test_error"]
        assert abs(scaled["log_p_probit"] - plain["log_p_probit"]) <= 1e-8 * abs(plain["log_p_probit"])
        assert scaled["trace"] > plain["trace"]  # conv1's Hessian block grows by alpha^2, conv2's weight shrinks


def test_cnn_prior_kernel_is_the_empirical_kernel_of_the_same_prior():
    from flatfast.experiments import kernel_draws, make_cnn, prior_kernel

    assert kernel_draws(Config(arch="cnn"), 1297) == 130  # the authors' M = n / 10
    assert kernel_draws(Config(arch="cnn", kernel_samples=64), 1297) == 64
    X = np.random.default_rng(0).random((30, 64))
    config = Config(arch="cnn", channels=4, kernel_samples=2)
    K = prior_kernel(config, X, log=lambda s: None)
    # By hand: the kernel's draws continue one generator seeded 0, and its first draw is the network that
    # make_cnn(seed=0) builds for training (one prior draw, one function); K averages
    # (sigma_w2 / d) phi phi^T + sigma_b2 over the draws' penultimate features phi.
    from flatfast.kernel.empirical import _draw_from_prior

    first = make_cnn((1, 8, 8), 4, seed=0)
    second = make_cnn((1, 8, 8), 4, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        _draw_from_prior(second, generator, 2.0, 1.0)  # the first draw again: the same weights as make_cnn's
        assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))
        _draw_from_prior(second, generator, 2.0, 1.0)  # the second draw
        by_hand = np.zeros((30, 30))
        for net in (first, second):
            phi = net[:-1](torch.from_numpy(X)).numpy()
            by_hand += (2.0 / phi.shape[1]) * phi @ phi.T + 1.0
    np.testing.assert_allclose(K, by_hand / 2, rtol=1e-12)
    wide = make_cnn((1, 8, 8), 64, seed=1)  # a network is one draw of that prior: N(0, 2/fan_in), N(0, 1)
    assert float(wide[3].weight.std()) == pytest.approx((2.0 / (64 * 9)) ** 0.5, rel=0.05)
    assert float(wide[1].weight.std()) == pytest.approx((2.0 / 9) ** 0.5, rel=0.15)
    assert float(wide[3].bias.std()) == pytest.approx(1.0, rel=0.25)


def _write_cifar_batch(path, classes, rng):
    """A file in the CIFAR-10 python format; each image's first red pixel holds its class, so labels can be
    checked after loading."""
    import pickle

    data = rng.integers(0, 256, (len(classes), 3072), dtype=np.uint8)
    data[:, 0] = classes
    with open(path, "wb") as fh:
        pickle.dump({b"batch_label": b"synthetic", b"labels": [int(c) for c in classes], b"data": data}, fh)


@pytest.fixture
def cifar_dir(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    some_classes = [0, 1, 3, 5, 9]  # 1 (automobile) and 3 (cat) are the task's; the rest must be left out
    for i in range(1, 6):
        _write_cifar_batch(root / f"data_batch_{i}", rng.choice(some_classes, 40), rng)
    _write_cifar_batch(root / "test_batch", rng.choice(some_classes, 60), rng)
    return tmp_path


def test_cifar10_batches_give_the_cat_vs_car_task(cifar_dir):
    from flatfast.experiments.data import read_cifar10

    X, y = read_cifar10(cifar_dir, [f"data_batch_{i}" for i in range(1, 6)])
    classes = np.round(X[:, 0] * 255).astype(int)
    assert set(classes) == {1, 3} and len(classes) > 40 and X.shape[1] == 3072 and 0.0 <= X.min() and X.max() <= 1.0
    np.testing.assert_array_equal(y, (classes == 3).astype(int))  # the authors' mapping: car -> 0, cat -> 1
    config = Config(data="cifar10", data_dir=str(cifar_dir), n_train=20, attack_sizes=[0, 5])
    X_pool, y_pool, X_test, y_test = config.load_data()
    n_test_available = len(read_cifar10(cifar_dir / "cifar-10-batches-py", ["test_batch"])[1])
    assert X_pool.shape == (25, 3072) and X_test.shape == (n_test_available, 3072)  # |E| <= the authors' 2000
    np.testing.assert_array_equal(y_test, (np.round(X_test[:, 0] * 255) == 3).astype(int))
    with pytest.raises(ValueError, match="--n-train/--attack-sizes/--n-test: 500 training"):
        Config(data="cifar10", data_dir=str(cifar_dir), n_train=500, attack_sizes=[0]).load_data()


def test_cifar10_files_that_are_missing_or_not_batches_are_named(cifar_dir, tmp_path):
    import pickle

    from flatfast.experiments.data import read_cifar10

    with pytest.raises(FileNotFoundError, match="no CIFAR-10 batch data_batch_9"):
        read_cifar10(cifar_dir, ["data_batch_9"])
    with open(tmp_path / "not_a_batch", "wb") as fh:
        pickle.dump([1, 2, 3], fh)
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        read_cifar10(tmp_path, ["not_a_batch"])
    with open(tmp_path / "wrong_shape", "wb") as fh:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [1, 3, 1, 3]}, fh)
    with pytest.raises(ValueError, match="expected b'data' of shape \\(m, 3072\\)"):
        read_cifar10(tmp_path, ["wrong_shape"])
    with open(tmp_path / "runs_code", "wb") as fh:
        pickle.dump({b"data": os.getcwd, b"labels": []}, fh)  # a pickle that names a function
    with pytest.raises(ValueError, match="names posix.getcwd|names nt.getcwd"):
        read_cifar10(tmp_path, ["runs_code"])


@pytest.mark.slow  # run by .ci/run after the default suite (pytest -m slow)
def test_cnn_on_cifar10_from_the_command_line(cifar_dir, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "flatfast", "reproduce", "--data", "cifar10", "--data-dir",
                             str(cifar_dir), "--arch", "cnn", "--channels", "4", "--kernel-samples", "8",
                             "--n-train", "16", "--n-test", "12", "--attack-sizes", "0", "4", "--seeds", "1",
                             "--successful-runs", "0", "--optimizers", "sgd", "--max-epochs", "300", "--lr", "0.05",
                             "--sharpness-epochs", "2", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "CNN on cifar10, |S| = 16, |E| = 12" in result.stdout
    # the authors' E3 settings fill in what was not given (batch 128, eps 1e-5), and say so
    assert "--data cifar10 takes the authors' E3 settings: batch_size = 128, sharpness_eps = 1e-05" in result.stdout
    assert json.loads((out / "config.json").read_text())["batch_size"] == 128
    rows = read_table(out / "results.csv")
    assert len(rows) == 4 and all(r["data"] == "cifar10" for r in rows)
    assert json.loads((out / "config.json").read_text())["arch"] == "cnn"


def test_configurations_get_distinct_seeds():
    """1000 * seed + |A| gave seed 1 with |A| = 0 and seed 0 with |A| = 1000 one network and one batch order."""
    from flatfast.experiments.training import run_seed

    seeds = {(s, a, o): run_seed(s, a, o) for s in range(5) for a in range(0, 5001, 50)
             for o in ("sgd", "adam", "entropy-sgd")}
    assert len(set(seeds.values())) == len(seeds)
    assert run_seed(1, 0, "sgd") != run_seed(0, 1000, "sgd") and run_seed(0, 0, "sgd") != run_seed(0, 0, "adam")
    assert run_seed(2, 100, "adam") == run_seed(2, 100, "adam") and 0 <= run_seed(2, 100, "adam") < 2**63
    import torch

    torch.Generator().manual_seed(run_seed(4, 5000, "entropy-sgd"))  # a seed torch accepts


def test_left_out_networks_are_counted_in_english():
    from flatfast.experiments.statistics import _left_out_phrase

    assert _left_out_phrase(0) == ""
    assert _left_out_phrase(1) == " (1 that did not is left out)"
    assert _left_out_phrase(3) == " (3 that did not are left out)"


def test_resume_continues_from_the_saved_settings_without_retyping_them(tmp_path, reference_table, capsys):
    """--resume --out DIR reads DIR/config.json: no setting need be typed again, a typed change is refused."""
    from flatfast.__main__ import main

    out = reference_table.parent
    rows = _rows_without_timing(reference_table)
    assert main(["reproduce", "--resume", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"--resume: (\d+) of \1 configurations are in .* already and are skipped", printed), printed
    assert _rows_without_timing(reference_table) == rows
    assert main(["reproduce", "--resume", "--out", str(out), "--seeds", "3"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_ctrl_c_leaves_one_line_saying_what_was_kept(monkeypatch, reference_table, capsys):
    import flatfast.experiments.cli as cli
    from flatfast.__main__ import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    out = reference_table.parent
    assert main(["reproduce", "--resume", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip()
    rows = len(_rows_without_timing(reference_table))
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"interrupted; {rows} finished row(s) are kept in {out / 'results.csv'}" in err
    assert f"flatfast reproduce --resume --out {out}" in err


@pytest.mark.slow  # run by .ci/run after the default suite (pytest -m slow)
def test_jobs_give_the_rows_of_a_serial_run(tmp_path, reference_table):
    """--jobs 2: the configurations in two worker processes (one thread each here), the same rows as serially."""
    lines = []
    table = run(_tiny_config(tmp_path / "jobs"), log=lines.append, jobs=2)
    assert any("--jobs 2: 4 configurations in 2 worker processes" in line for line in lines), lines[:5]
    parallel, serial = _rows_without_timing(table), _rows_without_timing(reference_table)
    assert len(parallel) == len(serial) == 6
    for ours, theirs in zip(parallel, serial):
        for key in theirs:
            if key.startswith("log_p_"):  # EP's BLAS runs on one thread per worker: its sums round differently
                assert float(ours[key]) == pytest.approx(float(theirs[key]), rel=1e-10), key
            else:  # training, the traces, sharpness, ...: identical
                assert ours[key] == theirs[key], key
    # the statistics do not depend on the order rows were appended in (parallel rows arrive as they finish)
    ours, theirs = correlations(read_table(table)), correlations(read_table(reference_table))
    for name in ("trace", "top_eigenvalue", "frobenius", "sharpness"):
        assert json.dumps(ours[name], sort_keys=True) == json.dumps(theirs[name], sort_keys=True), name
    assert ours["log_p"]["kendall_tau"] == theirs["log_p"]["kendall_tau"]


@pytest.mark.slow  # run by .ci/run after the default suite (pytest -m slow)
def test_shard_auto_reads_the_slurm_array_and_merges_to_the_whole(tmp_path, reference_table, monkeypatch):
    from flatfast.__main__ import main

    shards = []
    for task in range(2):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        shards.append(tmp_path / f"shard-{task}")
        assert main(["reproduce", *TINY, "--shard", "auto", "--out", str(shards[-1])]) == 0
    assert json.loads((shards[1] / "config.json").read_text())["shard_index"] == 1
    assert main(["reproduce", "--merge", *map(str, shards), "--out", str(tmp_path / "merged")]) == 0
    assert _rows_without_timing(tmp_path / "merged" / "results.csv") == _rows_without_timing(reference_table)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    with pytest.raises(ValueError, match="--shard: auto reads SLURM_ARRAY_TASK_ID"):
        from flatfast.experiments.cli import parse_shard

        parse_shard("auto")


def test_successful_runs_try_more_seeds_until_enough_fit_S(tmp_path):
    """--successful-runs 2 with an epoch cap no network meets: each (optimizer, |A|) tries new seeds, one per
    missing success, up to --max-seeds 3, says so, and says which groups ended short."""
    lines = []
    config = _tiny_config(tmp_path / "short", optimizers=["adam"], attack_sizes=[0], seeds=1, successful_runs=2,
                          max_seeds=3, max_epochs=1)
    rows = read_table(run(config, log=lines.append))
    assert sorted(int(r["seed"]) for r in rows) == [0, 1, 2] and not any(r["reached_100_on_S"] for r in rows)
    assert any("--successful-runs 2: adam |A| = 0 fitted S in 0 of 1 seed(s); trying seed(s) 1, 2" in line
               for line in lines), lines
    assert any("adam |A| = 0 fitted S in only 0 of 3 seed(s) (--max-seeds 3" in line for line in lines), lines
    # stopped during the extra seeds (seed 2's row lost): --resume runs the extra seed again
    table = tmp_path / "short" / "results.csv"
    lines_kept = table.read_text().splitlines(keepends=True)
    kept = [line for line in lines_kept if not line.startswith("digits,adam,0,2,")]
    table.write_text("".join(kept))
    assert len(read_table(table)) == 2
    rows = read_table(run(config, resume=True, log=lambda s: None))
    assert sorted(int(r["seed"]) for r in rows) == [0, 1, 2]
    with pytest.raises(ValueError, match="--max-seeds: must be >= --seeds and --successful-runs"):
        _tiny_config(tmp_path / "bad", successful_runs=5, max_seeds=3).validate()


def test_the_network_trained_is_the_priors_own_draw():
    """make_network draws with the function the empirical kernel draws with (one prior, written once), from its
    own generator: re-drawing a copy with that function and seed gives the same weights."""
    import copy

    from flatfast.kernel.empirical import _draw_from_prior
    from flatfast.experiments import make_network

    model = make_network(8, 5, seed=7)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
        _draw_from_prior(twin, torch.Generator().manual_seed(7), 2.0, 1.0)
    for ours, theirs in zip(model.parameters(), twin.parameters()):
        assert torch.equal(ours, theirs)
    assert not torch.equal(make_network(8, 5, seed=8)[0].weight, model[0].weight)


def test_entropy_sgd_defaults_are_the_settings_the_experiment_trains_with():
    """EntropySGD's docstring says its defaults are flatfast reproduce's settings, outer step 1 / gamma included
    (an outer step of 1, its former default, did not fit S)."""
    import torch

    from flatfast.experiments.training import make_optimizer
    from flatfast.optim import EntropySGD

    model = torch.nn.Linear(3, 1)
    used = make_optimizer(model, "entropy-sgd", Config(), seed=0).param_groups[0]
    default = EntropySGD(model.parameters()).param_groups[0]
    assert {k: v for k, v in used.items() if k != "params"} == {k: v for k, v in default.items() if k != "params"}
    assert default["lr"] == pytest.approx(1 / default["gamma"])


@pytest.mark.slow  # run by .ci/run after the default suite (pytest -m slow)
def test_every_predictor_is_recorded_and_ranked_and_the_invariant_ones_survive_the_rescaling(tmp_path):
    """--measures all: a column per measure in results.csv, every ranking metric in correlations.json, the
    leaderboard, and on the alpha-scaled SGD copies (measured from scratch, float64) the invariant measures
    unchanged to 1e-6 while the trace moves."""
    from flatfast.experiments import predictors
    from flatfast.experiments.table import read_table

    config = _tiny_config(tmp_path / "all", optimizers=["sgd"], seeds=2, attack_sizes=[0, 20], measures="all", width=12)
    table = run(config, log=lambda s: None)
    rows = read_table(table)
    for name in predictors.OTHERS:
        assert all(math.isfinite(r[name]) and r[f"seconds_{name}"] >= 0 for r in rows), name
    pairs = {}
    for r in rows:
        pairs.setdefault((r["attack_size"], r["seed"]), {})[r["rescaled"]] = r
    for original, scaled in ((p[False], p[True]) for p in pairs.values()):
        for name in predictors.INVARIANT + ["log_p_heaviside"]:
            assert abs(scaled[name] - original[name]) <= 1e-6 * abs(original[name]), name
        assert scaled["trace"] > 2 * original["trace"]
    board = list(csv.DictReader(open(table.parent / "leaderboard.csv")))
    assert {b["measure"] for b in board} == set(predictors.PAPER) | set(predictors.OTHERS)
    moved = {b["measure"]: float(b["rescaling_changed_it_by"]) for b in board}
    assert all(moved[name] <= 1e-6 for name in predictors.INVARIANT) and moved["trace"] > 1
    correlations_json = json.loads((table.parent / "correlations.json").read_text())["correlations_with_test_error"]
    assert {"granulated_kendall", "conditional_mutual_information", "robust_sign_error"} <= \
        set(correlations_json["fisher_rao_norm"])
    psi = correlations_json["fisher_rao_norm"]
    parts = [v for v in psi["granulated_kendall_per_axis"].values() if math.isfinite(v)]
    assert psi["granulated_kendall"] == pytest.approx(sum(parts) / len(parts))
    assert (table.parent / "leaderboard.png").stat().st_size > 0


def test_measures_option_is_checked():
    from flatfast.experiments.predictors import INVARIANT, chosen

    assert chosen("paper") == [] and chosen("invariant") == INVARIANT and chosen("path_norm,fisher_rao_norm") == \
        ["fisher_rao_norm", "path_norm"]
    with pytest.raises(ValueError, match="--measures: expected paper, invariant, all or names"):
        chosen("flatness")
    with pytest.raises(ValueError, match="--measures"):
        Config(measures="bogus").validate()
