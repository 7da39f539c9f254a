"""Entropy-SGD (Chaudhari et al., ICLR 2017) as a torch.optim.Optimizer."""
from __future__ import annotations

import math
from typing import Iterable

import torch


class EntropySGD(torch.optim.Optimizer):
    r"""Entropy-SGD: gradient descent on the local entropy of the loss.

    Each :meth:`step` runs ``inner_steps`` steps of stochastic gradient Langevin dynamics on
    :math:`f(x') + \frac{\gamma}{2}\|x' - x\|^2` from the current weights x, keeps an exponential average
    :math:`\mu \leftarrow (1-\alpha)\mu + \alpha x'`, and then moves the weights along the local-entropy gradient
    :math:`\gamma (x - \mu)`: :math:`x \leftarrow x - \eta\,\gamma (x - \mu)`. The defaults follow the paper's
    settings (L = 20 inner steps, inner step 0.1, gamma = 0.03, Langevin noise 1e-4, alpha = 0.75).

    ``step(closure)`` needs a closure that draws a minibatch, zeroes the gradients, computes the loss, calls
    ``backward()`` and returns the loss; it is called ``inner_steps`` times per step.

    Examples
    --------
    >>> import torch
    >>> from flatfast.optim import EntropySGD
    >>> w = torch.nn.Parameter(torch.tensor([3.0]))
    >>> opt = EntropySGD([w], lr=1.0, seed=0)
    >>> def closure():
    ...     opt.zero_grad(); loss = (w ** 2).sum(); loss.backward(); return loss
    >>> for _ in range(100):
    ...     _ = opt.step(closure)
    >>> abs(float(w)) < 0.5
    True
    """

    def __init__(self, params: Iterable, lr: float = 1.0, inner_steps: int = 20, inner_lr: float = 0.1,
                 gamma: float = 0.03, noise: float = 1e-4, alpha: float = 0.75, seed: int = 0) -> None:
        if lr <= 0 or inner_lr <= 0 or gamma <= 0 or noise < 0 or not 0 < alpha <= 1 or inner_steps < 1:
            raise ValueError("EntropySGD: lr, inner_lr, gamma > 0, noise >= 0, 0 < alpha <= 1, inner_steps >= 1")
        super().__init__(params, dict(lr=lr, inner_steps=inner_steps, inner_lr=inner_lr, gamma=gamma, noise=noise,
                                      alpha=alpha))
        self._generator = torch.Generator().manual_seed(int(seed))

    def step(self, closure=None):
        if closure is None:
            raise ValueError("closure: EntropySGD needs a closure that evaluates a minibatch loss")
        for group in self.param_groups:
            anchors = [p.detach().clone() for p in group["params"]]
            means = [p.detach().clone() for p in group["params"]]
            loss = None
            for _ in range(group["inner_steps"]):
                with torch.enable_grad():
                    loss = closure()
                with torch.no_grad():
                    for p, x, mu in zip(group["params"], anchors, means):
                        grad = p.grad if p.grad is not None else torch.zeros_like(p)
                        drift = grad + group["gamma"] * (p - x)
                        noise = torch.randn(p.shape, generator=self._generator, dtype=p.dtype).to(p.device)
                        p.add_(-group["inner_lr"] * drift + math.sqrt(group["inner_lr"]) * group["noise"] * noise)
                        mu.mul_(1 - group["alpha"]).add_(group["alpha"] * p)
            with torch.no_grad():
                for p, x, mu in zip(group["params"], anchors, means):
                    p.copy_(x - group["lr"] * group["gamma"] * (x - mu))
        return loss
