"""The headline calls on the models researchers train now: transformers (torch's and Hugging Face's), recurrent
nets, attention written by hand, ResNet-style CNNs with BatchNorm; batches as tensors, tuples and mappings;
parameter subsets; modes. Every value is checked against the dense Hessian of a small instance (P < 3000, float64),
computed by reverse-over-reverse autograd, and that Hessian in turn against central finite differences of the
float64 gradient -- a reference that shares no code path with the double backward flatfast takes first."""
import contextlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import flatfast
from flatfast.curvature.operator import HessianOperator

pytestmark = pytest.mark.usefixtures("float64_by_default")


# --- small instances of each architecture --------------------------------------------------------------------

class TorchTransformer(nn.Module):
    """Token ids -> embedding -> nn.TransformerEncoder (fused attention fast path in eval mode) -> mean -> head."""

    def __init__(self, vocab=12, width=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)).mean(1))


class HandAttention(nn.Module):
    """Attention written with F.scaled_dot_product_attention in the user's own module; two positional inputs."""

    def __init__(self, width=6, classes=3):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :].bool()).squeeze(1)
        return self.head(self.norm(attended + x).mean(1))


class Recurrent(nn.Module):
    def __init__(self, cell=nn.LSTM, features=4, hidden=10, classes=3):
        super().__init__()
        self.rnn = cell(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class TupleOutput(nn.Module):
    """Returns (logits, features), as many research models do."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        features = torch.tanh(self.body(x))
        return self.head(features), features


class ResNetBlock(nn.Module):
    """conv-BN-ReLU stem, one residual block with BatchNorm, pooling, a linear head."""

    def __init__(self, channels=4, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                                   nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        h = self.stem(x)
        h = F.relu(h + self.block(h))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers; "
                               "keep the torch pin, see the README)")


def tiny_bert(classes=3):
    transformers = _transformers()
    config = transformers.BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8, num_labels=classes)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).double()


def tiny_vit(classes=3):
    transformers = _transformers()
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=16, num_labels=classes)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config).double()


def _token_batch(n, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length - 2:] = 0  # one padded sequence
    return ids, mask, torch.randint(0, 3, (n,), generator=g)


def case(name):
    """(model, batches): each model's batches in the form its users have them."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "torch-transformer":
        ids, _, y = _token_batch(12, 5, 12, 2)
        return TorchTransformer(), [(ids[:7], y[:7]), (ids[7:], y[7:])]
    if name == "hand-attention":
        x = torch.randn(10, 4, 6, generator=g)
        mask = torch.ones(10, 4)
        mask[1, 3] = 0
        return HandAttention(), [((x, mask), torch.randint(0, 3, (10,), generator=g))]
    if name in ("lstm", "gru"):
        x = torch.randn(12, 6, 4, generator=g)
        return Recurrent(nn.LSTM if name == "lstm" else nn.GRU), [(x, torch.randint(0, 3, (12,), generator=g))]
    if name == "tuple-output":
        return TupleOutput(), [(torch.randn(9, 5, generator=g), torch.randint(0, 3, (9,), generator=g))]
    if name == "resnet-bn":
        model = ResNetBlock()
        with torch.no_grad():  # running statistics unlike the batch's, so eval and train modes differ
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5, generator=g)
                    m.running_var.uniform_(0.5, 2.0, generator=g)
        return model, [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g))]
    if name == "bert":
        ids, mask, y = _token_batch(8, 6, 16, 3)
        return tiny_bert(), [{"input_ids": ids, "attention_mask": mask, "labels": y}]
    if name == "vit":
        return tiny_vit(), [{"pixel_values": torch.randn(6, 3, 8, 8, generator=g),
                             "labels": torch.randint(0, 3, (6,), generator=g)}]
    raise KeyError(name)


CASES = ["torch-transformer", "hand-attention", "lstm", "gru", "tuple-output", "resnet-bn", "bert", "vit"]


def _as_pair(batch):
    if isinstance(batch, dict):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return (), inputs, batch["labels"]
    inputs, y = batch
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}, y
    return tuple(inputs), {}, y


