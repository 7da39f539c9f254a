"""log P(f) where its data is: torch and cupy inputs, the array-module EP solver that runs on the GPU (tested here
on numpy with LAPACK standing in for cuSOLVER), EP's memory (two n x n arrays, measured), and GPU-only checks."""
import sys
import tracemalloc
import types
import warnings

import numpy as np
import pytest

import flatfast
from flatfast.prior import ep as _ep
from flatfast.kernel import checks as _kernel_checks
from flatfast.backend import xp as _xp
from flatfast.prior import checks as prior_checks
from flatfast.prior import evidence as prior
from flatfast.errors import BackendFallbackWarning, NotPSDError


def _problem(n, d, seed):
    rng = np.random.default_rng(seed)
    X = rng.random((n, d))
    y = np.where(X[:, : d // 2].sum(1) > X[:, d // 2:].sum(1), 1, -1)
    return X, flatfast.nngp_kernel(X), y


def _array_linalg_on_numpy(block_bytes):
    from scipy.special import erfcx, log_ndtr

    return _xp.ArrayLinalg(np, _xp.lapack_factor, _xp.lapack_solve, (erfcx, log_ndtr), block_bytes=block_bytes)


# --- the GPU's solver, on numpy ------------------------------------------------------------------------------

@pytest.mark.parametrize("likelihood", ["heaviside", "probit"])
@pytest.mark.parametrize("precision", ["float64", "mixed"])
def test_array_module_solver_equals_the_lapack_solver(likelihood, precision):
    """The solver cupy runs (POTRF in place, the inverse factor applied by triangular solves, diag(B^-1) from
    blocks of solved identity columns) gives the CPU solver's value; 40 KB blocks make every pass run over many
    blocks."""
    X, K, y = _problem(500, 40, 3)
    shift = 1.0 if likelihood == "probit" else 0.0
    cpu = _ep.expectation_propagation(K, y * 1.0, precision=precision, shift=shift)
    device = _ep.expectation_propagation(K, y * 1.0, precision=precision, shift=shift,
                                           linalg=_array_linalg_on_numpy(40_000))
    assert cpu.converged and device.converged and device.sweeps == cpu.sweeps
    tol = 1e-10 if precision == "float64" else 1e-7  # mixed: the float32 phase rounds differently; tol = 1e-6
    assert abs(device.log_z - cpu.log_z) <= tol * abs(cpu.log_z), (device.log_z, cpu.log_z)
    if precision == "float64":  # mixed: both stop within site_tol = sqrt(tol) of the fixed point's sites
        np.testing.assert_allclose(device.site_precision, cpu.site_precision, rtol=1e-7, atol=1e-9)


def test_array_module_solver_detects_a_failed_factorisation():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((60, 60))
    indefinite = A + A.T
    la = _array_linalg_on_numpy(10_000)
    work = np.empty_like(indefinite)
    with pytest.raises(NotPSDError, match="not positive semi-definite"):
        _kernel_checks._check_psd(indefinite, la, work)
    assert la.inverse_cholesky_inplace(la.scaled_system(indefinite, np.ones(60), work, shift=-1.0)) is None


def test_probit_is_a_diagonal_shift_not_a_copy():
    """Probit's K + I, applied inside the passes, equals Heaviside EP on an explicit K + I."""
    X, K, y = _problem(300, 20, 5)
    shifted = flatfast.ep_log_evidence(K + np.eye(len(K)), y)
    assert flatfast.ep_log_evidence(K, y, likelihood="probit") == pytest.approx(shifted, rel=1e-12)


# --- torch inputs on the CPU ---------------------------------------------------------------------------------

def test_torch_inputs_give_the_numpy_values():
    torch = pytest.importorskip("torch")
    X, K, y = _problem(200, 30, 1)
    expected = flatfast.log_prior(X, y)
    assert flatfast.log_prior(torch.from_numpy(X), torch.from_numpy(y)) == expected
    assert flatfast.ep_log_evidence(torch.from_numpy(K), y) == flatfast.ep_log_evidence(K, y)
    assert flatfast.log_prior(X, y, kernel=torch.from_numpy(K)) == expected
    K32 = torch.from_numpy(K).float()
    assert flatfast.ep_log_evidence(K32, y) == flatfast.ep_log_evidence(K32.numpy(), y)
    info = flatfast.log_prior(torch.from_numpy(X), y, return_info=True, likelihood="probit")
    assert isinstance(info, flatfast.EPResult) and info.log_z == flatfast.log_prior(X, y, likelihood="probit")


def test_cpu_tensor_is_shared_with_ep_not_copied():
    torch = pytest.importorskip("torch")
    K = torch.eye(4, dtype=torch.float64)
    assert np.shares_memory(_xp.ep_array(K), K.numpy())


def test_wrong_kernel_shape_names_the_argument():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"kernel: expected shape \(3, 3\)"):
        flatfast.log_prior(np.zeros((3, 2)), [1, -1, 1], kernel=torch.eye(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="K: expected a real"):
        flatfast.ep_log_evidence(np.array([["a", "b"], ["c", "d"]]), [1, -1])


# --- the dispatch for CUDA inputs (faked: no GPU here) --------------------------------------------------------

def test_cuda_input_without_the_gpu_solver_warns_once_and_runs_on_the_cpu(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(_xp, "is_cuda_tensor", lambda t: True)
    monkeypatch.setattr(_xp, "device_ep_unavailable", lambda: "cupy is not installed: `pip install cupy-cuda12x`")
    monkeypatch.setattr(_xp, "_WARNED", set())
    X, K, y = _problem(80, 10, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = flatfast.ep_log_evidence(torch.from_numpy(K), y)
        second = flatfast.ep_log_evidence(torch.from_numpy(K), -y)
    fallback = [w for w in caught if issubclass(w.category, BackendFallbackWarning)]
    assert len(fallback) == 1 and "cupy-cuda12x" in str(fallback[0].message)
    assert "EP runs on the CPU" in str(fallback[0].message)
    assert first == flatfast.ep_log_evidence(K, y) and second == flatfast.ep_log_evidence(K, -y)


def test_cuda_input_goes_to_cupy_by_dlpack(monkeypatch):
    """With the GPU solver available, a CUDA tensor is handed to cupy by DLPack: the same memory, no host copy."""
    torch = pytest.importorskip("torch")
    handed = []
    fake_cupy = types.ModuleType("cupy")
    fake_cupy.from_dlpack = lambda t: handed.append(t) or "cupy view"
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setattr(_xp, "is_cuda_tensor", lambda t: True)
    monkeypatch.setattr(_xp, "device_ep_unavailable", lambda: None)
    K = torch.eye(3, dtype=torch.float64)
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self: pytest.fail("a CUDA kernel was copied to the host"))
    assert _xp.ep_array(K) == "cupy view"
    assert handed[0].data_ptr() == K.data_ptr()


def test_device_ep_reason_names_the_package_when_cupy_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    reason = _xp.device_ep_unavailable()
    assert "cupy-cuda12x" in reason and "cupy-cuda13x" in reason


# --- memory: two n x n arrays, measured ----------------------------------------------------------------------

def _peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kwargs", [{}, {"likelihood": "probit"}, {"precision": "mixed"}, {"check_psd": False}])
def test_ep_holds_one_workspace_beside_k(kwargs):
    """K (the caller's) and one workspace: the PSD check factors in it, probit's K + I is a shift, mixed
    precision keeps its float32 K and workspace inside it. Measured with tracemalloc."""
    X, K, y = _problem(600, 50, 4)
    peak = _peak_bytes(lambda: flatfast.ep_log_evidence(K, y, **kwargs))
    assert peak <= 1.2 * K.nbytes, peak / K.nbytes


def test_log_prior_peaks_at_two_arrays():
    X, K, y = _problem(600, 50, 4)
    assert _peak_bytes(lambda: flatfast.log_prior(X, y)) <= 2.2 * K.nbytes


@pytest.mark.parametrize("kwargs", [{}, {"likelihood": "probit"}, {"method": "tilting", "n_samples": 200},
                                    {"method": "tilting", "n_samples": 200, "likelihood": "probit"},
                                    {"method": "smc", "n_samples": 40},
                                    {"method": "smc", "n_samples": 40, "likelihood": "probit"}])
def test_memory_guard_counts_what_is_measured(monkeypatch, kwargs):
    """The guard asks for at least the measured peak, and not much more (an honest count, not a constant)."""
    asked = []
    monkeypatch.setattr(prior_checks, "memory_guard", lambda n_bytes, what, available=None: asked.append((n_bytes, what)))
    X, K, y = _problem(300, 30, 6)
    peak = _peak_bytes(lambda: flatfast.log_prior(X, y, **kwargs))
    assert len(asked) == 1
    assert peak <= asked[0][0] <= 1.3 * peak + 0.3 * K.nbytes, (peak / K.nbytes, asked[0][0] / K.nbytes)
    if kwargs.get("method") in ("tilting", "smc"):
        assert kwargs["method"].upper() in asked[0][1].upper()


def test_memory_guard_refuses_before_allocating(monkeypatch):
    monkeypatch.setattr(_xp, "free_bytes", lambda xp: 10**6)
    monkeypatch.setattr(prior_checks, "free_bytes", lambda xp: 10**6)
    X = np.random.default_rng(0).random((1000, 3))
    with pytest.raises(MemoryError, match=r"log_prior on n = 1000 points .*2\.25 new float64 .* needs 17\.2 MiB"):
        flatfast.log_prior(X, np.ones(1000))


# --- on a GPU ------------------------------------------------------------------------------------------------

def _gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = _xp.device_ep_unavailable()
    if reason is not None:
        pytest.skip(f"EP cannot run on the GPU here: {reason}")
    import cupy

    return torch, cupy


def test_gpu_log_prior_equals_cpu_and_copies_no_matrix_to_the_host(monkeypatch):
    torch, cupy = _gpu()
    n = 3000
    X, K, y = _problem(n, 784, 11)
    expected = flatfast.log_prior(X, y)
    X_cuda = torch.from_numpy(X).cuda()
    original_cpu = torch.Tensor.cpu

    def guarded_cpu(self, *args, **kw):
        assert self.numel() < n * n, "an n x n tensor was copied to the host"
        return original_cpu(self, *args, **kw)

    monkeypatch.setattr(torch.Tensor, "cpu", guarded_cpu)
    monkeypatch.setattr(cupy, "asnumpy", lambda *a, **k: pytest.fail("cupy.asnumpy was called"))
    flatfast.log_prior(X_cuda[:100], y[:100])  # warm-up: cupy's first call loads its modules
    host_peak = []
    tracemalloc.start()
    try:
        got = flatfast.log_prior(X_cuda, y, return_info=True)
        host_peak.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
    assert host_peak[0] < 0.2 * 8 * n * n, host_peak  # an n x n host array would be 8 n^2 bytes
    assert type(got.site_precision).__module__.startswith("cupy")
    assert abs(got.log_z - expected) <= 1e-8 * abs(expected), (got.log_z, expected)


def test_gpu_ep_peak_memory_is_two_arrays():
    torch, cupy = _gpu()
    n = 20000
    X = torch.rand((n, 784), dtype=torch.float64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    y = np.where(X[:, 0].cpu().numpy() > 0.5, 1, -1)
    K = flatfast.nngp_kernel(X)
    K_cupy = cupy.from_dlpack(K)
    del X
    from flatfast.testing import cupy_peak_memory

    watcher = cupy_peak_memory(cupy)
    with watcher.hook:
        value = flatfast.ep_log_evidence(K_cupy, y)
    total = K.numel() * 8 + watcher.peak
    assert np.isfinite(value)
    assert total <= 2.2 * 8 * n * n, total / (8 * n * n)


def test_gpu_non_psd_kernel_raises():
    torch, cupy = _gpu()
    rng = np.random.default_rng(0)
    A = rng.standard_normal((500, 500))
    with pytest.raises(NotPSDError):
        flatfast.ep_log_evidence(cupy.asarray(A + A.T), np.ones(500))
    with pytest.raises(NotPSDError):
        flatfast.ep_log_evidence(torch.from_numpy(A + A.T).cuda(), np.ones(500))


def test_cupy_input_without_the_gpu_solver_falls_back_like_a_cuda_tensor(monkeypatch):
    class FakeCupyArray:  # stands in for a cupy array: cupy's module name and .get() to the host
        __module__ = "cupy._core.core"

        def __init__(self, host):
            self.host = host

        def get(self):
            return self.host

    monkeypatch.setattr(_xp, "device_ep_unavailable", lambda: "cuSOLVER could not be loaded (test)")
    monkeypatch.setattr(_xp, "_WARNED", set())
    K = np.eye(3)
    with pytest.warns(BackendFallbackWarning, match="EP runs on the CPU.*cuSOLVER could not be loaded"):
        assert _xp.ep_array(FakeCupyArray(K)) is K
