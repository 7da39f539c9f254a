#include "cpu/orthant_hmc_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "common/orthant_wall.h"
#include "cpu/parallel.h"

namespace flatfast {

namespace {

// Walls that cannot be crossed before the earliest crossing found so far in a pass are ruled out by a bound that
// costs a few multiplications, so that consider_wall's square root and two divisions -- most of a pass's time
// when particles crowd their walls, as they do late in a run -- are spent on the few walls that might win.
// Over s in [0, s*] (s* <= pi / 2), u cos s + v sin s + gap >= min(u, u cos s*) + min(v sin s*, 0) + gap; where
// that is positive there is no crossing before s*. s* is the crossing so far widened by kWiden, and the bound must
// clear kMargin times the coordinates' size, far more than rounding in the bound can bridge; so a ruled-out wall
// is one whose root would not have won (unless rounding put that root more than kWiden off, which takes a
// trajectory that all but touches the wall), and the pass takes the same wall, to the bit, as one that solves
// every wall: the tests compare the two. (Crossings beyond a quarter period may differ; no trajectory lasts that
// long, so neither pass reflects there.) Until a crossing is found, s* is the quarter period.
class EarliestCrossing {
 public:
  // consider_wall, for a wall the bound does not rule out, then s* narrowed to what it found.
  void consider(double uj, double vj, double g, int64_t j, double floor) {
    if (rules_out(uj, vj, g)) return;
    const double before = best;
    consider_wall(uj, vj, g, j, floor, best, face);
    if (best < before) {
      const double t = std::min(best * kWiden, 1.0), t2 = t * t;
      cos_ = (1.0 - t2) / (1.0 + t2);  // s* = 2 atan(t): its cosine and sine from the half-angle tangent
      sin_ = 2.0 * t / (1.0 + t2);
    }
  }

  double best = std::numeric_limits<double>::infinity();  // t = tan(s / 2) of the earliest crossing found
  int64_t face = -1;                                       // its wall; -1 while there is none

 private:
  static constexpr double kWiden = 1.0 + 1e-6, kMargin = 1e-12;

  bool rules_out(double uj, double vj, double g) const {
    const double pull = vj * sin_;
    // min(pull, 0) as arithmetic: the sign of a velocity is a coin flip, and a branch on it is mispredicted half
    // the time. (pull - |pull|) / 2 is exact.
    const double bound = lesser(uj, uj * cos_) + 0.5 * (pull - std::fabs(pull)) + g;
    return bound > kMargin * (std::fabs(uj) + std::fabs(vj) + std::fabs(g));
  }

  double cos_ = 0.0, sin_ = 1.0;
};

}  // namespace

int64_t orthant_trajectories_cpu(double* U, double* V, int64_t rows, int64_t n, const double* gap, const double* cov,
                                 double duration, double graze, int64_t max_events, int64_t* reflections) {
  std::atomic<int64_t> stopped{0};
  parallel_for(rows, [&](int64_t i) {
    double* u = U + i * n;
    double* v = V + i * n;
    double remaining = duration;
    int64_t events = 0;
    EarliestCrossing next;
    for (int64_t j = 0; j < n; ++j) next.consider(u[j], v[j], gap[j], j, 0.0);
    while (true) {
      const double hit = next.face < 0 ? std::numeric_limits<double>::infinity() : 2.0 * std::atan(next.best);
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
      // One pass: move to the wall, reflect (cov is symmetric: its row `last` is the column), and find the next.
      const int64_t last = next.face;
      const double* column = cov + last * n;
      const double coefficient = 2.0 * (v[last] * c - u[last] * s) / column[last];
      next = EarliestCrossing();
      for (int64_t j = 0; j < n; ++j) {
        const double uj = u[j], vj = v[j];
        const double moved = std::max(uj * c + vj * s, -gap[j]);
        const double turned = (vj * c - uj * s) - coefficient * column[j];
        u[j] = moved;
        v[j] = turned;
        next.consider(moved, turned, gap[j], j, j == last ? graze : 0.0);
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
