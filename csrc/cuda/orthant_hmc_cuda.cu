#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "common/orthant_wall.h"
#include "cuda/orthant_hmc_cuda.h"

namespace flatfast {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

// The earliest (root, wall) over the warp's lanes, the lowest wall on ties (as the CPU's ascending scan finds it);
// every lane ends with the same pair.
__device__ __forceinline__ void warp_earliest(double& best, int64_t& where) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const double other = __shfl_xor_sync(0xffffffffu, best, offset);
    const long long other_where = __shfl_xor_sync(0xffffffffu, static_cast<long long>(where), offset);
    if (other < best || (other == best && other_where >= 0 && (where < 0 || other_where < where))) {
      best = other;
      where = other_where;
    }
  }
}

// One warp per row: its lanes stride over the n coordinates, so every pass (move to the wall, reflect, look for
// the next wall) reads the row, gap and the reflected wall's covariance row coalesced, and the earliest wall is a
// shuffle reduction, with no block-wide barrier.
__global__ void trajectories_kernel(double* U, double* V, int64_t rows, int64_t n, const double* gap,
                                    const double* cov, double duration, double graze, int64_t max_events,
                                    int64_t* reflections) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp;
  if (row >= rows) return;  // whole warps only: blockDim is a multiple of the warp
  double* u = U + row * n;
  double* v = V + row * n;
  const double infinity = INFINITY;
  double best = infinity;
  int64_t face = -1;
  for (int64_t j = lane; j < n; j += kWarp) consider_wall(u[j], v[j], gap[j], j, 0.0, best, face);
  warp_earliest(best, face);
  double remaining = duration;
  int64_t events = 0;
  while (true) {
    const double hit = face < 0 ? infinity : 2.0 * atan(best);
    const bool bounce = hit < remaining;
    const double step = bounce ? hit : remaining;
    double s, c;
    sincos(step, &s, &c);
    if (!bounce) {
      for (int64_t j = lane; j < n; j += kWarp) {
        const double uj = u[j], vj = v[j];
        u[j] = fmax(uj * c + vj * s, -gap[j]);  // rounding may leave a hair outside
        v[j] = vj * c - uj * s;
      }
      break;
    }
    const double* column = cov + face * n;  // cov is symmetric: its row `face` is the column
    const double coefficient = 2.0 * (v[face] * c - u[face] * s) / column[face];
    __syncwarp();  // every lane has read u[face], v[face] before their owner overwrites them
    const int64_t last = face;
    best = infinity;
    face = -1;
    for (int64_t j = lane; j < n; j += kWarp) {
      const double uj = u[j], vj = v[j];
      const double moved = fmax(uj * c + vj * s, -gap[j]);
      const double turned = (vj * c - uj * s) - coefficient * column[j];
      u[j] = moved;
      v[j] = turned;
      consider_wall(moved, turned, gap[j], j, j == last ? graze : 0.0, best, face);
    }
    warp_earliest(best, face);
    __syncwarp();  // the writes above are visible to the lane that reads u[face] next
    remaining -= step;
    if (++events >= max_events) break;
  }
  if (lane == 0) reflections[row] = events;
}

}  // namespace

void orthant_trajectories_cuda(double* U, double* V, int64_t rows, int64_t n, const double* gap, const double* cov,
                               double duration, double graze, int64_t max_events, int64_t* reflections,
                               void* stream) {
  if (rows == 0) return;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  trajectories_kernel<<<static_cast<unsigned>(blocks), kWarp * kWarpsPerBlock, 0,
                        static_cast<cudaStream_t>(stream)>>>(U, V, rows, n, gap, cov, duration, graze, max_events,
                                                             reflections);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("orthant_trajectories_cuda: ") + cudaGetErrorString(err));
}

}  // namespace flatfast
