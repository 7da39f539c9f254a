// flatfast._C_cuda: CUDA kernels on raw device pointers (torch's data_ptr()), so the module links no torch.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>

#include "common/check.h"
#include "cuda/nngp_cuda.h"

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

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "flatfast CUDA kernels (raw device pointers)";
  m.def("nngp", &nngp, py::arg("x"), py::arg("z"), py::arg("n"), py::arg("m"), py::arg("d"), py::arg("depth"),
        py::arg("sigma_w2"), py::arg("sigma_b2"), py::arg("out"), py::arg("is_double"), py::arg("stream"));
}
