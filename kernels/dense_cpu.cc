// Dense layer for XLA:CPU in bfloat16: y[M, N] = x[M, K] @ w[K, N], bfloat16
// in and out, accumulated in float32 and rounded once (the contract of
// models/llama.py's dense layers in bfloat16).
//
// Why: XLA:CPU runs small-M bfloat16 dots (decode steps) at ~12 GB/s of
// weights on this project's CPUs; a decode step is a stream over the
// weights, which this kernel reads at close to the memory bandwidth, and
// large-M dots (prefill) are compute-bound, where VDPBF16PS does 32
// multiply-adds per instruction.
//
// The weights come packed (kernels/dense.py, `pack`): panels of 32 columns,
// each panel's K rows taken in pairs, w_packed[p, kp, j, t] = w[2 kp + t, 32 p + j]
// (zero past the edges), shape [ceil(N / 32), ceil(K / 2), 32, 2]. A panel is
// contiguous (the stream a prefetcher follows) and each pair row is two
// 64-byte loads in the operand layout of VDPBF16PS: 16 column pairs (w[k, n],
// w[k+1, n]) times a broadcast pair (x[m, k], x[m, k+1]), both products added
// to 16 float32 sums. A block is 8 rows x 32 columns (16 accumulators).
// Threads take contiguous panel ranges (each weight is read from memory once)
// and, when panels are too few for the threads, row ranges too. Without
// AVX512_BF16 a portable loop (float32 FMAs on GCC vectors) computes the
// same sums.
//
// Built with micro_attention_cpu.cc by kernels/native.py (-O3 -march=native)
// and registered as the XLA FFI target "distkv_dense_bf16".

#include <algorithm>
#include <cstdint>
#include <cstdlib>

// DISTKV_PORTABLE (kernels/native.py, $DISTKV_NATIVE_PORTABLE) builds the
// portable loop on any CPU, for its tests.
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(DISTKV_PORTABLE)
#include <immintrin.h>
#define DISTKV_DPBF16 1
#endif

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;  // columns per packed panel

inline float bf16_to_f32(uint16_t x) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(x) << 16);
}

// float32 -> bfloat16, round to nearest even (NaN kept a quiet NaN), as XLA's convert.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

struct Geometry {
  int64_t M, K, N;
  const uint16_t* x;  // [M, K]
  const uint16_t* w;  // packed [ceil(N / 32), ceil(K / 2), 32, 2]
  uint16_t* y;        // [M, N]
};

#ifdef DISTKV_DPBF16

// Rows [0, R) of x times one packed panel (32 columns) -> y, `cols` of them
// stored (the last panel may be partial). acc0[r] holds columns 0-15,
// acc1[r] columns 16-31.
template <int R>
void panel(const uint16_t* x, int64_t K, const uint16_t* wp, uint16_t* y, int64_t ldy,
           int64_t cols) {
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  // the next panel (contiguous after this one), line for line: the hardware
  // prefetcher alone left a decode step's stream at half the bandwidth
  const int64_t ahead = (K + 1) / 2 * 2 * kPanel;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    __builtin_prefetch(wp + kp * 2 * kPanel + ahead, 0, 3);
    __builtin_prefetch(wp + kp * 2 * kPanel + ahead + 32, 0, 3);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp + kp * 2 * kPanel);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + kp * 2 * kPanel + 32);
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      __builtin_memcpy(&pair, x + r * K + 2 * kp, 4);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      acc0[r] = _mm512_dpbf16_ps(acc0[r], xb, w0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], xb, w1);
    }
  }
  if (K & 1) {  // the packed panel pairs the last row of w with zeros
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp + pairs * 2 * kPanel);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + pairs * 2 * kPanel + 32);
    for (int r = 0; r < R; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * K + K - 1]));
      acc0[r] = _mm512_dpbf16_ps(acc0[r], xb, w0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], xb, w1);
    }
  }
  const __mmask16 m0 = cols >= 16 ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? 0xffff : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  for (int r = 0; r < R; ++r) {
    _mm256_mask_storeu_epi16(y + r * ldy, m0, (__m256i)_mm512_cvtneps_pbh(acc0[r]));
    _mm256_mask_storeu_epi16(y + r * ldy + 16, m1, (__m256i)_mm512_cvtneps_pbh(acc1[r]));
  }
}

constexpr int kRows = 8;  // rows per block: 16 accumulators

