"""Helpers shared by the tests and benchmarks."""
import numpy as np


def scaled_error(K, K_ref, diag_x, diag_z):
    """max |K - K_ref| / sqrt(q_x q_z): the error relative to each entry's natural scale (its Cauchy-Schwarz
    bound), which stays meaningful where an entry itself is near zero (depth 0, centred data)."""
    scale = np.sqrt(np.outer(diag_x, diag_z))
    return float(np.max(np.abs(np.asarray(K, dtype=np.float64) - K_ref) / scale)) if K_ref.size else 0.0


def kernel_diagonal(A, depth, sigma_w2=2.0, sigma_b2=1.0):
    """The exact q_depth of every row of A."""
    A = np.asarray(A, dtype=np.float64)
    q = sigma_w2 * np.sum(A * A, axis=1) / A.shape[1] + sigma_b2
    for _ in range(depth):
        q = sigma_b2 + sigma_w2 / 2 * q
    return q


def sample_relu_network_outputs(X, depth, width, draws, rng, sigma_w2=2.0, sigma_b2=1.0, chunk=5000):
    """Outputs f(X) of `draws` random ReLU networks of the given width and depth (draws x n), the paper's
    initialisation (weights N(0, sigma_w2/fan_in), biases N(0, sigma_b2)).

    The first layer's weights are drawn explicitly. For a later layer with N inputs a = relu(h) (N x n per
    network), each unit is w.a + b with w ~ N(0, sigma_w2/N I), so the rows of W a + b are iid
    N(0, sigma_w2/N a^T a + sigma_b2 11^T): drawing them from that n-dimensional Gaussian is the same distribution
    as drawing the N x N matrix W, at O(N n^2) instead of O(N^2 n) per layer.
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    outputs = []
    for start in range(0, draws, chunk):
        b = min(chunk, draws - start)
        W1 = rng.standard_normal((b, width, d)) * np.sqrt(sigma_w2 / d)
        h = W1 @ X.T + rng.standard_normal((b, width, 1)) * np.sqrt(sigma_b2)
        for layer in range(depth):
            a = np.maximum(h, 0.0)
            cov = sigma_w2 / width * np.einsum("bkn,bkm->bnm", a, a) + sigma_b2
            vals, vecs = np.linalg.eigh(cov)
            root = vecs * np.sqrt(np.clip(vals, 0.0, None))[:, None, :]  # cov = root root^T
            units = 1 if layer == depth - 1 else width
            h = rng.standard_normal((b, units, n)) @ np.swapaxes(root, 1, 2)
        outputs.append(h[:, 0, :])
    return np.concatenate(outputs)


def cupy_peak_memory(cupy):
    """A cupy memory hook that records the peak of the bytes cupy's pool hands out while it is active:
    ``watch = cupy_peak_memory(cupy); with watch.hook: ...; watch.peak``. For measuring EP's device memory."""

    class Watch:
        current = peak = 0

    watch = Watch()

    class Hook(cupy.cuda.MemoryHook):
        name = "flatfast-peak"

        def malloc_postprocess(self, **kw):
            watch.current += kw["mem_size"]
            watch.peak = max(watch.peak, watch.current)

        def free_postprocess(self, **kw):
            watch.current -= kw["mem_size"]

    watch.hook = Hook()
    return watch
