"""The curvature engine asks what a model does before it picks a route: a random loss is refused wherever the
randomness comes from, and a per-example route runs only where the examples are independent. Each model here
is one a researcher brings; each call gives the dense Hessian's value or a clear error that says what to change.

Every dense value is checked twice: by reverse-over-reverse autograd (torch.autograd.functional.hessian) and by
central finite differences of the float64 gradient, which shares no code path with double backward."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import flatfast

B = 6  # examples per batch; also the side of the shared attention mask below


pytestmark = pytest.mark.usefixtures("float64_by_default")


# --- the models -------------------------------------------------------------------------------------------------

class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(F.dropout(torch.relu(self.fc1(x)), p=0.5, training=self.training))


class AttentionDropout(nn.Module):
    """Attention whose dropout_p follows the mode, as most hand-written attention does."""

    def __init__(self, d=4, p=0.3):
        super().__init__()
        self.qkv, self.head, self.p = nn.Linear(d, 3 * d), nn.Linear(d, 3), p

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return self.head(h.mean(dim=1))


class StochasticDepth(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.block, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.inner(x))
        if not self.training or bool(torch.rand(()) > 0.5):  # the residual branch survives half the time
            h = h + torch.relu(self.block(h))
        return self.head(h)


class GaussianNoise(nn.Module):
    """A noise layer that draws whatever the mode."""

    def forward(self, x):
        return x + 0.01 * torch.randn_like(x)


class MixesExamples(nn.Module):
    """Each example's output depends on every example of the batch, through a (B, B) matrix."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.mix = nn.Parameter(torch.eye(B) + 0.1 * torch.randn(B, B, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        return self.head(self.mix @ torch.relu(self.fc(x)))


class Recurrent(nn.Module):
    def __init__(self, cell, batch_first):
        super().__init__()
        self.rnn = cell(4, 5, batch_first=batch_first)
        self.head = nn.Linear(5, 3)
        self.batch_first = batch_first

    def forward(self, x):
        out = self.rnn(x)[0]
        return self.head(out[:, -1] if self.batch_first else out[-1])


class MaskedAttention(nn.Module):
    """Attention over L positions with one (L, L) additive mask shared by every example, passed beside x."""

    def __init__(self, d=4):
        super().__init__()
        self.qkv, self.head = nn.Linear(d, 3 * d), nn.Linear(d, 3)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.head(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).mean(dim=1))


def _batches(x_shape, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*x_shape, generator=g), torch.randint(0, classes, (B,), generator=g))]


# --- the dense references ---------------------------------------------------------------------------------------

def _measured(model, names):
    named = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    fixed = {n: p.detach() for n, p in model.named_parameters() if names is not None and n not in names}
    return named, fixed


def _dataset_loss(model, batches, names=None, loss=F.cross_entropy, mode="eval"):
    """(theta, L) with L(flat) the dataset-mean loss in the parameters ``names`` (default all), in ``mode``
    (train: batch statistics, not tracked)."""
    named, fixed = _measured(model, names)
    fixed.update({n: b for n, b in model.named_buffers()})
    sizes = [p.numel() for _, p in named]
    N = sum(y.shape[0] for _, y in batches)

    def L(flat):
        params = {n: t.view(p.shape) for (n, p), t in zip(named, flat.split(sizes))}
        total = 0.0
        for x, y in batches:
            args = x if isinstance(x, tuple) else (x,)
            total = total + loss(functional_call(model, {**params, **fixed}, args), y) * y.shape[0]
        return total / N

    return torch.cat([p.detach().reshape(-1) for _, p in named]), L


def _in_mode(model, mode, fn):
    modes = [(m, m.training) for m in model.modules()]
    norms = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.train(mode == "train")
    for m, _ in norms:
        m.track_running_stats = mode != "train"
    try:
        return fn()
    finally:
        for m, t in norms:
            m.track_running_stats = t
        for m, t in modes:
            m.training = t


def dense_hessian(model, batches, names=None, loss=F.cross_entropy, mode="eval"):
    theta, L = _dataset_loss(model, batches, names, loss, mode)
    return _in_mode(model, mode, lambda: torch.autograd.functional.hessian(L, theta))


def finite_difference_hessian(model, batches, names=None, loss=F.cross_entropy, mode="eval", h=1e-5):
    """Column j: (g(theta + h e_j) - g(theta - h e_j)) / 2h, g the float64 gradient (one backward pass each)."""
    theta, L = _dataset_loss(model, batches, names, loss, mode)

    def grad(flat):
        flat = flat.clone().requires_grad_(True)
        return torch.autograd.grad(L(flat), flat)[0]

    def columns():
        eye = torch.eye(theta.numel())
        return torch.stack([(grad(theta + h * e) - grad(theta - h * e)) / (2 * h) for e in eye], dim=1)

    return _in_mode(model, mode, columns)


