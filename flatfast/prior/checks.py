"""The arguments of log P(f) checked before any work: labels, the method and its options, and the memory the
estimators will need on the device they run on."""
from __future__ import annotations

import numpy as np

from flatfast._validate import memory_guard
from flatfast.backend.xp import free_bytes
from flatfast.prior.smc import RUNS as SMC_RUNS, block_rows as smc_block_rows

_METHODS = ("ep", "tilting", "smc")
_RETIRED_METHODS = {
    "ep-is": "method='ep-is' was removed: importance sampling from the EP posterior has infinite-variance weights "
             "under the Heaviside likelihood and collapses beyond a few dozen points, so its error bar could not "
             "be backed; method='tilting' replaces it"}


def _labels(y, n):
    if isinstance(y, (str, bytes)) or y is None:
        raise TypeError(f"y: expected labels in {{-1, +1}} or {{0, 1}}, got {type(y).__name__}")
    from flatfast._validate import to_numpy

    arr = to_numpy(y)
    if arr.ndim not in (1, 2):
        raise ValueError(f"y: expected a 1-D labelling or a 2-D array of labellings, got {arr.ndim}-D")
    if arr.shape[-1] != n:
        raise ValueError(f"y: has {arr.shape[-1]} labels per labelling but there are {n} points")
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"y: expected numeric labels, got dtype {arr.dtype}")
    values = np.unique(arr)
    if np.all(np.isin(values, (-1, 1))):
        signs = arr.astype(np.float64)
    elif np.all(np.isin(values, (0, 1))):
        signs = np.where(arr > 0, 1.0, -1.0)
    else:
        raise ValueError(f"y: labels must be in {{-1, +1}} or {{0, 1}}; found {values[:5].tolist()}")
    return np.atleast_2d(signs)


def _check_method(method):
    if method in _RETIRED_METHODS:
        raise ValueError(f"method: {_RETIRED_METHODS[method]}")
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")


def _module_for_input(X):
    """The array module EP will run on for inputs like X (cupy for CUDA tensors when it can run there)."""
    from flatfast.backend.xp import device_ep_unavailable, is_cuda_tensor

    if (is_cuda_tensor(X) or type(X).__module__.startswith("cupy")) and device_ep_unavailable() is None:
        import cupy

        return cupy
    return np


def _check_correction(correction, method):
    if not isinstance(correction, bool):
        raise TypeError(f"correction: expected True or False, got {correction!r}")
    if correction and method != "ep":
        raise ValueError("correction: is EP's second-order correction, for method='ep' only")


def _guard_memory(n, likelihood, method, caller, *, xp=np, new_arrays=0, n_samples=0, correction=False):
    """Fail before allocating, against the memory of the device EP runs on. ``new_arrays``: n x n float64 arrays
    the caller makes before EP (the kernel, or a float64 copy of K); then EP's workspace (its row-block scans add
    0.1 n^2 at large n, up to 0.25 n^2 at n of a few hundred). Tilting (on the host) adds four (the signed K, its
    ordered factor, the Newton system and its Jacobian), a block of n x min(2048, n_samples) samples, and for
    probit its own K + I; the second-order correction 2.7 (on the host). The counts are what tracemalloc measures
    (tests/test_prior_device.py)."""
    arrays = new_arrays + 1.25
    what = "EP's workspace"
    extra = 0.0
    if method == "tilting":
        arrays += 4 + (likelihood == "probit")
        samples = n_samples if isinstance(n_samples, int) else 2048  # validated later, with the other arguments
        extra = 8.0 * n * min(2048, max(samples, 1))
        what += ", the tilting estimator's four and its sample block" + (" and K + I" if likelihood == "probit"
                                                                        else "")
    if method == "smc":
        # each stage's Gaussian (its covariance and factor, made beside one temporary on the host, two on a GPU)
        # and all runs' particles with the pilot's, twice while they are resampled, plus the moves' blocks
        samples = n_samples if isinstance(n_samples, int) else 0
        rows = samples // SMC_RUNS * (SMC_RUNS + 1)
        arrays += (2 if xp is np else 3) + (2 * rows + 8 * min(rows, smc_block_rows(xp))) / n
        what += ", the SMC's stage covariance and its factor, and its particles"
    if correction:
        arrays += 2.7
        what += ", the correction's posterior covariance and its factor (on the host)"
    where = "" if xp is np else " on the GPU"
    memory_guard(arrays * 8.0 * n * n + extra, f"{caller} on n = {n} points{where} ({arrays:g} new float64 n x n "
                 "arrays: " + ("the kernel, " if new_arrays else "") + what + ")", available=free_bytes(xp))