def _dataset_loss(model, batches, names=None, loss=F.cross_entropy):
    """(theta, L): L(flat) the dataset-mean loss in the parameters ``names`` (default: all trainable) at flat."""
    named = [(n, p) for n, p in model.named_parameters() if (p.requires_grad if names is None else n in names)]
    chosen = {n for n, _ in named}
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
    fixed.update(dict(model.named_buffers()))
    sizes = [p.numel() for _, p in named]
    N = sum(_as_pair(b)[2].shape[0] for b in batches)

    def dataset_loss(flat):
        params = {n: t.view(p.shape) for (n, p), t in zip(named, flat.split(sizes))}
        total = 0.0
        for batch in batches:
            args, kwargs, y = _as_pair(batch)
            out = functional_call(model, {**params, **fixed}, args, kwargs)
            out = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
            total = total + loss(out, y) * y.shape[0]
        return total / N

    return torch.cat([p.detach().reshape(-1) for _, p in named]), dataset_loss


@contextlib.contextmanager
def _measured_as(model, mode):
    """The model in ``mode`` (train: BatchNorm on batch statistics, untracked), attention on the math kernel."""
    modes = [(m, m.training) for m in model.modules()]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [m.track_running_stats for m in norms]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.train(mode == "train")
    for m in norms:
        m.track_running_stats = mode != "train"
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, t in zip(norms, tracked):
            m.track_running_stats = t
        for m, training in modes:
            m.training = training


def dense_hessian(model, batches, names=None, mode="eval", loss=F.cross_entropy):
    """The Hessian of the dataset-mean loss in the parameters ``names`` (default: all trainable), by reverse-over-
    reverse autograd on the math attention kernel, in ``mode`` (train: BatchNorm on batch statistics)."""
    theta, dataset_loss = _dataset_loss(model, batches, names, loss)
    with _measured_as(model, mode):
        return torch.autograd.functional.hessian(dataset_loss, theta, vectorize=True,
                                                 outer_jacobian_strategy="reverse-mode")


def finite_difference_products(model, batches, V, names=None, mode="eval", h=1e-6):
    """H v for each row v of V by central differences of the float64 gradient, (g(theta + h v) - g(theta - h v)) /
    2h: one backward pass each, no second derivative taken anywhere (truncation error ~ h^2, rounding ~ eps / h)."""
    theta, dataset_loss = _dataset_loss(model, batches, names)

    def gradient(flat):
        flat = flat.clone().requires_grad_(True)
        return torch.autograd.grad(dataset_loss(flat), flat)[0]

    with _measured_as(model, mode):
        return torch.stack([(gradient(theta + h * v) - gradient(theta - h * v)) / (2 * h) for v in V])


_DENSE = {}


def case_hessian(name, names=None, mode="eval"):
    """dense_hessian of a fresh case(name), computed once per (name, names, mode) for the whole module."""
    key = (name, tuple(names) if names is not None else None, mode)
    if key not in _DENSE:
        model, batches = case(name)
        _DENSE[key] = dense_hessian(model, batches, names, mode=mode)
    return _DENSE[key]


def _relative(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-300)


