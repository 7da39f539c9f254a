"""Flatness measures, rescaling invariances, function_of, Entropy-SGD."""
import numpy as np
import pytest
import torch

import flatfast
from flatfast.optim import EntropySGD

from test_hessian import data, dense_hessian, mlp


class Quadratic(torch.nn.Module):
    """L(w) = 1/2 (w - w*)^T A (w - w*) with A = diag(a) as a 'model' whose output is its loss."""

    def __init__(self, a, w_star, w):
        super().__init__()
        self.register_buffer("a", torch.as_tensor(a, dtype=torch.float64))
        self.register_buffer("w_star", torch.as_tensor(w_star, dtype=torch.float64))
        self.w = torch.nn.Parameter(torch.as_tensor(w, dtype=torch.float64).clone())

    def forward(self, x):
        d = self.w - self.w_star
        return (0.5 * (self.a * d * d).sum()).expand(x.shape[0], 1)


def _identity_loss(outputs, targets):
    return outputs.mean()


def test_sharpness_of_a_quadratic_with_known_hessian():
    a = np.array([4.0, 1.0, 0.25, 9.0])
    w_star = np.array([0.5, -1.0, 2.0, 0.0])
    model = Quadratic(a, w_star, w_star)  # at the minimum, L = 0
    batches = [(torch.zeros(4, 1), torch.zeros(4, 1))]
    eps = 1e-3
    # max over the box |z_j| <= eps (|w_j| + 1) of 1/2 z^T A z is attained at a corner.
    expected = 100 * 0.5 * np.sum(a * (eps * (np.abs(w_star) + 1)) ** 2) / (1 + 0.0)
    got = flatfast.sharpness(model, batches, eps=eps, loss_fn=_identity_loss, method="sign-ascent", steps=20, seed=0)
    assert got == pytest.approx(expected, rel=1e-6)
    assert torch.equal(model.w.detach(), torch.as_tensor(w_star))  # parameters restored


def test_sgd_ascent_sharpness_reaches_the_corner_the_gradient_points_to():
    """The authors' procedure: SGD on -L from z = 0, clipped into the box after every step. Off the minimum by
    delta > 0, the ascent runs into the corner z = +box, where L is largest: 1/2 sum a (delta + box)^2."""
    a = np.array([4.0, 1.0, 0.25, 9.0])
    w_star = np.array([0.5, -1.0, 2.0, 0.0])
    delta = np.array([1e-3, 2e-3, 1e-3, 5e-4])
    model = Quadratic(a, w_star, w_star + delta)
    model.w.grad = torch.full((4,), 7.0, dtype=torch.float64)
    batches = [(torch.zeros(4, 1), torch.zeros(4, 1))] * 4  # four minibatches per epoch
    eps = 1e-3
    box = eps * (np.abs(w_star + delta) + 1)
    base = 0.5 * np.sum(a * delta ** 2)
    expected = 100 * (0.5 * np.sum(a * (delta + box) ** 2) - base) / (1 + base)
    got = flatfast.sharpness(model, batches, eps=eps, loss_fn=_identity_loss, method="sgd-ascent", epochs=20, lr=1.0)
    assert got == pytest.approx(expected, rel=1e-9)
    # a step too small to reach the corner within one epoch gives less: the maximum is over the iterates seen
    short = flatfast.sharpness(model, batches, eps=eps, loss_fn=_identity_loss, method="sgd-ascent", epochs=1,
                               lr=1e-3)
    assert 0 < short < expected
    assert torch.equal(model.w.detach(), torch.as_tensor(w_star + delta))  # parameters restored
    assert torch.equal(model.w.grad, torch.full((4,), 7.0, dtype=torch.float64))  # the caller's .grad untouched
    with pytest.raises(ValueError, match="method: expected one of"):
        flatfast.sharpness(model, batches, method="lbfgs")


