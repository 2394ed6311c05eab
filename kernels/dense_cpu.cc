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
// A second target computes the MLP's silu(x @ gate) * (x @ up) in one call:
// gate and up packed panel by panel (dense.py's pack_gate_up), both panels
// of a row block kept in L1, only the activation written.
//
// Built with micro_attention_cpu.cc by kernels/native.py (-O3 -march=native)
// and registered as the XLA FFI targets "distkv_dense_bf16" and
// "distkv_dense_silu_mul_bf16".

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
#include "cpu_vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;  // columns per packed panel

using distkv::bf16_to_f32;
using distkv::f32_to_bf16;

struct Geometry {
  int64_t M, K, N;
  const uint16_t* x;  // [M, K]
  const uint16_t* w;  // packed [ceil(N / 32), ceil(K / 2), 32, 2] (silu_mul: 2x the panels)
  uint16_t* y;        // [M, N]
};

// The MLP's silu(gate) * up with PyTorch's bfloat16 roundings
// (models.llama.silu_mul): gate and up are the bfloat16-rounded products;
// silu is computed in float32 and rounded once, then the product rounded
// once. sigmoid(g) from e = exp(-|g|) <= 1: 1 / (1 + e) for g >= 0, else
// e / (1 + e) (no overflow). 16 values of one row at a time.
inline distkv::f16v bf16x16(const uint16_t* p) {
  uint16_t h[16];
  __builtin_memcpy(h, p, sizeof h);
  distkv::i16v bits;
  for (int j = 0; j < 16; ++j) bits[j] = static_cast<int32_t>(static_cast<uint32_t>(h[j]) << 16);
  return (distkv::f16v)bits;  // the same bits
}

inline distkv::f16v round_bf16x16(distkv::f16v v) {  // to nearest even (finite values)
  distkv::i16v u = (distkv::i16v)v;
  u = (u + 0x7fff + ((u >> 16) & 1)) & ~0xffff;
  return (distkv::f16v)u;
}

void silu_mul_row(const uint16_t* g, const uint16_t* u, uint16_t* y, int64_t cols) {
  using distkv::f16v;
  for (int64_t j0 = 0; j0 < cols; j0 += 16) {
    const f16v gv = bf16x16(g + j0), uv = bf16x16(u + j0);
    const f16v neg = gv < 0.0f ? gv : -gv;  // -|g|
    const f16v e = distkv::exp_nonpos16(neg);
    const f16v sig = (gv >= 0.0f ? f16v{} + 1.0f : e) / (1.0f + e);
    const f16v out = round_bf16x16(round_bf16x16(gv * sig) * uv);
    const int64_t n = std::min<int64_t>(16, cols - j0);
    for (int64_t j = 0; j < n; ++j)
      y[j0 + j] = static_cast<uint16_t>(__builtin_bit_cast(uint32_t, out[j]) >> 16);
  }
}

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

// Rows [m0, m1) x panels [p0, p1) of y. Panel outer: the panel (K x 64
// bytes) stays in L1/L2 while the row blocks reuse it. SiluMul: panel p of y
// is silu(gate panel 2p) * (up panel 2p + 1), both kept in L1 per row block.
template <bool SiluMul>
void run(const Geometry& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t stride = (g.K + 1) / 2 * 2 * kPanel;  // elements per packed panel
  alignas(64) uint16_t gate[SiluMul ? kRows * kPanel : 1], up[SiluMul ? kRows * kPanel : 1];
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t cols = std::min<int64_t>(kPanel, g.N - p * kPanel);
    for (int64_t m = m0; m < m1; m += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, m1 - m);
      if constexpr (SiluMul) {
        panel_rows(rows, g.x + m * g.K, g.K, g.w + 2 * p * stride, gate, kPanel, kPanel);
        panel_rows(rows, g.x + m * g.K, g.K, g.w + (2 * p + 1) * stride, up, kPanel, kPanel);
        for (int64_t r = 0; r < rows; ++r)
          silu_mul_row(gate + r * kPanel, up + r * kPanel, g.y + (m + r) * g.N + p * kPanel, cols);
      } else {
        panel_rows(rows, g.x + m * g.K, g.K, g.w + p * stride, g.y + m * g.N + p * kPanel, g.N,
                   cols);
      }
    }
  }
}

