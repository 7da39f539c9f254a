"""hessian_trace(method="exact") on piecewise-linear CNNs, ResNets and MLPs against the trace of the dense Hessian,
and its refusal of networks that are not piecewise linear in each parameter."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import flatfast
from flatfast import NotPiecewiseLinearError


def dense_trace(model, batches, loss_fn):
    """tr of the exact Hessian of the dataset-mean loss in eval mode (torch.autograd.functional.hessian)."""
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fixed = {**{n: p for n, p in model.named_parameters() if not p.requires_grad}, **dict(model.named_buffers())}
    sizes = [p.numel() for _, p in params]
    was_training = model.training
    model.eval()

    def loss(flat):
        d = {n: t.view(p.shape) for (n, p), t in zip(params, flat.split(sizes))}
        return loss_fn(functional_call(model, {**d, **fixed}, (X,)), y)

    H = torch.autograd.functional.hessian(loss, torch.cat([p.detach().reshape(-1) for _, p in params]))
    model.train(was_training)
    return float(torch.trace(H))


def image_batches(n=20, batch=8, channels=1, size=6, classes=3, target="class", seed=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, channels, size, size, generator=g, dtype=torch.float64)
    if target == "class":
        y = torch.randint(0, classes, (n,), generator=g)
    elif target == "binary":
        y = torch.randint(0, 2, (n, 1), generator=g).double()
    else:
        y = torch.randn(n, classes, generator=g, dtype=torch.float64)
    return [(X[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]  # 8, 8, 4: a short last batch


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2),
                         nn.LeakyReLU(0.1), nn.AvgPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(4, 3)).double()


class Block(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN, plus the input, then ReLU."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.blocks = nn.Sequential(Block(3), Block(3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        h = self.blocks(self.stem(x))
        features = torch.cat([self.pool(h).flatten(1), F.adaptive_max_pool2d(h, 1).flatten(1)], dim=1)
        return self.head(features)


def tiny_resnet(classes=3):
    torch.manual_seed(1)
    model = TinyResNet(classes).double()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    model.train()  # the trace is of the eval-mode network; the mode must come back
    return model


def bce_mlp():
    torch.manual_seed(2)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(),
                         nn.Linear(5, 1)).double()


CASES = {
    "cnn-pooling-cross-entropy": (small_cnn, "class", None, F.cross_entropy),
    "cnn-pooling-mse": (small_cnn, "regression", nn.MSELoss(), F.mse_loss),
    "resnet-batchnorm-eval": (tiny_resnet, "class", None, F.cross_entropy),
    "resnet-cross-entropy-module": (tiny_resnet, "class", nn.CrossEntropyLoss(), F.cross_entropy),
    "mlp-bce-with-logits": (bce_mlp, "binary", nn.BCEWithLogitsLoss(), F.binary_cross_entropy_with_logits),
    "mlp-bce-through-autograd": (bce_mlp, "binary", lambda o, t: F.binary_cross_entropy_with_logits(o, t),
                                 F.binary_cross_entropy_with_logits),
    "cnn-huber-through-autograd": (small_cnn, "regression", nn.HuberLoss(delta=0.5), nn.HuberLoss(delta=0.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exact_trace_matches_dense_hessian(case):
    make, target, loss_fn, reference_loss = CASES[case]
    model = make()
    batches = image_batches(target=target)
    expected = dense_trace(model, batches, reference_loss)
    modes = [m.training for m in model.modules()]
    result = flatfast.hessian_trace(model, batches, loss_fn=loss_fn, method="exact")
    assert result.value == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert result.stderr == 0.0 and result.method == "exact"
    assert [m.training for m in model.modules()] == modes


def test_generic_exact_trace_agrees_with_the_mlp_fast_path():
    from flatfast.curvature.exact_trace import exact_trace
    from flatfast.curvature.operator import HessianOperator

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(36, 9), nn.ReLU(), nn.Linear(9, 4)).double()
    batches = [(x.flatten(1), y) for x, y in image_batches(classes=4)]
    fast = flatfast.hessian_trace(model, batches, method="exact").value
    assert HessianOperator(model, batches).linears is not None
    assert exact_trace(HessianOperator(model, batches)) == pytest.approx(fast, rel=1e-11)


def test_many_classes_are_chunked_over_outputs(monkeypatch):
    """With a gradient-memory budget smaller than one factor's gradients, every factor vector and example is its
    own chunk; the trace must not change."""
    import flatfast.curvature.exact_trace as exact

    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 8), nn.ReLU(),
                          nn.Linear(8, 40)).double()
    batches = image_batches(classes=40)
    whole = flatfast.hessian_trace(model, batches, method="exact").value
    monkeypatch.setattr(exact, "GRADIENT_MEMORY_BYTES", 1)
    assert flatfast.hessian_trace(model, batches, method="exact").value == pytest.approx(whole, rel=1e-12)
    assert whole == pytest.approx(dense_trace(model, batches, F.cross_entropy), rel=1e-9)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(36, 4), nn.Linear(36, 4)

    def forward(self, x):
        x = x.flatten(1)
        return self.a(x) * torch.relu(self.b(x)) + self.a(x)


class SelfGated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(36, 3)

    def forward(self, x):
        h = self.a(x.flatten(1))
        return h * torch.relu(h)


class TiedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(36, 36)
        self.head = nn.Linear(36, 3)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(torch.relu(self.inner(torch.relu(self.inner(x)))))


class NormalisedByOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(36, 3)

    def forward(self, x):
        h = self.a(x.flatten(1))
        return h / h.abs().sum(dim=1, keepdim=True)


def _flat(*layers):
    return nn.Sequential(nn.Flatten(), *layers)


REFUSED = {
    "tanh": (lambda: _flat(nn.Linear(36, 5), nn.Tanh(), nn.Linear(5, 3)), r"model: module '2' \(Tanh\) applies tanh"),
    "gelu": (lambda: _flat(nn.Linear(36, 5), nn.GELU(), nn.Linear(5, 3)), r"module '2' \(GELU\) applies gelu"),
    "softplus": (lambda: _flat(nn.Linear(36, 5), nn.Softplus(), nn.Linear(5, 3)), r"Softplus\) applies softplus"),
    "layernorm": (lambda: _flat(nn.Linear(36, 5), nn.LayerNorm(5), nn.Linear(5, 3)), r"LayerNorm\) applies"),
    "batchnorm-no-running-stats": (lambda: _flat(nn.Linear(36, 5), nn.BatchNorm1d(5, track_running_stats=False),
                                                 nn.Linear(5, 3)), r"BatchNorm1d\) normalises by batch statistics"),
    "attention": (lambda: _Attention(), r"module 'attn' \(MultiheadAttention\) applies multi_head_attention_forward"),
    "gating": (lambda: SelfGated(), r"model: SelfGated.forward multiplies two values that both depend on "
                                    r"parameter a\.(bias|weight)"),
    "weight-used-twice": (lambda: TiedTwice(), r"module 'inner' \(Linear\) multiplies two values that both depend on "
                                               r"parameter inner\."),
    "division-by-the-output": (lambda: NormalisedByOutput(), r"divides by a value that depends on parameters"),
}


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        tokens = x.reshape(x.shape[0], 6, 6)
        return self.head(self.attn(tokens, tokens, tokens)[0].mean(dim=1))


@pytest.mark.parametrize("case", list(REFUSED))
def test_exact_trace_refuses_networks_that_are_not_piecewise_linear(case):
    make, message = REFUSED[case]
    torch.manual_seed(0)
    model = make().double()
    with pytest.raises(NotPiecewiseLinearError, match=message) as info:
        flatfast.hessian_trace(model, image_batches(), method="exact")
    assert "method='exact' does not apply" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_accepted_products_of_independent_parameters_are_exact():
    """a(x) * relu(b(x)) is piecewise linear in each single parameter (a and b are different parameters), so it
    is accepted, and the trace is exact though the model is not a chain of layers."""
    torch.manual_seed(6)
    model = Gated().double()
    batches = image_batches(classes=4)
    expected = dense_trace(model, batches, F.cross_entropy)
    assert flatfast.hessian_trace(model, batches, method="exact").value == pytest.approx(expected, rel=1e-9)


class SharedInParallel(nn.Module):
    """One Linear layer applied to both halves of the image and the results added: the layer is used twice, but
    additively, so the network stays piecewise linear in each of its parameters and the trace stays exact."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(18, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        top, bottom = x.flatten(1).split(18, dim=1)
        return self.head(torch.relu(self.shared(top)) + torch.relu(self.shared(bottom)))


