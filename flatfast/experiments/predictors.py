"""The generalization predictors the experiment can record beside the paper's (``--measures``): every one
flatfast computes, on one footing -- the mean BCE loss on S alone, the trained network in eval mode, float64."""
import time
from collections import OrderedDict

import numpy as np

# name: (label, direction, invariant to the alpha-rescaling), direction +1 when a larger value should mean a larger
# error. The paper's measures first (log P(f) stands for both likelihoods' columns), then the others.
PAPER = OrderedDict([
    ("log_p", ("log P(f)", -1, True)),
    ("trace", ("Hessian trace", +1, False)),
    ("top_eigenvalue", ("top Hessian eigenvalue", +1, False)),
    ("frobenius", ("Hessian Frobenius norm", +1, False)),
    ("sharpness", ("epsilon-sharpness", +1, False)),
])
OTHERS = OrderedDict([
    ("adaptive_sharpness", ("adaptive sharpness (worst case)", +1, True)),
    ("adaptive_sharpness_average", ("adaptive sharpness (average case)", +1, True)),
    ("relative_flatness", ("relative flatness", +1, True)),
    ("fisher_rao_norm", ("Fisher-Rao norm", +1, True)),
    ("pac_bayes_flatness", ("PAC-Bayes flatness (1/sigma'^2, eps = 0)", +1, True)),
    ("path_norm", ("path norm", +1, True)),
    ("laplace_evidence", ("Laplace evidence", -1, False)),
])
INVARIANT = [name for name, (_, _, invariant) in OTHERS.items() if invariant]
CHOICES = ("paper", "invariant", "all")


def chosen(option):
    """The measures beyond the paper's that ``--measures`` asks for: "paper" none, "invariant" the invariant ones,
    "all" every one, or a comma-separated list of names. ValueError names an unknown one."""
    if option == "paper":
        return []
    if option == "invariant":
        return list(INVARIANT)
    if option == "all":
        return list(OTHERS)
    names = [name.strip() for name in str(option).split(",") if name.strip()]
    unknown = [name for name in names if name not in OTHERS and name not in PAPER]
    if unknown or not names:
        raise ValueError(f"--measures: expected paper, invariant, all or names from {', '.join(OTHERS)}; got "
                         f"{option!r}")
    return [name for name in OTHERS if name in names]


# The settings every run uses (the sources' defaults where they give one): adaptive sharpness with rho = 0.05 (a
# small multiple of each weight) for p = inf, 20 ascent steps and 20 draws; relative flatness of the last layer;
# PAC-Bayes with Jiang et al.'s accuracy drop 0.1 but no absolute noise floor (their eps = 1e-3 does not scale with
# the weights, so the alpha-rescaling moves it; with eps = 0 it cannot); the
# Laplace evidence's prior precision 1 (laplace-torch's default).
ADAPTIVE_RHO = 0.05
PRIOR_PRECISION = 1.0


def record(model, S, names, seed):
    """{column: value} of the measures ``names`` (and each one's seconds) of ``model`` on S's mean BCE loss."""
    import torch

    import flatfast

    Xs, ys = torch.from_numpy(S[0]), torch.from_numpy(S[1].astype(np.float64))[:, None]
    data = [(Xs, ys)]
    bce = torch.nn.BCEWithLogitsLoss()
    compute = {
        "adaptive_sharpness": lambda: flatfast.adaptive_sharpness(model, data, rho=ADAPTIVE_RHO, loss_fn=bce),
        "adaptive_sharpness_average": lambda: flatfast.adaptive_sharpness(model, data, rho=ADAPTIVE_RHO,
                                                                          kind="average", loss_fn=bce, seed=seed),
        "relative_flatness": lambda: flatfast.relative_flatness(model, data, loss_fn=bce, seed=seed),
        "fisher_rao_norm": lambda: flatfast.fisher_rao_norm(model, data, loss_fn=bce),
        "pac_bayes_flatness": lambda: flatfast.pac_bayes_flatness(model, data, eps=0.0, seed=seed),
        "path_norm": lambda: flatfast.path_norm(model, data),
        "laplace_evidence": lambda: flatfast.laplace_evidence(model, data, loss_fn=bce, seed=seed,
                                                              prior_precision=PRIOR_PRECISION),
    }
    row = {}
    for name in names:
        start = time.perf_counter()
        result = compute[name]()
        row[f"seconds_{name}"] = round(time.perf_counter() - start, 4)
        row[name] = result.value
        if name in STDERR_COLUMNS:
            row[f"{name}_stderr"] = result.stderr
        if name == "pac_bayes_flatness":
            row["pac_bayes_sigma"] = result.info["sigma"]
    return row


STDERR_COLUMNS = ("adaptive_sharpness_average", "relative_flatness", "pac_bayes_flatness", "laplace_evidence")
COLUMNS = [column for name in OTHERS for column in
           ([name] + ([f"{name}_stderr"] if name in STDERR_COLUMNS else [])
            + (["pac_bayes_sigma"] if name == "pac_bayes_flatness" else []))]
SECONDS_COLUMNS = [f"seconds_{name}" for name in list(PAPER) + list(OTHERS)]
