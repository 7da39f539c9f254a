#pragma once
#include <cstdint>

namespace flatfast {

// out[n x m] = NNGP kernel of a depth-hidden-layer ReLU network between the rows of X[n x d] and Z[m x d]
// (row-major, contiguous). When Z == nullptr, Z = X and only the upper triangle is computed (half the
// GEMM flops), the diagonal is the exact closed form, and the lower triangle is mirrored.
// T is double or float; the epilogue always runs in double.
template <typename T>
void nngp_cpu(const T* X, int64_t n, const T* Z, int64_t m, int64_t d, int depth, double sw2, double sb2, T* out);

}  // namespace flatfast
