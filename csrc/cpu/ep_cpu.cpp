#include "cpu/ep_cpu.h"

#include <algorithm>

#include "cpu/parallel.h"

namespace flatfast {

namespace {
constexpr int64_t kRowsPerTask = 16;  // rows of decreasing length: small tasks keep the dynamic schedule even
}

template <typename T>
void ep_scaled_system_cpu(const T* K, const double* s, double shift, int64_t n, T* out) {
  const int64_t tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(tasks, [&](int64_t task) {
    const int64_t end = std::min(n, (task + 1) * kRowsPerTask);
    for (int64_t i = task * kRowsPerTask; i < end; ++i) {
      const T si = static_cast<T>(s[i]);
      const T* k = K + i * n;
      T* o = out + i * n;
#pragma omp simd
      for (int64_t j = i; j < n; ++j) o[j] = si * k[j] * static_cast<T>(s[j]);
      o[i] += static_cast<T>(1.0 + shift * s[i] * s[i]);
    }
  });
}

template <typename T>
void ep_factor_column_norms_cpu(const T* W, int64_t n, double* norms) {
  const int64_t tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(tasks, [&](int64_t task) {
    const int64_t end = std::min(n, (task + 1) * kRowsPerTask);
    for (int64_t i = task * kRowsPerTask; i < end; ++i) {
      const T* w = W + i * n;
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = i; k < n; ++k) sum += static_cast<double>(w[k]) * static_cast<double>(w[k]);
      norms[i] = sum;
    }
  });
}

template void ep_scaled_system_cpu<double>(const double*, const double*, double, int64_t, double*);
template void ep_scaled_system_cpu<float>(const float*, const double*, double, int64_t, float*);
template void ep_factor_column_norms_cpu<double>(const double*, int64_t, double*);
template void ep_factor_column_norms_cpu<float>(const float*, int64_t, double*);

}  // namespace flatfast