void panel_rows(int64_t rows, const uint16_t* x, int64_t K, const uint16_t* wp, uint16_t* y,
                int64_t ldy, int64_t cols) {
  switch (rows) {
    case 8: panel<8>(x, K, wp, y, ldy, cols); break;
    case 7: panel<7>(x, K, wp, y, ldy, cols); break;
    case 6: panel<6>(x, K, wp, y, ldy, cols); break;
    case 5: panel<5>(x, K, wp, y, ldy, cols); break;
    case 4: panel<4>(x, K, wp, y, ldy, cols); break;
    case 3: panel<3>(x, K, wp, y, ldy, cols); break;
    case 2: panel<2>(x, K, wp, y, ldy, cols); break;
    default: panel<1>(x, K, wp, y, ldy, cols); break;
  }
}

// Rows [m0, m1) x panels [p0, p1). Panel outer: the panel (K x 64 bytes)
// stays in L1/L2 while the row blocks reuse it.
void run(const Geometry& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t pairs = (g.K + 1) / 2;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t cols = std::min<int64_t>(kPanel, g.N - p * kPanel);
    const uint16_t* wp = g.w + p * pairs * 2 * kPanel;
    for (int64_t m = m0; m < m1; m += kRows)
      panel_rows(std::min<int64_t>(kRows, m1 - m), g.x + m * g.K, g.K, wp,
                 g.y + m * g.N + p * kPanel, g.N, cols);
  }
}

#else  // portable: float32 FMAs on 32-lane GCC vectors, one row at a time

typedef float f32v __attribute__((vector_size(128)));

void run(const Geometry& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t pairs = (g.K + 1) / 2;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t cols = std::min<int64_t>(kPanel, g.N - p * kPanel);
    const uint16_t* wp = g.w + p * pairs * 2 * kPanel;
    for (int64_t m = m0; m < m1; ++m) {
      const uint16_t* x = g.x + m * g.K;
      f32v acc = {};
      for (int64_t k = 0; k < g.K; ++k) {
        const uint16_t* row = wp + (k / 2) * 2 * kPanel + (k & 1);
        f32v wv;
        for (int64_t j = 0; j < kPanel; ++j) wv[j] = bf16_to_f32(row[2 * j]);
        acc += bf16_to_f32(x[k]) * wv;
      }
      for (int64_t j = 0; j < cols; ++j) g.y[m * g.N + p * kPanel + j] = f32_to_bf16(acc[j]);
    }
  }
}

constexpr int kRows = 8;

#endif

// Below this many multiply-adds a task's hand-off costs more than it saves.
constexpr int64_t kMacsPerPart = int64_t{1} << 19;

ffi::Error dense_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::BF16> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 4 || yd.size() != 2)
    return ffi::Error::InvalidArgument("dense: x [M, K], packed w [Np, Kp, 32, 2], y [M, N]");
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  const int64_t panels = (N + kPanel - 1) / kPanel;
  if (yd[0] != M || wd[0] != panels || wd[1] != (K + 1) / 2 || wd[2] != kPanel || wd[3] != 2)
    return ffi::Error::InvalidArgument("dense: packed w does not match x [M, K] and y [M, N]");
  const Geometry g{M, K, N, reinterpret_cast<const uint16_t*>(x.untyped_data()),
                   reinterpret_cast<const uint16_t*>(w.untyped_data()),
                   reinterpret_cast<uint16_t*>(y->untyped_data())};
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  // two parts per thread, claimed dynamically (a thread slowed by the host's
  // own work takes fewer), none smaller than kMacsPerPart
  const int64_t parts = std::min({distkv::thread_cap(), 2 * workers,
                                  std::max<int64_t>(1, M * std::max<int64_t>(K, 1) * N / kMacsPerPart)});
  if (parts <= 1) {
    run(g, 0, M, 0, panels);
    return ffi::Error::Success();
  }
  // panels first (each weight read once); rows too when panels are too few
  const int64_t blocks = (M + kRows - 1) / kRows;
  const int64_t col_parts = std::min(parts, panels);
  const int64_t row_parts = std::min((parts + col_parts - 1) / col_parts, blocks);
  distkv::parallel_for(pool, col_parts * row_parts, [&](int64_t part) {
    const int64_t c = part / row_parts, r = part % row_parts;
    const int64_t m0 = blocks * r / row_parts * kRows;
    const int64_t m1 = std::min(M, blocks * (r + 1) / row_parts * kRows);
    run(g, m0, m1, panels * c / col_parts, panels * (c + 1) / col_parts);
  });
  return ffi::Error::Success();
}

}  // namespace

// 1 where the AVX512_BF16 path is built (dense.resolve_impl's "auto" takes
// the kernel only then: the portable loop is slower than XLA's dot).
extern "C" int DistkvDenseVectorized() {
#ifdef DISTKV_DPBF16
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DistkvDenseBF16, dense_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
