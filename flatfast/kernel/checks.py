"""The checks a kernel matrix passes before EP: finite and symmetric, positive semi-definite (one Cholesky in EP's
workspace), and labellings that no function drawn from the prior can give (zero-variance points, duplicates
and antipodes with clashing labels). Every scan runs over row blocks, so none allocates an n x n temporary.
"""
from flatfast.errors import NotPSDError


def _impossible_points(K, labels, xp):
    """For each labelling, why its Heaviside orthant probability is exactly 0, or None.

    A point with K_ii = 0 (a blank input with sigma_b2 = 0) has g_i = 0, whose sign is never strictly positive
    or negative; two points with correlation +1 (duplicates) carry one g between them and cannot take different
    labels, nor points with correlation -1 the same label.
    """
    diag = xp.diagonal(K)
    scale = float(xp.max(diag)) if diag.size else 0.0
    zero = xp.nonzero(diag <= 1e-14 * scale)[0]
    if zero.size:
        listed = [int(i) for i in zero[:10]]
        reason = (f"point(s) {listed}{' ...' if zero.size > 10 else ''} have zero prior variance (K_ii = 0, e.g. a "
                  "blank input with sigma_b2 = 0): g_i = 0 there, so no labelling of them has positive probability")
        return [reason] * len(labels)
    first, second, positive = _degenerate_pairs(K, xp)
    if first.size == 0:
        return [None] * len(labels)
    reasons = []
    for row in labels:
        y = xp.asarray(row)
        clash = xp.nonzero((y[first] == y[second]) != positive)[0]  # +1 with different labels, -1 with equal
        if clash.size == 0:
            reasons.append(None)
            continue
        k = int(clash[0])
        i, j = int(first[k]), int(second[k])
        kind = "duplicates (correlation +1) with different" if bool(positive[k]) else \
            "antipodal (correlation -1) with equal"
        reasons.append(f"points {i} and {j} are {kind} labels, which no function drawn from the prior can give "
                       f"them ({clash.size} such pair(s) in all)")
    return reasons


def _scan_rows(n):
    """Rows per block of the O(n^2) checks: each of their few temporaries holds 1/32 of an n x n array at most,
    so they add ~0.1 n^2 to EP's two arrays at any n."""
    return max(16, -(-n // 32))


def _degenerate_pairs(K, xp):
    """Pairs i < j with correlation +-1 (duplicate or antipodal inputs): (first, second, positive) index arrays.
    K is scanned in blocks of rows, so no n x n temporary is allocated beside the counted ones."""
    block = _scan_rows(K.shape[0])
    root = xp.sqrt(xp.diagonal(K))
    first, second, positive = [], [], []
    for start in range(0, K.shape[0], block):
        corr = K[start: start + block] / root[start: start + block, None] / root[None, :]
        i, j = xp.nonzero(xp.abs(corr) >= 1.0 - 1e-12)
        upper = j > i + start
        first.append(i[upper] + start)
        second.append(j[upper])
        positive.append(corr[i[upper], j[upper]] > 0)
    return xp.concatenate(first), xp.concatenate(second), xp.concatenate(positive)


def _check_finite_symmetric(K, xp):
    """NaN/inf and asymmetry checks in row blocks: no n x n temporaries (at n = 5000 the whole-matrix version
    cost more than one Cholesky)."""
    block = _scan_rows(K.shape[0])
    scale = 0.0
    asymmetry = 0.0
    for start in range(0, K.shape[0], block):
        rows = K[start: start + block]
        if not bool(xp.isfinite(rows).all()):
            raise ValueError("K: contains NaN or infinite values")
        scale = max(scale, float(xp.max(xp.abs(rows))))
        asymmetry = max(asymmetry, float(xp.max(xp.abs(rows - K[:, start: start + block].T))))
    if asymmetry > 1e-10 * max(scale, 1e-300):
        raise NotPSDError("K: is not symmetric")


def _check_psd(K, la, work):
    """One Cholesky of K + 1e-10 mean(diag K) I, in EP's workspace (no third n x n array), on K's device; a
    failure (LAPACK's or cuSOLVER's info > 0) raises NotPSDError."""
    xp = la.xp
    jitter = 1e-10 * float(xp.mean(xp.diagonal(K)))
    la.scaled_system(K, xp.ones(K.shape[0]), work, shift=jitter - 1.0)  # K + (1 + jitter - 1) I
    if not la.cholesky_inplace(work):
        raise NotPSDError("K: is not positive semi-definite (Cholesky of K + 1e-10 mean(diag K) I failed)")
