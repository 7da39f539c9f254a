#include "cpu/parallel.h"

#include <atomic>
#include <cstdlib>
#include <thread>

namespace flatfast {

const char* threading_backend() {
#if defined(_OPENMP)
  return "openmp";
#else
  return "std::thread";
#endif
}

namespace {

int positive_env(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::atoi(value) > 0 ? std::atoi(value) : 0;
}

std::atomic<int> g_requested_threads{0};  // set_num_threads; 0 = not set
thread_local bool t_serial = false;        // a SerialScope(true) of this thread is alive

}  // namespace

void set_num_threads(int threads) { g_requested_threads.store(threads > 0 ? threads : 0); }

SerialScope::SerialScope(bool serial) : previous_(t_serial) { t_serial = t_serial || serial; }
SerialScope::~SerialScope() { t_serial = previous_; }

int max_threads() {
  if (t_serial) return 1;
  if (const int requested = g_requested_threads.load()) return requested;
  if (const int requested = positive_env("FLATFAST_NUM_THREADS")) return requested;
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  if (const int requested = positive_env("OMP_NUM_THREADS")) return requested;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
#endif
}

}  // namespace flatfast
