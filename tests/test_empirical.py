"""Empirical NNGP kernels: convergence to the closed forms (the arc-cosine kernel of a ReLU MLP; the CNN-GP of a
ReLU CNN without pooling, computed here in numpy), Monte Carlo error bars, log_prior on them, bad input."""
import math

import numpy as np
import pytest

import flatfast

torch = pytest.importorskip("torch")


def _relu_expectation(k11, k12, k22):
    """E[relu(u) relu(v)] for (u, v) ~ N(0, [[k11, k12], [k12, k22]]) (the arc-cosine formula)."""
    norm = np.sqrt(k11 * k22)
    cos = np.clip(k12 / np.where(norm > 0, norm, 1.0), -1.0, 1.0)
    theta = np.arccos(cos)
    return norm * (np.sin(theta) + (np.pi - theta) * cos) / (2 * np.pi)


def _cnn_gp_kernel(X, layers, kernel_size, sigma_w2, sigma_b2):
    """Closed-form NNGP of Conv(k, 'same' zero padding) -> ReLU, `layers` times, then Flatten -> Linear, for
    images X (n, C, H, W) (Novak et al. 2019). Without pooling only same-position covariances are needed:
    V[a, b, p] = E[phi_p(x_a) phi_p(x_b)] per position p, averaged over each filter's window (zeros outside)."""
    n, C, H, W = X.shape
    r = kernel_size // 2
    V = np.einsum("achw,bchw->abhw", X, X) / C  # layer 0: the inputs' channel-averaged products
    for _ in range(layers):
        padded = np.pad(V, ((0, 0), (0, 0), (r, r), (r, r)))
        window = sum(padded[:, :, i: i + H, j: j + W] for i in range(kernel_size) for j in range(kernel_size))
        K = sigma_b2 + sigma_w2 * window / kernel_size**2
        diag = np.einsum("aahw->ahw", K)
        V = _relu_expectation(diag[:, None], K, diag[None, :])
    return sigma_b2 + sigma_w2 * V.mean(axis=(2, 3))


def _mlp(d, width, depth, outputs=1):
    layers, fan_in = [], d
    for _ in range(depth):
        layers += [torch.nn.Linear(fan_in, width), torch.nn.ReLU()]
        fan_in = width
    return torch.nn.Sequential(*layers, torch.nn.Linear(fan_in, outputs))


def _relative_error(K, reference):
    return float(np.linalg.norm(K - reference) / np.linalg.norm(reference))