# --- the headline calls against the dense Hessian ------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_trace_eigenvalues_and_products_match_the_dense_hessian(name):
    model, batches = case(name)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert P < 3000
    H = case_hessian(name)
    exact_trace = float(torch.trace(H))
    top = np.sort(np.linalg.eigvalsh(H.numpy()))[::-1][:2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = flatfast.hessian_trace(model, batches, method="unit-vectors", progress=False)
        eig = flatfast.hessian_eigenvalues(model, batches, k=2, tol=1e-10, progress=False)
        spectrum = flatfast.hessian_spectrum(model, batches, probes=2, iterations=8, progress=False)
        V = torch.randn(3, P, generator=torch.Generator().manual_seed(4))
        HV = flatfast.hvp(model, batches, V)
    ours = [w for w in caught if "flatfast" in str(w.filename) or "flatfast" in str(w.message)
            or issubclass(w.category, RuntimeWarning) or "jit.script" in str(w.message)]
    assert not ours, [str(w.message) for w in ours]  # no fallback warning, no torch deprecation notice
    assert _relative(trace.value, exact_trace) < 1e-6
    np.testing.assert_allclose(eig.values, top, rtol=1e-6)
    torch.testing.assert_close(HV, V @ H, rtol=1e-6, atol=1e-9 * float(H.abs().max()))
    # the second reference: central differences of the gradient, no second derivative taken anywhere (directions
    # inside the parameters torch's gradient holds constant -- an embedding's padding row -- left out)
    constant = HessianOperator(model, batches).constant_entries
    free = V if constant is None else V.masked_fill(constant, 0.0)
    torch.testing.assert_close(finite_difference_products(model, batches, free), free @ H, rtol=1e-5,
                               atol=1e-6 * float((free @ H).abs().max()))
    assert trace.mode == eig.mode == spectrum.mode == "eval"
    # the spectrum's quadrature is exact for polynomials of degree < 2 x iterations on its own (seeded) probes
    probes = torch.randn(2, P, generator=torch.Generator().manual_seed(0))
    probes = probes / torch.linalg.norm(probes, dim=1, keepdim=True)
    for j in (1, 2, 3):
        exact = (probes * (probes @ torch.linalg.matrix_power(H, j))).sum(1).numpy()
        np.testing.assert_allclose((spectrum.weights * spectrum.nodes ** j).sum(1), exact, rtol=1e-6,
                                   atol=1e-9 * float(H.abs().max()) ** j)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", CASES)
def test_cuda_curvature_of_each_architecture_matches_the_dense_hessian(name):
    """The same calls with the model on a GPU: attention must leave the flash and memory-efficient kernels and the
    recurrent layers cuDNN (neither has a double backward), with no fallback warning; batches stay on the CPU and
    flatfast moves them."""
    model, batches = case(name)
    H = case_hessian(name)
    model = model.cuda()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = flatfast.hessian_trace(model, batches, method="unit-vectors", progress=False)
        eig = flatfast.hessian_eigenvalues(model, batches, k=2, tol=1e-10, progress=False)
        V = torch.randn(2, H.shape[0], generator=torch.Generator().manual_seed(4))
        HV = flatfast.hvp(model, batches, V.cuda()).cpu()
    ours = [str(w.message) for w in caught if "flatfast" in str(w.filename) or "flatfast" in str(w.message)]
    assert not ours, ours
    assert _relative(trace.value, float(torch.trace(H))) < 1e-6
    np.testing.assert_allclose(eig.values, np.sort(np.linalg.eigvalsh(H.numpy()))[::-1][:2], rtol=1e-6)
    torch.testing.assert_close(HV, V @ H, rtol=1e-6, atol=1e-9 * float(H.abs().max()))
    assert next(model.parameters()).is_cuda  # left where the user put it


@pytest.mark.parametrize("name, mode", [("torch-transformer", "eval"), ("hand-attention", "eval"),
                                        ("resnet-bn", "train")])
def test_quadratic_forms_where_torch_forward_over_forward_is_wrong(name, mode):
    """v^T H v for the trace estimators: torch 2.13's jvp of jvp gets layer_norm and train-mode batch_norm wrong
    (tens of percent off here), so flatfast takes v . (H v); this pins it against the dense Hessian."""
    model, batches = case(name)
    H = case_hessian(name, mode=mode)
    op = HessianOperator(model, batches, mode=mode)
    V = torch.randn(4, op.dimension, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(op.quadratic(V), ((V @ H) * V).sum(1), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["torch-transformer", "hand-attention", "lstm", "gru", "bert"])
def test_both_routes_work_and_agree_on_attention_and_recurrent_layers(name):
    """Double backward runs first; forward-over-reverse, the fallback for operations without a double backward,
    also works on these models because attention runs on the math kernel and the RNN on its composite
    implementation (the fused kernels have no forward-mode derivative), and gives the same products."""
    model, batches = case(name)
    op = HessianOperator(model, batches)
    V = torch.randn(2, op.dimension, generator=torch.Generator().manual_seed(10))
    first = op.matmat(V)
    assert op.route == "double backward"
    op.route = "forward-over-reverse"
    torch.testing.assert_close(op.matmat(V), first, rtol=1e-9, atol=1e-12)


class _CubeGradient(torch.autograd.Function):
    """3 x^2 g with a forward-mode derivative but no backward: torch cannot differentiate a _Cube twice."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, g):
        return 3 * x ** 2 * g

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the derivative for 'cube_backward' is not implemented")

    @staticmethod
    def jvp(ctx, x_tangent, g_tangent):
        x, g = ctx.saved_tensors
        return 6 * x * x_tangent * g + 3 * x ** 2 * g_tangent


class _Cube(torch.autograd.Function):
    """x^3, whose backward is a _CubeGradient: a custom operation without a double backward, as fused kernels are."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _CubeGradient.apply(x, g)

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * tangent


class CubeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(_Cube.apply(self.a(x)))


def test_products_move_to_the_second_route_where_torch_has_no_double_backward():
    """A model with an operation that torch cannot differentiate twice: the first product finds double backward
    refused with torch's 'not implemented', moves to forward-over-reverse, remembers it, and the products and the
    trace equal central finite differences of the gradient."""
    torch.manual_seed(0)
    model = CubeNet()
    batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    op = HessianOperator(model, batches)
    eye = torch.eye(op.dimension)
    H = op.matmat(eye)
    assert op.route == "forward-over-reverse"
    H_fd = finite_difference_products(model, batches, eye)
    torch.testing.assert_close(H, H_fd, rtol=1e-6, atol=1e-8)
    result = flatfast.hessian_trace(model, batches)
    assert _relative(result.value, torch.trace(H_fd)) < 1e-6


def test_a_route_is_left_only_for_what_torch_cannot_do():
    from flatfast.curvature.generic_hvp import _first_route_that_works

    class Op:
        route = None
        model = nn.Linear(1, 1)

    op = Op()

    def users_bug():
        raise RuntimeError("shape mismatch in the user's loss")

    with pytest.raises(RuntimeError, match="user's loss"):
        _first_route_that_works(op, {"double backward": users_bug, "forward-over-reverse": lambda: 7})
    assert op.route is None


def test_embedding_padding_rows_are_constant_and_the_operator_symmetric():
    """torch's gradient of an nn.Embedding's padding_idx row is zero although the forward pass reads that row; the
    operator holds the row constant (as double backward, PyHessian and curvlinops do), so it stays symmetric."""
    model, batches = TorchTransformer(), None
    model.embed = nn.Embedding(12, 8, padding_idx=0)
    ids, _, y = _token_batch(6, 5, 12, 2)
    ids[:, 0] = 0  # every sequence reads the padding row
    batches = [(ids, y)]
    op = HessianOperator(model, batches)
    assert int(op.constant_entries.sum()) == 8 and bool(op.constant_entries[:8].all())
    dense = dense_hessian(model, batches)
    for route in ("double backward", "forward-over-reverse"):  # the second route sees the row unless it is masked
        op.route = route
        full = op.matmat(torch.eye(op.dimension))
        assert op.route == route
        torch.testing.assert_close(full, full.T, rtol=0, atol=1e-12)
        torch.testing.assert_close(full, dense, rtol=1e-7, atol=1e-12)
        assert float(full[:8].abs().max()) == 0.0


def _backend_flags():
    return (torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled, torch.backends.mha.get_fastpath_enabled())


def test_the_backends_and_modes_are_restored_after_a_call_that_succeeds_and_one_that_fails():
    model, batches = case("lstm")
    flags = _backend_flags()
    model.train()
    flatfast.hessian_trace(model, batches, method="hutchinson", probes=4)
    assert _backend_flags() == flags and all(m.training for m in model.modules())

    def fails(outputs, targets):  # called first inside the first product's pass, after the behaviour probe
        raise RuntimeError("the user's loss failed")

    with pytest.raises(RuntimeError, match="the user's loss failed"):
        flatfast.hessian_trace(model, batches, method="hutchinson", probes=4, loss_fn=fails)
    assert _backend_flags() == flags and all(m.training for m in model.modules())


def test_no_torch_deprecation_warning_on_the_first_forward_over_reverse_product():
    """torch.func's first jvp imports a module that calls the deprecated torch.jit.script; flatfast imports it
    once with that warning silenced. The products must take the forward-over-reverse route in a fresh process
    for the test to see the import at all."""
    code = ("import warnings, torch, flatfast\n"
            "from flatfast.curvature.operator import HessianOperator\n"
            "warnings.simplefilter('error', DeprecationWarning)\n"
            "m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))\n"
            "op = HessianOperator(m, [(torch.randn(5, 3), torch.randint(0, 2, (5,)))])\n"
            "op.route = 'forward-over-reverse'\n"
            "op.matmat(torch.randn(2, op.dimension))\n"
            "import sys\n"
            "print(op.route, 'torch._decomp.decompositions_for_jvp' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "forward-over-reverse True", done.stderr[-2000:]


# --- batches as users have them ----------------------------------------------------------------------------

def test_mapping_batches_equal_tuple_batches_and_batch_fn():
    model, batches = case("bert")
    batch = batches[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    V = torch.randn(2, sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(5))
    reference = flatfast.hvp(model, [batch], V)
    assert torch.equal(flatfast.hvp(model, [(inputs, batch["labels"])], V), reference)
    renamed = [{"tokens": inputs["input_ids"], "mask": inputs["attention_mask"], "y": batch["labels"]}]
    as_pair = flatfast.hvp(model, renamed, V, batch_fn=lambda b: ({"input_ids": b["tokens"],
                                                                    "attention_mask": b["mask"]}, b["y"]))
    assert torch.equal(as_pair, reference)
    label = [{**inputs, "label": batch["labels"]}]  # a datasets column before collation
    assert torch.equal(flatfast.hvp(model, label, V), reference)


def test_tuple_inputs_are_spread_over_the_model_arguments():
    model, batches = case("hand-attention")
    (x, mask), y = batches[0]
    V = torch.randn(1, sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(6))
    via_fn = flatfast.hvp(model, [{"x": x, "m": mask, "y": y}], V, batch_fn=lambda b: ((b["x"], b["m"]), b["y"]))
    assert torch.equal(via_fn, flatfast.hvp(model, batches, V))


def test_float_inputs_meet_a_float64_model():
    model, batches = case("lstm")
    x, y = batches[0]
    V = torch.randn(1, sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(flatfast.hvp(model, [(x.float(), y)], V), flatfast.hvp(model, [(x.float().double(), y)],
                                                                                    V))


@pytest.mark.parametrize("batch, batch_fn, match", [
    ({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, None, "a mapping with keys \\['input_ids'\\] with no "
                                                               "targets under 'labels'"),
    ("text", None, "loader: a batch is a str; accepted: \\(inputs, targets\\)"),
    ((torch.zeros(2, 3), [0, 1]), None, "loader: the targets are a list of 2; expected a tensor"),
    ({"x": 1}, lambda b: b, "batch_fn: must return an \\(inputs, targets\\) pair, returned a mapping"),
    ((torch.zeros(2, 3), torch.tensor(1)), None, "loader: the targets are a 0-d tensor"),
    (("not a tensor", torch.zeros(2)), None, "loader: the inputs are a str; expected a tensor"),
])
def test_batch_errors_name_what_was_found_and_what_is_accepted(batch, batch_fn, match):
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(TypeError if "0-d" not in match else ValueError, match=match):
        flatfast.hessian_trace(model, [batch], batch_fn=batch_fn)


def test_model_output_errors_name_what_was_returned():
    class Strange(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return {"scores": self.lin(x)}

    with pytest.raises(TypeError, match="model: returned a mapping with keys \\['scores'\\]; flatfast needs a tensor"):
        flatfast.hessian_trace(Strange(), [(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))])
    with pytest.raises(TypeError, match="batch_fn: expected a callable"):
        flatfast.hessian_trace(Strange(), [], batch_fn="labels")


# --- parameter subsets ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, chosen", [
    ("torch-transformer", lambda m: m.head),                                     # a module
    ("lstm", lambda m: ["rnn.weight_hh_l0", "head.bias"]),                        # names
    ("bert", lambda m: [m.classifier.weight, m.bert.pooler.dense.bias]),          # tensors
    ("resnet-bn", lambda m: m.block[0].named_parameters()),                      # (name, parameter) pairs
])
def test_params_gives_the_dense_sub_block(name, chosen):
    model, batches = case(name)
    selected = chosen(model)
    ids = {id(p) for p in (selected.parameters() if isinstance(selected, nn.Module) else
                           [model.get_parameter(s) if isinstance(s, str) else s[1] if isinstance(s, tuple) else s
                            for s in selected])}
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    selected = chosen(model)  # a generator of pairs is spent by the line above
    H = case_hessian(name, names)
    P = H.shape[0]
    V = torch.randn(2, P, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(flatfast.hvp(model, batches, V, params=selected if not hasattr(selected, "__next__")
                                            else chosen(model)), V @ H, rtol=1e-6, atol=1e-10)
    trace = flatfast.hessian_trace(model, batches, params=names, method="unit-vectors")
    assert _relative(trace.value, torch.trace(H)) < 1e-6
    top = float(np.linalg.eigvalsh(H.numpy())[-1])
    assert _relative(flatfast.hessian_eigenvalues(model, batches, params=names, tol=1e-10).values[0], top) < 1e-6
    assert HessianOperator(model, batches, params=names).dimension == P


def test_the_exact_trace_applies_to_a_piecewise_linear_subset():
    """A transformer is not piecewise linear in its attention weights, but it is in its classifier head (and in
    the BERT pooler's tanh input it is not): method='exact' takes the subset, 'auto' too, and refuses the rest."""
    for name, head in (("torch-transformer", "head"), ("bert", "classifier")):
        model, batches = case(name)
        names = [f"{head}.weight", f"{head}.bias"]
        H = case_hessian(name, names)
        exact = flatfast.hessian_trace(model, batches, params=names, method="exact")
        assert exact.stderr == 0.0 and _relative(exact.value, torch.trace(H)) < 1e-10
        assert flatfast.hessian_trace(model, batches, params=names).method == "exact"
        with pytest.raises(flatfast.NotPiecewiseLinearError, match="not piecewise linear"):
            flatfast.hessian_trace(model, batches, method="exact")


def test_frozen_parameters_are_left_out_unless_named():
    model, batches = case("torch-transformer")
    for p in model.embed.parameters():
        p.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert HessianOperator(model, batches).dimension == trainable
    named = HessianOperator(model, batches, params=["embed.weight", "head.weight"])
    assert named.dimension == model.embed.weight.numel() + model.head.weight.numel()
    before = model.embed.weight.detach().clone()
    assert flatfast.sharpness(model, batches, params=["embed.weight"], method="sign-ascent", steps=2) >= 0
    assert not model.embed.weight.requires_grad and torch.equal(model.embed.weight, before)


@pytest.mark.parametrize("params, exc, match", [
    (["head.wieght"], ValueError, "params: 'head.wieght' is not a parameter name of the model; did you mean "
                                  "'head.weight'"),
    ([torch.zeros(3)], ValueError, "params: entry 0 \\(a tensor of shape \\(3,\\)\\) is not a parameter of the model"),
    ([], ValueError, "params: is empty"),
    ([nn.Linear(2, 2)], ValueError, "params: entry 0 \\(Linear\\) is not a submodule of the model"),
    ([3.5], TypeError, "params: entry 0 is a float; expected a parameter, a parameter name or a module"),
    (7, TypeError, "params: expected parameters, parameter names or modules"),
])
def test_params_errors(params, exc, match):
    model, batches = case("torch-transformer")
    with pytest.raises(exc, match=match):
        flatfast.hessian_trace(model, batches, params=params)


# --- modes -----------------------------------------------------------------------------------------------------

def test_eval_mode_by_default_train_mode_on_request_and_both_restored():
    model, batches = case("resnet-bn")
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    for training in (True, False):
        model.train(training)
        for mode in ("eval", "train"):
            H = case_hessian("resnet-bn", mode=mode)
            res = flatfast.hessian_trace(model, batches, mode=mode, method="unit-vectors")
            assert res.mode == mode and _relative(res.value, torch.trace(H)) < 1e-6
            assert all(m.training == training for m in model.modules())
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())  # running statistics untouched
    eval_trace = float(torch.trace(case_hessian("resnet-bn", mode="eval")))
    train_trace = float(torch.trace(case_hessian("resnet-bn", mode="train")))
    assert _relative(eval_trace, train_trace) > 1e-3  # the two modes measure different functions here
    report = flatfast.flatness_report(model, batches, mode="train", eps=1e-3, slq_iterations=5)
    assert report.mode == "train" and report.trace.mode == "train" and report.as_dict()["mode"] == "train"
    H_train = case_hessian("resnet-bn", mode="train")  # the values, not only the labels, are train mode's
    assert _relative(report.trace.value, torch.trace(H_train)) < 4 * report.trace.stderr / abs(train_trace) + 1e-6
    assert _relative(report.top_eigenvalue, torch.linalg.eigvalsh(H_train)[-1]) < 1e-3


def test_train_mode_refuses_active_dropout_and_bad_modes():
    model, batches = case("torch-transformer")
    with pytest.raises(ValueError, match="mode: 'train' would drop out at random in .*dropout.*use mode='eval'"):
        flatfast.hessian_trace(model, batches, mode="train")
    with pytest.raises(ValueError, match="mode: expected one of \\('eval', 'train'\\)"):
        flatfast.hessian_eigenvalues(model, batches, mode="inference")


def test_the_exact_trace_refuses_sequence_first_inputs_by_name():
    model = Recurrent()
    model.rnn = nn.LSTM(4, 10)  # sequence first: inputs (L, B, F), examples in dimension 1
    model.forward = lambda x: model.head(model.rnn(x)[0][-1])
    x, y = torch.randn(6, 5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="no input tensor has the batch's 5 examples as its first dimension"):
        flatfast.hessian_trace(model, [(x, y)], params=["head.weight", "head.bias"], method="exact")
    H = dense_hessian(model, [(x, y)])
    assert _relative(flatfast.hessian_trace(model, [(x, y)], method="unit-vectors").value, torch.trace(H)) < 1e-6


# --- log P(f) for the same models -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["torch-transformer", "lstm", "hand-attention", "bert", "vit"])
def test_empirical_kernel_and_log_prior_of_modern_architectures(name):
    model, batches = case(name)
    batch = batches[0]
    if isinstance(batch, dict):
        X = {k: v for k, v in batch.items() if k != "labels"}
    else:
        X = batch[0] if isinstance(batch[0], torch.Tensor) else dict(zip(("x", "mask"), batch[0]))
    before = [p.detach().clone() for p in model.parameters()]
    K16, se16 = flatfast.empirical_nngp_kernel(model, X, kernel_samples=16, seed=3, return_stderr=True)
    n = K16.shape[0]
    assert K16.shape == (n, n) and torch.allclose(K16, K16.T) and bool(torch.isfinite(K16).all())
    assert float(torch.linalg.eigvalsh(K16).min()) > -1e-8 * float(K16.diagonal().max())
    assert torch.equal(K16, flatfast.empirical_nngp_kernel(model, X, kernel_samples=16, seed=3))  # seeded
    assert not torch.equal(K16, flatfast.empirical_nngp_kernel(model, X, kernel_samples=16, seed=4))
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    _, se64 = flatfast.empirical_nngp_kernel(model, X, kernel_samples=64, seed=3, return_stderr=True)
    ratio = float(se64.mean() / se16.mean())
    assert 0.3 < ratio < 0.75  # Monte Carlo error falls like 1/sqrt(M): 0.5 expected
    y = np.where(np.arange(n) % 3 == 0, 1, -1)
    value = flatfast.log_prior(X, y, model=model, kernel_samples=16, seed=3)
    assert value == pytest.approx(flatfast.log_prior(X, y, kernel=K16), rel=1e-12)
    assert -n * np.log(2) * 20 < value < 0


def test_every_layer_of_a_transformer_is_redrawn():
    """Linear maps, attention projections, recurrent weights, embeddings and (for Hugging Face) the class token
    and position embeddings all change between draws; LayerNorm is drawn by its own initialiser (ones, zeros)."""
    from flatfast.kernel.empirical import _draw_from_prior, _prior_rules

    model = TorchTransformer()
    model.rnn = nn.GRU(8, 8)
    rules = _prior_rules(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    _draw_from_prior(model, g, 2.0, 1.0, rules=rules)
    for n, p in model.named_parameters():
        if "norm" in n:
            assert torch.equal(p, torch.ones_like(p) if n.endswith("weight") else torch.zeros_like(p)), n
        else:
            assert not torch.equal(p, before[n]), n
    w = model.encoder.layers[0].self_attn.in_proj_weight
    assert float(w.detach().std()) == pytest.approx((2.0 / w.shape[1]) ** 0.5, rel=0.25)
    vit = tiny_vit()
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    _draw_from_prior(vit, g, 2.0, 1.0)
    changed = {n for n, p in vit.named_parameters() if not torch.equal(p, before[n])}
    assert {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings", "classifier.weight"} <= changed
