#pragma once
// The O(n^2) passes of one EP sweep, fused (flatfast/prior.py's _refresh_posterior). Each is one pass over the
// triangle LAPACK reads, where numpy needs two or more full passes and a Python loop.
#include <cstdint>

namespace flatfast {

// out[i, j] = s_i (K[i, j] + shift (i == j)) s_j + (i == j) for j >= i (the upper triangle of the C-ordered out,
// which is the lower triangle of the Fortran-ordered view that POTRF factors); the rest of out is left untouched.
// shift = 1 is the probit likelihood's K + I without a second n x n array.
template <typename T>
void ep_scaled_system_cpu(const T* K, const double* s, double shift, int64_t n, T* out);

// norms[i] = sum_{k >= i} W[i, k]^2 in float64: with W the C-ordered buffer whose Fortran view is the lower
// inverse factor L^-1, these are its column norms, diag(B^-1).
template <typename T>
void ep_factor_column_norms_cpu(const T* W, int64_t n, double* norms);

}  // namespace flatfast
