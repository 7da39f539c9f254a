"""
Which measures a rescaling moves
================================

Divide one ReLU layer by α and multiply the next by α: the network computes the same function. This example
trains one small network on the digits, rescales it for several α, and measures every generalization predictor
flatfast has. The Hessian measures and the Laplace evidence move; the measures built to be invariant -- adaptive
sharpness, relative flatness, the Fisher-Rao norm, magnitude-aware PAC-Bayes flatness, the path norm -- and
log P(f) do not.
"""

# %%
# A small ReLU network trained on scikit-learn's digits (label 1 iff the digit is ≥ 5), in float64.
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits

import flatfast

digits = load_digits()
X = torch.tensor(digits.data[:300] / 16.0, dtype=torch.float64)
y = torch.tensor((digits.target[:300] >= 5).astype(float))[:, None]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
                            torch.nn.Linear(40, 1)).double()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
bce = torch.nn.BCEWithLogitsLoss()
for epoch in range(300):
    optimizer.zero_grad()
    bce(model(X), y).backward()
    optimizer.step()
data = [(X, y)]
X_all = torch.tensor(digits.data[:500] / 16.0, dtype=torch.float64)

# %%
# Every measure of the network and of its rescaled copies. The random ones (the average adaptive sharpness, the
# PAC-Bayes flatness) take the same seed, so they see the same draws in every copy.
measures = {
    "Hessian trace": lambda m: flatfast.hessian_trace(m, data, loss_fn=bce).value,
    "top eigenvalue": lambda m: flatfast.hessian_eigenvalues(m, data, loss_fn=bce).values[0],
    "Laplace evidence": lambda m: flatfast.laplace_evidence(m, data, loss_fn=bce, method="slq", seed=0).value,
    "adaptive sharpness": lambda m: flatfast.adaptive_sharpness(m, data, rho=0.05, loss_fn=bce).value,
    "relative flatness": lambda m: flatfast.relative_flatness(m, data, loss_fn=bce).value,
    "Fisher-Rao norm": lambda m: flatfast.fisher_rao_norm(m, data, loss_fn=bce).value,
    "PAC-Bayes flatness": lambda m: flatfast.pac_bayes_flatness(m, data, eps=0.0, draws=8, seed=0).value,
    "path norm": lambda m: flatfast.path_norm(m, data).value,
    "log P(f)": lambda m: flatfast.log_prior(X_all.numpy(), flatfast.function_of(m, X_all)),
}
alphas = [1 / 4, 1 / 2, 1, 2, 4]
values = {name: [] for name in measures}
for alpha in alphas:
    scaled = flatfast.rescale(model, alpha)
    for name, measure in measures.items():
        values[name].append(float(measure(scaled)))
base = alphas.index(1)
for name, series in values.items():
    change = max(abs(v - series[base]) / abs(series[base]) for v in series)
    print(f"{name:<20} at alpha = 1: {series[base]:12.6g}   largest relative change over alpha: {change:.1e}")

# %%
# Each measure over α, divided by its value at α = 1: the invariant ones lie on 1, to rounding.
fig, ax = plt.subplots(figsize=(8, 4.5))
for name, series in values.items():
    ratio = np.abs(np.asarray(series) / series[base])
    ax.loglog(alphas, ratio, "o-", label=name)
ax.set_xlabel("α (layer 1 divided, layer 2 multiplied)")
ax.set_ylabel("measure ÷ its value at α = 1")
ax.legend(fontsize=8, ncol=2)
fig.tight_layout()