def test_a_layer_reused_additively_is_accepted_and_exact():
    torch.manual_seed(9)
    model = SharedInParallel().double()
    batches = image_batches()
    expected = dense_trace(model, batches, F.cross_entropy)
    assert flatfast.hessian_trace(model, batches, method="exact").value == pytest.approx(expected, rel=1e-9)


def test_exact_trace_rejects_a_loss_that_is_not_a_mean_of_per_example_losses():
    model = small_cnn()
    with pytest.raises(ValueError, match="loss_fn: the batch loss is not the mean"):
        flatfast.hessian_trace(model, image_batches(), loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="sum"),
                               method="exact")


def test_a_thousand_classes_match_the_closed_form_of_one_linear_layer():
    """For logits W x + b under cross-entropy, tr H = mean_i (|x_i|^2 + 1) (1 - |p_i|^2): an independent check
    with C = 1000 classes, whose factor rows are made in chunks rather than as a B x C x C array."""
    torch.manual_seed(7)
    model = nn.Linear(6, 1000).double()
    g = torch.Generator().manual_seed(8)
    X = torch.randn(24, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 1000, (24,), generator=g)
    p = torch.softmax(model(X), dim=1).detach()
    expected = float((((X * X).sum(1) + 1.0) * (1.0 - (p * p).sum(1))).mean())
    assert flatfast.hessian_trace(model, [(X[:16], y[:16]), (X[16:], y[16:])],
                                  method="exact").value == pytest.approx(expected, rel=1e-11)
