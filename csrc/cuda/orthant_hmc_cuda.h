#pragma once
// method="smc"'s exact reflected Hamiltonian trajectories on the GPU, one warp per particle: the CUDA twin of
// csrc/cpu/orthant_hmc_cpu.h (same arguments and algorithm, on device pointers), launched on `stream`.
#include <cstdint>

namespace flatfast {

// See orthant_trajectories_cpu. reflections[i] receives row i's count (a row stopped by max_events has that many).
void orthant_trajectories_cuda(double* U, double* V, int64_t rows, int64_t n, const double* gap, const double* cov,
                               double duration, double graze, int64_t max_events, int64_t* reflections,
                               void* stream);

}  // namespace flatfast
