#include "cpu/mlp_hvp_cpu.h"

#include <algorithm>

#include "cpu/blas.h"
#include "cpu/parallel.h"

namespace flatfast {
namespace {

// Rows per tile: a tile's GEMM output (128 x N, N <= a few thousand) is still in L2 when its addend and mask
// are applied, so the product is written to memory once.
constexpr int64_t kTileRows = 128;

}  // namespace

template <typename T>
void masked_matmul_cpu(const T* A, int64_t M, int64_t K, const T* B, int64_t N, bool b_transposed,
                       const uint8_t* mask, int64_t mask_rows, const T* C, T* out) {
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  // Each worker runs its tile's GEMM (BLAS, limited to one thread by the caller) and the epilogue.
  parallel_for(tiles, [&](int64_t t) {
    const int64_t r0 = t * kTileRows, rows = std::min(kTileRows, M - r0);
    T* tile = out + r0 * N;
    if (b_transposed)
      gemm_abt(static_cast<int>(rows), static_cast<int>(N), static_cast<int>(K), T(1), A + r0 * K,
               static_cast<int>(K), B, static_cast<int>(K), T(0), tile, static_cast<int>(N));
    else
      gemm_ab(static_cast<int>(rows), static_cast<int>(N), static_cast<int>(K), T(1), A + r0 * K, static_cast<int>(K),
              B, static_cast<int>(N), T(0), tile, static_cast<int>(N));
    for (int64_t r = r0; r < r0 + rows; ++r) {
      T* row = out + r * N;
      const uint8_t* keep = mask + (r % mask_rows) * N;
      const T* add = C ? C + r * N : nullptr;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) row[j] = keep[j] ? (add ? row[j] + add[j] : row[j]) : T(0);
    }
  });
}

template void masked_matmul_cpu<double>(const double*, int64_t, int64_t, const double*, int64_t, bool, const uint8_t*,
                                        int64_t, const double*, double*);
template void masked_matmul_cpu<float>(const float*, int64_t, int64_t, const float*, int64_t, bool, const uint8_t*,
                                       int64_t, const float*, float*);

}  // namespace flatfast
