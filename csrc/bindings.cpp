// flatfast._C: the CPU kernels. Arguments are checked here, at the boundary, so that nothing malformed
// reaches a kernel; the Python layer has already given friendlier messages for user-facing mistakes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <optional>
#include <string>

#include "common/check.h"
#include "cpu/blas.h"
#include "cpu/ep_cpu.h"
#include "cpu/mlp_hvp_cpu.h"
#include "cpu/nngp_cpu.h"
#include "cpu/orthant_hmc_cpu.h"
#include "cpu/parallel.h"

namespace py = pybind11;
using namespace flatfast;

namespace {

template <typename T>
using carray = py::array_t<T, py::array::c_style>;

template <typename T>
void check_matrix(const py::array& a, const char* name) {
  FF_CHECK_ARG(a.ndim() == 2, name, "must be 2-D, got " + std::to_string(a.ndim()) + "-D");
  FF_CHECK_ARG(py::isinstance<carray<T>>(a), name, "must be a C-contiguous array of the kernel's dtype");
  FF_CHECK_ARG(a.shape(0) < INT_MAX && a.shape(1) < INT_MAX, name, "is too large for 32-bit BLAS dimensions");
}

template <typename T>
py::array nngp(const py::array& X, const std::optional<py::array>& Z, int depth, double sw2, double sb2, bool serial) {
  check_matrix<T>(X, "X");
  FF_CHECK_ARG(X.shape(1) >= 1, "X", "must have at least one column");
  if (Z) {
    check_matrix<T>(*Z, "Z");
    FF_CHECK_ARG(Z->shape(1) == X.shape(1), "Z", "must have as many columns as X");
  }
  FF_CHECK_ARG(depth >= 0, "depth", "must be >= 0");
  FF_CHECK_ARG(std::isfinite(sw2) && sw2 > 0, "sigma_w2", "must be positive and finite");
  FF_CHECK_ARG(std::isfinite(sb2) && sb2 >= 0, "sigma_b2", "must be non-negative and finite");
  get_dgemm();  // resolve the BLAS pointers while the GIL is held
  get_sgemm();
  const int64_t n = X.shape(0), d = X.shape(1), m = Z ? Z->shape(0) : n;
  carray<T> out({n, m});
  const T* x = static_cast<const T*>(X.data());
  const T* z = Z ? static_cast<const T*>(Z->data()) : nullptr;
  T* o = out.mutable_data();
  if (n > 0 && m > 0) {
    py::gil_scoped_release release;
    SerialScope scope(serial);
    nngp_cpu<T>(x, n, z, m, d, depth, sw2, sb2, o);
  }
  return std::move(out);
}

template <typename T>
py::array masked_matmul(const py::array& A, const py::array& B, bool b_transposed, const py::array& mask,
                        const std::optional<py::array>& C, bool serial) {
  check_matrix<T>(A, "A");
  check_matrix<T>(B, "B");
  const int64_t M = A.shape(0), K = A.shape(1);
  const int64_t N = b_transposed ? B.shape(0) : B.shape(1);
  FF_CHECK_ARG((b_transposed ? B.shape(1) : B.shape(0)) == K, "B", "inner dimension does not match A");
  FF_CHECK_ARG(mask.ndim() == 2 && py::isinstance<carray<uint8_t>>(mask), "mask",
               "must be a C-contiguous 2-D uint8 array");
  FF_CHECK_ARG(mask.shape(1) == N && mask.shape(0) > 0 && M % mask.shape(0) == 0, "mask",
               "must be (R, N) with R dividing A's rows");
  if (C) {
    check_matrix<T>(*C, "C");
    FF_CHECK_ARG(C->shape(0) == M && C->shape(1) == N, "C", "must have the product's shape");
  }
  get_dgemm();
  get_sgemm();
  carray<T> out({M, N});
  const T* a = static_cast<const T*>(A.data());
  const T* b = static_cast<const T*>(B.data());
  const uint8_t* keep = static_cast<const uint8_t*>(mask.data());
  const T* c = C ? static_cast<const T*>(C->data()) : nullptr;
  T* o = out.mutable_data();
  const int64_t rows = mask.shape(0);
  if (M > 0 && N > 0) {
    py::gil_scoped_release release;
    SerialScope scope(serial);
    masked_matmul_cpu<T>(a, M, K, b, N, b_transposed, keep, rows, c, o);
  }
  return std::move(out);
}

// EP's fused passes: `out` is the caller's workspace (written in place, so no n x n array is allocated per sweep).
template <typename T>
void ep_scaled_system(const py::array& K, const py::array& s, py::array& out, double shift) {
  check_matrix<T>(K, "K");
  check_matrix<T>(out, "out");
  const int64_t n = K.shape(0);
  FF_CHECK_ARG(K.shape(1) == n, "K", "must be square");
  FF_CHECK_ARG(out.shape(0) == n && out.shape(1) == n, "out", "must have K's shape");
  FF_CHECK_ARG(s.ndim() == 1 && s.shape(0) == n && py::isinstance<carray<double>>(s), "s",
               "must be a contiguous float64 vector of length n");
  FF_CHECK_ARG(out.writeable(), "out", "must be writeable");
  FF_CHECK_ARG(std::isfinite(shift), "shift", "must be finite");
  const T* k = static_cast<const T*>(K.data());
  const double* sp = static_cast<const double*>(s.data());
  T* o = static_cast<T*>(out.mutable_data());
  py::gil_scoped_release release;
  ep_scaled_system_cpu<T>(k, sp, shift, n, o);
}

template <typename T>
py::array ep_factor_column_norms(const py::array& W) {
  check_matrix<T>(W, "W");
  const int64_t n = W.shape(0);
  FF_CHECK_ARG(W.shape(1) == n, "W", "must be square");
  carray<double> norms({n});
  const T* w = static_cast<const T*>(W.data());
  double* o = norms.mutable_data();
  {
    py::gil_scoped_release release;
    ep_factor_column_norms_cpu<T>(w, n, o);
  }
  return std::move(norms);
}

// method="smc"'s moves: (U, V) updated in place; returns (reflections per row, rows stopped at max_events).
py::tuple orthant_trajectories(py::array& U, py::array& V, const py::array& gap, const py::array& cov,
                               double duration, double graze, int64_t max_events) {
  check_matrix<double>(U, "U");
  check_matrix<double>(V, "V");
  check_matrix<double>(cov, "cov");
  const int64_t rows = U.shape(0), n = U.shape(1);
  FF_CHECK_ARG(V.shape(0) == rows && V.shape(1) == n, "V", "must have U's shape");
  FF_CHECK_ARG(U.writeable() && V.writeable(), "U", "U and V must be writeable");
  FF_CHECK_ARG(cov.shape(0) == n && cov.shape(1) == n, "cov", "must be n x n with n = U's columns");
  FF_CHECK_ARG(gap.ndim() == 1 && gap.shape(0) == n && py::isinstance<carray<double>>(gap), "gap",
               "must be a contiguous float64 vector of length n");
  FF_CHECK_ARG(std::isfinite(duration) && duration >= 0 && duration <= 1.5707963267948966, "duration",
               "must be in [0, pi / 2]");
  FF_CHECK_ARG(std::isfinite(graze) && graze >= 0, "graze", "must be non-negative and finite");
  FF_CHECK_ARG(max_events >= 1, "max_events", "must be >= 1");
  const double* c = static_cast<const double*>(cov.data());
  for (int64_t j = 0; j < n; ++j)
    FF_CHECK_ARG(c[j * n + j] > 0, "cov", "must have a positive diagonal");
  carray<int64_t> reflections({rows});
  double* u = static_cast<double*>(U.mutable_data());
  double* v = static_cast<double*>(V.mutable_data());
  const double* g = static_cast<const double*>(gap.data());
  int64_t* r = reflections.mutable_data();
  int64_t stopped = 0;
  if (rows > 0 && n > 0) {
    py::gil_scoped_release release;
    stopped = orthant_trajectories_cpu(u, v, rows, n, g, c, duration, graze, max_events, r);
  }
  return py::make_tuple(std::move(reflections), stopped);
}

// A 2x3 times 3x2 product through the BLAS the kernels borrow, in both precisions: the largest error
// against the exact answer. scipy.linalg.cython_blas wraps whatever BLAS scipy links (OpenBLAS, MKL,
// Accelerate) behind one ABI; this checks that the pointers resolve and compute, once, at load time.
double blas_check() {
  const double a[6] = {1, 2, 3, 4, 5, 6}, b[6] = {1, 0, -1, 2, 1, 0};  // A 2x3, B 2x3 (product A B^T)
  const double expected[4] = {-2, 4, -2, 13};
  double c[4] = {0, 0, 0, 0};
  float af[6], bf[6], cf[4] = {0, 0, 0, 0};
  for (int i = 0; i < 6; ++i) {
    af[i] = static_cast<float>(a[i]);
    bf[i] = static_cast<float>(b[i]);
  }
  gemm_abt(2, 2, 3, 1.0, a, 3, b, 3, 0.0, c, 2);
  gemm_abt(2, 2, 3, 1.0f, af, 3, bf, 3, 0.0f, cf, 2);
  double worst = 0.0;
  for (int i = 0; i < 4; ++i) {
    worst = std::max(worst, std::abs(c[i] - expected[i]));
    worst = std::max(worst, std::abs(static_cast<double>(cf[i]) - expected[i]));
  }
  return worst;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flatfast CPU kernels (C++17; OpenMP or std::thread workers)";
  m.def("nngp_f64", &nngp<double>, py::arg("X"), py::arg("Z"), py::arg("depth"), py::arg("sigma_w2"),
        py::arg("sigma_b2"), py::arg("serial") = false);
  m.def("nngp_f32", &nngp<float>, py::arg("X"), py::arg("Z"), py::arg("depth"), py::arg("sigma_w2"),
        py::arg("sigma_b2"), py::arg("serial") = false);
  m.def("masked_matmul_f64", &masked_matmul<double>, py::arg("A"), py::arg("B"), py::arg("b_transposed"),
        py::arg("mask"), py::arg("C"), py::arg("serial") = false);
  m.def("masked_matmul_f32", &masked_matmul<float>, py::arg("A"), py::arg("B"), py::arg("b_transposed"),
        py::arg("mask"), py::arg("C"), py::arg("serial") = false);
  m.def("ep_scaled_system_f64", &ep_scaled_system<double>, py::arg("K"), py::arg("s"), py::arg("out"),
        py::arg("shift") = 0.0);
  m.def("ep_scaled_system_f32", &ep_scaled_system<float>, py::arg("K"), py::arg("s"), py::arg("out"),
        py::arg("shift") = 0.0);
  m.def("ep_factor_column_norms_f64", &ep_factor_column_norms<double>, py::arg("W"));
  m.def("ep_factor_column_norms_f32", &ep_factor_column_norms<float>, py::arg("W"));
  m.def("orthant_trajectories_f64", &orthant_trajectories, py::arg("U"), py::arg("V"), py::arg("gap"),
        py::arg("cov"), py::arg("duration"), py::arg("graze"), py::arg("max_events"));
  m.def("threading", []() { return std::string(threading_backend()); },
        "What the tile loops run on: 'openmp' or 'std::thread'.");
  m.def("num_threads", &max_threads, "Worker threads per kernel call (FLATFAST_NUM_THREADS overrides).");
  m.def("set_num_threads", &set_num_threads, py::arg("threads"),
        "Worker threads for later calls (>= 1); 0 restores the default.");
  m.def("blas_check", &blas_check, "Largest error of a small GEMM through scipy's BLAS (0 when it works).");
}
