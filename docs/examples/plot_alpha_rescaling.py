"""
The α-rescaling of one network
==============================

Divide a ReLU layer by α and multiply the next by α: the network computes the same function, so its prior
log P(f) cannot change, while every flatness measure of its loss does. This example trains one small network on
the digits, rescales it for several α, and measures both.
"""

# %%
# A small ReLU network trained on scikit-learn's digits (label 1 iff the digit is ≥ 5), as in the paper.
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
loss_fn = torch.nn.BCEWithLogitsLoss()
for epoch in range(300):
    optimizer.zero_grad()
    loss_fn(model(X), y).backward()
    optimizer.step()
print(f"training accuracy {float(((model(X) > 0) == (y > 0.5)).double().mean()):.3f}")

# %%
# Rescale and measure. The trace is exact for this piecewise-linear network; log P(f) is taken over the
# training points and 200 held-out ones, f being the network's own labelling of them.
data = [(X, y)]
X_all = torch.tensor(digits.data[:500] / 16.0, dtype=torch.float64)
alphas = [1 / 4, 1 / 2, 1, 2, 4, 5.9]
traces, priors = [], []
for alpha in alphas:
    scaled = flatfast.rescale(model, alpha)
    same = torch.allclose(scaled(X_all), model(X_all))
    traces.append(flatfast.hessian_trace(scaled, data, loss_fn=loss_fn).value)
    f = flatfast.function_of(scaled, X_all)
    priors.append(flatfast.log_prior(X_all.numpy(), f))
    print(f"alpha = {alpha:5.3f}: same function {same}, trace {traces[-1]:10.3f}, log P(f) {priors[-1]:.3f}")

# %%
# The trace moves by orders of magnitude; log P(f) does not move at all.
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
left.loglog(alphas, traces, "o-")
left.set_xlabel("α (layer 1 divided, layer 2 multiplied)")
left.set_ylabel("Hessian trace of the training loss")
right.semilogx(alphas, priors, "o-", color="C1")
right.set_xlabel("α")
right.set_ylabel("log P(f)  (nats)")
right.set_ylim(min(priors) - 5, max(priors) + 5)
fig.tight_layout()
