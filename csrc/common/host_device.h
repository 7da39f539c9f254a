#pragma once
// FF_HD marks math written once for both the CPU build (g++) and the CUDA build (nvcc).
#if defined(__CUDACC__)
#define FF_HD __host__ __device__ __forceinline__
#else
#define FF_HD inline __attribute__((always_inline))
#endif