def assert_trace_is_dense(result, model, batches, names=None, loss=F.cross_entropy, mode="eval"):
    H = dense_hessian(model, batches, names, loss, mode)
    H_fd = finite_difference_hessian(model, batches, names, loss, mode)
    torch.testing.assert_close(H, H_fd, rtol=1e-5, atol=1e-7)  # two independent references agree
    exact = float(torch.trace(H))
    if result.stderr == 0.0:
        assert abs(result.value - exact) <= 1e-6 * abs(exact) + 1e-12, (result, exact)
    else:
        assert abs(result.value - exact) <= 4 * result.stderr, (result, exact)


# --- randomness is refused, wherever it comes from ---------------------------------------------------------------

def _noisy_mlp():
    return nn.Sequential(nn.Linear(4, 8), GaussianNoise(), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("make, where", [
    (FunctionalDropout, "the model's own forward"),
    (AttentionDropout, "the model's own forward"),
    (StochasticDepth, "the model's own forward"),
    (_noisy_mlp, "module '1' \\(GaussianNoise\\)"),
], ids=["functional-dropout", "attention-dropout-p", "stochastic-depth", "noise-layer"])
def test_a_model_that_draws_in_train_mode_is_refused_naming_where(make, where):
    model = make()
    shape = (B, 5, 4) if isinstance(model, AttentionDropout) else (B, 4)
    batches = _batches(shape)
    for call in (lambda: flatfast.hessian_trace(model, batches, mode="train"),
                 lambda: flatfast.hessian_eigenvalues(model, batches, mode="train"),
                 lambda: flatfast.hvp(model, batches, torch.randn(sum(p.numel() for p in model.parameters())),
                                      mode="train"),
                 lambda: flatfast.sharpness(model, batches, mode="train", method="sign-ascent")):
        with pytest.raises(ValueError, match=f"draws random numbers in mode='train'.*{where}.*mode='eval'"):
            call()
    if make is not _noisy_mlp:
        result = flatfast.hessian_trace(model, batches)  # eval mode: the same model is deterministic
        assert_trace_is_dense(result, model, batches)


def test_a_layer_that_draws_in_eval_mode_is_refused_too():
    model = nn.Sequential(nn.Linear(4, 8), GaussianNoise(), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="mode='eval'.*module '1' \\(GaussianNoise\\).*even in eval mode"):
        flatfast.hessian_trace(model, _batches((B, 4)))


# --- routes chosen by what the model does -------------------------------------------------------------------------

def test_a_model_that_mixes_examples_gets_a_route_without_per_example_passes():
    model, batches = MixesExamples(), _batches((B, 4))
    result = flatfast.hessian_trace(model, batches)
    assert result.method in ("unit-vectors", "hutch++") and "half of the batch" in result.reason
    assert_trace_is_dense(result, model, batches)
    with pytest.raises(ValueError, match="'exact' takes the examples one at a time, but it fails on half"):
        flatfast.hessian_trace(model, batches, method="exact")


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_heads_give_the_dense_value(cell, batch_first):
    model = Recurrent(cell, batch_first)
    shape = (B, 7, 4) if batch_first else (7, B, 4)
    batches = _batches(shape)
    head = ["head.weight", "head.bias"]
    for params, names in ((head, head), (None, None)):
        result = flatfast.hessian_trace(model, batches, params=params)
        assert_trace_is_dense(result, model, batches, names)
        if not batch_first:
            assert result.method != "exact" and "sequence-first" in result.reason


def test_sequence_first_inputs_whose_length_equals_the_batch_size_are_not_sliced():
    """(L, B, d) with L = B: the leading dimension matches the batch size, yet it is not the examples'."""
    model = Recurrent(nn.LSTM, batch_first=False)
    batches = _batches((B, B, 4))
    result = flatfast.hessian_trace(model, batches, params=["head.weight", "head.bias"])
    assert result.method != "exact" and "split in two differ" in result.reason
    assert_trace_is_dense(result, model, batches, ["head.weight", "head.bias"])


def test_batchnorm_in_train_mode_gives_the_dense_value():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    batches = _batches((B, 4))
    result = flatfast.hessian_trace(model, batches, mode="train")
    assert result.method != "exact"
    assert_trace_is_dense(result, model, batches, mode="train")
    eval_result = flatfast.hessian_trace(model, batches)  # eval mode: running statistics, exact and per example
    assert eval_result.method == "exact"
    assert_trace_is_dense(eval_result, model, batches)


def test_a_shared_mask_whose_side_equals_the_batch_size_is_not_sliced():
    model = MaskedAttention()
    g = torch.Generator().manual_seed(4)
    mask = torch.randn(B, B, generator=g)  # (L, L) with L = B: shaped like a per-example tensor
    batches = [((torch.randn(B, B, 4, generator=g), mask), torch.randint(0, 3, (B,), generator=g))]
    result = flatfast.hessian_trace(model, batches)
    assert result.method != "exact"
    assert_trace_is_dense(result, model, batches)
    top = flatfast.hessian_eigenvalues(model, batches).values[0]
    assert abs(top - float(torch.linalg.eigvalsh(dense_hessian(model, batches))[-1])) <= 1e-6 * abs(top)


def test_a_per_example_pass_that_torch_cannot_take_falls_back_under_auto_and_is_reported_under_exact(monkeypatch):
    import flatfast.curvature.exact_trace as exact_trace

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    batches = _batches((B, 4))

    def no_vjp(*args, **kwargs):
        raise RuntimeError("output with shape [1, 6] doesn't match the broadcast shape [12, 1, 6]")

    monkeypatch.setattr("torch.func.vjp", no_vjp)
    result = flatfast.hessian_trace(model, batches, params=["2.weight", "2.bias"], loss_fn=nn.CrossEntropyLoss(
        label_smoothing=0.1))  # not the MLP fast path: the generic per-example pass
    assert result.method == "unit-vectors" and "per-example pass failed inside torch" in result.reason
    assert_trace_is_dense(result, model, batches, ["2.weight", "2.bias"],
                          loss=nn.CrossEntropyLoss(label_smoothing=0.1))
    with pytest.raises(ValueError, match="'exact' takes the examples one at a time, and torch could not.*broadcast"):
        flatfast.hessian_trace(model, batches, params=["2.weight", "2.bias"], method="exact",
                               loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1))
    assert exact_trace.PerExampleFailure.__doc__


