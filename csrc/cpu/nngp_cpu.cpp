#include "cpu/nngp_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/arccos_step.h"
#include "cpu/blas.h"
#include "cpu/parallel.h"

namespace flatfast {
namespace {

// Output tile edge. One tile (256 x 256 doubles, 512 KiB) is written by its GEMM and read back by the
// epilogue while it is still in L2; the GEMM's inner dimension is the full d.
constexpr int64_t kTile = 256;
constexpr int64_t kMirrorBlock = 64;

// sqrt(q_l) of every point for layers l = 0 .. depth-1 (layer-major), plus the final diagonal q_depth.
template <typename T>
void point_variances(const T* X, int64_t n, int64_t d, int depth, double sw2, double sb2, std::vector<double>& sqrt_q,
                     std::vector<double>& q_final) {
  sqrt_q.assign(static_cast<size_t>(depth) * n, 0.0);
  q_final.assign(n, 0.0);
  parallel_for(n, [&](int64_t i) {
    double sq = 0.0;
    const T* x = X + i * d;
    for (int64_t k = 0; k < d; ++k) sq += static_cast<double>(x[k]) * static_cast<double>(x[k]);
    double q = sw2 * sq / static_cast<double>(d) + sb2;
    for (int l = 0; l < depth; ++l) {
      sqrt_q[static_cast<size_t>(l) * n + i] = std::sqrt(q);
      q = diagonal_step(q, sw2, sb2);
    }
    q_final[i] = q;
  });
}

struct Recursion {
  const double* sqrt_qx;  // depth x n
  const double* sqrt_qz;  // depth x m
  int64_t n, m;
  int depth;
  double sw2_over_d, sw2, sb2;
};

// The whole depth recursion for row i, columns [j_begin, j_end), over the tile's dot products. Layer-outer,
// column-inner so that each layer is one vectorised loop over a row held in `buf` (double, L1-resident).
// Compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA) and baseline x86-64; the loader picks the clone this CPU runs.
template <typename T>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void epilogue_row(T* row, int64_t i, int64_t j_begin, int64_t j_end, const Recursion& r, double* buf) {
  const int64_t len = j_end - j_begin;
  const T* in = row + j_begin;
  const double a = r.sw2_over_d, b = r.sb2, sw2 = r.sw2;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) buf[j] = a * static_cast<double>(in[j]) + b;
  for (int l = 0; l < r.depth; ++l) {
    const double sx = r.sqrt_qx[l * r.n + i];
    const double* sz = r.sqrt_qz + l * r.m + j_begin;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) buf[j] = arccos_step(buf[j], sx * sz[j], sw2, b);
  }
  T* dst = row + j_begin;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<T>(buf[j]);
}

}  // namespace

template <typename T>
void nngp_cpu(const T* X, int64_t n, const T* Z, int64_t m, int64_t d, int depth, double sw2, double sb2, T* out) {
  const bool symmetric = (Z == nullptr);
  if (symmetric) {
    Z = X;
    m = n;
  }
  std::vector<double> sqx, qx_final, sqz, qz_final;
  point_variances(X, n, d, depth, sw2, sb2, sqx, qx_final);
  if (!symmetric) point_variances(Z, m, d, depth, sw2, sb2, sqz, qz_final);
  const Recursion rec{sqx.data(), symmetric ? sqx.data() : sqz.data(), n, m, depth,
                      sw2 / static_cast<double>(d), sw2, sb2};

  // The tile list: all tiles, or the upper triangle's (half the GEMM flops) when Z = X.
  const int64_t tiles_i = (n + kTile - 1) / kTile, tiles_j = (m + kTile - 1) / kTile;
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t bi = 0; bi < tiles_i; ++bi)
    for (int64_t bj = symmetric ? bi : 0; bj < tiles_j; ++bj) tiles.emplace_back(bi, bj);

  // Each worker runs a tile's GEMM (BLAS, single-threaded: the caller limits BLAS to one thread) and its
  // epilogue back to back, so the dot products are consumed from cache and every entry is written once.
  parallel_for(static_cast<int64_t>(tiles.size()), [&](int64_t t) {
    thread_local std::vector<double> buf;
    buf.resize(kTile);
    const int64_t i0 = tiles[t].first * kTile, j0 = tiles[t].second * kTile;
    const int64_t rows = std::min(kTile, n - i0), cols = std::min(kTile, m - j0);
    T* tile = out + i0 * m + j0;
    gemm_abt(static_cast<int>(rows), static_cast<int>(cols), static_cast<int>(d), T(1), X + i0 * d,
             static_cast<int>(d), Z + j0 * d, static_cast<int>(d), T(0), tile, static_cast<int>(m));
    for (int64_t i = i0; i < i0 + rows; ++i) {
      T* row = out + i * m;
      if (symmetric && i0 == j0) {
        epilogue_row(row, i, i + 1, j0 + cols, rec, buf.data());
        row[i] = static_cast<T>(qx_final[i]);  // exact diagonal
      } else {
        epilogue_row(row, i, j0, j0 + cols, rec, buf.data());
      }
    }
  });

  if (symmetric) {
    // Mirror the upper triangle in cache-sized blocks (a plain transpose loop strides through memory).
    const int64_t nb = (n + kMirrorBlock - 1) / kMirrorBlock;
    parallel_for(nb, [&](int64_t bi) {
      for (int64_t bj = 0; bj <= bi; ++bj)
        for (int64_t i = bi * kMirrorBlock; i < std::min(n, (bi + 1) * kMirrorBlock); ++i)
          for (int64_t j = bj * kMirrorBlock; j < std::min(i, (bj + 1) * kMirrorBlock); ++j)
            out[i * n + j] = out[j * n + i];
    });
  }
}

template void nngp_cpu<double>(const double*, int64_t, const double*, int64_t, int64_t, int, double, double, double*);
template void nngp_cpu<float>(const float*, int64_t, const float*, int64_t, int64_t, int, double, double, float*);

}  // namespace flatfast
