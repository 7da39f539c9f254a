"""Entropy-SGD (Chaudhari et al., ICLR 2017) as a torch.optim.Optimizer."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch


class EntropySGD(torch.optim.Optimizer):
    r"""Entropy-SGD (Chaudhari et al., ICLR 2017): gradient descent on the local entropy of the loss.

    Each :meth:`step` runs ``inner_steps`` steps of stochastic gradient Langevin dynamics on
    :math:`f(x') + \frac{\gamma}{2}\|x' - x\|^2` from the current weights x, keeps an exponential average
    :math:`\mu \leftarrow (1-\alpha)\mu + \alpha x'`, and then moves the weights along the local-entropy gradient
    :math:`\gamma (x - \mu)`: :math:`x \leftarrow x - \eta\,\gamma (x - \mu)`.

    The defaults are the settings ``flatfast reproduce`` trains with (Zhang et al. did not publish theirs): 20
    inner steps of 0.1, gamma = 0.03, Langevin noise 1e-4, alpha = 0.75, and an outer step of 1 / gamma, which
    moves the weights to the Langevin average after each inner loop. With an outer step of 1 the experiment's
    networks did not fit their training set within 2000 epochs on the digits with an attack set.

    ``step(closure)`` needs a closure that draws a minibatch, zeroes the gradients, computes the loss, calls
    ``backward()`` and returns the loss; it is called ``inner_steps`` times per step.

    Parameters
    ----------
    params : iterable of parameters or parameter groups
        As for any torch optimizer.
    lr : float, optional
        The outer step :math:`\eta` along :math:`\gamma (x - \mu)`; default 1 / gamma.
    inner_steps : int
        Langevin steps per :meth:`step` (each calls the closure once).
    inner_lr : float
        The Langevin step size.
    gamma : float
        The coupling :math:`\gamma` that keeps the inner chain near x (the local-entropy scope).
    noise : float
        The Langevin noise scale (the chain's thermal noise; 0 for plain gradient steps).
    alpha : float in (0, 1]
        The averaging weight of :math:`\mu`.
    seed : int
        Seeds the Langevin noise: the same seed gives the same trajectory.

    Examples
    --------
    >>> import torch
    >>> from flatfast.optim import EntropySGD
    >>> w = torch.nn.Parameter(torch.tensor([3.0]))
    >>> opt = EntropySGD([w], seed=0)
    >>> def closure():
    ...     opt.zero_grad(); loss = (w ** 2).sum(); loss.backward(); return loss
    >>> for _ in range(20):
    ...     _ = opt.step(closure)
    >>> abs(float(w.detach())) < 0.5
    True
    """

    def __init__(self, params: Iterable, lr: Optional[float] = None, inner_steps: int = 20, inner_lr: float = 0.1,
                 gamma: float = 0.03, noise: float = 1e-4, alpha: float = 0.75, seed: int = 0) -> None:
        if lr is None:
            lr = 1.0 / gamma if gamma > 0 else 1.0
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
