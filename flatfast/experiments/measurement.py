"""What is recorded of one trained network: test error, log P(f) under both likelihoods over the prior kernel of
S u E, and the flatness of the loss on S; the alpha-scale's per-layer factors."""
import time

import numpy as np

import flatfast.experiments.predictors as predictors
from flatfast.experiments.config import IMAGE_SHAPES
from flatfast.experiments.training import make_cnn


MEASURES = [("log_p", "log P(f) (nats)"), ("trace", "Hessian trace"), ("top_eigenvalue", "top Hessian eigenvalue"),
            ("frobenius", "Hessian Frobenius norm"), ("sharpness", "epsilon-sharpness")]
FLATNESS_MEASURES = ("trace", "top_eigenvalue", "frobenius", "sharpness_sgd_ascent", "sharpness_sign_ascent")


def flatness_on(model, S, config, seed, which=FLATNESS_MEASURES):
    """Trace, top eigenvalue, Frobenius norm and both sharpness ascents of the mean BCE loss on S alone -- or only
    the measures named in ``which`` (the others are not computed: the temporal run needs three of the five).

    ``config`` supplies batch_size, trace_method (auto, exact, or Hutch++ to trace_rtol), frobenius_rtol and the
    sharpness_* settings (a Config or a TemporalConfig)."""
    import torch

    import flatfast

    Xs, ys = torch.from_numpy(S[0]), torch.from_numpy(S[1].astype(np.float64))[:, None]
    whole = [(Xs, ys)]
    bce = torch.nn.BCEWithLogitsLoss()
    unknown = set(which) - set(FLATNESS_MEASURES)
    if unknown:
        raise ValueError(f"which: unknown measures {sorted(unknown)}; choose from {FLATNESS_MEASURES}")
    out = {}
    clock = time.perf_counter
    if "trace" in which:
        start = clock()
        trace = flatfast.hessian_trace(model, whole, loss_fn=bce, method=config.trace_method, rtol=config.trace_rtol,
                                       seed=seed, progress=False)
        out.update(trace=trace.value, trace_stderr=trace.stderr, seconds_trace=round(clock() - start, 4),
                   trace_hit_budget=bool(trace.stderr > config.trace_rtol * abs(trace.value)))
    if "top_eigenvalue" in which:
        start = clock()
        eig = flatfast.hessian_eigenvalues(model, whole, k=1, loss_fn=bce, tol=1e-4, seed=seed)
        out.update(top_eigenvalue=float(eig.values[0]), top_eigenvalue_residual=float(eig.residuals[0]),
                   seconds_top_eigenvalue=round(clock() - start, 4))
    if "frobenius" in which:
        start = clock()
        frob = flatfast.frobenius_norm(model, whole, loss_fn=bce, rtol=config.frobenius_rtol, seed=seed)
        out.update(frobenius=frob.value, frobenius_stderr=frob.stderr, seconds_frobenius=round(clock() - start, 4))
    if "sharpness_sgd_ascent" in which:
        start = clock()
        minibatches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xs, ys),
                                                  batch_size=config.batch_size, shuffle=True,
                                                  generator=torch.Generator().manual_seed(seed))
        out["sharpness_sgd_ascent"] = flatfast.sharpness(model, minibatches, eps=config.sharpness_eps, loss_fn=bce,
                                                         method="sgd-ascent", epochs=config.sharpness_epochs,
                                                         lr=config.sharpness_lr)
        out["seconds_sharpness_sgd_ascent"] = round(clock() - start, 4)
    if "sharpness_sign_ascent" in which:
        start = clock()
        out["sharpness_sign_ascent"] = flatfast.sharpness(model, whole, eps=config.sharpness_eps, loss_fn=bce,
                                                          method="sign-ascent", seed=seed)
        out["seconds_sharpness_sign_ascent"] = round(clock() - start, 4)
    return out


