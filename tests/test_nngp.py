"""Every nngp backend against the float64 reference, plus independent checks of the reference itself."""
import dataclasses
import warnings

import numpy as np
import pytest

import flatfast
from flatfast.reference.nngp import nngp_kernel_reference
from flatfast.testing import kernel_diagonal, sample_relu_network_outputs, scaled_error

from conftest import devices_here, native_module_or_skip, nngp_backends_here, on_device, to_numpy

SIZES = (1, 2, 7, 64, 513)
DIMS = (1, 3, 784, 3072)
DEPTHS = range(0, 11)
F64_TOL = 1e-12
F32_TOL = 2e-5  # float32 dot products over d = 3072 carry ~sqrt(d) * 6e-8 relative error


def make_inputs(rng, n, m, d):
    """Gaussian rows with the awkward cases mixed in: a duplicate row, a zero row, a negated row."""
    X = rng.standard_normal((n, d))
    Z = rng.standard_normal((m, d))
    if n >= 7 and m >= 7:
        X[1] = X[0]           # duplicate within X
        X[2] = 0.0            # zero row
        Z[3] = X[0]           # a row shared by X and Z
        Z[4] = -X[5]          # antipodal rows: c = -1
    return X, Z


def grid_for(backend):
    """The full grid for compiled backends; a covering subset for the Triton interpreter (~1 ms per tile)."""
    if backend == "triton":
        pairs = [(1, 1), (2, 7), (7, 2), (64, 64), (513, 7)]
        return [(n, m, d) for (n, m) in pairs for d in DIMS], (0, 1, 2, 5, 10)
    return [(n, m, d) for n in SIZES for m in SIZES for d in DIMS], DEPTHS


def _cases():
    for backend_param in nngp_backends_here():
        backend, device = backend_param.values
        shapes, depths = grid_for(backend)
        for n, m, d in shapes:
            yield pytest.param(backend, device, n, m, d, depths, marks=backend_param.marks,
                               id=f"{backend}-{device}-{n}x{m}-d{d}")


@pytest.mark.parametrize("backend,device,n,m,d,depths", list(_cases()))
def test_backend_matches_reference_float64(backend, device, n, m, d, depths, rng):
    X, Z = make_inputs(rng, n, m, d)
    for depth in depths:
        qx, qz = kernel_diagonal(X, depth), kernel_diagonal(Z, depth)
        K = to_numpy(flatfast.nngp_kernel(on_device(X, device), on_device(Z, device), depth=depth, backend=backend))
        assert K.dtype == np.float64 and K.shape == (n, m)
        err = scaled_error(K, nngp_kernel_reference(X, Z, depth), qx, qz)
        assert err <= F64_TOL, f"depth {depth}: scaled error {err:.2e}"
        if n == m:  # the symmetric path, Z = X
            Ks = to_numpy(flatfast.nngp_kernel(on_device(X, device), depth=depth, backend=backend))
            err = scaled_error(Ks, nngp_kernel_reference(X, None, depth), qx, qx)
            assert err <= F64_TOL, f"symmetric, depth {depth}: scaled error {err:.2e}"
            np.testing.assert_allclose(np.diag(Ks), qx, rtol=1e-14)  # the closed-form diagonal
            np.testing.assert_array_equal(Ks, Ks.T)


@pytest.mark.parametrize("backend,device", nngp_backends_here())
@pytest.mark.parametrize("d", [3, 784, 3072])
def test_float32_within_stated_tolerance(backend, device, d, rng):
    X, Z = make_inputs(rng, 64, 7, d)
    for depth in (0, 2, 10):
        K32 = to_numpy(flatfast.nngp_kernel(on_device(X.astype(np.float32), device),
                                            on_device(Z.astype(np.float32), device), depth=depth, backend=backend,
                                            dtype=np.float32))
        assert K32.dtype == np.float32
        err = scaled_error(K32, nngp_kernel_reference(X, Z, depth), kernel_diagonal(X, depth), kernel_diagonal(Z, depth))
        assert err <= F32_TOL, f"depth {depth}: float32 scaled error {err:.2e}"


@pytest.mark.parametrize("backend,device", nngp_backends_here())
def test_zero_bias_variance_and_zero_rows(backend, device):
    # sigma_b2 = 0 and a zero row: q = 0 for that point, whose covariances are exactly 0.
    X = np.array([[0.0, 0.0], [1.0, 2.0], [-1.0, 0.5]])
    for depth in (0, 1, 3):
        K = to_numpy(flatfast.nngp_kernel(on_device(X, device), depth=depth, sigma_b2=0.0, backend=backend))
        ref = nngp_kernel_reference(X, None, depth, 2.0, 0.0)
        np.testing.assert_allclose(K, ref, rtol=1e-13, atol=1e-300)
        assert np.all(K[0] == 0.0) and np.all(np.isfinite(K))


