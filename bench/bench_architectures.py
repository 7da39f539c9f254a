"""flatfast against PyHessian and curvlinops on the models researchers train now (bench/architectures.py: a
ResNet-18-shaped CNN with BatchNorm on CIFAR-sized images, a small ViT, a BERT-style encoder; 0.9-1.6M parameters,
random weights, float32), each on one batch of N = 32 examples, eval mode, cross-entropy (the dataset mean):

* the trace with 100 Rademacher probes: PyHessian ``hessian(model, loss, data=batch).trace(maxIter=100,
  tol=-inf)`` (its stop test divides by the running mean without abs(), so tol=-inf forces the full budget),
  curvlinops ``hutchinson_trace(HessianLinearOperator(...), 100)``, flatfast ``hessian_trace(method="hutchinson",
  probes=100)``; their estimates must agree within 4 combined standard errors. On the same four probes flatfast's
  products must agree with PyHessian's and with a float64 product to 1e-4 relative; curvlinops' difference is
  printed, not asserted: on these LayerNorm models its forward-over-reverse products differ from the dense Hessian
  (2.9 % on torch's TransformerEncoder against central finite differences, which flatfast and PyHessian match to
  3e-9; the same model without LayerNorm agrees to 2e-9; torch's forward-mode differentiation of layer_norm has
  known errors, PyTorch issue 196700);
* the top eigenvalue to 1e-4 relative in each library: flatfast's Lanczos ``hessian_eigenvalues(k=1, tol=1e-4)``
  (thick restart, 8 basis vectors) and scipy's ``eigsh(k=1, which="LA", tol=1e-4)`` on curvlinops' operator
  (ARPACK, 20 basis vectors) bound the residual |H u - theta u| <= 1e-4 |theta|; PyHessian's power iteration
  ``eigenvalues(maxIter=1000, tol=1e-6)``: its tol bounds the change between iterations, and power iteration creeps,
  so at tol=1e-3 it stopped 1.7 %, 1.3 % and 0.01 % below the top eigenvalue (ResNet, ViT, BERT) and at 1e-4 still
  0.16 % and 1.2 % below on the first two; 1e-6 is the loosest power of ten at which all three came within 1e-4
  (one trial each). The three values must agree to 1e-4 relative (PyHessian's, a Rayleigh quotient, from below).
  Each row prints the operator products it used and its peak memory beyond what the process held before
  (resident set size, Linux's high-water mark reset before the call) in copies of the parameters, beside one
  flatfast.hvp product's.

flatfast takes the Hugging Face models as users have them (a mapping with "labels"); the peers call one tensor and
need a logits tensor, so they get the same model behind bench/architectures.PeerView. Both peers run with
attention on torch's math kernel, which flatfast selects itself: without it neither can differentiate these
models twice (the fused kernels have no double backward). Median of 3 rounds after a warm-up, every row (the
peers' eigenvalue rows warm up on the run that counts their products); rows whose package is missing are skipped,
saying which (``pip install torch==2.13.0 -e ".[bench,test]"``).
"""
import contextlib
import math

import numpy as np
import pytest
import torch

import flatfast

import architectures

N, PROBES = 32, 100
EIGEN_TOL = 1e-4  # the agreement the top-eigenvalue rows are held to
MODELS = ["resnet18", "vit", "bert"]
RESULTS = {}


@pytest.fixture(scope="module", params=MODELS)
def arch(request):
    """(name, model, flatfast's batches, the peers' model, the peers' (inputs, targets), P)."""
    name = request.param
    if name != "resnet18":
        pytest.importorskip("transformers", reason="transformers is not installed")
    model = architectures.build(name)
    data = architectures.batch(name, N)
    peer_model, peer_data = architectures.peer_view(name, model, data)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return name, model, [data], peer_model, peer_data, P