class CountingLoader:
    """A loader that counts the passes over it and augments at random: every pass draws fresh noise."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0
        self.generator = torch.Generator().manual_seed(0)

    def __iter__(self):
        self.passes += 1
        for X, y in self.batches:
            yield X + 0.01 * torch.randn(X.shape, generator=self.generator, dtype=X.dtype), y


@pytest.mark.parametrize("budget, held", [(None, True), (1, False)])
def test_ascent_replays_the_batches_it_read_once(monkeypatch, budget, held):
    """The sgd-ascent evaluates the full loss after every step: from batches held since the first pass (the
    loader is read once per epoch, for the steps), or, past the byte budget, from the loader every time."""
    from flatfast.curvature import operator

    if budget is not None:
        monkeypatch.setattr(operator, "HELD_BATCH_BYTES", budget)
    model, batches = mlp(), data("mlp")
    loader = CountingLoader(batches)
    epochs = 3
    flatfast.sharpness(model, loader, eps=1e-3, epochs=epochs, lr=1e-2)
    steps = epochs * len(batches)
    # probe 1 + the first full loss 1 + one pass per epoch for the steps (+ a full loss per step when streamed)
    assert loader.passes == 2 + epochs + (0 if held else steps)
    # the held loss is one function of the parameters: the random augmentation was drawn once
    op = operator.HessianOperator(model, CountingLoader(batches))
    first = [X for (inputs, _) in op.held_batches() for X in inputs.tensors()]
    again = [X for (inputs, _) in op.held_batches() for X in inputs.tensors()]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) == held


def test_frobenius_norm_against_exact():
    model, batches = mlp(), data("mlp")
    H = dense_hessian(model, batches)
    exact = float(torch.linalg.norm(H))
    res = flatfast.frobenius_norm(model, batches, probes=400, seed=0)
    assert abs(res.value - exact) <= 4 * res.stderr and res.stderr < 0.1 * exact


def _binary_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 1)).double()


def test_rescale_keeps_the_function_and_log_prior_but_moves_flatness():
    model = _binary_mlp()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (60,), generator=g).double()[:, None]
    batches = [(X, y)]
    bce = torch.nn.BCEWithLogitsLoss()
    scaled = flatfast.rescale(model, 5.9)
    assert torch.allclose(scaled(X), model(X), rtol=1e-12, atol=1e-12)
    f, f_scaled = flatfast.function_of(model, X), flatfast.function_of(scaled, X)
    np.testing.assert_array_equal(f, f_scaled)  # the same labelling, so the same log P(f) ...
    flipped = f.copy()
    flipped[:5] *= -1  # ... while log P(f) does see a change of the function
    assert abs(flatfast.log_prior(X.numpy(), flipped) - flatfast.log_prior(X.numpy(), f)) > 0.1
    far = flatfast.rescale(model, 100.0)
    assert torch.allclose(far(X), model(X), rtol=1e-10, atol=1e-12)
    for other in (scaled, far):
        t_other = float(torch.trace(_dense(other, X, y, bce)))
        trace_est = flatfast.hessian_trace(other, batches, loss_fn=bce, rtol=0.05, seed=0)
        assert abs(trace_est.value - t_other) <= 4 * trace_est.stderr + 1e-9 * abs(t_other)
    e = flatfast.hessian_eigenvalues(model, batches, loss_fn=bce).values[0]
    e_far = flatfast.hessian_eigenvalues(far, batches, loss_fn=bce).values[0]
    assert abs(np.log10(e_far / e)) > 2
    assert model[0].weight.data_ptr() != scaled[0].weight.data_ptr()  # a copy; the original is unchanged


def test_rescale_divides_the_named_layer_and_multiplies_the_next():
    """The direction, exactly: dividing W1, b1 by alpha and multiplying W2 by alpha scales the Hessian's diagonal
    blocks of W1 and b1 by alpha^2, of W2 by 1/alpha^2, and leaves b2 and later layers alone."""
    model = _binary_mlp()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(80, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (80,), generator=g).double()[:, None]
    bce = torch.nn.BCEWithLogitsLoss()
    alpha = 5.9
    scaled = flatfast.rescale(model, alpha, divided_layer=0)
    torch.testing.assert_close(scaled[0].weight, model[0].weight / alpha, rtol=1e-15, atol=0)
    torch.testing.assert_close(scaled[0].bias, model[0].bias / alpha, rtol=1e-15, atol=0)
    torch.testing.assert_close(scaled[2].weight, model[2].weight * alpha, rtol=1e-15, atol=0)
    torch.testing.assert_close(scaled[2].bias, model[2].bias, rtol=0, atol=0)
    diag, diag_scaled = torch.diagonal(_dense(model, X, y, bce)), torch.diagonal(_dense(scaled, X, y, bce))
    sizes = [p.numel() for p in model.parameters()]
    blocks, blocks_scaled = diag.split(sizes), diag_scaled.split(sizes)
    factors = [alpha ** 2, alpha ** 2, alpha ** -2, 1.0, 1.0, 1.0]  # W1, b1, W2, b2, W3, b3
    for name, block, block_scaled, factor in zip("W1 b1 W2 b2 W3 b3".split(), blocks, blocks_scaled, factors):
        torch.testing.assert_close(block_scaled, factor * block, rtol=1e-9, atol=1e-14, msg=name)
    # where the divided layer holds most of the curvature the trace grows by nearly alpha^2
    share = float(blocks[0].sum() + blocks[1].sum()) / float(diag.sum())
    growth = float(diag_scaled.sum() / diag.sum())
    assert growth == pytest.approx(share * alpha ** 2 + float(blocks[2].sum()) / float(diag.sum()) / alpha ** 2
                                   + float(sum(b.sum() for b in blocks[3:])) / float(diag.sum()), rel=1e-9)
    assert growth > 0.5 * share * alpha ** 2 > 1


def _dense(model, X, y, loss_fn):
    from torch.func import functional_call

    params = dict(model.named_parameters())
    sizes = [p.numel() for p in params.values()]

    def loss(flat):
        d = {n: t.view(p.shape) for (n, p), t in zip(params.items(), flat.split(sizes))}
        return loss_fn(functional_call(model, d, (X,)), y)

    return torch.autograd.functional.hessian(loss, torch.cat([p.detach().reshape(-1) for p in params.values()]))


def test_rescale_of_a_conv_relu_conv_pair_keeps_the_function():
    """Conv -> ReLU -> Conv (with max pooling after) is rescaled like a Linear pair: the same function, the first
    convolution's Hessian block alpha^2 larger, the second's weight block alpha^2 smaller (exact traces)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(3, 2, 3),
                                torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                                torch.nn.Linear(8, 1)).double()
    g = torch.Generator().manual_seed(2)
    X = torch.randn(30, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (30, 1), generator=g).double()
    scaled = flatfast.rescale(model, 5.9)
    assert torch.allclose(scaled(X), model(X), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scaled[0].bias, model[0].bias / 5.9, rtol=1e-15, atol=0)
    torch.testing.assert_close(scaled[2].weight, model[2].weight * 5.9, rtol=1e-15, atol=0)
    bce = torch.nn.BCEWithLogitsLoss()
    diag, diag_scaled = torch.diagonal(_dense(model, X, y, bce)), torch.diagonal(_dense(scaled, X, y, bce))
    sizes = [p.numel() for p in model.parameters()]
    for block, block_scaled, factor in zip(diag.split(sizes), diag_scaled.split(sizes), [5.9 ** 2, 5.9 ** 2,
                                                                                         5.9 ** -2, 1.0, 1.0, 1.0]):
        torch.testing.assert_close(block_scaled, factor * block, rtol=1e-9, atol=1e-14)
    exact = flatfast.hessian_trace(scaled, [(X, y)], loss_fn=bce, method="exact").value
    assert exact == pytest.approx(float(diag_scaled.sum()), rel=1e-9)


