#pragma once
// BLAS GEMM borrowed from the scipy that flatfast depends on (scipy.linalg.cython_blas exports function
// pointers as PyCapsules). Linking no BLAS of our own keeps the wheel small and uses the same OpenBLAS as
// numpy, so the benchmark's GEMM floor and our tiles run the same code.
namespace flatfast {

using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*,
                          const int*);
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                          const float*, const int*, const float*, const int*, const float*, float*,
                          const int*);

// Resolved once, on first use, with the GIL held. Throws std::runtime_error if scipy is missing.
dgemm_fn get_dgemm();
sgemm_fn get_sgemm();

// Row-major C[n x m] = alpha * A[n x k] * B[m x k]^T + beta * C, with leading dimensions lda, ldb, ldc.
void gemm_abt(int n, int m, int k, double alpha, const double* A, int lda, const double* B, int ldb, double beta,
              double* C, int ldc);
void gemm_abt(int n, int m, int k, float alpha, const float* A, int lda, const float* B, int ldb, float beta,
              float* C, int ldc);
// Row-major C[n x m] = alpha * A[n x k] * B[k x m] + beta * C.
void gemm_ab(int n, int m, int k, double alpha, const double* A, int lda, const double* B, int ldb, double beta,
             double* C, int ldc);
void gemm_ab(int n, int m, int k, float alpha, const float* A, int lda, const float* B, int ldb, float beta,
             float* C, int ldc);
// Row-major C[n x m] = alpha * A[k x n]^T * B[k x m] + beta * C.
void gemm_atb(int n, int m, int k, double alpha, const double* A, int lda, const double* B, int ldb, double beta,
              double* C, int ldc);
void gemm_atb(int n, int m, int k, float alpha, const float* A, int lda, const float* B, int ldb, float beta,
              float* C, int ldc);

}  // namespace flatfast