@contextlib.contextmanager
def _math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_memory(fn):
    """(fn(), bytes by which the process's peak resident set size during fn exceeded its size before). Freed
    memory is handed back to the system first (glibc keeps it resident otherwise, and reusing it would not show)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set size (Linux >= 4.0)
    except OSError:
        return fn(), float("nan")
    before = _status("VmRSS")
    out = fn()
    return out, _status("VmHWM") - before


def _copies(nbytes, P):
    return f"{nbytes / (4 * P):.1f} parameter copies ({nbytes / 2 ** 20:.0f} MiB)"


def _pyhessian(peer_model, peer_data):
    pyhessian = pytest.importorskip("pyhessian", reason="pyhessian is not installed")

    @contextlib.contextmanager
    def session():
        with _math_attention():
            h = pyhessian.hessian(peer_model, torch.nn.CrossEntropyLoss(), data=peer_data, cuda=False)
            try:
                yield h
            finally:
                peer_model.zero_grad(set_to_none=True)  # hessian() leaves graph-carrying .grad behind

    return session


def _curvlinops_operator(peer_model, peer_data):
    curvlinops = pytest.importorskip("curvlinops", reason="curvlinops-for-pytorch is not installed")
    params = [p for p in peer_model.parameters() if p.requires_grad]
    H = curvlinops.HessianLinearOperator(peer_model, torch.nn.CrossEntropyLoss(), params, [peer_data],
                                         check_deterministic=False, num_data=N)
    return curvlinops, H


# --- trace, 100 Rademacher probes ---------------------------------------------------------------------------

def test_trace_pyhessian(benchmark, arch):
    name, _, _, peer_model, peer_data, _ = arch
    session = _pyhessian(peer_model, peer_data)
    benchmark.group = f"arch trace-100 {name}"
    benchmark.name = f"arch-trace-pyhessian-{name}"

    def run():
        torch.manual_seed(0)
        with session() as h:
            return h.trace(maxIter=PROBES, tol=float("-inf"))

    samples = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    RESULTS["time", "pyhessian", name] = benchmark.stats.stats.median
    RESULTS["trace", "pyhessian", name] = (float(np.mean(samples)),
                                           float(np.std(samples, ddof=1) / math.sqrt(len(samples))))
    benchmark.extra_info["value"] = "{:.4f} +- {:.4f}".format(*RESULTS["trace", "pyhessian", name])


def test_trace_curvlinops(benchmark, arch):
    name, _, _, peer_model, peer_data, _ = arch
    curvlinops, H = _curvlinops_operator(peer_model, peer_data)
    benchmark.group = f"arch trace-100 {name}"
    benchmark.name = f"arch-trace-curvlinops-{name}"

    def run():
        torch.manual_seed(0)
        with _math_attention():
            return float(curvlinops.hutchinson_trace(H, PROBES))

    RESULTS["trace", "curvlinops", name] = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    RESULTS["time", "curvlinops", name] = benchmark.stats.stats.median
    benchmark.extra_info["value"] = round(RESULTS["trace", "curvlinops", name], 4)


def test_trace_flatfast(benchmark, arch):
    name, model, batches, peer_model, peer_data, P = arch
    benchmark.group = f"arch trace-100 {name}"
    benchmark.name = f"arch-trace-flatfast-{name}"
    benchmark.extra_info["baseline"] = [f"arch-trace-pyhessian-{name}", f"arch-trace-curvlinops-{name}"]
    res = benchmark.pedantic(flatfast.hessian_trace, args=(model, batches),
                             kwargs=dict(method="hutchinson", probes=PROBES, progress=False), rounds=3, iterations=1,
                             warmup_rounds=1)
    benchmark.extra_info["value"] = f"{res.value:.4f} +- {res.stderr:.4f}"
    RESULTS["time", "flatfast-hutchinson", name] = benchmark.stats.stats.median
    RESULTS["trace", "flatfast-hutchinson", name] = (res.value, res.stderr)
    if ("trace", "pyhessian", name) in RESULTS:  # independent estimates of one trace agree within their errors
        value, stderr = RESULTS["trace", "pyhessian", name]
        assert abs(res.value - value) < 4 * math.hypot(res.stderr, stderr)
    if ("trace", "curvlinops", name) in RESULTS:  # curvlinops reports no error: its probes' spread is flatfast's
        assert abs(res.value - RESULTS["trace", "curvlinops", name]) < 4 * math.sqrt(2) * res.stderr
    # the same four probes through all three: the products themselves agree (float32 rounding only)
    V = (torch.randint(0, 2, (4, P), generator=torch.Generator().manual_seed(3)) * 2 - 1).float()
    ours = flatfast.hvp(model, batches, V)
    agreement = {}
    if ("trace", "pyhessian", name) in RESULTS:
        from pyhessian.utils import hessian_vector_product

        with _pyhessian(peer_model, peer_data)() as h:
            sizes = [p.numel() for p in h.params]
            theirs = torch.stack([torch.cat([t.reshape(-1) for t in hessian_vector_product(
                h.gradsH, h.params, [t.view(p.shape) for t, p in zip(v.split(sizes), h.params)])]) for v in V])
        agreement["pyhessian"] = float(torch.linalg.norm(ours - theirs) / torch.linalg.norm(theirs))
    if ("trace", "curvlinops", name) in RESULTS:
        _, H = _curvlinops_operator(peer_model, peer_data)
        with _math_attention():
            theirs = (H @ V.T).T
        agreement["curvlinops"] = float(torch.linalg.norm(ours - theirs) / torch.linalg.norm(theirs))
    import copy

    model64 = copy.deepcopy(model).double()
    batches64 = [{k: (v.double() if v.is_floating_point() else v) for k, v in b.items()} if isinstance(b, dict) else
                 tuple(t.double() if t.is_floating_point() else t for t in b) for b in batches]
    truth = flatfast.hvp(model64, batches64, V.double())
    agreement["float64"] = float(torch.linalg.norm(ours.double() - truth) / torch.linalg.norm(truth))
    del model64, batches64, truth
    for peer, error in agreement.items():
        benchmark.extra_info[f"same-probe products vs {peer}"] = f"{error:.1e} relative"
        if peer != "curvlinops":
            assert error < 1e-4, (peer, error)
    _, hvp_peak = peak_memory(lambda: flatfast.hvp(model, batches, V[:1]))
    RESULTS["hvp-memory", name] = hvp_peak
    benchmark.extra_info["peak memory of one flatfast.hvp"] = _copies(hvp_peak, P)


# --- top eigenvalue ---------------------------------------------------------------------------------------------

def _time_peer_eigenvalue(benchmark, key, run, counted, P):
    """One untimed run of ``counted`` -- ``run`` with its operator products counted, returning (value, products)
    -- for the products and the peak memory, then the timed rounds of ``run``; the value goes to RESULTS[key]. The
    counted run is the warm-up (PyHessian's takes over a minute on the ViT)."""
    (_, products), peak = peak_memory(counted)
    RESULTS[key] = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({"products": products, "value": round(RESULTS[key], 5),
                                 "peak memory": _copies(peak, P)})


def test_top_eigenvalue_pyhessian(benchmark, arch):
    import sys

    name, _, _, peer_model, peer_data, P = arch
    session = _pyhessian(peer_model, peer_data)
    benchmark.group = f"arch top-eigenvalue {name}"
    benchmark.name = f"arch-top-eigenvalue-pyhessian-{name}"

    def run():
        torch.manual_seed(0)
        with session() as h:
            return float(h.eigenvalues(maxIter=1000, tol=1e-6, top_n=1)[0][0])

    def counted():
        module = sys.modules["pyhessian.hessian"]  # pyhessian.hessian the attribute is the class, not the module
        product, products = module.hessian_vector_product, [0]

        def counting(*args, **kwargs):
            products[0] += 1
            return product(*args, **kwargs)

        module.hessian_vector_product = counting
        try:
            return run(), products[0]
        finally:
            module.hessian_vector_product = product

    _time_peer_eigenvalue(benchmark, ("eig", "pyhessian", name), run, counted, P)


def test_top_eigenvalue_curvlinops_eigsh(benchmark, arch):
    from scipy.sparse.linalg import LinearOperator, eigsh

    name, _, _, peer_model, peer_data, P = arch
    _, H = _curvlinops_operator(peer_model, peer_data)
    benchmark.group = f"arch top-eigenvalue {name}"
    benchmark.name = f"arch-top-eigenvalue-curvlinops-eigsh-{name}"

    def run(operator=None):
        with _math_attention():
            return float(eigsh(operator or H.to_scipy(), k=1, which="LA", tol=EIGEN_TOL, return_eigenvectors=False,
                               v0=np.random.default_rng(0).standard_normal(P))[0])

    def counted():
        scipy_operator, products = H.to_scipy(), [0]

        def counting(v):
            products[0] += 1
            return scipy_operator.matvec(v)

        return run(LinearOperator(scipy_operator.shape, matvec=counting, dtype=scipy_operator.dtype)), products[0]

    _time_peer_eigenvalue(benchmark, ("eig", "curvlinops", name), run, counted, P)


def test_top_eigenvalue_flatfast(benchmark, arch):
    name, model, batches, _, _, P = arch
    benchmark.group = f"arch top-eigenvalue {name}"
    benchmark.name = f"arch-top-eigenvalue-flatfast-{name}"
    benchmark.extra_info["baseline"] = [f"arch-top-eigenvalue-pyhessian-{name}",
                                        f"arch-top-eigenvalue-curvlinops-eigsh-{name}"]

    def run():
        return flatfast.hessian_eigenvalues(model, batches, k=1, tol=EIGEN_TOL, progress=False)

    _, peak = peak_memory(run)
    res = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    value = float(res.values[0])
    benchmark.extra_info["value"] = f"{value:.5f} ({res.iterations} products)"
    benchmark.extra_info["peak memory"] = _copies(peak, P)
    if ("hvp-memory", name) in RESULTS:
        benchmark.extra_info["peak memory beyond one hvp"] = _copies(peak - RESULTS["hvp-memory", name], P)
    if ("eig", "curvlinops", name) in RESULTS:
        assert value == pytest.approx(RESULTS["eig", "curvlinops", name], rel=EIGEN_TOL)
    if ("eig", "pyhessian", name) in RESULTS:
        theirs = RESULTS["eig", "pyhessian", name]
        benchmark.extra_info["PyHessian's value below this one"] = f"{(value - theirs) / value:.1e} relative"
        assert value * (1 - EIGEN_TOL) <= theirs <= value * (1 + EIGEN_TOL)


# --- the trace at equal accuracy: the time to a stated standard error ---------------------------------------------

TARGET_RTOL = 0.1  # the standard error every library is held to: 10 % of |tr H|
DEFAULT_ROUTE_BUDGET = 400  # the most products flatfast's estimator takes here before its time is projected


def _projected(seconds, probes, stderr, target):
    """Seconds a Monte Carlo trace estimate would need to bring ``stderr`` (after ``probes`` products in
    ``seconds``) down to ``target``: products grow as (stderr / target)^2, the rate of any estimator whose error
    falls like 1 / sqrt(products) (Hutch++ falls faster once its sketch holds the top of the spectrum, so its
    projection is an upper bound)."""
    return seconds * max(1.0, (stderr / target) ** 2) if stderr > 0 else seconds


def test_trace_to_a_stated_error(benchmark, arch):
    """The honest trace row: the time each library needs to reach a standard error of TARGET_RTOL |tr H|. flatfast
    runs its default route (method="auto": the exact trace where the network is piecewise linear, else Hutch++
    to rtol, at most DEFAULT_ROUTE_BUDGET products); the peers' Hutchinson times are projected from their own
    100-probe rows (their per-probe spread is the same operator's: flatfast's 100-probe Hutchinson row gives it for
    curvlinops, which reports no error). A projected time says so."""
    name, model, batches, _, _, P = arch
    benchmark.group = f"arch trace-to-10% {name}"
    benchmark.name = f"arch-trace-to-10%-flatfast-{name}"
    res = benchmark.pedantic(flatfast.hessian_trace, args=(model, batches),
                             kwargs=dict(rtol=TARGET_RTOL, max_probes=DEFAULT_ROUTE_BUDGET, progress=False),
                             rounds=1 if name != "resnet18" else 3, iterations=1)
    seconds = benchmark.stats.stats.median
    reference = res.value if res.stderr == 0 else RESULTS.get(("trace", "flatfast-hutchinson", name), (res.value,))[0]
    target = TARGET_RTOL * abs(reference)
    ours = _projected(seconds, res.probes, res.stderr, target)
    how = "measured" if res.stderr <= target else f"projected from {res.probes} products, stderr {res.stderr:.3g}"
    benchmark.extra_info["flatfast"] = f"{res.method}: {ours:.4g} s ({how}); {res.value:.5g} +- {res.stderr:.3g}"
    benchmark.extra_info["target stderr"] = f"{target:.4g} (10 % of |{reference:.5g}|)"
    hutchinson = RESULTS.get(("trace", "flatfast-hutchinson", name))
    peers = {}
    for peer in ("pyhessian", "curvlinops"):
        if ("time", peer, name) not in RESULTS or hutchinson is None:
            continue
        stderr_100 = RESULTS["trace", "pyhessian", name][1] if peer == "pyhessian" else hutchinson[1]
        peers[peer] = _projected(RESULTS["time", peer, name], PROBES, stderr_100, target)
        benchmark.extra_info[peer] = f"Hutchinson: {peers[peer]:.4g} s (projected from {PROBES} probes, " \
                                     f"stderr {stderr_100:.3g})"
    if peers:
        faster = min(peers, key=peers.get)
        benchmark.extra_info["flatfast / the faster peer"] = f"{ours / peers[faster]:.3g} x ({faster})"


def test_behaviour_probe(benchmark, arch):
    """What every curvature call pays before its first product (flatfast.models.probe: the first batch twice and
    in two halves), beside one 100-probe trace."""
    from flatfast.curvature.operator import HessianOperator

    name, model, batches, _, _, _ = arch
    benchmark.group = f"arch trace-100 {name}"
    benchmark.name = f"arch-behaviour-probe-{name}"
    benchmark.extra_info["baseline"] = [f"arch-trace-flatfast-{name}"]
    benchmark.pedantic(lambda: HessianOperator(model, batches).probe(), rounds=3, iterations=1, warmup_rounds=1)