def test_rescale_rejects_bad_arguments():
    model = _binary_mlp()
    with pytest.raises(ValueError, match="alpha: must be > 0"):
        flatfast.rescale(model, -1.0)
    with pytest.raises(ValueError, match="divided_layer: must index a Linear/Conv layer"):
        flatfast.rescale(model, 2.0, divided_layer=2)
    smooth = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    with pytest.raises(ValueError, match="separated by a ReLU and positively homogeneous modules only"):
        flatfast.rescale(smooth, 2.0)
    with pytest.raises(TypeError, match="layer: rescale's `layer` is now `divided_layer`"):
        flatfast.rescale(model, 2.0, layer=0)
    with pytest.raises(TypeError, match="model: rescale needs an nn.Sequential"):
        flatfast.rescale(torch.nn.Linear(2, 2), 2.0)


def test_function_of_two_logit_and_errors():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]))
        model.bias.zero_()
    np.testing.assert_array_equal(flatfast.function_of(model, torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]])), [-1, 1])
    with pytest.raises(ValueError, match="binary classifier"):
        flatfast.function_of(torch.nn.Linear(3, 4), torch.zeros(2, 3))


def test_entropy_sgd_minimises_a_convex_problem():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(20, 5, generator=g, dtype=torch.float64)
    b = torch.randn(20, generator=g, dtype=torch.float64)
    w_opt = torch.linalg.lstsq(A, b[:, None]).solution[:, 0]
    w = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = EntropySGD([w], lr=1.0, inner_lr=0.02, gamma=0.03, noise=1e-4, seed=0)

    def closure():
        opt.zero_grad()
        loss = ((A @ w - b) ** 2).mean()
        loss.backward()
        return loss

    start = float(((A @ w - b) ** 2).mean())
    for _ in range(300):
        opt.step(closure)
    final = float(((A @ w.detach() - b) ** 2).mean())
    best = float(((A @ w_opt - b) ** 2).mean())
    assert final < best + 1e-2 * (start - best)
    assert torch.allclose(w.detach(), w_opt, atol=0.05)