# --- batches with more than inputs and targets -------------------------------------------------------------------

def test_sample_weights_are_never_dropped_and_the_documented_way_weights_the_loss():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(5)
    x, y, w = torch.randn(B, 4, generator=g), torch.randint(0, 3, (B,), generator=g), torch.rand(B, generator=g)
    with pytest.raises(TypeError, match="ignore its last 1 element.*batch_fn=.*loss_fn that weights"):
        flatfast.hessian_trace(model, [(x, y, w)])

    def weighted(outputs, targets):  # targets: (B, 2) = class, weight
        return (targets[:, 1] * F.cross_entropy(outputs, targets[:, 0].long(), reduction="none")).mean()

    def batch_fn(b):
        return b[0], torch.stack([b[1].to(b[2].dtype), b[2]], 1)

    result = flatfast.hessian_trace(model, [(x, y, w)], batch_fn=batch_fn, loss_fn=weighted)
    H = dense_hessian(model, [(x, torch.stack([y.double(), w], 1))], loss=weighted)
    assert abs(result.value - float(torch.trace(H))) <= 1e-6 * abs(float(torch.trace(H)))
    unweighted = flatfast.hessian_trace(model, [(x, y)]).value
    assert abs(result.value - unweighted) > 1e-3 * abs(unweighted)  # the weights count


def test_the_probe_costs_three_forward_passes_of_the_first_batch_only():
    calls = []
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    batches = _batches((B, 4)) + _batches((B, 4), seed=1)
    op = flatfast.curvature.operator.HessianOperator(model, batches)
    assert op.probe() is None and calls == [B, B, B // 2, B - B // 2]  # whole twice, then the two halves
    op.probe()
    assert len(calls) == 4  # asked once per operator
    assert math.isclose(op.outputs_per_example, 3)


# --- a second derivative that torch drops without a word ---------------------------------------------------------

class _OnceCube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g


class OnceDifferentiable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(_OnceCube.apply(self.a(x)))


def test_a_custom_function_whose_second_derivative_torch_drops_is_refused():
    """Through a @once_differentiable backward torch's double backward silently treats the backward as constant in
    its input: torch.autograd.functional.hessian itself is wrong here (finite differences show it), and so would
    every product be. The probe finds the custom Function, one product of two vectors is not symmetric, and the
    model is refused; the parameters after it are measured right."""
    torch.manual_seed(0)
    model = OnceDifferentiable()
    batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    wrong, right = dense_hessian(model, batches), finite_difference_hessian(model, batches)
    assert float((wrong - right).abs().max()) > 0.1 * float(right.abs().max())  # the dense reference is fooled
    for call in (lambda: flatfast.hessian_trace(model, batches), lambda: flatfast.hessian_eigenvalues(model, batches),
                 lambda: flatfast.hvp(model, batches, torch.randn(26))):
        with pytest.raises(ValueError, match="not symmetric.*_OnceCube.*once_differentiable.*params="):
            call()
    after = ["b.weight", "b.bias"]
    assert_trace_is_dense(flatfast.hessian_trace(model, batches, params=after), model, batches, after)
