#include "cpu/orthant_hmc_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "common/orthant_wall.h"
#include "cpu/parallel.h"

namespace flatfast {

int64_t orthant_trajectories_cpu(double* U, double* V, int64_t rows, int64_t n, const double* gap, const double* cov,
                                 double duration, double graze, int64_t max_events, int64_t* reflections) {
  std::atomic<int64_t> stopped{0};
  parallel_for(rows, [&](int64_t i) {
    double* u = U + i * n;
    double* v = V + i * n;
    double remaining = duration;
    int64_t events = 0, face = -1;
    double best = std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < n; ++j) consider_wall(u[j], v[j], gap[j], j, 0.0, best, face);
    while (true) {
      const double hit = face < 0 ? std::numeric_limits<double>::infinity() : 2.0 * std::atan(best);
      const bool bounce = hit < remaining;
      const double step = bounce ? hit : remaining;
      const double c = std::cos(step), s = std::sin(step);
      if (!bounce) {
        for (int64_t j = 0; j < n; ++j) {
          const double uj = u[j], vj = v[j];
          u[j] = std::max(uj * c + vj * s, -gap[j]);  // rounding may leave a hair outside
          v[j] = vj * c - uj * s;
        }
        break;
      }
      // One pass: move to the wall, reflect (cov is symmetric: its row `face` is the column), and find the next.
      const double* column = cov + face * n;
      const double coefficient = 2.0 * (v[face] * c - u[face] * s) / column[face];
      const int64_t last = face;
      best = std::numeric_limits<double>::infinity();
      face = -1;
      for (int64_t j = 0; j < n; ++j) {
        const double uj = u[j], vj = v[j];
        const double moved = std::max(uj * c + vj * s, -gap[j]);
        const double turned = (vj * c - uj * s) - coefficient * column[j];
        u[j] = moved;
        v[j] = turned;
        consider_wall(moved, turned, gap[j], j, j == last ? graze : 0.0, best, face);
      }
      remaining -= step;
      if (++events >= max_events) {
        stopped.fetch_add(1);
        break;
      }
    }
    reflections[i] = events;
  });
  return stopped.load();
}

}  // namespace flatfast