def test_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    X = torch.rand(9, 5, dtype=torch.float64)
    K = flatfast.nngp_kernel(X, depth=3)
    assert isinstance(K, torch.Tensor) and K.dtype == torch.float64
    np.testing.assert_allclose(K.numpy(), nngp_kernel_reference(X.numpy(), None, 3), rtol=1e-13)
    K32 = flatfast.nngp_kernel(X.float(), X[:4].float(), dtype=torch.float32)
    assert isinstance(K32, torch.Tensor) and K32.dtype == torch.float32 and K32.shape == (9, 4)


def test_closed_form_depth_one_orthogonal_inputs():
    # Orthogonal unit inputs, sigma_b2 = 0: K0 = 0 off the diagonal, so c = 0, theta = pi/2 and
    # K1 = sigma_w2 / (2 pi) * sqrt(q q') exactly (the arc-cosine kernel's value at a right angle).
    X = np.eye(3) * np.sqrt(3.0)
    K = flatfast.nngp_kernel(X, depth=1, sigma_w2=2.0, sigma_b2=0.0)
    q0 = 2.0
    np.testing.assert_allclose(K[0, 1], 2.0 / (2 * np.pi) * q0, rtol=1e-15)
    np.testing.assert_allclose(np.diag(K), q0, rtol=1e-15)


# --- an independent check: random finite-width ReLU networks ----------------------------------------------

@pytest.mark.parametrize("depth", [1, 2, 3])
def test_kernel_matches_finite_width_networks(depth):
    rng = np.random.default_rng(depth)
    X = np.array([[1.0, 0.0, 0.5], [0.2, -1.0, 0.3], [0.0, 0.0, 0.0], [1.0, 0.0, 0.5], [-1.0, 0.1, -0.4]])
    f = sample_relu_network_outputs(X, depth, width=2048, draws=4000, rng=rng)
    prods = f[:, :, None] * f[:, None, :]
    mean = prods.mean(axis=0)
    stderr = prods.std(axis=0, ddof=1) / np.sqrt(prods.shape[0])
    K = flatfast.nngp_kernel(X, depth=depth)
    z = np.abs(mean - K) / stderr
    assert z.max() < 4.5, f"Monte Carlo disagrees: max |z| = {z.max():.2f}\n{mean}\n{K}"


def test_depth_one_matches_explicit_networks():
    """Depth 1 with every weight drawn explicitly (no sampling shortcut): 3000 networks of width 2048."""
    rng = np.random.default_rng(7)
    X = np.array([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.2], [0.0, 0.0]])
    width, draws = 2048, 3000
    W1 = rng.standard_normal((draws, width, 2)) * np.sqrt(2.0 / 2)
    a = np.maximum(W1 @ X.T + rng.standard_normal((draws, width, 1)), 0.0)
    w2 = rng.standard_normal((draws, 1, width)) * np.sqrt(2.0 / width)
    f = (w2 @ a)[:, 0, :] + rng.standard_normal((draws, 1))
    prods = f[:, :, None] * f[:, None, :]
    z = np.abs(prods.mean(0) - flatfast.nngp_kernel(X, depth=1)) / (prods.std(0, ddof=1) / np.sqrt(draws))
    assert z.max() < 4.5


# --- bad input and dispatch --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(X=np.array([[np.nan, 1.0]])), ValueError, "X: contains NaN"),
    (dict(X=np.array([[np.inf, 1.0]])), ValueError, "X: contains NaN or infinite"),
    (dict(X=np.ones(3)), ValueError, "X: expected a 2-D array"),
    (dict(X=np.ones((2, 2, 2))), ValueError, "X: expected a 2-D array"),
    (dict(X=np.ones((2, 0))), ValueError, "X: has zero feature columns"),
    (dict(X=np.ones((2, 3)), Z=np.ones((2, 4))), ValueError, "Z: has 4 features but X has 3"),
    (dict(X=np.ones((2, 3)), Z=np.array([[1.0, np.nan, 0.0]])), ValueError, "Z: contains NaN"),
    (dict(X=np.ones((2, 3)), depth=-1), ValueError, "depth: must be >= 0"),
    (dict(X=np.ones((2, 3)), depth=1.5), TypeError, "depth: expected an integer"),
    (dict(X=np.ones((2, 3)), sigma_w2=0.0), ValueError, "sigma_w2: must be > 0"),
    (dict(X=np.ones((2, 3)), sigma_w2=-1.0), ValueError, "sigma_w2: must be > 0"),
    (dict(X=np.ones((2, 3)), sigma_b2=-1.0), ValueError, "sigma_b2: must be >= 0"),
    (dict(X=np.ones((2, 3)), sigma_b2=float("nan")), ValueError, "sigma_b2: must be finite"),
    (dict(X=np.ones((2, 3)), dtype=np.int32), ValueError, "dtype: expected float64 or float32"),
    (dict(X=np.ones((2, 3)), backend="nope"), ValueError, "backend: unknown backend"),
    (dict(X="abc"), TypeError, "X: expected a 2-D array"),
    (dict(X=np.array([["a", "b"]])), TypeError, "X: expected a real numeric array"),
])
def test_bad_input_raises_naming_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        flatfast.nngp_kernel(**kwargs)


