#pragma once
// Exact Hamiltonian trajectories of a Gaussian restricted to a box of lower bounds (Pakman & Paninski 2014),
// one particle per worker: method="smc"'s moves (flatfast/_smc.py, whose numpy loop is the reference).
#include <cstdint>

namespace flatfast {

// Each row i of (U, V) (rows x n, C-ordered, updated in place) is a particle's offset u = h - mean and velocity v
// under N(mean, cov) restricted to u + gap >= 0. Between walls u(s) = u cos s + v sin s, v(s) = v cos s - u sin s;
// at the first outward crossing of wall j, v -= 2 v_j / cov[j, j] cov[j, :]. Each row runs for `duration`
// (<= pi / 2, which the candidate test below relies on) or until max_events reflections, whichever comes first.
// A crossing within `graze` of the wall just reflected from is that reflection's rounding and is skipped.
// reflections[i] receives row i's count; returns the number of rows stopped by max_events.
int64_t orthant_trajectories_cpu(double* U, double* V, int64_t rows, int64_t n, const double* gap, const double* cov,
                                 double duration, double graze, int64_t max_events, int64_t* reflections);

}  // namespace flatfast
