// flatfast._C_cuda: CUDA kernels on raw device pointers (torch's data_ptr()), so the module links no torch.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>

#include "common/check.h"
#include "cuda/mlp_hvp_cuda.h"
#include "cuda/nngp_cuda.h"
#include "cuda/orthant_hmc_cuda.h"

namespace py = pybind11;
using namespace flatfast;

namespace {

void nngp(uintptr_t x, uintptr_t z, int64_t n, int64_t m, int64_t d, int depth, double sw2, double sb2, uintptr_t out,
          bool is_double, uintptr_t stream) {
  FF_CHECK_ARG(x != 0 && out != 0, "X", "null device pointer");
  FF_CHECK_ARG(n >= 0 && m >= 0 && d >= 1, "X", "bad shape");
  FF_CHECK_ARG(depth >= 0, "depth", "must be >= 0");
  FF_CHECK_ARG(std::isfinite(sw2) && sw2 > 0, "sigma_w2", "must be positive and finite");
  FF_CHECK_ARG(std::isfinite(sb2) && sb2 >= 0, "sigma_b2", "must be non-negative and finite");
  py::gil_scoped_release release;
  void* s = reinterpret_cast<void*>(stream);
  if (is_double)
    nngp_cuda<double>(reinterpret_cast<const double*>(x), n, reinterpret_cast<const double*>(z), m, d, depth, sw2, sb2,
                      reinterpret_cast<double*>(out), s);
  else
    nngp_cuda<float>(reinterpret_cast<const float*>(x), n, reinterpret_cast<const float*>(z), m, d, depth, sw2, sb2,
                     reinterpret_cast<float*>(out), s);
}

void masked_matmul(uintptr_t a, int64_t M, int64_t K, uintptr_t b, int64_t N, bool b_transposed, uintptr_t mask,
                   int64_t mask_rows, uintptr_t c, uintptr_t out, bool is_double, uintptr_t stream) {
  FF_CHECK_ARG(a != 0 && b != 0 && mask != 0 && out != 0, "A", "null device pointer");
  FF_CHECK_ARG(M >= 0 && K >= 1 && N >= 0, "A", "bad shape");
  FF_CHECK_ARG(mask_rows > 0 && M % mask_rows == 0, "mask", "its rows must divide A's rows");
  py::gil_scoped_release release;
  void* s = reinterpret_cast<void*>(stream);
  const auto* keep = reinterpret_cast<const uint8_t*>(mask);
  if (is_double)
    masked_matmul_cuda<double>(reinterpret_cast<const double*>(a), M, K, reinterpret_cast<const double*>(b), N,
                               b_transposed, keep, mask_rows, reinterpret_cast<const double*>(c),
                               reinterpret_cast<double*>(out), s);
  else
    masked_matmul_cuda<float>(reinterpret_cast<const float*>(a), M, K, reinterpret_cast<const float*>(b), N,
                              b_transposed, keep, mask_rows, reinterpret_cast<const float*>(c),
                              reinterpret_cast<float*>(out), s);
}

// method="smc"'s moves on device arrays (float64, C-ordered; shapes and the covariance's diagonal are checked by
// flatfast._smc, which owns the arrays): U, V (rows x n) updated in place, reflections (rows, int64) written.
void orthant_trajectories(uintptr_t U, uintptr_t V, int64_t rows, int64_t n, uintptr_t gap, uintptr_t cov,
                          double duration, double graze, int64_t max_events, uintptr_t reflections, uintptr_t stream) {
  FF_CHECK_ARG(rows >= 0 && n >= 1, "U", "bad shape");
  FF_CHECK_ARG(rows == 0 || (U != 0 && V != 0 && gap != 0 && cov != 0 && reflections != 0), "U",
               "null device pointer");
  FF_CHECK_ARG(std::isfinite(duration) && duration >= 0 && duration <= 1.5707963267948966, "duration",
               "must be in [0, pi / 2]");
  FF_CHECK_ARG(std::isfinite(graze) && graze >= 0, "graze", "must be non-negative and finite");
  FF_CHECK_ARG(max_events >= 1, "max_events", "must be >= 1");
  py::gil_scoped_release release;
  orthant_trajectories_cuda(reinterpret_cast<double*>(U), reinterpret_cast<double*>(V), rows, n,
                            reinterpret_cast<const double*>(gap), reinterpret_cast<const double*>(cov), duration, graze,
                            max_events, reinterpret_cast<int64_t*>(reflections), reinterpret_cast<void*>(stream));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "flatfast CUDA kernels (raw device pointers)";
  m.def("nngp", &nngp, py::arg("x"), py::arg("z"), py::arg("n"), py::arg("m"), py::arg("d"), py::arg("depth"),
        py::arg("sigma_w2"), py::arg("sigma_b2"), py::arg("out"), py::arg("is_double"), py::arg("stream"));
  m.def("masked_matmul", &masked_matmul, py::arg("a"), py::arg("M"), py::arg("K"), py::arg("b"), py::arg("N"),
        py::arg("b_transposed"), py::arg("mask"), py::arg("mask_rows"), py::arg("c"), py::arg("out"),
        py::arg("is_double"), py::arg("stream"));
  m.def("orthant_trajectories", &orthant_trajectories, py::arg("U"), py::arg("V"), py::arg("rows"), py::arg("n"),
        py::arg("gap"), py::arg("cov"), py::arg("duration"), py::arg("graze"), py::arg("max_events"),
        py::arg("reflections"), py::arg("stream"));
}
