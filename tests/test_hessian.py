"""The Hessian engine against dense Hessians of tiny float64 models."""
import os

import numpy as np
import pytest
import torch
from torch.func import functional_call

import flatfast
from flatfast.curvature.operator import HessianOperator

from conftest import devices_here, native_module_or_skip


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 7), torch.nn.ReLU(), torch.nn.Linear(7, 5),
                               torch.nn.ReLU(), torch.nn.Linear(5, 3)).double()


def cnn():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                                torch.nn.Dropout(0.5), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3)).double()
    with torch.no_grad():  # non-trivial running statistics, so eval mode visibly differs from train mode
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    return model


def data(kind, target="class", n=40, batch=16):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, 6, generator=g, dtype=torch.float64) if kind == "mlp" else \
        torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g) if target == "class" else torch.randn(n, 3, generator=g,
                                                                                     dtype=torch.float64)
    return [(X[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]  # 16, 16, 8: a short last batch


def loss_for(target):
    """The loss a call must name: none for class targets (cross-entropy is the default), MSE for regression."""
    return None if target == "class" else torch.nn.MSELoss()


def dense_hessian(model, batches, target="class"):
    """The exact Hessian of the dataset-mean loss, in eval mode, by torch.autograd.functional.hessian."""
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())
    sizes = [p.numel() for _, p in params]
    was_training = model.training
    model.eval()

    def loss(flat):
        d = {n: t.view(p.shape) for (n, p), t in zip(params, flat.split(sizes))}
        out = functional_call(model, {**d, **frozen, **buffers}, (X,))
        if target == "class":
            return torch.nn.functional.cross_entropy(out, y)
        return torch.nn.functional.mse_loss(out, y)

    theta = torch.cat([p.detach().reshape(-1) for _, p in params])
    H = torch.autograd.functional.hessian(loss, theta)
    model.train(was_training)
    return H


def _hvp_cases():
    """Every R-operator backend on every device present (CPU: torch, generic, Triton under the interpreter, C++;
    CUDA: torch, generic, Triton, CUDA C++), both losses, plus a CNN through the generic path."""
    cases = []
    for device in devices_here():
        native = "cpp" if device == "cpu" else "cuda"
        for backend in ("torch", "generic", "triton", native):
            for target in ("class", "regression"):
                cases.append(pytest.param("mlp", target, backend, device, id=f"mlp-{target}-{backend}-{device}"))
        cases.append(pytest.param("cnn", "class", "auto", device, id=f"cnn-class-auto-{device}"))
    return cases


@pytest.mark.parametrize("kind,target,backend,device", _hvp_cases())
def test_hvp_matches_dense_hessian(kind, target, backend, device):
    if backend == "triton":  # CPU tensors only under TRITON_INTERPRET=1 (tests/conftest.py sets it by default)
        pytest.importorskip("triton")
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1; this run uses the compiled GPU kernels")
    if backend == "cpp":
        native_module_or_skip()
    if backend == "cuda" and flatfast.backends()["mlp_hvp"]["cuda"].startswith("unavailable"):
        pytest.skip(flatfast.backends()["mlp_hvp"]["cuda"])
    model = mlp() if kind == "mlp" else cnn()
    batches = data(kind, target)
    H = dense_hessian(model, batches, target)  # on the CPU, the oracle for every device
    model = model.to(device)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    V = torch.randn(5, H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loss_fn = loss_for(target)
    HV = flatfast.hvp(model, batches, V.to(device), loss_fn=loss_fn, backend=backend).cpu()
    assert torch.allclose(HV, V @ H, rtol=0, atol=1e-10 * float(H.abs().max()))
    one = flatfast.hvp(model, batches, V[0].to(device), loss_fn=loss_fn, backend=backend).cpu()
    assert one.shape == V[0].shape and torch.allclose(one, HV[0], atol=1e-12)
    op = HessianOperator(model, batches, loss_fn, backend=backend)
    assert torch.allclose(op.quadratic(V.to(device)).cpu(), (V * (V @ H)).sum(1), rtol=1e-10, atol=1e-12)


def test_no_vectors_give_no_products_without_a_pass_over_the_data():
    model, batches = cnn(), data("cnn")
    op = HessianOperator(model, batches)
    empty = torch.zeros(0, op.dimension, dtype=torch.float64)
    assert op.matmat(empty).shape == (0, op.dimension) and op.quadratic(empty).shape == (0,)


def test_fast_path_is_chosen_and_agrees_with_generic():
    model, batches = mlp(), data("mlp")
    assert HessianOperator(model, batches).backend == "torch"
    assert HessianOperator(cnn(), data("cnn")).backend == "reference"
    V = torch.randn(4, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    generic = flatfast.hvp(model, batches, V, backend="reference")
    assert torch.equal(flatfast.hvp(model, batches, V, backend="generic"), generic)  # the former name
    for backend in ("auto", "torch", "cpp", "triton"):
        if backend != "auto" and flatfast.backends()["mlp_hvp"][backend].startswith("unavailable"):
            if backend == "cpp":
                native_module_or_skip()
            continue
        fast = flatfast.hvp(model, batches, V, backend=backend)
        assert torch.allclose(fast, generic, rtol=0, atol=1e-10 * float(generic.abs().max())), backend


def test_list_of_parameter_shaped_tensors():
    model, batches = mlp(), data("mlp")
    H = dense_hessian(model, batches)
    vs = [torch.randn_like(p) for p in model.parameters()]
    out = flatfast.hvp(model, batches, vs)
    assert [o.shape for o in out] == [p.shape for p in model.parameters()]
    flat = torch.cat([o.reshape(-1) for o in out])
    assert torch.allclose(flat, H @ torch.cat([v.reshape(-1) for v in vs]), atol=1e-10)


def test_frozen_parameters_are_excluded():
    model, batches = mlp(), data("mlp")
    model[1].weight.requires_grad_(False)
    H = dense_hessian(model, batches)
    op = HessianOperator(model, batches)
    assert op.dimension == H.shape[0] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    V = torch.randn(2, op.dimension, dtype=torch.float64)
    assert torch.allclose(op.matmat(V), V @ H, atol=1e-10)


def test_partial_last_batch_is_weighted_by_its_size():
    model = mlp()
    whole = data("mlp", batch=40)
    split = data("mlp", batch=16)
    V = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    assert torch.allclose(flatfast.hvp(model, whole, V), flatfast.hvp(model, split, V), atol=1e-12)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_estimates_cover_the_exact_trace(method):
    model, batches = cnn(), data("cnn")
    exact = float(torch.trace(dense_hessian(model, batches)))
    inside = 0
    seeds = range(30)
    for seed in seeds:
        res = flatfast.hessian_trace(model, batches, probes=30, method=method, seed=seed, block=10)
        assert res.probes == 30 and res.stderr > 0
        inside += abs(res.value - exact) <= 2 * res.stderr
    # Two standard errors cover ~95%; allow for the t-distribution of 10-30 samples and for 30 seeds.
    assert inside / len(seeds) >= 0.8, inside


@pytest.mark.parametrize("target", ["class", "regression"])
def test_exact_trace_of_relu_mlp(target):
    model, batches = mlp(), data("mlp", target)
    exact = float(torch.trace(dense_hessian(model, batches, target)))
    res = flatfast.hessian_trace(model, batches, loss_fn=loss_for(target), method="exact")
    assert res.value == pytest.approx(exact, rel=1e-10) and res.stderr == 0.0
    # the CNN (BatchNorm, Dropout) takes the generic exact path of tests/test_exact_trace.py
    cnn_exact = float(torch.trace(dense_hessian(cnn(), data("cnn", target), target)))
    assert flatfast.hessian_trace(cnn(), data("cnn", target), loss_fn=loss_for(target),
                                  method="exact").value == pytest.approx(cnn_exact,
                                                                                                    rel=1e-9)


def test_adaptive_trace_meets_its_tolerance():
    model, batches = mlp(), data("mlp")
    exact = float(torch.trace(dense_hessian(model, batches)))
    for method in ("hutchinson", "hutch++"):
        res = flatfast.hessian_trace(model, batches, rtol=0.05, method=method, seed=1)
        assert res.stderr <= 0.05 * abs(res.value)
        assert abs(res.value - exact) <= 4 * res.stderr
    with pytest.warns(flatfast.ConvergenceWarning, match="stopped at max_probes=32"):
        flatfast.hessian_trace(model, batches, rtol=1e-6, method="hutchinson", max_probes=32)


def test_top_eigenvalues_match_dense():
    model, batches = mlp(), data("mlp")
    H = dense_hessian(model, batches)
    expected = np.sort(np.linalg.eigvalsh(H.numpy()))[::-1][:3]
    res = flatfast.hessian_eigenvalues(model, batches, k=3, tol=1e-12, max_iter=H.shape[0], return_vectors=True)
    np.testing.assert_allclose(res.values, expected, rtol=1e-8, atol=1e-10)
    assert np.all(res.residuals <= 1e-8 * np.abs(res.values).max())
    u = res.vectors[0]
    assert torch.allclose(H @ u, res.values[0] * u, atol=1e-8)


def test_spectrum_quadrature_reproduces_probe_moments():
    model, batches = cnn(), data("cnn")
    H = dense_hessian(model, batches)
    spec = flatfast.hessian_spectrum(model, batches, probes=3, iterations=12, seed=5)
    g = torch.Generator().manual_seed(5)
    V = torch.randn(3, H.shape[0], generator=g, dtype=torch.float64)
    V = V / torch.linalg.norm(V, dim=1, keepdim=True)
    for j in (1, 2, 3, 5):
        Hj = torch.linalg.matrix_power(H, j)
        exact = (V * (V @ Hj)).sum(1).numpy()
        quad = (spec.weights * spec.nodes ** j).sum(1)
        np.testing.assert_allclose(quad, exact, rtol=1e-8, atol=1e-12)
    assert np.isclose(np.trapezoid(spec.density, spec.grid), 1.0, atol=1e-3)
    # the spectrum's moments estimate the exact normalised ones
    evals = np.linalg.eigvalsh(H.numpy())
    assert abs(spec.moment(1) - evals.mean()) < 5 * evals.std() / np.sqrt(3) + 1e-12


def test_linear_operator_for_scipy():
    from scipy.sparse.linalg import eigsh

    model, batches = mlp(), data("mlp")
    H = dense_hessian(model, batches).numpy()
    op = flatfast.hessian_operator(model, batches)
    x = np.random.default_rng(0).standard_normal(H.shape[0])
    np.testing.assert_allclose(op @ x, H @ x, atol=1e-10)
    M = np.random.default_rng(1).standard_normal((H.shape[0], 3))
    np.testing.assert_allclose(op.matmat(M), H @ M, atol=1e-10)
    top = eigsh(op, k=1, which="LA", return_eigenvectors=False)[0]
    assert top == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-8)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


@pytest.mark.parametrize("call,exc,match", [
    (lambda m, b: flatfast.hvp(m, [], torch.zeros(1, 1)), None, None),
    (lambda m, b: flatfast.hessian_trace(m, [], probes=6), ValueError, "loader: yielded no batches"),
    (lambda m, b: flatfast.hvp(m, [(b[0][0], b[0][1][:3])], torch.zeros(2, 107, dtype=torch.float64)), ValueError,
     "loader: integer targets of shape"),
    (lambda m, b: flatfast.hvp(m, [(b[0][0], torch.randn(16, 2, dtype=torch.float64))],
                               torch.zeros(1, 107, dtype=torch.float64)), ValueError,
     r"loss_fn: float targets of shape \(16, 2\) .* name the loss, e.g. loss_fn=torch.nn.MSELoss\(\)"),
    (lambda m, b: flatfast.hvp(m, [(b[0][0], torch.randn(16, 2, dtype=torch.float64))],
                               torch.zeros(1, 107, dtype=torch.float64), loss_fn=torch.nn.MSELoss()), ValueError,
     "do not match outputs"),
    (lambda m, b: flatfast.hvp(m, [(b[0][0] * float("nan"), b[0][1])], torch.zeros(1, 107, dtype=torch.float64)),
     FloatingPointError, "loss: is NaN"),
    (lambda m, b: flatfast.hvp(m, b, torch.zeros(1, 5)), ValueError, "vectors: expected 107 entries"),
    (lambda m, b: flatfast.hvp(m, b, [torch.zeros(3)]), ValueError, "vectors: a list must hold one tensor"),
    (lambda m, b: flatfast.hvp(m, [(1, 2, 3)][0:0] or [42], torch.zeros(1, 107)), TypeError,
     "loader: a batch is an int; accepted"),
    (lambda m, b: flatfast.hvp("model", b, torch.zeros(1, 107)), TypeError, "model: expected a torch.nn.Module"),
    (lambda m, b: flatfast.hessian_trace(m, b, method="power"), ValueError, "method: expected"),
    (lambda m, b: flatfast.hessian_eigenvalues(m, b, k=0), ValueError, "k: must be >= 1"),
    (lambda m, b: flatfast.hvp(m, b, torch.zeros(1, 107), backend="torch",
                               loss_fn=lambda o, t: torch.nn.functional.cross_entropy(o, t)), ValueError,
     "backend: 'torch' is the fast path"),
])
def test_bad_input_leaves_the_model_untouched(call, exc, match):
    model, batches = mlp(), data("mlp")
    model.train()
    before, modes = _snapshot(model)
    if exc is None:  # the empty loader through hvp: also an error
        with pytest.raises(ValueError, match="loader: yielded no batches"):
            flatfast.hvp(model, [], torch.zeros(1, 107, dtype=torch.float64))
    else:
        with pytest.raises(exc, match=match):
            call(model, batches)
    after, modes_after = _snapshot(model)
    assert modes == modes_after and all(m for m in modes_after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_no_trainable_parameters():
    model = mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="model: has no trainable parameters"):
        flatfast.hvp(model, data("mlp"), torch.zeros(1, 1))


def test_modes_restored_after_success():
    model = cnn()
    model.train()
    model[3].eval()  # a mixed state must come back exactly
    modes = [m.training for m in model.modules()]
    flatfast.hessian_trace(model, data("cnn"), probes=4, method="hutchinson")
    assert [m.training for m in model.modules()] == modes


def _distributed_worker(rank, world, port, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, batches = mlp(), data("mlp")
        shard = batches[rank::world]  # each rank reads its own shard
        V = torch.randn(3, 107, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        HV = flatfast.hvp(model, shard, V)
        sharp = flatfast.sharpness(model, shard, eps=1e-3, method="sign-ascent")
        adaptive = flatfast.adaptive_sharpness(model, shard, steps=5).value
        if rank == 0:
            torch.save((HV, sharp, adaptive), out_path)
        dist.barrier()  # no rank tears gloo down while another is still inside a collective (an abort, at random)
    finally:
        dist.destroy_process_group()


def test_data_parallel_with_gloo(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "hv.pt")
    mp.spawn(_distributed_worker, args=(2, port, out), nprocs=2, join=True)
    V = torch.randn(3, 107, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    expected = flatfast.hvp(mlp(), data("mlp"), V)
    HV, sharp, adaptive = torch.load(out)
    assert torch.allclose(HV, expected, atol=1e-12)
    assert sharp == pytest.approx(flatfast.sharpness(mlp(), data("mlp"), eps=1e-3, method="sign-ascent"), rel=1e-10)
    # the ascent steps along the whole data's gradient on every rank, as one process does
    assert adaptive == pytest.approx(flatfast.adaptive_sharpness(mlp(), data("mlp"), steps=5).value, rel=1e-10)


def _diagonal_operator(eigenvalues):
    d = torch.tensor(eigenvalues, dtype=torch.float64)
    return lambda V: V * d


def test_lanczos_with_few_iterations_warns_and_bounds_from_below():
    from flatfast.errors import ConvergenceWarning
    from flatfast.curvature.estimators import lanczos_eigenvalues

    eigenvalues = np.linspace(1.0, 2.0, 400) ** 3  # a slowly decaying top: 8 iterations cannot resolve it
    with pytest.warns(ConvergenceWarning, match="Ritz values have residuals above tol"):
        res = lanczos_eigenvalues(_diagonal_operator(eigenvalues), 400, k=3, max_iter=8, tol=1e-8)
    top = np.sort(eigenvalues)[::-1][:3]
    assert res.iterations == 8 and np.all(res.values <= top + 1e-12) and np.all(res.residuals > 0)
    # with room it converges, across several basis blocks, without a warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        full = lanczos_eigenvalues(_diagonal_operator(eigenvalues), 400, k=3, max_iter=400, tol=1e-8)
    np.testing.assert_allclose(full.values, top, rtol=1e-8)


def test_one_batch_reuses_its_gradient_graph_until_something_changes():
    """A list of one batch keeps its gradient graph between products (as PyHessian's data= mode does); an
    in-place change to a parameter, the inputs or the targets builds it again."""
    model, batches = mlp(), data("mlp", n=16, batch=16)
    op = HessianOperator(model, batches, torch.nn.CrossEntropyLoss(), backend="generic")
    V = torch.randn(2, op.dimension, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    first = op.matmat(V)
    graph = op._graph[1]
    assert torch.equal(op.matmat(V), first) and op._graph[1] is graph  # reused
    with torch.no_grad():
        model[1].weight.mul_(1.5)
    fresh = HessianOperator(model, batches, torch.nn.CrossEntropyLoss(), backend="generic").matmat(V)
    assert op._graph[1] is graph and torch.equal(op.matmat(V), fresh) and op._graph[1] is not graph
    batches[0][0].mul_(0.5)  # the inputs, in place
    assert not torch.allclose(op.matmat(V), fresh)
    two = HessianOperator(model, data("mlp", n=32, batch=16), torch.nn.CrossEntropyLoss(), backend="generic")
    two.matmat(V)
    assert two._graph is None  # several batches: nothing is kept between passes


def test_lanczos_holds_a_bounded_basis_through_its_restarts(monkeypatch):
    """Thick restarts keep the basis at 8k vectors however many products a tight tolerance takes, and the values
    are those of Lanczos keeping every vector."""
    from flatfast.curvature.estimators import lanczos_basis, lanczos_eigenvalues

    allocations = []
    empty = torch.empty

    def recording_empty(*shape, **kwargs):
        allocations.append(tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape)
        return empty(*shape, **kwargs)

    monkeypatch.setattr(torch, "empty", recording_empty)
    eigenvalues = np.linspace(1.0, 2.0, 400) ** 3
    res = lanczos_eigenvalues(_diagonal_operator(eigenvalues), 400, k=2, max_iter=400, tol=1e-9)
    monkeypatch.undo()
    assert res.iterations > 2 * lanczos_basis(400, 2)  # several restarts happened
    assert max(shape[0] for shape in allocations if len(shape) == 2 and shape[1] == 400) == 16
    np.testing.assert_allclose(res.values, np.sort(eigenvalues)[::-1][:2], rtol=1e-8)


def test_lanczos_finds_a_repeated_eigenvalue_once():
    from flatfast.errors import ConvergenceWarning
    from flatfast.curvature.estimators import lanczos_eigenvalues

    eigenvalues = [5.0, 5.0, 3.0, 1.0, 0.5]
    res = lanczos_eigenvalues(_diagonal_operator(eigenvalues), 5, k=2, tol=1e-10)
    np.testing.assert_allclose(res.values, [5.0, 3.0], rtol=1e-10)  # the top k *distinct* values, as documented
    with pytest.warns(ConvergenceWarning, match="Krylov space is exhausted"):
        fewer = lanczos_eigenvalues(_diagonal_operator(eigenvalues), 5, k=5, tol=1e-10)
    np.testing.assert_allclose(fewer.values, [5.0, 3.0, 1.0, 0.5], rtol=1e-10)


def test_probe_budgets_that_leave_no_standard_error_are_refused():
    model, batches = mlp(), data("mlp")
    with pytest.raises(ValueError, match="probes: must be >= 6"):
        flatfast.hessian_trace(model, batches, probes=3)
    from flatfast.curvature.estimators import hutchinson, hutchpp

    with pytest.raises(ValueError, match="probes: Hutch\\+\\+ needs at least 6"):
        hutchpp(_diagonal_operator([1.0, 2.0]), 2, probes=5)
    with pytest.raises(ValueError, match="probes: Hutchinson needs at least 2"):
        hutchinson(_diagonal_operator([1.0, 2.0]), 2, probes=1)
    res = flatfast.hessian_trace(model, batches, probes=6, method="hutch++")
    assert res.probes == 6 and np.isfinite(res.stderr)


class ScaledLinear(torch.nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


def test_fast_path_only_for_plain_linear_and_relu():
    """A Linear subclass, a hook or a parametrization changes the function; the R-operator would differentiate
    the plain one. Such models take the generic path, and their products are still the dense Hessian's."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2.0 * w

    batches = data("mlp")
    torch.manual_seed(0)
    subclass = torch.nn.Sequential(torch.nn.Flatten(), ScaledLinear(6, 7), torch.nn.ReLU(), torch.nn.Linear(7, 5),
                                   torch.nn.ReLU(), torch.nn.Linear(5, 3)).double()
    hooked = mlp()
    hooked[1].register_forward_hook(lambda module, inputs, output: output * 3.0)
    param = mlp()
    parametrize.register_parametrization(param[1], "weight", Doubled())
    for name, model in {"subclass": subclass, "hook": hooked, "parametrization": param}.items():
        assert HessianOperator(model, batches).backend == "reference", name
        H = dense_hessian(model, batches)
        V = torch.randn(2, H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(flatfast.hvp(model, batches, V), V @ H, atol=1e-10 * float(H.abs().max())), name
    assert HessianOperator(mlp(), batches).backend == "torch"


def test_class_targets_out_of_range_and_empty_batches_are_named():
    model, batches = mlp(), data("mlp")
    x, y = batches[0]
    outputs = model(x).shape[1]
    with pytest.raises(ValueError, match=f"loader: class target {outputs} is out of range for a model with {outputs}"):
        flatfast.hvp(model, [(x, torch.full_like(y, outputs))], torch.zeros(1, 107, dtype=torch.float64))
    with pytest.raises(ValueError, match="loader: class target -1"):
        flatfast.hessian_trace(model, [(x, torch.full_like(y, -1))], method="exact")
    with pytest.raises(ValueError, match="loader: its 2 batch\\(es\\) hold no examples"):
        flatfast.hvp(model, [(x[:0], y[:0])] * 2, torch.zeros(1, 107, dtype=torch.float64))
    # empty batches among real ones are skipped, not counted
    V = torch.randn(1, 107, dtype=torch.float64)
    assert torch.allclose(flatfast.hvp(model, [(x[:0], y[:0])] + batches, V), flatfast.hvp(model, batches, V))


def test_routes_move_on_only_for_torch_limits_and_quietly():
    """A bug in the user's loss propagates (no route is tried after it); a loss that torch.func cannot
    differentiate in forward mode (mse_loss: "ZeroTensors are immutable") works by double backward, the first
    route, with the same products and no warning, and the operator remembers the route."""
    model, batches = mlp(), data("mlp", "regression")

    def failing(outputs, targets):
        raise RuntimeError("boom: a bug in the user's loss")

    op = HessianOperator(model, batches, failing, backend="generic")
    with pytest.raises(RuntimeError, match="boom"):
        op.matmat(torch.zeros(1, 107, dtype=torch.float64))
    assert op.route is None

    mse = torch.nn.MSELoss()
    H = dense_hessian(model, batches, "regression")
    V = torch.randn(2, H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    op = HessianOperator(model, batches, mse, backend="generic")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HV = op.matmat(V)
        quadratic = op.quadratic(V)
    assert op.route == "double backward"
    assert torch.allclose(HV, V @ H, atol=1e-10 * float(H.abs().max()))
    assert torch.allclose(quadratic, ((V @ H) * V).sum(1), atol=1e-10 * float(H.abs().max()))
    assert torch.allclose(HV, V @ H, atol=1e-10 * float(H.abs().max()))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # said once
        flatfast.hvp(model, batches, V, loss_fn=mse, backend="generic")


# --- method="auto": the cheapest honest route ------------------------------------------------------------------

def tanh_net(hidden, inputs=6):
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3)).double()


def test_default_trace_of_relu_networks_is_exact():
    for model, kind in ((mlp(), "mlp"), (cnn(), "cnn")):
        batches = data(kind)
        exact = float(torch.trace(dense_hessian(model, batches)))
        res = flatfast.hessian_trace(model, batches)
        assert res.method == "exact" and res.stderr == 0.0 and res.probes == 0
        assert res.value == pytest.approx(exact, rel=1e-9)


def test_default_trace_of_a_small_smooth_network_takes_the_unit_vectors():
    """A 243-parameter tanh network: no estimator with 2000 probes, the exact trace from 243 products."""
    model, batches = tanh_net(24), data("mlp")
    P = sum(p.numel() for p in model.parameters())
    assert P == 243
    exact = float(torch.trace(dense_hessian(model, batches)))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", flatfast.ConvergenceWarning)
        res = flatfast.hessian_trace(model, batches)
    assert res.method == "unit-vectors" and res.probes == P and res.stderr == 0.0
    assert res.value == pytest.approx(exact, rel=1e-10)


def test_default_trace_of_a_large_smooth_network_estimates_with_at_most_p_probes():
    model = tanh_net(600, inputs=6)  # 6,003 parameters: more than the estimator's 2000 probes
    batches = data("mlp")
    P = sum(p.numel() for p in model.parameters())
    res = flatfast.hessian_trace(model, batches, rtol=0.05)
    assert res.method == "hutch++" and 0 < res.probes <= min(2000, P) and res.stderr > 0
    exact = float(torch.trace(dense_hessian(model, batches)))
    assert abs(res.value - exact) <= 4 * res.stderr
    # a probe budget above P is never spent: P unit vectors give the trace exactly
    small = tanh_net(24)
    assert flatfast.hessian_trace(small, batches, probes=300).method == "unit-vectors"


def test_trace_rule_weighs_the_exact_cost_against_the_estimators():
    """The cost model: exact costs ~C passes (C outputs), the estimator 2 passes per expected probe."""
    from flatfast.curvature.trace import choose_trace_method, expected_estimator_probes

    assert expected_estimator_probes(None, 0.01, 2000) == 2000
    assert expected_estimator_probes(None, 0.1, 2000) == 200
    assert expected_estimator_probes(30, 0.01, 2000) == 30
    torch.manual_seed(0)
    wide_output = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.ReLU(), torch.nn.Linear(40, 50)).double()
    X = torch.randn(20, 6, dtype=torch.float64)
    loader = [(X, torch.randint(0, 50, (20,)))]
    op = HessianOperator(wide_output, loader)
    assert choose_trace_method(op, probes=30)[0] == "exact"  # 50 passes <= 2 x 30
    method, why = choose_trace_method(op, probes=20)  # 50 passes > 2 x 20, and 2,330 parameters > 20 probes
    assert method == "hutch++" and "50 passes" in why
    smooth = HessianOperator(tanh_net(600), data("mlp"))
    method, why = choose_trace_method(smooth)
    assert method == "hutch++" and "Tanh" in why  # names why the exact route was refused


def test_probe_block_fills_a_memory_budget():
    from flatfast.curvature.estimators import probe_block

    assert probe_block(10**6, 4, "cpu", requested=5) == 5
    assert probe_block(10**6, 4, "cpu") == 16  # 256 MiB / (4 x 4 MB)
    assert probe_block(100, 8, "cpu") == 64  # capped
    assert probe_block(10**9, 8, "cpu") == 1


# --- the default loss never guesses ----------------------------------------------------------------------------

def test_default_loss_is_cross_entropy_on_class_targets_only():
    """A one-logit classifier with 0/1 float targets (the paper's) used to get MSE: its trace was 4.30 where the
    BCE it was trained with gives 0.537. Now every measure refuses and names the losses that fit."""
    torch.manual_seed(0)
    one_logit = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).double()
    X = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = (X[:, :1] > 0).double()
    batches = [(X, y)]
    calls = {
        "hessian_trace": lambda **kw: flatfast.hessian_trace(one_logit, batches, **kw),
        "hvp": lambda **kw: flatfast.hvp(one_logit, batches, torch.zeros(1, 65, dtype=torch.float64), **kw),
        "hessian_eigenvalues": lambda **kw: flatfast.hessian_eigenvalues(one_logit, batches, **kw),
        "frobenius_norm": lambda **kw: flatfast.frobenius_norm(one_logit, batches, probes=4, **kw),
        "sharpness": lambda **kw: flatfast.sharpness(one_logit, batches, eps=1e-3, method="sign-ascent", **kw),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"loss_fn: one output and float targets in \{0, 1\}: .*"
                                             r"BCEWithLogitsLoss\(\) \(the paper's"):
            call()
    bce = torch.nn.BCEWithLogitsLoss()
    exact = flatfast.hessian_trace(one_logit, batches, loss_fn=bce)
    dense = torch.autograd.functional.hessian(
        lambda flat: bce(torch.func.functional_call(one_logit, dict(zip(
            [n for n, _ in one_logit.named_parameters()],
            [t.view(p.shape) for (_, p), t in zip(one_logit.named_parameters(),
                                                  flat.split([p.numel() for p in one_logit.parameters()]))])), (X,)),
                         y), torch.cat([p.detach().reshape(-1) for p in one_logit.parameters()]))
    assert exact.method == "exact" and exact.value == pytest.approx(float(torch.trace(dense)), rel=1e-10)
    with pytest.raises(ValueError, match="loss_fn: one output and integer targets: cross-entropy needs two"):
        flatfast.hessian_trace(one_logit, [(X, y[:, 0].long())])
    with pytest.raises(TypeError):  # keyword-only: a loss in the third position is refused, not misread
        flatfast.hessian_trace(one_logit, batches, bce)


def test_warnings_point_at_the_callers_line():
    """A ConvergenceWarning from hessian_trace (Hutch++ calling Hutchinson inside) names this file, not flatfast's."""
    model, batches = mlp(), data("mlp")
    with pytest.warns(flatfast.ConvergenceWarning) as caught:
        flatfast.hessian_trace(model, batches, rtol=1e-6, method="hutch++", max_probes=40)
    assert caught[0].filename == __file__
    with pytest.warns(flatfast.ConvergenceWarning) as caught:
        flatfast.hessian_trace(model, batches, rtol=1e-6, method="hutchinson", max_probes=32)
    assert caught[0].filename == __file__


def test_a_one_shot_loader_is_refused_not_half_read():
    """method='auto' looks at the first batch before the trace's pass: a generator would lose that batch."""
    model, batches = mlp(), data("mlp")
    with pytest.raises(TypeError, match="loader: is a one-shot iterator"):
        flatfast.hessian_trace(model, (b for b in batches))
    with pytest.raises(TypeError, match="loader: is a one-shot iterator"):
        flatfast.hvp(model, iter(batches), torch.zeros(1, 107, dtype=torch.float64))
    assert flatfast.hessian_trace(model, batches).method == "exact"  # a list is fine
