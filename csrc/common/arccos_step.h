#pragma once
#include <cmath>

#include "common/host_device.h"

namespace flatfast {

// pi and 1/(2 pi) as double literals so CPU and CUDA round identically.
constexpr double kPi = 3.141592653589793238462643383279502884;
constexpr double kHalfPi = 1.570796326794896619231321691639751442;
constexpr double kInv2Pi = 0.159154943091895335768883763372514362;

// asin(t) for 0 <= t <= 1/2 by its Maclaurin series, t * sum_k c_k x^k with x = t^2 and
// c_k = (2k)! / (4^k (k!)^2 (2k + 1)), k = 0..24 (the tail is below 2e-17 t there). The sum is split into four
// interleaved Horner chains in x^4 (c_k with k = r mod 4 in chain r) so that four FMA chains overlap instead
// of one 25-deep dependency chain; every coefficient and x are positive, so the split costs no accuracy.
// Branch-free so that the CPU epilogue vectorises (libm's acos does not) and identical on every backend;
// kernels/nngp_triton.py evaluates the same polynomial, since Triton's interpreter has no acos.
FF_HD double asin_series(double t) {
  constexpr int kChains = 4, kPerChain = 7;  // 28 slots, the last three zero
  constexpr double c[kChains * kPerChain] = {
      1.0, 0.16666666666666666, 0.074999999999999997, 0.044642857142857144, 0.030381944444444444,
      0.022372159090909092, 0.017352764423076924, 0.013964843750000001, 0.011551800896139705,
      0.0097616095291940784, 0.0083903358096168151, 0.0073125258735988454, 0.0064472103118896487,
      0.0057400376708419236, 0.0051533096823199046, 0.0046601434869150962, 0.0042409070936793632,
      0.0038809645588376691, 0.0035692053938259347, 0.0032970595034734849, 0.0030578216492580306,
      0.0028461784011089421, 0.0026578706382072901, 0.0024894486782468836, 0.002338091892111975,
      0.0, 0.0, 0.0};
  const double x = t * t, x2 = x * x, x4 = x2 * x2;
  double acc0 = 0.0, acc1 = 0.0, acc2 = 0.0, acc3 = 0.0;
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 8
#endif
  for (int k = kPerChain - 1; k >= 0; --k) {
    acc0 = acc0 * x4 + c[kChains * k];
    acc1 = acc1 * x4 + c[kChains * k + 1];
    acc2 = acc2 * x4 + c[kChains * k + 2];
    acc3 = acc3 * x4 + c[kChains * k + 3];
  }
  return t * ((acc0 + x * acc1) + x2 * (acc2 + x * acc3));
}

// arccos on [-1, 1]: pi/2 - asin(a) for a = |c| <= 1/2, 2 asin(sqrt((1 - a)/2)) above (1 - a is exact there),
// reflected for c < 0. Within a few ulp of libm's acos (tested).
FF_HD double acos_branchless(double c) {
  const double a = fabs(c);
  const bool far = a > 0.5;
  const double t = far ? sqrt(0.5 * (1.0 - a)) : a;
  const double s = asin_series(t);
  const double r = far ? 2.0 * s : kHalfPi - s;
  return c < 0.0 ? kPi - r : r;
}

// One hidden ReLU layer of the NNGP recursion (arc-cosine kernel of degree 1, Cho & Saul 2009):
//   c = clamp(k / sqrt(qx qz), -1, 1), theta = arccos c
//   k' = sb2 + sw2/(2 pi) sqrt(qx qz) (sin theta + (pi - theta) c)
// sqrt_qxqz is passed in because callers keep per-point sqrt(q) per layer. sin theta is sqrt((1-c)(1+c)):
// no cancellation near |c| = 1, where duplicates and near-collinear rows put it. A zero-variance point
// (sqrt_qxqz = 0, only possible with sb2 = 0 and a zero row) gives c = 0; the sqrt(qx qz) factor kills the term.
FF_HD double arccos_step(double k, double sqrt_qxqz, double sw2, double sb2) {
  const bool degenerate = !(sqrt_qxqz > 0.0);
  double c = k / (degenerate ? 1.0 : sqrt_qxqz);  // divide unconditionally: a select, not a branch
  c = degenerate ? 0.0 : (c > 1.0 ? 1.0 : (c < -1.0 ? -1.0 : c));
  const double theta = acos_branchless(c);
  const double sin_theta = sqrt((1.0 - c) * (1.0 + c));
  return sb2 + sw2 * kInv2Pi * sqrt_qxqz * (sin_theta + (kPi - theta) * c);
}

// The exact diagonal of the same layer: theta = 0, so k' = sb2 + sw2/2 q. Never routed through arccos.
FF_HD double diagonal_step(double q, double sw2, double sb2) { return sb2 + 0.5 * sw2 * q; }

}  // namespace flatfast