def test_flatness_report_has_every_measure():
    model, batches = mlp(), data("mlp")
    report = flatfast.flatness_report(model, batches, seed=0)
    H = dense_hessian(model, batches)
    evals = np.linalg.eigvalsh(H.numpy())
    assert report.trace.value == pytest.approx(evals.sum(), rel=1e-10)  # exact for a ReLU MLP
    assert report.top_eigenvalue == pytest.approx(evals[-1], rel=1e-3)
    assert report.sharpness >= 0 and np.isfinite(report.log_volume)
    exact_log_volume = -0.5 * np.sum(np.log(np.abs(evals) + 1e-3))
    assert abs(report.log_volume - exact_log_volume) < 5 * report.log_volume_stderr + 0.05 * abs(exact_log_volume)
    assert set(report.as_dict()) >= {"trace", "top_eigenvalue", "frobenius", "sharpness", "log_volume"}


def test_flatness_report_traces_exactly_where_the_network_allows():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(30, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    torch.manual_seed(4)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(18, 3)).double()
    small_smooth = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(25, 4), torch.nn.Tanh(),
                                       torch.nn.Linear(4, 3)).double()  # 119 parameters
    large_smooth = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(25, 120), torch.nn.Tanh(),
                                       torch.nn.Linear(120, 3)).double()  # 3,483 parameters
    exact = flatfast.flatness_report(cnn, [(X, y)], seed=0, slq_iterations=5).trace
    assert exact.method == "exact" and exact.stderr == 0.0
    by_units = flatfast.flatness_report(small_smooth, [(X, y)], seed=0, slq_iterations=5).trace
    assert by_units.method == "unit-vectors" and by_units.stderr == 0.0 and by_units.probes == 119
    assert by_units.value == pytest.approx(flatfast.hessian_trace(small_smooth, [(X, y)], method="unit-vectors").value)
    estimate = flatfast.flatness_report(large_smooth, [(X, y)], seed=0, slq_iterations=5).trace
    assert estimate.method == "hutch++" and estimate.stderr > 0


def test_every_long_call_takes_progress_and_gives_the_same_result(capsys):
    """progress=True draws a bar on stderr; the values are those of progress=False."""
    X = np.random.default_rng(0).random((200, 20))
    y = np.where(X[:, 0] > 0.5, 1, -1)
    assert flatfast.log_prior(X, y, progress=True) == flatfast.log_prior(X, y, progress=False)
    assert "flatfast EP (n = 200)" in capsys.readouterr().err
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    data = [(torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,)))]
    calls = {
        "Lanczos": lambda p: flatfast.hessian_eigenvalues(model, data, progress=p).values[0],
        "SLQ": lambda p: float(flatfast.hessian_spectrum(model, data, iterations=10, progress=p).nodes.sum()),
        "Frobenius": lambda p: flatfast.frobenius_norm(model, data, probes=8, progress=p).value,
        "sharpness": lambda p: flatfast.sharpness(model, data, eps=1e-3, epochs=3, progress=p),
        "trace": lambda p: flatfast.hessian_trace(model, data, method="hutchinson", probes=8, progress=p).value,
    }
    for name, call in calls.items():
        assert call(True) == call(False), name
        assert "flatfast" in capsys.readouterr().err, name
