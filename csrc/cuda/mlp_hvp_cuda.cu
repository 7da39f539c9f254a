#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda/mlp_hvp_cuda.h"

namespace flatfast {
namespace {

constexpr int kTile = 16;  // 16 x 16 threads, one output entry each; A and B slabs staged in shared memory

constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y

// out = (A op(B) + C) * mask, the addend and the ReLU mask applied in registers before the single store.
// A has M = k * batch rows (k stacked directions), which can exceed 65535 tiles of 16: each block walks the row
// tiles with a grid stride. The loop bound depends only on the block, so all its threads meet every barrier.
template <typename T>
__global__ void masked_matmul_kernel(const T* A, int64_t M, int64_t K, const T* B, int64_t N, bool b_transposed,
                                     const uint8_t* mask, int64_t mask_rows, const T* C, T* out) {
  __shared__ T as[kTile][kTile + 1];
  __shared__ T bs[kTile][kTile + 1];
  const int64_t col = blockIdx.x * static_cast<int64_t>(kTile) + threadIdx.x;
  const int64_t row_tiles = (M + kTile - 1) / kTile;
  for (int64_t tile = blockIdx.y; tile < row_tiles; tile += gridDim.y) {
    const int64_t row = tile * kTile + threadIdx.y;
    T acc = T(0);
    for (int64_t k0 = 0; k0 < K; k0 += kTile) {
      const int64_t ka = k0 + threadIdx.x, kb = k0 + threadIdx.y;
      as[threadIdx.y][threadIdx.x] = (row < M && ka < K) ? A[row * K + ka] : T(0);
      T bv = T(0);
      if (col < N && kb < K) bv = b_transposed ? B[col * K + kb] : B[kb * N + col];
      bs[threadIdx.y][threadIdx.x] = bv;
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTile; ++kk) acc += as[threadIdx.y][kk] * bs[kk][threadIdx.x];
      __syncthreads();
    }
    if (row < M && col < N) {
      if (C != nullptr) acc += C[row * N + col];
      out[row * N + col] = mask[(row % mask_rows) * N + col] ? acc : T(0);
    }
  }
}

}  // namespace

template <typename T>
void masked_matmul_cuda(const T* A, int64_t M, int64_t K, const T* B, int64_t N, bool b_transposed,
                        const uint8_t* mask, int64_t mask_rows, const T* C, T* out, void* stream_ptr) {
  if (M == 0 || N == 0) return;  // a zero-sized grid is an invalid launch
  const int64_t row_tiles = (M + kTile - 1) / kTile;
  dim3 block(kTile, kTile);
  dim3 grid(static_cast<unsigned>((N + kTile - 1) / kTile), static_cast<unsigned>(std::min(row_tiles, kMaxGridY)));
  masked_matmul_kernel<T><<<grid, block, 0, static_cast<cudaStream_t>(stream_ptr)>>>(A, M, K, B, N, b_transposed,
                                                                                      mask, mask_rows, C, out);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("masked_matmul_kernel launch: ") + cudaGetErrorString(err));
}

template void masked_matmul_cuda<double>(const double*, int64_t, int64_t, const double*, int64_t, bool,
                                         const uint8_t*, int64_t, const double*, double*, void*);
template void masked_matmul_cuda<float>(const float*, int64_t, int64_t, const float*, int64_t, bool, const uint8_t*,
                                        int64_t, const float*, float*, void*);

}  // namespace flatfast
