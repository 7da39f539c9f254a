#include "cpu/blas.h"

#include <pybind11/pybind11.h>

#include <stdexcept>

namespace py = pybind11;

namespace flatfast {
namespace {

void* capsule_pointer(const char* name) {
  py::gil_scoped_acquire gil;
  py::object capi = py::module_::import("scipy.linalg.cython_blas").attr("__pyx_capi__");
  py::object capsule = capi[py::str(name)];
  PyObject* raw = capsule.ptr();
  void* fn = PyCapsule_GetPointer(raw, PyCapsule_GetName(raw));
  if (fn == nullptr) throw std::runtime_error(std::string("scipy.linalg.cython_blas has no usable ") + name);
  return fn;
}

}  // namespace

dgemm_fn get_dgemm() {
  static dgemm_fn fn = reinterpret_cast<dgemm_fn>(capsule_pointer("dgemm"));
  return fn;
}

sgemm_fn get_sgemm() {
  static sgemm_fn fn = reinterpret_cast<sgemm_fn>(capsule_pointer("sgemm"));
  return fn;
}

// Row-major products are column-major products of the transposes: C^T = op(B) op(A) with the roles swapped.
void gemm_abt(int n, int m, int k, double alpha, const double* A, int lda, const double* B, int ldb, double beta,
              double* C, int ldc) {
  get_dgemm()("T", "N", &m, &n, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}
void gemm_abt(int n, int m, int k, float alpha, const float* A, int lda, const float* B, int ldb, float beta,
              float* C, int ldc) {
  get_sgemm()("T", "N", &m, &n, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}
void gemm_ab(int n, int m, int k, double alpha, const double* A, int lda, const double* B, int ldb, double beta,
             double* C, int ldc) {
  get_dgemm()("N", "N", &m, &n, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}
void gemm_ab(int n, int m, int k, float alpha, const float* A, int lda, const float* B, int ldb, float beta,
             float* C, int ldc) {
  get_sgemm()("N", "N", &m, &n, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}
void gemm_atb(int n, int m, int k, double alpha, const double* A, int lda, const double* B, int ldb, double beta,
              double* C, int ldc) {
  get_dgemm()("N", "T", &m, &n, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}
void gemm_atb(int n, int m, int k, float alpha, const float* A, int lda, const float* B, int ldb, float beta,
              float* C, int ldc) {
  get_sgemm()("N", "T", &m, &n, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

}  // namespace flatfast
