// Work split over XLA's intra-op thread pool, shared by the native CPU
// kernels (micro_attention_cpu.cc, dense_cpu.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace distkv {

// Upper bound on threads per call ($DISTKV_CPU_THREADS; default: no bound).
inline int64_t thread_cap() {
  static const int64_t n = [] {
    const char* env = std::getenv("DISTKV_CPU_THREADS");
    return env ? std::max<int64_t>(1, std::atoll(env)) : int64_t{1} << 20;
  }();
  return n;
}

// fn(0), ..., fn(count - 1), claimed from a shared counter by the caller and
// by tasks on XLA's intra-op pool. The caller claims parts too and waits
// only for parts that others have claimed (and are running), so it cannot
// deadlock when every pool thread is busy; a task that starts after all
// parts are claimed does nothing and touches only the shared heap state.
// The caller blocks (futex) rather than spins: the other threads may be
// simulated devices' work, or the host, on the same cores.
inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t count,
                         std::function<void(int64_t)> fn) {
  struct Parts {
    std::atomic<int64_t> next{0}, done{0};
    int64_t count = 0;
    std::function<void(int64_t)> fn;

    void drain() {
      for (int64_t p; (p = next.fetch_add(1)) < count;) {
        fn(p);
        done.fetch_add(1, std::memory_order_release);
        done.notify_all();
      }
    }
  };
  if (count <= 1) {
    if (count == 1) fn(0);
    return;
  }
  auto parts = std::make_shared<Parts>();
  parts->count = count;
  parts->fn = std::move(fn);
  for (int64_t i = 1; i < count; ++i) pool.Schedule([parts] { parts->drain(); });
  parts->drain();
  for (int64_t d; (d = parts->done.load(std::memory_order_acquire)) < count;)
    parts->done.wait(d, std::memory_order_acquire);
}

}  // namespace distkv
