#pragma once
#include <cstdint>

namespace flatfast {

// The fused GEMM-plus-mask primitive of the MLP R-operator (row-major, contiguous):
//   out[M x N] = (A[M x K] op(B) + C) * mask[row % mask_rows],  op(B) = B[K x N], or B[N x K]^T if b_transposed.
// C may be null. mask holds 0/1 bytes for mask_rows rows (the ReLU pattern of one batch), broadcast over the
// M / mask_rows stacked directions.
template <typename T>
void masked_matmul_cpu(const T* A, int64_t M, int64_t K, const T* B, int64_t N, bool b_transposed,
                       const uint8_t* mask, int64_t mask_rows, const T* C, T* out);

}  // namespace flatfast
