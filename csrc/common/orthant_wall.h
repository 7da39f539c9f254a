#pragma once
// The wall test of method="smc"'s reflected Hamiltonian trajectories, written once for the C++ and CUDA kernels
// (flatfast/_smc.py's _first_wall_hits is its reference).
#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace flatfast {

// std::min's semantics on both compilers (fmin would treat NaN differently, and costs more on the CPU).
FF_HD double lesser(double a, double b) { return b < a ? b : a; }

// Wall j's contribution to a trajectory's first outward crossing within a quarter period: the smallest root
// t = tan(s / 2) > floor of (gap - u) t^2 + 2 v t + (gap + u) = 0, for walls that may be crossed
// (D = u^2 + v^2 - gap^2 > 0 and min(u, 0) + min(v, 0) + gap < 0), in the stable form q = -(v + sign(v) sqrt(D)),
// roots q / (gap - u) and (gap + u) / q. Lowers (best, where) when it is earlier.
FF_HD void consider_wall(double uj, double vj, double g, int64_t j, double floor, double& best, int64_t& where) {
  const double reach2 = uj * uj + vj * vj;
  if (!(reach2 > g * g) || !(lesser(uj, 0.0) + lesser(vj, 0.0) + g < 0.0)) return;
  const double q = -(vj + copysign(sqrt(reach2 - g * g), vj));
  const double a = g - uj, c = g + uj;
  if (a != 0) {
    const double root = q / a;
    if (root > floor && root < best) best = root, where = j;
  }
  if (q != 0) {
    const double root = c / q;
    if (root > floor && root < best) best = root, where = j;
  }
}

}  // namespace flatfast
