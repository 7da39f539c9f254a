"""The experiment of Zhang, Reid, Valle Pérez & Louis (arXiv 2103.06219) as one command: ``flatfast reproduce``.

Their protocol (docs/guide/protocol.md states it step by step, beside flatfast's defaults and every departure), by
default: a fully connected ReLU network d-40-40-1
(weights N(0, 2/fan_in), biases N(0, 1): the NNGP prior with sigma_w2 = 2, sigma_b2 = 1), one logit with sigmoid
cross-entropy, is trained on a binarised image set S (label 1 iff digit >= 5) together with an attack set A of
other images whose labels are flipped, until the first epoch with 100 % accuracy on S (A need not be fitted).
The larger A, the worse it generalises. For each network that gets there we record the test error on E,
log P(f) for f = (true labels on S, the network's predictions on E) by EP under both likelihoods (probit, GPy's
link, is what the published plots use), and the flatness of the mean training loss on S alone: Hessian trace,
top eigenvalue, Frobenius norm and Keskar's epsilon-sharpness (SGD ascent, their procedure). Each SGD network is
also alpha-scaled (W1, b1 / 5.9; W2 * 5.9) and measured again: same function, same log P(f), much sharper.
The PAC-Bayes bound of Valle-Pérez et al. from log P(U) of S's labels stands beside the measured error.

``--arch cnn`` is their third experiment's recipe (a CNN with a Monte Carlo NNGP kernel) on a small ReLU CNN:
conv3x3 -> ReLU -> conv3x3 -> ReLU -> 2x2 max pool -> one logit, the same prior; log P(f) from the empirical
kernel of the architecture (penultimate readout, M draws); the alpha-scale on the Conv -> ReLU -> Conv pair; the
trace exact (the network is piecewise linear in each parameter). ``--data cifar10`` reads the CIFAR-10 python
batches for their car-vs-cat task.

Rows are appended to results.csv as each network finishes, so a killed run loses nothing and ``--resume``
continues it (with the same settings only). ``--shard i/N`` runs every N-th (optimizer, |A|) group of the grid
and ``--merge`` combines shard directories. ``--experiment temporal`` is the paper's Fig. 5
(flatfast.experiments.temporal).

The package, one idea a module: ``config`` (the settings and their checks), ``data`` (the data sets),
``training`` (the networks and the training rule), ``measurement`` (what is recorded of a network), ``table``
(the durable results table), ``grid`` (the configurations, serial or in --jobs workers, and --merge),
``statistics`` and ``plots`` (what a table shows), ``cli`` (``flatfast reproduce``) and ``temporal`` (the
temporal experiment, built from the same pieces).
"""
from flatfast.experiments.config import IMAGE_SHAPES, Config
from flatfast.experiments.data import load_data
from flatfast.experiments.grid import merge, run
from flatfast.experiments.measurement import kernel_draws, measure, prior_kernel
from flatfast.experiments.statistics import correlations, summarise
from flatfast.experiments.table import read_table
from flatfast.experiments.temporal import TemporalConfig, run_temporal
from flatfast.experiments.training import make_cnn, make_network, train

__all__ = ["Config", "IMAGE_SHAPES", "TemporalConfig", "correlations", "kernel_draws", "load_data", "make_cnn",
           "make_network", "measure", "merge", "prior_kernel", "read_table", "run", "run_temporal", "summarise",
           "train"]