@pytest.mark.slow  # run by .ci/run after the default suite (pytest -m slow)
def test_mlp_kernel_converges_like_one_over_sqrt_m_to_the_arc_cosine_kernel():
    """Width 1024, depth 2: the relative error falls about 2x per 4x draws (measured 0.022, 0.0094, 0.0050,
    0.0026 at M = 4, 16, 64, 256); at equal M the penultimate readout (the last layer integrated exactly) is
    some 50x closer than output products (0.49 at M = 16)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((24, 10))
    exact = flatfast.nngp_kernel(X, depth=2)
    net = _mlp(10, 1024, depth=2).double()
    draws = (4, 16, 64, 256)
    errors = [_relative_error(flatfast.empirical_nngp_kernel(net, X, M, seed=1), exact) for M in draws]
    print("relative error vs M (penultimate):", dict(zip(draws, errors)))
    assert all(later < 0.8 * earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < errors[0] / 4 and errors[-1] < 0.005
    output = _relative_error(flatfast.empirical_nngp_kernel(net, X, 16, readout="output", seed=1), exact)
    print(f"relative error at M = 16, readout='output': {output:.3f}")
    assert errors[1] < output / 10, (errors[1], output)


@pytest.mark.parametrize("device", __import__("conftest").devices_here())
def test_kernel_on_each_device_present(device):
    """The model's device is where the draws run (a GPU when the model is on one); K comes back as the kind it
    was given: a float64 tensor on that device for a tensor, a float64 numpy array for an array."""
    X = np.random.default_rng(5).standard_normal((16, 6))
    net = _mlp(6, 1024, depth=2).double().to(device)
    K = flatfast.empirical_nngp_kernel(net, torch.as_tensor(X, device=device), 64, seed=2)
    assert isinstance(K, torch.Tensor) and K.dtype == torch.float64 and K.device.type == device
    assert _relative_error(K.cpu().numpy(), flatfast.nngp_kernel(X, depth=2)) < 0.03  # 0.017 measured on the CPU
    from_array = flatfast.empirical_nngp_kernel(net.cpu(), X, 64, seed=2)
    assert isinstance(from_array, np.ndarray) and from_array.dtype == np.float64


def test_stderr_matches_the_spread_between_seeds():
    X = np.random.default_rng(1).random((12, 6))
    net = _mlp(6, 64, depth=1).double()
    K, se = flatfast.empirical_nngp_kernel(net, X, 40, seed=0, return_stderr=True)
    others = np.stack([flatfast.empirical_nngp_kernel(net, X, 40, seed=s) for s in range(1, 21)])
    spread = others.std(axis=0, ddof=1)
    ratio = np.median(se / spread)
    assert 0.7 < ratio < 1.4, ratio


@pytest.mark.parametrize("channels", [8, 256])
def test_cnn_kernel_approaches_the_cnn_gp_as_channels_grow(channels):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((6, 2, 5, 5))
    exact = _cnn_gp_kernel(X, layers=2, kernel_size=3, sigma_w2=2.0, sigma_b2=1.0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, channels, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(channels * 25, 1)).double()
    K = flatfast.empirical_nngp_kernel(net, torch.as_tensor(X), 200, seed=3).numpy()
    error = _relative_error(K, exact)
    print(f"CNN-GP relative error at {channels} channels: {error:.4f}")
    assert error < (0.02 if channels == 256 else 0.2)


def test_same_seed_same_kernel_and_the_model_is_untouched():
    net = _mlp(4, 32, depth=1)
    before = [p.detach().clone() for p in net.parameters()]
    X = torch.rand(8, 4)
    a = flatfast.empirical_nngp_kernel(net, X, 5, seed=7)
    b = flatfast.empirical_nngp_kernel(net, X, 5, seed=7)
    assert torch.equal(a, b) and a.dtype == torch.float64  # tensor in, tensor out
    with pytest.warns(FutureWarning, match="kernel_samples"):  # the former name, still accepted
        assert torch.equal(flatfast.empirical_nngp_kernel(net, X, samples=5, seed=7), a)
    assert all(torch.equal(p, q) for p, q in zip(before, net.parameters()))


def test_log_prior_from_a_model_and_from_a_kernel():
    rng = np.random.default_rng(4)
    X = rng.random((30, 8))
    y = np.where(X[:, 0] > X[:, 1], 1, -1)
    net = _mlp(8, 512, depth=2).double()
    from_model = flatfast.log_prior(X, y, model=net, kernel_samples=64)
    with pytest.warns(FutureWarning, match="kernel_samples"):
        assert flatfast.log_prior(X, y, model=net, samples=64) == from_model  # the former name, still accepted
    K = flatfast.empirical_nngp_kernel(net, X, 64)
    assert flatfast.log_prior(X, y, kernel=K) == pytest.approx(from_model, rel=1e-12)
    images = torch.rand(30, 1, 4, 4)  # with a kernel, X only counts the points: any shape
    assert flatfast.log_prior(images, y, kernel=K) == pytest.approx(from_model, rel=1e-12)
    assert from_model == pytest.approx(flatfast.log_prior(X, y), abs=0.5)  # the analytic kernel's value


def test_bad_input_is_named():
    net = _mlp(4, 8, depth=1)
    X = torch.rand(5, 4)
    with pytest.raises(ValueError, match="samples"):
        flatfast.empirical_nngp_kernel(net, X, 1)
    with pytest.raises(ValueError, match="no nn.Linear"):
        flatfast.empirical_nngp_kernel(torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.ReLU()),
                                       torch.rand(3, 1, 8), 4)
    with pytest.raises(ValueError, match="X: the model rejected"):
        flatfast.empirical_nngp_kernel(net, torch.rand(5, 3), 4)
    class Scale(torch.nn.Module):  # a parameter with no initialiser that flatfast could call
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.gain

    with pytest.raises(ValueError, match=r"module 1 \(Scale\) has parameters that no prior covers.*init="):
        flatfast.empirical_nngp_kernel(torch.nn.Sequential(torch.nn.Linear(4, 8), Scale(), torch.nn.Linear(8, 1)),
                                       X, 4)
    with pytest.raises(ValueError, match="readout"):
        flatfast.empirical_nngp_kernel(net, X, 4, readout="logits")
    with pytest.raises(ValueError, match="kernel: expected shape"):
        flatfast.log_prior(X.numpy(), [1, -1, 1, 1, -1], kernel=np.eye(4))
    with pytest.raises(ValueError, match="model, kernel_samples"):
        flatfast.log_prior(X.numpy(), [1, -1, 1, 1, -1], model=net)


def test_custom_init_is_used():
    def zeros_but_bias(model, generator):
        for p in model.parameters():
            p.zero_()
        model[-1].bias.fill_(3.0)

    net = _mlp(3, 4, depth=1)
    K = flatfast.empirical_nngp_kernel(net, torch.rand(4, 3), 3, readout="output", init=zeros_but_bias)
    np.testing.assert_allclose(K, np.full((4, 4), 9.0))
    assert math.isfinite(K.sum())


@pytest.mark.parametrize("readout", ["penultimate", "output"])
def test_a_kernel_whose_draws_are_all_equal_is_the_one_draw_formula(readout):
    """With every draw the same network, the Monte Carlo mean is one draw's kernel, known in closed form:
    sigma_b^2 + sigma_w^2 / d phi phi^T of the penultimate features phi (d of them), or f f^T / C of the C outputs."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)).double()
    fixed = [p.detach().clone() for p in net.parameters()]

    def same_draw(model, generator):
        with torch.no_grad():
            for p, value in zip(model.parameters(), fixed):
                p.copy_(value)

    X = torch.randn(6, 5, dtype=torch.float64)
    K, stderr = flatfast.empirical_nngp_kernel(net, X, 4, readout=readout, sigma_w2=1.7, sigma_b2=0.3,
                                               init=same_draw, return_stderr=True)
    with torch.no_grad():
        phi = torch.relu(net[0](X))
        expected = 0.3 + 1.7 / 7 * phi @ phi.T if readout == "penultimate" else net(X) @ net(X).T / 3
    torch.testing.assert_close(K, expected, rtol=1e-12, atol=1e-12)
    assert float(stderr.max()) <= 1e-6 * float(K.abs().max())  # identical draws: no Monte Carlo error (E[k^2] - K^2 cancels to ~1e-8)


def test_a_model_that_mixes_inputs_is_not_split_into_chunks():
    """The features are taken batch_size inputs at a time; that is only the kernel of the whole when the model
    treats its inputs independently, which is checked, not assumed."""
    class MixesInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = torch.nn.Linear(3, 8), torch.nn.Linear(8, 1)

        def forward(self, x):
            h = torch.relu(self.fc(x))
            return self.head(h - h.mean(dim=0))  # each output depends on the whole batch

    X = torch.randn(10, 3)
    with pytest.raises(ValueError, match="X: is taken in chunks of batch_size = 4.*split in two differ.*"
                                         "batch_size >= 10"):
        flatfast.empirical_nngp_kernel(MixesInputs(), X, 2, batch_size=4)
    whole = flatfast.empirical_nngp_kernel(MixesInputs(), X, 2, batch_size=10)  # one pass: allowed
    assert whole.shape == (10, 10)
