"""Every generalization predictor's cost, as multiples of one forward+backward pass over the same data, and the
Laplace evidence against laplace-torch on the same model in the same run.

The model is the experiment's FCN (64-40-40-1, the authors' architecture, 4,281 parameters) on |S| = 500 of the
digits, float64, trained for 200 full-batch steps so that its training accuracy is high (the PAC-Bayes search needs
room to drop 0.1), the mean BCE loss -- what ``flatfast reproduce --measures all`` measures for each network, with
its settings (flatfast.experiments.predictors). laplace-torch runs ``Laplace(model, "classification",
subset_of_weights="all", hessian_structure="full")``, whose full GGN it forms (P^2 numbers), on the same network
with the logits (0, z) for its one logit z: laplace-torch's classification is softmax cross-entropy, under which a
single logit has zero loss and zero curvature, and softmax over (0, z) is the BCE of z, with the same parameters and
the same GGN. flatfast's default route at this size is stochastic Lanczos quadrature on GGN products. Its value must
lie within 4 of SLQ's standard errors of laplace-torch's. laplace-torch pulls a newer torch and a torchvision that
stops transformers from importing beside a CPU torch: install it with ``pip install --no-deps laplace-torch==0.3``
(curvlinops-for-pytorch and asdfghjkl beside it); the row is skipped, saying so, without it.
"""
import numpy as np
import pytest
import torch

import flatfast
from flatfast.experiments import predictors

N_TRAIN = 500
RESULTS = {}


@pytest.fixture(scope="module")
def trained():
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data[:N_TRAIN] / 16.0, dtype=torch.float64)
    y = torch.tensor((digits.target[:N_TRAIN] >= 5).astype(float))[:, None]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
                                torch.nn.Linear(40, 1)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    bce = torch.nn.BCEWithLogitsLoss()
    for _ in range(200):
        optimizer.zero_grad()
        bce(model(X), y).backward()
        optimizer.step()
    return model, (X.numpy(), y.numpy()[:, 0]), [(X, y)]


def _forward_backward(model, data):
    model.zero_grad()
    x, y = data[0]
    torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()


def test_forward_backward_floor(benchmark, trained):
    model, _, data = trained
    benchmark.group = "predictors"
    benchmark.name = "predictors-forward-backward"
    benchmark.pedantic(_forward_backward, args=(model, data), rounds=20, iterations=5, warmup_rounds=2)


@pytest.mark.parametrize("name", list(predictors.OTHERS))
def test_measure(benchmark, trained, name):
    model, S, _ = trained
    benchmark.group = "predictors"
    benchmark.name = f"predictors-{name}"
    benchmark.extra_info["baseline"] = ["predictors-forward-backward"]
    row = benchmark.pedantic(predictors.record, args=(model, S, [name], 0), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["value"] = f"{row[name]:.6g}" + (f" +- {row[name + '_stderr']:.2g}"
                                                          if name + "_stderr" in row else "")
    RESULTS[name] = row


class _TwoLogits(torch.nn.Module):
    """The binary network as a two-class one for a softmax cross-entropy: logits (0, z)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        z = self.net(x)
        return torch.cat([torch.zeros_like(z), z], dim=1)


def test_laplace_torch(benchmark, trained):
    laplace = pytest.importorskip("laplace", reason="laplace-torch is not installed (pip install --no-deps "
                                                    "laplace-torch==0.3)")
    net, _, data = trained
    model = _TwoLogits(net)
    x, y = data[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y[:, 0].long()), batch_size=N_TRAIN)
    benchmark.group = "predictors"
    benchmark.name = "predictors-laplace-torch-full"
    benchmark.extra_info["baseline"] = ["predictors-forward-backward"]

    def run():
        la = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure="full",
                             prior_precision=predictors.PRIOR_PRECISION)
        la.fit(loader)
        return float(la.log_marginal_likelihood())

    theirs = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["value"] = f"{theirs:.6g}"
    ours = RESULTS.get("laplace_evidence")
    if ours is not None:
        benchmark.extra_info["flatfast's SLQ value - this one"] = \
            f"{ours['laplace_evidence'] - theirs:+.3g} (flatfast's stderr {ours['laplace_evidence_stderr']:.2g})"
        assert abs(ours["laplace_evidence"] - theirs) <= 4 * ours["laplace_evidence_stderr"]
    exact = flatfast.laplace_evidence(net, data, loss_fn=torch.nn.BCEWithLogitsLoss(), method="exact",
                                      prior_precision=predictors.PRIOR_PRECISION)
    benchmark.extra_info["flatfast exact - this one"] = f"{exact.value - theirs:+.2e}"
    assert abs(exact.value - theirs) <= 1e-6 * abs(theirs)


def test_laplace_flatfast_slq_against_laplace_torch(benchmark, trained):
    """The same evidence by flatfast's SLQ, as its own row, against laplace-torch's full-GGN row."""
    model, _, data = trained
    benchmark.group = "predictors"
    benchmark.name = "predictors-laplace-flatfast-slq"
    benchmark.extra_info["baseline"] = ["predictors-laplace-torch-full", "predictors-forward-backward"]
    res = benchmark.pedantic(flatfast.laplace_evidence, args=(model, data),
                             kwargs=dict(loss_fn=torch.nn.BCEWithLogitsLoss(), method="slq",
                                         prior_precision=predictors.PRIOR_PRECISION), rounds=3, iterations=1)
    benchmark.extra_info["value"] = f"{res.value:.6g} +- {res.stderr:.2g}"
    assert np.isfinite(res.value)
