#pragma once
// Work sharing for the CPU kernels. With OpenMP (the default build) this is an OpenMP loop; a compiler
// without OpenMP (Apple clang, for one) gets the same dynamic schedule on std::thread workers, so flatfast
// builds everywhere and still uses every core. The kernels call parallel_for and never name either.
#include <algorithm>
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#else
#include <atomic>
#include <thread>
#include <vector>
#endif

namespace flatfast {

// "openmp" or "std::thread": what this build runs its tile loops on.
const char* threading_backend();
// Worker threads a parallel_for uses: set_num_threads's value, else FLATFAST_NUM_THREADS if set (either build),
// else OpenMP's own count
// (OMP_NUM_THREADS), else -- without OpenMP -- OMP_NUM_THREADS or the hardware's thread count.
int max_threads();
// Overrides the count (threads >= 1) for every later call; 0 goes back to the default above.
void set_num_threads(int threads);

// While a SerialScope(true) lives, every parallel_for that its thread starts runs on that thread alone, outside
// any parallel region. Kernels that call BLAS from their workers run so when the caller cannot limit BLAS to one
// thread: a threaded BLAS called inside a parallel region oversubscribes the cores (and OpenBLAS warns that the
// program may hang), while called from a plain thread it may use its own threads.
class SerialScope {
 public:
  explicit SerialScope(bool serial);
  ~SerialScope();
  SerialScope(const SerialScope&) = delete;
  SerialScope& operator=(const SerialScope&) = delete;

 private:
  bool previous_;
};

// body(i) for every i in [0, count), items handed out one at a time to whichever worker is free (tiles differ
// in cost: the diagonal tiles of a symmetric kernel do half the work). body must not throw.
template <typename Body>
void parallel_for(int64_t count, const Body& body) {
  const int64_t workers = std::min<int64_t>(max_threads(), count);
  if (workers <= 1) {  // no parallel region at all: a BLAS called from body sees a plain thread
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic) num_threads(static_cast<int>(workers))
  for (int64_t i = 0; i < count; ++i) body(i);
#else
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) body(i);
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers - 1));
  for (int64_t w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
#endif
}

}  // namespace flatfast
