"""The networks (drawn from the NNGP prior), their optimizers and the training rule: SGD, Adam or Entropy-SGD on
S u A until the first epoch with 100 % accuracy on S."""
import itertools
import math

import numpy as np

from flatfast.experiments.config import IMAGE_SHAPES, OPTIMIZERS


def run_seed(seed, attack, optimizer_name):
    """The seed of one configuration (initialisation, shuffling, probes), derived by numpy's SeedSequence from
    (seed, |A|, optimizer): distinct configurations get independent streams at any grid size (the earlier
    1000 * seed + |A| gave seed 1 with |A| = 0 and seed 0 with |A| = 1000 the same network and batches)."""
    import zlib

    entropy = [int(seed), int(attack), zlib.crc32(optimizer_name.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def make_model(config, d, seed):
    """The network of ``config.arch`` for d-dimensional (flattened) inputs, drawn from the paper's prior."""
    if config.arch == "cnn":
        return make_cnn(IMAGE_SHAPES[config.data], config.channels, seed)
    return make_network(d, config.width, seed)


def make_cnn(image_shape, channels, seed):
    """A small ReLU CNN on flattened images of ``image_shape`` (c, h, w): unflatten -> conv3x3(c -> channels) ->
    ReLU -> conv3x3(channels -> channels) -> ReLU -> 2x2 max pool -> flatten -> Linear(-> 1), padding 1, float64;
    weights N(0, 2/fan_in), biases N(0, 1) (one draw of the prior its empirical NNGP kernel averages over).
    The two convolutions are the Conv -> ReLU -> Conv pair the alpha-scale acts on."""
    import torch
    import torch.nn as nn

    from flatfast.kernel.empirical import _draw_from_prior

    c, h, w = image_shape
    model = nn.Sequential(nn.Unflatten(1, image_shape), nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(channels * (h // 2) * (w // 2), 1)).double()
    with torch.no_grad():
        _draw_from_prior(model, torch.Generator().manual_seed(seed), 2.0, 1.0)
    return model


def make_network(d, width, seed):
    """d-width-width-1 ReLU network, weights N(0, 2/fan_in), biases N(0, 1) (float64): the same prior draw as
    make_cnn's and the empirical kernel's (flatfast.kernel.empirical), from its own generator seeded with ``seed``."""
    import torch

    from flatfast.kernel.empirical import _draw_from_prior

    model = torch.nn.Sequential(torch.nn.Linear(d, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                torch.nn.ReLU(), torch.nn.Linear(width, 1)).double()
    with torch.no_grad():
        _draw_from_prior(model, torch.Generator().manual_seed(seed), 2.0, 1.0)
    return model


def make_optimizer(model, optimizer_name, config, seed):
    import torch

    from flatfast.optim import EntropySGD

    if optimizer_name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr)
    if optimizer_name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    if optimizer_name == "entropy-sgd":
        # The authors do not publish their Entropy-SGD settings; EntropySGD's defaults are flatfast's (its docstring
        # says why the outer step is 1 / gamma).
        return EntropySGD(model.parameters(), seed=seed)
    raise ValueError(f"--optimizers: unknown optimizer {optimizer_name!r} ({', '.join(OPTIMIZERS)})")


def train_epoch(model, opt, optimizer_name, Xt, yt, batch_size, gen):
    """One pass of minibatches (Entropy-SGD: as many outer steps as take about one pass of minibatches)."""
    import torch

    loss_fn = torch.nn.BCEWithLogitsLoss()
    order = torch.randperm(len(yt), generator=gen)
    batches = [order[i: i + batch_size] for i in range(0, len(yt), batch_size)]
    if optimizer_name == "entropy-sgd":
        stream = itertools.cycle(batches)

        def closure():
            idx = next(stream)
            opt.zero_grad()
            loss = loss_fn(model(Xt[idx]), yt[idx])
            loss.backward()
            return loss

        for _ in range(max(1, math.ceil(len(batches) / opt.param_groups[0]["inner_steps"]))):
            opt.step(closure)
        return
    for idx in batches:
        opt.zero_grad()
        loss_fn(model(Xt[idx]), yt[idx]).backward()
        opt.step()


def accuracy(model, X, y):
    """Fraction of X the one-logit model classifies as y (flatfast.function_of: logit >= 0 is label 1); NaN for an
    empty set."""
    import torch

    import flatfast

    if len(y) == 0:
        return float("nan")
    return float(np.mean(flatfast.function_of(model, torch.from_numpy(X)) == 2 * y - 1))


def fit(model, opt, optimizer_name, Xt, yt, S, batch_size, gen, max_epochs, progress=None):
    """Epochs of minibatches on (Xt, yt) until the first after which every point of S is classified correctly
    (the authors' rule), or max_epochs: (epochs, reached, accuracy on S). ``progress(epoch, accuracy on S)`` is
    called after every epoch.

    Training runs on one torch thread whatever the process has: float32 products summed by two threads round
    differently from one, and a network trained in a --jobs worker (one thread) must be the network of a serial
    run (measured: with float32 training, 6 of 34 rows of the quick run differed between the two)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for epoch in range(1, max_epochs + 1):
            train_epoch(model, opt, optimizer_name, Xt, yt, batch_size, gen)
            accuracy_S = accuracy(model, *S)
            if progress is not None:
                progress(epoch, accuracy_S)
            if accuracy_S == 1.0:
                return epoch, True, accuracy_S
        return max_epochs, False, accuracy_S
    finally:
        torch.set_num_threads(threads)


def train(model, S, A, optimizer_name, config, seed, progress=None):
    """Train on S u A until the first epoch after which every point of S is classified correctly (A need not be
    fitted), or max_epochs. Returns (epochs, reached, accuracy on S, accuracy on A)."""
    import torch

    X = np.concatenate([S[0], A[0]])
    y = np.concatenate([S[1], A[1]])
    dtype = next(model.parameters()).dtype  # the training precision (the measurements run in float64)
    Xt, yt = torch.from_numpy(X).to(dtype), torch.from_numpy(y.astype(np.float64)).to(dtype)[:, None]
    opt = make_optimizer(model, optimizer_name, config, seed)
    gen = torch.Generator().manual_seed(seed)
    epochs, reached, accuracy_S = fit(model, opt, optimizer_name, Xt, yt, S, config.batch_size, gen,
                                      config.max_epochs, progress)
    return epochs, reached, accuracy_S, accuracy(model, *A)


def every_seconds(log, seconds=10.0):
    """A ``say(message)`` that passes a message to ``log`` when ``seconds`` have passed since it last did (or
    since it was made): a line at least that often through long training, and no flood."""
    import time

    last = [time.perf_counter()]

    def say(message):
        now = time.perf_counter()
        if now - last[0] >= seconds:
            last[0] = now
            log(message)

    return say
