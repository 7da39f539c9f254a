#pragma once
#include <cstdint>

namespace flatfast {

// Device pointers. out[n x m] = NNGP kernel (see csrc/cpu/nngp_cpu.h); Z == nullptr means Z = X.
// Throws std::runtime_error with the CUDA error string on failure.
template <typename T>
void nngp_cuda(const T* X, int64_t n, const T* Z, int64_t m, int64_t d, int depth, double sw2, double sb2, T* out,
               void* stream);

}  // namespace flatfast
