"""
The PAC-Bayes bound from log P(U)
=================================

Valle-Pérez et al.'s bound turns the prior probability of the training labels U into a bound on the expected
error of the Bayesian learner that samples functions consistent with U. The more random the labels -- here,
training sets with a growing fraction of flipped labels -- the smaller P(U) and the looser the bound; the
measured test error of a network fitted to each training set is shown beside it.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits

import flatfast

digits = load_digits()
X = digits.data / 16.0
y = (digits.target >= 5).astype(float)
m = 300
X_train, X_test, y_test = X[:m], X[m:], y[m:]

fractions = [0.0, 0.1, 0.2, 0.3, 0.5]
bounds, errors = [], []
for fraction in fractions:
    y_train = y[:m].copy()
    flip = np.random.default_rng(0).choice(m, int(fraction * m), replace=False)
    y_train[flip] = 1 - y_train[flip]
    log_p_train = flatfast.log_prior(X_train, 2 * y_train - 1)
    bounds.append(flatfast.pac_bayes_bound(log_p_train, m=m))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
                                torch.nn.Linear(40, 1)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    Xt, yt = torch.tensor(X_train), torch.tensor(y_train)[:, None]
    for epoch in range(400):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(Xt), yt).backward()
        optimizer.step()
    errors.append(float(np.mean((flatfast.function_of(model, torch.tensor(X_test)) > 0) != (y_test > 0.5))))
    print(f"{fraction:.0%} flipped: log P(U) = {log_p_train:8.2f}, bound {bounds[-1]:.3f}, "
          f"a fitted network's test error {errors[-1]:.3f}")

# %%
fig, ax = plt.subplots(figsize=(5.5, 3.5))
ax.plot(fractions, bounds, "o-", label="PAC-Bayes bound (δ = 2⁻¹⁰)")
ax.plot(fractions, errors, "s--", label="one fitted network's test error")
ax.set_xlabel("fraction of training labels flipped")
ax.set_ylabel("error")
ax.set_ylim(0, 1)
ax.legend(fontsize=8)
fig.tight_layout()
