#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/arccos_step.h"
#include "cuda/nngp_cuda.h"

namespace flatfast {
namespace {

constexpr int kTile = 16;  // 16 x 16 threads, one output entry each; X and Z slabs staged in shared memory

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// sqrt(q_l) per point for l < depth (layer-major, depth x n) and the exact final diagonal q_depth.
template <typename T>
__global__ void point_variances_kernel(const T* A, int64_t n, int64_t d, int depth, double sw2, double sb2,
                                       double* sqrt_q, double* q_final) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  double sq = 0.0;
  for (int64_t k = 0; k < d; ++k) {
    const double v = static_cast<double>(A[i * d + k]);
    sq += v * v;
  }
  double q = sw2 * sq / static_cast<double>(d) + sb2;
  for (int l = 0; l < depth; ++l) {
    sqrt_q[l * n + i] = sqrt(q);
    q = diagonal_step(q, sw2, sb2);
  }
  q_final[i] = q;
}

template <typename T>
__global__ void nngp_tile_kernel(const T* X, const T* Z, int64_t n, int64_t m, int64_t d, int depth, double sw2,
                                 double sb2, const double* sqx, const double* sqz, const double* qdiag,
                                 bool symmetric, T* out) {
  __shared__ T xs[kTile][kTile + 1];
  __shared__ T zs[kTile][kTile + 1];
  const int64_t i = blockIdx.y * static_cast<int64_t>(kTile) + threadIdx.y;
  const int64_t j = blockIdx.x * static_cast<int64_t>(kTile) + threadIdx.x;
  const int64_t zrow = blockIdx.x * static_cast<int64_t>(kTile) + threadIdx.y;
  T acc = T(0);
  for (int64_t k0 = 0; k0 < d; k0 += kTile) {
    const int64_t k = k0 + threadIdx.x;
    xs[threadIdx.y][threadIdx.x] = (i < n && k < d) ? X[i * d + k] : T(0);
    zs[threadIdx.y][threadIdx.x] = (zrow < m && k < d) ? Z[zrow * d + k] : T(0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) acc += xs[threadIdx.y][kk] * zs[threadIdx.x][kk];
    __syncthreads();
  }
  if (i >= n || j >= m) return;
  if (symmetric && i == j) {
    out[i * m + j] = static_cast<T>(qdiag[i]);
    return;
  }
  double kv = sw2 / static_cast<double>(d) * static_cast<double>(acc) + sb2;
  for (int l = 0; l < depth; ++l) kv = arccos_step(kv, sqx[l * n + i] * sqz[l * m + j], sw2, sb2);
  out[i * m + j] = static_cast<T>(kv);
}

}  // namespace

template <typename T>
void nngp_cuda(const T* X, int64_t n, const T* Z, int64_t m, int64_t d, int depth, double sw2, double sb2, T* out,
               void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool symmetric = (Z == nullptr);
  if (symmetric) {
    Z = X;
    m = n;
  }
  const int64_t layers = depth > 0 ? depth : 1;
  double* scratch = nullptr;
  check(cudaMallocAsync(&scratch, sizeof(double) * (layers * (n + m) + n + m), stream), "cudaMallocAsync");
  double *sqx = scratch, *sqz = scratch + layers * n, *qx = sqz + layers * m, *qz = qx + n;
  const int threads = 256;
  point_variances_kernel<T><<<(n + threads - 1) / threads, threads, 0, stream>>>(X, n, d, depth, sw2, sb2, sqx, qx);
  point_variances_kernel<T><<<(m + threads - 1) / threads, threads, 0, stream>>>(Z, m, d, depth, sw2, sb2, sqz, qz);
  dim3 block(kTile, kTile), grid((m + kTile - 1) / kTile, (n + kTile - 1) / kTile);
  nngp_tile_kernel<T><<<grid, block, 0, stream>>>(X, Z, n, m, d, depth, sw2, sb2, sqx, sqz, qx, symmetric, out);
  const cudaError_t launch = cudaGetLastError();
  cudaFreeAsync(scratch, stream);
  check(launch, "nngp_tile_kernel launch");
}

template void nngp_cuda<double>(const double*, int64_t, const double*, int64_t, int64_t, int, double, double, double*,
                                void*);
template void nngp_cuda<float>(const float*, int64_t, const float*, int64_t, int64_t, int, double, double, float*,
                               void*);

}  // namespace flatfast