def test_native_boundary_checks_its_arguments():
    module = native_module_or_skip()
    with pytest.raises(ValueError, match="X: must be 2-D"):
        module.nngp_f64(np.ones(3), None, 1, 2.0, 1.0)
    with pytest.raises(ValueError, match="Z: must have as many columns"):
        module.nngp_f64(np.ones((2, 3)), np.ones((2, 2)), 1, 2.0, 1.0)
    with pytest.raises(ValueError, match="X: must be a C-contiguous array"):
        module.nngp_f64(np.ones((2, 3), dtype=np.float32), None, 1, 2.0, 1.0)
    with pytest.raises(ValueError, match="depth"):
        module.nngp_f64(np.ones((2, 3)), None, -2, 2.0, 1.0)


def test_unavailable_backend_says_why():
    with pytest.raises(flatfast.BackendUnavailableError, match="cuda"):
        flatfast.nngp_kernel(np.ones((2, 3)), backend="cuda")


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    import flatfast.backend.dispatch as dispatch_mod

    impls = dispatch_mod._REGISTRY["nngp"]
    broken = [i if i.reference else dataclasses.replace(i, probe=lambda: "pretend it is not built") for i in impls]
    monkeypatch.setitem(dispatch_mod._REGISTRY, "nngp", broken)
    monkeypatch.setattr(dispatch_mod, "_WARNED", set())
    X = np.random.default_rng(0).random((4, 3))
    with pytest.warns(flatfast.BackendFallbackWarning, match="pretend it is not built"):
        K = flatfast.nngp_kernel(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K2 = flatfast.nngp_kernel(X)  # the second call is silent
    np.testing.assert_array_equal(K, K2)


def test_backends_report_lists_every_backend():
    report = flatfast.backends()
    assert set(report["nngp"]) >= {"cpp", "cuda", "triton", "reference"}
    assert report["nngp"]["reference"].startswith("available")
    if "cuda" not in devices_here():
        assert "unavailable" in report["nngp"]["cuda"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_triton_gemm_epilogue_and_fused_kernel_agree(dtype, rng):
    """The two Triton routes (GEMM + in-place epilogue over the upper tiles, and the fused tile kernel) against
    the reference; the epilogue's K(X, X) is exactly symmetric (each upper tile writes its own mirror), with the
    exact diagonal, over sizes that leave partial tiles."""
    torch = pytest.importorskip("torch")
    if flatfast.backends()["nngp"]["triton"].startswith("unavailable"):
        pytest.skip(flatfast.backends()["nngp"]["triton"])
    from flatfast.kernels.nngp_triton import nngp_kernel_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"  # real Triton on a GPU, the interpreter on the CPU
    tdtype = getattr(torch, dtype)
    tol = F64_TOL if dtype == "float64" else F32_TOL
    for n, m, d, depth in [(130, None, 20, 2), (65, None, 5, 3), (97, 70, 12, 1)]:
        X, Z = make_inputs(rng, n, m or n, d)
        Z = None if m is None else Z
        Xt = torch.from_numpy(X).to(device, tdtype)
        Zt = None if Z is None else torch.from_numpy(Z).to(device, tdtype)
        reference = nngp_kernel_reference(X, Z, depth)
        for fused in (False, True):
            K = nngp_kernel_triton(Xt, Zt, depth, 2.0, 1.0, fused=fused)
            K = K.cpu()
            err = scaled_error(K.double().numpy(), reference, kernel_diagonal(X, depth),
                               kernel_diagonal(X if Z is None else Z, depth))
            assert err <= tol, (fused, n, m, depth, err)
            if Z is None and not fused:
                assert torch.equal(K, K.T)
                np.testing.assert_allclose(np.diag(K.double().numpy()), kernel_diagonal(X, depth),
                                           rtol=1e-15 if dtype == "float64" else 1e-7)
