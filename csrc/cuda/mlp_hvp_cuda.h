#pragma once
#include <cstdint>

namespace flatfast {

// Device pointers; the same contract as masked_matmul_cpu (csrc/cpu/mlp_hvp_cpu.h).
template <typename T>
void masked_matmul_cuda(const T* A, int64_t M, int64_t K, const T* B, int64_t N, bool b_transposed,
                        const uint8_t* mask, int64_t mask_rows, const T* C, T* out, void* stream);

}  // namespace flatfast
