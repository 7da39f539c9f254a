"""
Trace and spectrum of a CNN
===========================

The Hessian trace of a small ReLU CNN, three ways: exactly (the network is piecewise linear in each parameter,
so its Hessian's diagonal is the Gauss-Newton diagonal), by Hutch++ and by plain Hutchinson, each with its
standard error; then the top eigenvalues by Lanczos and the spectral density by stochastic Lanczos quadrature.
"""

# %%
import matplotlib.pyplot as plt
import torch

import flatfast

torch.manual_seed(0)
cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                          torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                          torch.nn.Linear(8 * 4 * 4, 10))
images, labels = torch.randn(256, 1, 8, 8), torch.randint(0, 10, (256,))
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=64)
print("parameters:", sum(p.numel() for p in cnn.parameters()))

# %%
# The exact trace, and two estimates of it with the same budget of 60 products.
exact = flatfast.hessian_trace(cnn, loader, method="exact")
hutchpp = flatfast.hessian_trace(cnn, loader, method="hutch++", probes=60, seed=1)
hutchinson = flatfast.hessian_trace(cnn, loader, method="hutchinson", probes=60, seed=1)
for result in (exact, hutchpp, hutchinson):
    print(result)

# %%
# ``method="auto"`` (the default) picks the cheapest honest route and says which.
print(flatfast.hessian_trace(cnn, loader).method)

# %%
# The top eigenvalues with their residuals, and the spectral density.
top = flatfast.hessian_eigenvalues(cnn, loader, k=3)
print("top eigenvalues", top.values, "residuals", top.residuals)
spectrum = flatfast.hessian_spectrum(cnn, loader, probes=4, iterations=40)
ax = spectrum.plot()
ax.set_yscale("log")
ax.set_title("Hessian spectral density of a small CNN (SLQ, 4 probes)")
plt.tight_layout()