#else  // portable: float32 FMAs on 32-lane GCC vectors, one row at a time

typedef float f32v __attribute__((vector_size(128)));

// One row of x times one packed panel -> 32 bfloat16 values.
void panel_row(const uint16_t* x, int64_t K, const uint16_t* wp, uint16_t* out) {
  f32v acc = {};
  for (int64_t k = 0; k < K; ++k) {
    const uint16_t* row = wp + (k / 2) * 2 * kPanel + (k & 1);
    f32v wv;
    for (int64_t j = 0; j < kPanel; ++j) wv[j] = bf16_to_f32(row[2 * j]);
    acc += bf16_to_f32(x[k]) * wv;
  }
  for (int64_t j = 0; j < kPanel; ++j) out[j] = f32_to_bf16(acc[j]);
}

template <bool SiluMul>
void run(const Geometry& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t stride = (g.K + 1) / 2 * 2 * kPanel;
  uint16_t a[kPanel], b[kPanel];
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t cols = std::min<int64_t>(kPanel, g.N - p * kPanel);
    for (int64_t m = m0; m < m1; ++m) {
      uint16_t* y = g.y + m * g.N + p * kPanel;
      if constexpr (SiluMul) {
        panel_row(g.x + m * g.K, g.K, g.w + 2 * p * stride, a);
        panel_row(g.x + m * g.K, g.K, g.w + (2 * p + 1) * stride, b);
        silu_mul_row(a, b, y, cols);
      } else {
        panel_row(g.x + m * g.K, g.K, g.w + p * stride, a);
        for (int64_t j = 0; j < cols; ++j) y[j] = a[j];
      }
    }
  }
}

constexpr int kRows = 8;

#endif

// Below this many multiply-adds a task's hand-off costs more than it saves.
constexpr int64_t kMacsPerPart = int64_t{1} << 19;

template <bool SiluMul>
ffi::Error dense_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::BF16> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 4 || yd.size() != 2)
    return ffi::Error::InvalidArgument("dense: x [M, K], packed w [Np, Kp, 32, 2], y [M, N]");
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  const int64_t panels = (N + kPanel - 1) / kPanel;
  if (yd[0] != M || wd[0] != (SiluMul ? 2 : 1) * panels || wd[1] != (K + 1) / 2 ||
      wd[2] != kPanel || wd[3] != 2)
    return ffi::Error::InvalidArgument("dense: packed w does not match x [M, K] and y [M, N]");
  const Geometry g{M, K, N, reinterpret_cast<const uint16_t*>(x.untyped_data()),
                   reinterpret_cast<const uint16_t*>(w.untyped_data()),
                   reinterpret_cast<uint16_t*>(y->untyped_data())};
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  // two parts per thread, claimed dynamically (a thread slowed by the host's
  // own work takes fewer), none smaller than kMacsPerPart
  const int64_t macs = (SiluMul ? 2 : 1) * M * std::max<int64_t>(K, 1) * N;
  const int64_t parts = std::min({distkv::thread_cap(), 2 * workers,
                                  std::max<int64_t>(1, macs / kMacsPerPart)});
  if (parts <= 1) {
    run<SiluMul>(g, 0, M, 0, panels);
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
    run<SiluMul>(g, m0, m1, panels * c / col_parts, panels * (c + 1) / col_parts);
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

#define DISTKV_DENSE_BIND                   \
  ffi::Ffi::Bind()                          \
      .Ctx<ffi::ThreadPool>()               \
      .Arg<ffi::Buffer<ffi::BF16>>()        \
      .Arg<ffi::Buffer<ffi::BF16>>()        \
      .Ret<ffi::Buffer<ffi::BF16>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(DistkvDenseBF16, dense_impl<false>, DISTKV_DENSE_BIND);
// silu(x @ gate) * (x @ up) over gate and up packed panel by panel (dense.py's pack_gate_up)
XLA_FFI_DEFINE_HANDLER_SYMBOL(DistkvDenseSiluMulBF16, dense_impl<true>, DISTKV_DENSE_BIND);
