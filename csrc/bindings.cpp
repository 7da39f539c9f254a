// flatfast._C: the CPU kernels. Arguments are checked here, at the boundary, so that nothing malformed
// reaches a kernel; the Python layer has already given friendlier messages for user-facing mistakes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <cmath>
#include <optional>

#include <omp.h>

#include "common/check.h"
#include "cpu/blas.h"
#include "cpu/nngp_cpu.h"

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
py::array nngp(const py::array& X, const std::optional<py::array>& Z, int depth, double sw2, double sb2) {
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
    nngp_cpu<T>(x, n, z, m, d, depth, sw2, sb2, o);
  }
  return std::move(out);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flatfast CPU kernels (C++17, OpenMP)";
  m.def("nngp_f64", &nngp<double>, py::arg("X"), py::arg("Z"), py::arg("depth"), py::arg("sigma_w2"),
        py::arg("sigma_b2"));
  m.def("nngp_f32", &nngp<float>, py::arg("X"), py::arg("Z"), py::arg("depth"), py::arg("sigma_w2"),
        py::arg("sigma_b2"));
  m.def("omp_max_threads", []() { return omp_get_max_threads(); });
}