def measure(model, S, X_test, y_test, K, config, seed):
    """Test error, log P(f) under both likelihoods (f = true labels on S, the network's predictions on E), and
    the flatness of the training loss on S."""
    import torch

    import flatfast

    row = {}
    test_pred = flatfast.function_of(model, torch.from_numpy(X_test))
    row["test_error"] = float(np.mean(test_pred != (2 * y_test - 1)))
    f = np.concatenate([2 * S[1] - 1, test_pred])
    start = time.perf_counter()
    heaviside = flatfast.ep_log_evidence(K, f, likelihood="heaviside", check_psd=False, return_info=True)
    probit = flatfast.ep_log_evidence(K, f, likelihood="probit", check_psd=False, return_info=True)
    row.update(log_p_heaviside=heaviside.log_z, log_p_probit=probit.log_z, ep_sweeps=heaviside.sweeps,
               ep_converged_heaviside=heaviside.converged, ep_converged_probit=probit.converged,
               seconds_log_p=round(time.perf_counter() - start, 4))
    row.update(flatness_on(model, S, config, seed))
    reported = "sharpness_sgd_ascent" if config.sharpness_method == "sgd-ascent" else "sharpness_sign_ascent"
    row["sharpness"] = row[reported]
    seconds = {method: row.pop(f"seconds_{method}") for method in ("sharpness_sgd_ascent", "sharpness_sign_ascent")}
    row["seconds_sharpness"] = seconds[reported]  # the cost of the sharpness reported
    row.update(predictors.record(model, S, predictors.chosen(config.measures), seed))
    return row


def rescalings(optimizer_name):
    """The rows one configuration has, by ``rescaled``: SGD networks are measured as trained and alpha-scaled,
    the other optimizers' as trained."""
    return [False, True] if optimizer_name == "sgd" else [False]


def layer_factors(n_weighted, divided_layer, alpha):
    """Per weighted (Linear or Conv) layer, the factor the alpha-scale applied to its weight and to its bias, as
    ';'-joined text."""
    weights, biases = [1.0] * n_weighted, [1.0] * n_weighted
    if alpha != 1.0:
        weights[divided_layer] = biases[divided_layer] = 1.0 / alpha
        weights[divided_layer + 1] = alpha
    text = lambda values: ";".join(f"{v:.6g}" for v in values)  # noqa: E731
    return text(weights), text(biases)


def rescale_label(config):
    """The alpha-scale in words: which layers were divided and multiplied."""
    k = config.divided_layer + 1
    name = "conv" if config.arch == "cnn" else "W"
    return f"{name}{k} weight and bias / {config.alpha:g}; {name}{k + 1} weight * {config.alpha:g}"


def kernel_draws(config, n):
    """M, the empirical kernel's draws: --kernel-samples, or the authors' n/10 (at least 2)."""
    return config.kernel_samples if config.kernel_samples is not None else max(2, round(n / 10))


def prior_kernel(config, X_prior, log=print):
    """The NNGP kernel over S u E that log P(f) is computed with: for the FCN the closed-form arc-cosine kernel of
    depth 2 (sigma_w2 = 2, sigma_b2 = 1); for the CNN the authors' Monte Carlo estimate, M draws of the same
    prior with the penultimate readout (bench/empirical_log_prior.py --arch cnn measures its error)."""
    import flatfast

    if config.arch == "fcn":
        return flatfast.nngp_kernel(X_prior, depth=2, sigma_w2=2.0, sigma_b2=1.0)
    draws = kernel_draws(config, len(X_prior))
    net = make_cnn(IMAGE_SHAPES[config.data], config.channels, seed=0)
    K, stderr = flatfast.empirical_nngp_kernel(net, X_prior, kernel_samples=draws, seed=0, return_stderr=True)
    off_diagonal = ~np.eye(len(K), dtype=bool)
    log(f"empirical NNGP kernel of the CNN: M = {draws} draws (penultimate readout), Monte Carlo standard error "
        f"of its entries {np.median(stderr[off_diagonal] / np.abs(K[off_diagonal])):.2%} of their size (median)")
    return K
