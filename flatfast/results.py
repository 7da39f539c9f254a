"""Result records. Each carries its uncertainty or convergence information beside the value."""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np


@dataclasses.dataclass
class EPResult:
    """Outcome of one EP run (see :func:`flatfast.ep_log_evidence`).

    log_z: the EP estimate of log P(f) (nats); for method="tilting" or "smc", the log of the unbiased Monte Carlo
    estimate of P(f) (so biased low by about stderr**2 / 2).
    stderr: standard error of log_z (0 for plain EP, which is deterministic but biased; see ep_log_z vs log_z).
    pareto_k: the tail shape of the importance weights (tilting): below 0.5 the stderr is backed, above 0.7
    neither value nor stderr is (a warning says so). log_upper_bound: Botev's deterministic bound
    log P(f) <= psi* (tilting; nan where it does not apply).
    sweeps, converged, damping (the final damping factor, 1 = undamped), max_site_change (the last proposed,
    undamped relative change of the site parameters), log_z_history (log Z_EP after each
    sweep), seconds, likelihood, method, ep_log_z (plain EP's value), ess (importance sampling's effective
    sample size), n_samples, float32_sweeps (of ``sweeps``, how many ran in float32 under precision="mixed"),
    correction (Opper, Paquet & Winther's second-order correction to log_z, with ``correction=True``; see
    :func:`flatfast.log_prior`) and corrected_log_z; for method="smc", smc_runs (each independent run's log
    estimate of P(f)), smc_stages (the number of stages, which every run shares) and smc_bounces (wall reflections per
    Hamiltonian trajectory, averaged over all moves).
    """

    log_z: float
    sweeps: int
    converged: bool
    damping: float
    max_site_change: float
    log_z_history: List[float]
    seconds: float
    likelihood: str
    method: str = "ep"
    stderr: float = 0.0
    ep_log_z: Optional[float] = None
    ess: Optional[float] = None
    n_samples: int = 0
    float32_sweeps: int = 0
    pareto_k: Optional[float] = None
    log_upper_bound: Optional[float] = None
    site_precision: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)
    site_natural_mean: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)
    labels: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)  # the signs it was run for
    correction: Optional[float] = None
    smc_runs: Optional[List[float]] = None
    smc_stages: Optional[int] = None
    smc_bounces: Optional[float] = None

    @property
    def corrected_log_z(self):
        """log_z plus the second-order correction (None unless it was asked for with ``correction=True``)."""
        return None if self.correction is None else self.log_z + self.correction

    def __float__(self):
        return float(self.log_z)

    def __repr__(self):
        value = f"{self.log_z:.6g}" if self.method == "ep" else f"{self.log_z:.6g} ± {self.stderr:.2g}"
        parts = [value, f"method={self.method!r}", f"likelihood={self.likelihood!r}",
                 f"sweeps={self.sweeps}", f"converged={self.converged}"]
        if self.method != "ep" and self.ep_log_z is not None:
            parts.append(f"ep_log_z={self.ep_log_z:.6g}")
        if self.correction is not None:
            parts.append(f"correction={self.correction:+.4g}")
        if self.pareto_k is not None:
            parts.append(f"pareto_k={self.pareto_k:.2f}")
        if self.smc_stages is not None:
            parts.append(f"smc_stages={self.smc_stages}")
        return f"EPResult({', '.join(parts)})"
