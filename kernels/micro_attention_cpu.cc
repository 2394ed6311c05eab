// MicroAttention for XLA:CPU: a fused gather + attention over the work list.
//
// Same contract as kernels/micro_attention.py's micro_attention (per-tile
// o, lse over the items that name the tile), computed without materializing
// the gathered blocks: each item's K/V block is read in place from the pool
// (16 keys x heads x D: it stays in L1 while every query row of the tile and
// every query head of the KV head use it), and the tile's rows keep an online
// softmax (running max m, sum l, weighted sum in the output buffer).
// Two loop orders: decode tiles (few rows per KV head) take per-row dot
// products over head_dim; prefill tiles put 16 query rows of one KV head in
// the vector lanes, so that each key or value element is one broadcast
// shared by the rows (no transposes, no horizontal sums); over bfloat16
// pages, where the CPU has AVX512_BF16, prefill tiles multiply bfloat16 pairs
// (VDPBF16PS: 2-2.4x the float32 loop). Common (head_dim, block_size) pairs
// are compiled with constant loop bounds.
//
// Built by kernels/native.py with the host's compiler (-O3 -march=native) and
// registered as XLA FFI targets "distkv_micro_attention_{f32,bf16}" (pages of
// that dtype; queries and outputs float32).
//
// Threads: tiles are split into contiguous ranges of about equal item counts,
// run on XLA's intra-op thread pool (the threads XLA's own ops use, so the
// kernel does not oversubscribe the cores); a tile's accumulators belong to
// one range, so no locks.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

// The prefill path over bfloat16 pages uses VDPBF16PS where the CPU has it
// (DISTKV_PORTABLE, from $DISTKV_NATIVE_PORTABLE, builds without it, for tests).
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(DISTKV_PORTABLE)
#include <immintrin.h>
#define DISTKV_DPBF16 1
#endif

#include "cpu_parallel.h"
#include "cpu_vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kMasked = int64_t{1} << 30;  // attention_plan.MASKED: an item that attends nothing

inline float load(float x) { return x; }
inline float load(uint16_t x) {  // bfloat16: the high half of a float32
  return __builtin_bit_cast(float, static_cast<uint32_t>(x) << 16);
}

using distkv::exp_nonpos16;
using distkv::f16v;
using distkv::i16v;
using distkv::load16;
using distkv::store16;

struct Shape {
  int64_t n_tiles, q_tile, num_kv, groups, head_dim;  // q [n_tiles, q_tile, Hkv, G, D]
  int64_t pages, block, stored;                        // pages [P, block, stored, D]
  int64_t items;
};

// Prefetch a page's bytes (the next item's block) while this one is computed:
// items name scattered pages, which the hardware prefetcher cannot guess.
inline void prefetch_page(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 3);
}

// One softmax update of row accumulator idx with scores sc[0..visible).
template <int DC>
inline void online_update(const float* __restrict sc, float* __restrict pr, int64_t visible,
                          float* m, float* l, float* __restrict acc, int64_t head_dim) {
  const int64_t D = DC ? DC : head_dim;
  // whole chunks of 16 keys as vectors, then the tail as one vector padded
  // with -inf (those lanes' exps are dropped)
  const int64_t full = visible & ~int64_t{15}, tail = visible - full;
  float last[16];
  for (int64_t j = 0; j < 16; ++j) last[j] = j < tail ? sc[full + j] : kNegInf;
  f16v mx = load16(last);
  for (int64_t j0 = 0; j0 < full; j0 += 16) {
    const f16v v = load16(sc + j0);
    mx = v > mx ? v : mx;
  }
  float block_max = kNegInf;
  for (int64_t j = 0; j < 16; ++j) block_max = std::max(block_max, mx[j]);
  const float m_old = *m;
  const float m_new = std::max(m_old, block_max);
  // m_old = -inf: nothing accumulated yet (acc and l are 0)
  const float a = m_old == kNegInf ? 0.0f : exp_nonpos16(f16v{} + (m_old - m_new))[0];
  f16v sums = {};
  for (int64_t j0 = 0; j0 < full; j0 += 16) {
    const f16v e = exp_nonpos16(load16(sc + j0) - m_new);
    store16(pr + j0, e);
    sums += e;
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < 16; ++j) sum += sums[j];
  if (tail) {
    store16(last, exp_nonpos16(load16(last) - m_new));
    for (int64_t j = 0; j < tail; ++j) {
      pr[full + j] = last[j];
      sum += last[j];
    }
  }
  *l = *l * a + sum;
  *m = m_new;
  if (a != 1.0f) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] *= a;
  }
}

// acc[0..D) += sum_j p[j] * v[j * key_stride + 0..D), j < n. The sum is kept
// in a local array (registers when D is a compile-time constant) and stored
// once: updating acc in memory key by key chains every key's update through a
// store and a load.
template <typename T, int DC>
inline void pv_accumulate(float* __restrict acc, const float* __restrict p, const T* v, int64_t n,
                          int64_t key_stride, int64_t head_dim) {
  if constexpr (DC > 0) {
    // four partial sums: one would chain every key's FMA on the previous one
    float a0[DC], a1[DC] = {}, a2[DC] = {}, a3[DC] = {};
    for (int64_t d = 0; d < DC; ++d) a0[d] = acc[d];
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const T* v0 = v + j * key_stride;
      const T* v1 = v0 + key_stride;
      const T* v2 = v1 + key_stride;
      const T* v3 = v2 + key_stride;
      const float p0 = p[j], p1 = p[j + 1], p2 = p[j + 2], p3 = p[j + 3];
#pragma omp simd
      for (int64_t d = 0; d < DC; ++d) {
        a0[d] += p0 * load(v0[d]);
        a1[d] += p1 * load(v1[d]);
        a2[d] += p2 * load(v2[d]);
        a3[d] += p3 * load(v3[d]);
      }
    }
    for (; j < n; ++j) {
      const T* vv = v + j * key_stride;
      const float pj = p[j];
#pragma omp simd
      for (int64_t d = 0; d < DC; ++d) a0[d] += pj * load(vv[d]);
    }
    for (int64_t d = 0; d < DC; ++d) acc[d] = (a0[d] + a1[d]) + (a2[d] + a3[d]);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const T* vv = v + j * key_stride;
      const float pj = p[j];
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) acc[d] += pj * load(vv[d]);
    }
  }
}

// exp(x) for x <= 0 that is exactly 0 below -87 (and for -inf): masked
// scores must add nothing to the softmax sum.
inline f16v exp_or_zero16(f16v x) {
  const f16v e = exp_nonpos16(x);
  return x < -87.0f ? f16v{} : e;
}

constexpr int64_t kLanes = 16;  // query rows per vector in the prefill path

// Prefill tiles: the vector lanes run over the tile's query rows of one KV
// head (row r = qi * G + g; 16 per row block), so that every key and value
// element is one broadcast shared by all rows: no transposes, no horizontal
// sums, and the online softmax keeps one running max and sum per lane.
// Accumulators live lane-major in `st` while a tile is being processed:
// per (KV head, row block): m[16], l[16], then acc[D][16].
struct LaneTile {
  int64_t tile = -1;
  int64_t blocks = 0;          // row blocks per KV head: ceil(q_tile * G / 16)
  std::vector<float> st, qt;   // state; queries (scaled) [h][rb][D][16]
  std::vector<uint32_t> qp;    // or (pairs path) bfloat16 query pairs [h][rb][D/2][16], unscaled
  float scale = 1.0f;          // pairs path: applied to the scores
  std::vector<int32_t> pos;    // [rb][16]: row positions (padding: INT32_MAX)
  std::vector<int32_t> lo, hi; // per row block: smallest and largest real position
};

// The online softmax of one chunk of n <= 16 keys (scores sc[j], a lane per
// row): the causal mask (key position > row position), the running max m
// and sum l at mp, lp updated; sc[j] becomes exp(score - new max). Returns
// the factor the accumulators are rescaled by.
inline f16v lanes_softmax(f16v* sc, int64_t n, int64_t kpos0, const int32_t* pos, bool mask,
                          float* mp, float* lp) {
  if (mask) {
    i16v pv;
    __builtin_memcpy(&pv, pos, sizeof pv);
    for (int64_t j = 0; j < n; ++j)
      sc[j] = (i16v{} + static_cast<int32_t>(kpos0 + j)) > pv ? f16v{} + kNegInf : sc[j];
  }
  f16v mx = sc[0];
  for (int64_t j = 1; j < n; ++j) mx = sc[j] > mx ? sc[j] : mx;
  const f16v m_old = load16(mp);
  const f16v m_new = mx > m_old ? mx : m_old;
  // a lane that has seen no key yet keeps m = -inf: subtract 0 there, not -inf
  const f16v m_use = m_new == kNegInf ? f16v{} : m_new;
  const f16v a = exp_or_zero16(m_old - m_use);
  f16v sum = {};
  for (int64_t j = 0; j < n; ++j) {
    sc[j] = exp_or_zero16(sc[j] - m_use);
    sum += sc[j];
  }
  store16(mp, m_new);
  store16(lp, load16(lp) * a + sum);
  return a;
}

// One chunk of n <= 16 keys of one block for one row block of one KV head.
template <typename T, int DC, int NC>
inline void lanes_chunk(const float* __restrict qt, const T* kb, const T* vb, int64_t key_stride,
                        int64_t n_rt, int64_t kpos0, const int32_t* pos, bool mask, float* mp,
                        float* lp, float* __restrict acc, int64_t head_dim) {
  const int64_t D = DC ? DC : head_dim, n = NC ? NC : n_rt;
  f16v sc[kLanes];
  for (int64_t j = 0; j < n; ++j) sc[j] = f16v{};
  for (int64_t d = 0; d < D; ++d) {  // scores: one broadcast key element per FMA
    const f16v qd = load16(qt + d * kLanes);
    for (int64_t j = 0; j < n; ++j) sc[j] += qd * load(kb[j * key_stride + d]);
  }
  const f16v a = lanes_softmax(sc, n, kpos0, pos, mask, mp, lp);
  for (int64_t d = 0; d < D; ++d) {  // values: one broadcast value element per FMA
    f16v ad = load16(acc + d * kLanes) * a;
    for (int64_t j = 0; j < n; ++j) ad += sc[j] * load(vb[j * key_stride + d]);
    store16(acc + d * kLanes, ad);
  }
}

// Takes up tile t: its accumulators (o, m, l: row-major; o and l start at 0,
// m at -inf) and scaled queries, lane-major into lt.
template <int DC, bool Pairs = false>
void lanes_take(const Shape& s, LaneTile& lt, const float* o, const float* m, const float* l,
                int64_t t, const float* q, const int32_t* q_pos, float scale) {
  const int64_t D = DC ? DC : s.head_dim, G = s.groups, R = s.q_tile * G;
  const int64_t per = (D + 2) * kLanes;
  lt.tile = t;
  lt.blocks = (R + kLanes - 1) / kLanes;
  lt.scale = scale;
  lt.st.assign(s.num_kv * lt.blocks * per, 0.0f);
  if (Pairs)
    lt.qp.assign(s.num_kv * lt.blocks * (D / 2) * kLanes, 0u);
  else
    lt.qt.assign(s.num_kv * lt.blocks * D * kLanes, 0.0f);
  lt.pos.assign(lt.blocks * kLanes, std::numeric_limits<int32_t>::max());
  lt.lo.assign(lt.blocks, std::numeric_limits<int32_t>::max());
  lt.hi.assign(lt.blocks, -1);
  for (int64_t r = 0; r < R; ++r) {
    const int32_t p = q_pos[t * s.q_tile + r / G];
    if (p < 0) continue;
    lt.pos[r] = p;
    lt.lo[r / kLanes] = std::min(lt.lo[r / kLanes], p);
    lt.hi[r / kLanes] = std::max(lt.hi[r / kLanes], p);
  }
  for (int64_t h = 0; h < s.num_kv; ++h)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t idx = ((t * s.q_tile + r / G) * s.num_kv + h) * G + r % G;
      const int64_t rb = r / kLanes, lane = r % kLanes;
      float* st = lt.st.data() + (h * lt.blocks + rb) * per;
      float* qt = Pairs ? nullptr : lt.qt.data() + (h * lt.blocks + rb) * D * kLanes;
      st[lane] = m[idx];
      st[kLanes + lane] = l[idx];
      for (int64_t d = 0; d < D; ++d) st[(2 + d) * kLanes + lane] = o[idx * D + d];
      if (Pairs) {
        uint32_t* qp = lt.qp.data() + (h * lt.blocks + rb) * (D / 2) * kLanes;
        for (int64_t d = 0; d < D; d += 2)
          qp[d / 2 * kLanes + lane] = distkv::f32_to_bf16(q[idx * D + d]) |
                                      static_cast<uint32_t>(distkv::f32_to_bf16(q[idx * D + d + 1])) << 16;
      } else {
        for (int64_t d = 0; d < D; ++d) qt[d * kLanes + lane] = q[idx * D + d] * scale;
      }
    }
}

// Puts the current tile's accumulators back into o, m, l (real rows only).
template <int DC>
void lanes_put(const Shape& s, LaneTile& lt, float* o, float* m, float* l, const int32_t* q_pos) {
  const int64_t D = DC ? DC : s.head_dim, G = s.groups, R = s.q_tile * G, t = lt.tile;
  const int64_t per = (D + 2) * kLanes;
  for (int64_t h = 0; h < s.num_kv; ++h)
    for (int64_t r = 0; r < R; ++r) {
      if (q_pos[t * s.q_tile + r / G] < 0) continue;
      const int64_t idx = ((t * s.q_tile + r / G) * s.num_kv + h) * G + r % G;
      const int64_t rb = r / kLanes, lane = r % kLanes;
      const float* st = lt.st.data() + (h * lt.blocks + rb) * per;
      m[idx] = st[lane];
      l[idx] = st[kLanes + lane];
      for (int64_t d = 0; d < D; ++d) o[idx * D + d] = st[(2 + d) * kLanes + lane];
    }
  lt.tile = -1;
}

// One block (item) of the current lane tile, every KV head and row block.
template <typename T, int DC, int BC>
void lanes_block(const Shape& s, LaneTile& lt, const T* kb, const T* vb, int64_t kstart) {
  const int64_t D = DC ? DC : s.head_dim, bs = BC ? BC : s.block;
  const int64_t key_stride = s.stored * D, per = (D + 2) * kLanes;
  constexpr int NC = BC > 0 && BC % kLanes == 0 ? kLanes : 0;  // keys per chunk, if constant
  for (int64_t h = 0; h < s.num_kv; ++h)
    for (int64_t rb = 0; rb < lt.blocks; ++rb) {
      float* st = lt.st.data() + (h * lt.blocks + rb) * per;
      const float* qt = lt.qt.data() + (h * lt.blocks + rb) * D * kLanes;
      for (int64_t j0 = 0; j0 < bs; j0 += kLanes) {
        const int64_t n = std::min<int64_t>(kLanes, bs - j0), kpos0 = kstart + j0;
        if (kpos0 > lt.hi[rb]) break;  // no row of the block sees these keys
        const bool mask = kpos0 + n - 1 > lt.lo[rb];
        lanes_chunk<T, DC, NC>(qt, kb + (j0 * s.stored + h) * D, vb + (j0 * s.stored + h) * D,
                               key_stride, n, kpos0, lt.pos.data() + rb * kLanes, mask, st,
                               st + kLanes, st + 2 * kLanes, D);
      }
    }
}

#ifdef DISTKV_DPBF16
// The lanes path over bfloat16 pages with VDPBF16PS (one instruction: 16
// lanes x a pair of products, float32 sums), where the generic path converts
// each key or value element to float32 before its FMA:
//   scores  sc[j] += (q[row][2i], q[row][2i+1]) . (k[j][2i], k[j][2i+1])
//           the query pairs lane-major (lt.qp), the key pair one broadcast
//           32-bit load straight from the page;
//   values  acc[d] += (p[row][2i], p[row][2i+1]) . (v[2i][d], v[2i+1][d])
//           the probabilities rounded to bfloat16 (as transformers' bfloat16
//           attention rounds its softmax before the product with V), the
//           value pairs interleaved once per block and KV head (vt), shared
//           by the head's row blocks.
// The softmax itself stays float32, lane per row, as in lanes_chunk.
inline uint32_t load_pair(const uint16_t* p) {
  uint32_t w;
  __builtin_memcpy(&w, p, sizeof w);
  return w;
}

template <int D>
inline void lanes_chunk_dp(const uint32_t* __restrict qp, const uint16_t* kc,
                           const uint32_t* __restrict vt, int64_t key_stride, int64_t kpos0,
                           const int32_t* pos, bool mask, float scale, float* mp, float* lp,
                           float* __restrict acc) {
  __m512 sc[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) sc[j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < D / 2; ++i) {
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(qp + i * kLanes);
    for (int64_t j = 0; j < kLanes; ++j)
      sc[j] = _mm512_dpbf16_ps(sc[j], qv,
                               (__m512bh)_mm512_set1_epi32(load_pair(kc + j * key_stride + 2 * i)));
  }
  f16v s[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) s[j] = (f16v)sc[j] * scale;
  const f16v a = lanes_softmax(s, kLanes, kpos0, pos, mask, mp, lp);
  // probability pairs: bfloat16 (p[j], p[j+1]) per lane
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10,
                                              25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
                                              18, 2, 17, 1, 16, 0);
  __m512bh pp[kLanes / 2];
  for (int64_t i = 0; i < kLanes / 2; ++i)
    pp[i] = (__m512bh)_mm512_permutexvar_epi16(
        interleave, (__m512i)_mm512_cvtne2ps_pbh((__m512)s[2 * i + 1], (__m512)s[2 * i]));
  for (int64_t d = 0; d < D; d += 4) {  // four independent chains per pass
    __m512 ad[4];
    for (int u = 0; u < 4; ++u) ad[u] = (__m512)(load16(acc + (d + u) * kLanes) * a);
    for (int64_t i = 0; i < kLanes / 2; ++i)
      for (int u = 0; u < 4; ++u)
        ad[u] = _mm512_dpbf16_ps(ad[u], pp[i], (__m512bh)_mm512_set1_epi32(vt[i * D + d + u]));
    for (int u = 0; u < 4; ++u) store16(acc + (d + u) * kLanes, (f16v)ad[u]);
  }
}

// vt[i][d] = (v[2i][d], v[2i+1][d]) for the block's first `keys` keys of one
// KV head. Out of line: inlined into lanes_block_dp, GCC spilled its vectors
// through the stack and it cost 13% of the prefill kernel.
template <int D>
__attribute__((noinline)) void value_pairs(const uint16_t* vh, int64_t key_stride, int64_t keys,
                                           uint32_t* __restrict vt) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40,
                                      8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t i = 0; i < keys / 2; ++i) {
    const uint16_t* v0 = vh + 2 * i * key_stride;
    for (int64_t c = 0; c < D; c += 32) {
      const __m512i a = _mm512_loadu_si512(v0 + c), b = _mm512_loadu_si512(v0 + key_stride + c);
      _mm512_storeu_si512(vt + i * D + c, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(vt + i * D + c + 16, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

// One block of the current lane tile on the pairs path (D % 32 == 0, BC % 16 == 0).
template <int D, int BC>
void lanes_block_dp(const Shape& s, LaneTile& lt, const uint16_t* kb, const uint16_t* vb,
                    int64_t kstart) {
  const int64_t key_stride = s.stored * D, per = (D + 2) * kLanes;
  alignas(64) uint32_t vt[BC / 2 * D];  // [i][d]: (v[2i][d], v[2i+1][d])
  int32_t hi_all = -1;  // the tile's last row position: keys past it are seen by no row
  for (int64_t rb = 0; rb < lt.blocks; ++rb) hi_all = std::max(hi_all, lt.hi[rb]);
  const int64_t keys = std::min<int64_t>(BC, (hi_all - kstart + kLanes) / kLanes * kLanes);
  for (int64_t h = 0; h < s.num_kv; ++h) {
    const uint16_t* kh = kb + h * D;
    value_pairs<D>(vb + h * D, key_stride, keys, vt);
    for (int64_t rb = 0; rb < lt.blocks; ++rb) {
      float* st = lt.st.data() + (h * lt.blocks + rb) * per;
      const uint32_t* qp = lt.qp.data() + (h * lt.blocks + rb) * (D / 2) * kLanes;
      for (int64_t j0 = 0; j0 < keys; j0 += kLanes) {
        const int64_t kpos0 = kstart + j0;
        if (kpos0 > lt.hi[rb]) break;  // no row of the block sees these keys
        const bool mask = kpos0 + kLanes - 1 > lt.lo[rb];
        lanes_chunk_dp<D>(qp, kh + j0 * key_stride, vt + j0 / 2 * D, key_stride, kpos0,
                          lt.pos.data() + rb * kLanes, mask, lt.scale, st, st + kLanes,
                          st + 2 * kLanes);
      }
    }
  }
}
#endif

// 16 vectors of partial sums -> one vector of their totals (lane j: the sum
// of P[j]'s lanes): halving shuffles and adds (the transpose of a 16 x 16
// block, summed on the way), 15 adds for 16 dot products instead of a
// horizontal reduction for each. The last shuffle undoes the bit-reversed
// lane order the stages leave.
inline f16v transpose_sum16(const f16v* P) {
  f16v q[8], r[4], h[2];
  for (int i = 0; i < 8; ++i)
    q[i] = __builtin_shufflevector(P[2 * i], P[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(P[2 * i], P[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24,
                                   25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    r[i] = __builtin_shufflevector(q[2 * i], q[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9,
                                   10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(q[2 * i], q[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13,
                                   14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    h[i] = __builtin_shufflevector(r[2 * i], r[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9,
                                   24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(r[2 * i], r[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11,
                                   26, 27, 14, 15, 30, 31);
  const f16v t = __builtin_shufflevector(h[0], h[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26,
                                         12, 28, 14, 30) +
                 __builtin_shufflevector(h[0], h[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27,
                                         13, 29, 15, 31);
  return __builtin_shufflevector(t, t, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

// Decode-like rows (few query rows per KV head): one query row against one
// block, every KV head and query group. Per KV head the block's keys and
// values are converted to float32 once (into L1) and shared by the G query
// heads of the group; scores of 16 keys come from 16 vector partial dot
// products and one transpose_sum16, and the online softmax runs on those
// vectors. (The generic path below converts every key once per query head
// and reduces every dot product horizontally.)
template <typename T, int DC, int BC>
void row_block(const Shape& s, const float* __restrict qr, const T* kb, const T* vb,
               int64_t visible, float scale, float* m, float* l, float* __restrict o) {
  static_assert(DC % 16 == 0 && BC % 16 == 0, "vector tiles of 16");
  constexpr int C = DC / 16, NB = BC / 16;
  const int64_t G = s.groups, key_stride = s.stored * DC;
  const int64_t chunks = (visible + 15) / 16;
  alignas(64) float kf[BC * DC], vf[BC * DC];
  for (int64_t h = 0; h < s.num_kv; ++h) {
    for (int64_t j = 0; j < chunks * 16; ++j) {
      float* kd = kf + j * DC;
      float* vd = vf + j * DC;
      if (j < visible) {
        const T* kr = kb + j * key_stride + h * DC;
        const T* vr = vb + j * key_stride + h * DC;
#pragma omp simd
        for (int64_t d = 0; d < DC; ++d) {
          kd[d] = load(kr[d]);
          vd[d] = load(vr[d]);
        }
      } else {  // past the visible keys: zeros (their weights are 0; no NaN from 0 * garbage)
        for (int64_t d = 0; d < DC; ++d) kd[d] = vd[d] = 0.0f;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t hg = h * G + g;
      f16v qv[C];
      for (int c = 0; c < C; ++c) qv[c] = load16(qr + hg * DC + 16 * c);
      f16v sc[NB];
      f16v mx = f16v{} + kNegInf;
      for (int64_t b = 0; b < chunks; ++b) {
        f16v P[16];
        for (int j = 0; j < 16; ++j) {
          const float* kd = kf + (b * 16 + j) * DC;
          f16v acc = qv[0] * load16(kd);
          for (int c = 1; c < C; ++c) acc += qv[c] * load16(kd + 16 * c);
          P[j] = acc;
        }
        const i16v key = i16v{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} +
                         static_cast<int32_t>(b * 16);
        const f16v v = transpose_sum16(P) * scale;
        sc[b] = key < static_cast<int32_t>(visible) ? v : f16v{} + kNegInf;
        mx = sc[b] > mx ? sc[b] : mx;
      }
      float block_max = kNegInf;
      for (int j = 0; j < 16; ++j) block_max = std::max(block_max, mx[j]);
      const float m_old = m[hg];
      const float m_new = std::max(m_old, block_max);
      // m_old = -inf: nothing accumulated yet (acc and l are 0)
      const float a = m_old == kNegInf ? 0.0f : exp_nonpos16(f16v{} + (m_old - m_new))[0];
      f16v sums = {};
      for (int64_t b = 0; b < chunks; ++b) {
        sc[b] = exp_or_zero16(sc[b] - m_new);
        sums += sc[b];
      }
      float sum = 0.0f;
      for (int j = 0; j < 16; ++j) sum += sums[j];
      l[hg] = l[hg] * a + sum;
      m[hg] = m_new;
      f16v av[C];
      float* acc = o + hg * DC;
      for (int c = 0; c < C; ++c) av[c] = load16(acc + 16 * c) * a;
      for (int64_t b = 0; b < chunks; ++b)
        for (int j = 0; j < 16; ++j) {
          const float p = sc[b][j];
          const float* vd = vf + (b * 16 + j) * DC;
          for (int c = 0; c < C; ++c) av[c] += p * load16(vd + 16 * c);
        }
      for (int c = 0; c < C; ++c) store16(acc + 16 * c, av[c]);
    }
  }
}

template <typename T, int DC, int BC>
void run_tiles_fixed(const Shape& s, const float* q, const int32_t* q_pos, const T* k_pages,
                     const T* v_pages, const int32_t* item_tile, const int32_t* item_block,
                     const int32_t* item_kstart, int64_t head_offset, float scale, float* o,
                     float* m, float* l, int64_t tile_lo, int64_t tile_hi) {
  const int64_t D = DC ? DC : s.head_dim, G = s.groups, bs = BC ? BC : s.block;
  const int64_t HG = s.num_kv * G;
  const int64_t key_stride = s.stored * D;  // floats between keys of one page
  const int64_t page = bs * key_stride;     // floats per page
  // tiles with >= 8 rows per KV head: lanes over rows (lanes_block; measured
  // 2-5x faster than the per-row products there); fewer rows: per-row dot
  // products over head_dim (10-15% faster than half-empty lanes at 2-4 rows)
  const bool by_lanes = s.q_tile * G >= 8;
#ifdef DISTKV_DPBF16
  constexpr bool kPairs = std::is_same_v<T, uint16_t> && DC > 0 && DC % 32 == 0 && BC > 0 &&
                          BC % kLanes == 0;
#else
  constexpr bool kPairs = false;
#endif
  LaneTile lt;
  std::vector<float> scores(by_lanes ? 0 : HG * bs), probs(by_lanes ? 0 : HG * bs);
  auto mine = [&](int64_t w) {  // this range's real items (not padding, not masked)
    const int64_t t = item_tile[w];
    return t >= tile_lo && t < tile_hi && item_block[w] >= 0 && item_block[w] < s.pages &&
           item_kstart[w] < kMasked;
  };
  int64_t next = -1;
  auto advance = [&] {  // next: the following item of this range (s.items: none)
    for (++next; next < s.items && !mine(next); ++next) {
    }
  };
  advance();
  while (next < s.items) {
    const int64_t w = next;
    advance();
    const int64_t t = item_tile[w];
    const int64_t kstart = item_kstart[w];
    const T* kb = k_pages + item_block[w] * page + head_offset * D;
    const T* vb = v_pages + item_block[w] * page + head_offset * D;
    if (by_lanes) {
      if (lt.tile != t) {
        if (lt.tile >= 0) lanes_put<DC>(s, lt, o, m, l, q_pos);
        lanes_take<DC, kPairs>(s, lt, o, m, l, t, q, q_pos, scale);
      }
      if (next < s.items) {
        prefetch_page(k_pages + item_block[next] * page, page * sizeof(T));
        prefetch_page(v_pages + item_block[next] * page, page * sizeof(T));
      }
#ifdef DISTKV_DPBF16
      if constexpr (kPairs) {
        lanes_block_dp<DC, BC>(s, lt, kb, vb, kstart);
        continue;
      }
#endif
      lanes_block<T, DC, BC>(s, lt, kb, vb, kstart);
      continue;
    }
    if constexpr (DC > 0 && DC % 16 == 0 && BC > 0 && BC % 16 == 0) {
      if (next < s.items) {
        prefetch_page(k_pages + item_block[next] * page, page * sizeof(T));
        prefetch_page(v_pages + item_block[next] * page, page * sizeof(T));
      }
      for (int64_t qi = 0; qi < s.q_tile; ++qi) {
        const int64_t pos = q_pos[t * s.q_tile + qi];
        if (pos < 0) continue;                                            // padding row
        const int64_t visible = std::min<int64_t>(bs, pos - kstart + 1);  // causal
        if (visible <= 0) continue;
        const int64_t row0 = (t * s.q_tile + qi) * HG;
        row_block<T, DC, BC>(s, q + row0 * D, kb, vb, visible, scale, m + row0, l + row0,
                             o + row0 * D);
      }
      continue;
    }
    // The next item's pages are prefetched key by key while this item's keys
    // are read (spread out, so the prefetches do not pile up), unless the next
    // page is the adjacent one: the hardware prefetcher's stream covers that.
    const bool fetch = next < s.items && item_block[next] != item_block[w] + 1;
    const T* next_k = fetch ? k_pages + item_block[next] * page : nullptr;
    const T* next_v = fetch ? v_pages + item_block[next] * page : nullptr;
    const int64_t key_bytes = key_stride * static_cast<int64_t>(sizeof(T));
    for (int64_t qi = 0; qi < s.q_tile; ++qi) {
      const int64_t pos = q_pos[t * s.q_tile + qi];
      if (pos < 0) continue;                                            // padding row
      const int64_t visible = std::min<int64_t>(bs, pos - kstart + 1);  // causal
      if (visible <= 0) continue;
      const int64_t row0 = (t * s.q_tile + qi) * HG;  // this row's (h, g) accumulators
      const float* qr = q + row0 * D;
      // scores [(h, g), key]: the page is read key by key, contiguously
      for (int64_t j = 0; j < visible; ++j) {
        const T* kr = kb + j * key_stride;
        if (next_k) prefetch_page(next_k + j * key_stride, key_bytes);
        for (int64_t hg = 0; hg < HG; ++hg) {
          const float* qv = qr + hg * D;
          const T* kv = kr + (hg / G) * D;
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qv[d] * load(kv[d]);
          scores[hg * bs + j] = dot * scale;
        }
      }
      // online softmax update per (h, g)
      for (int64_t hg = 0; hg < HG; ++hg)
        online_update<DC>(scores.data() + hg * bs, probs.data() + hg * bs, visible, m + row0 + hg,
                          l + row0 + hg, o + (row0 + hg) * D, D);
      // weighted values, again key by key
      for (int64_t j = 0; j < visible; ++j) {
        const T* vr = vb + j * key_stride;
        if (next_v) prefetch_page(next_v + j * key_stride, key_bytes);
        for (int64_t hg = 0; hg < HG; ++hg) {
          const T* vv = vr + (hg / G) * D;
          const float p = probs[hg * bs + j];
          float* acc = o + (row0 + hg) * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] += p * load(vv[d]);
        }
      }
      if (next_k) {  // keys past `visible`, then no more for the tile's other rows
        prefetch_page(next_k + visible * key_stride, (bs - visible) * key_bytes);
        prefetch_page(next_v + visible * key_stride, (bs - visible) * key_bytes);
        next_k = next_v = nullptr;
      }
    }
  }
  if (lt.tile >= 0) lanes_put<DC>(s, lt, o, m, l, q_pos);
  // normalize: o = acc / l, lse = m + log l (rows that saw nothing: o = 0, lse = -inf)
  const int64_t per_tile = s.q_tile * s.num_kv * G;
  for (int64_t idx = tile_lo * per_tile; idx < tile_hi * per_tile; ++idx) {
    float* acc = o + idx * D;
    if (l[idx] > 0.0f) {
      const float inv = 1.0f / l[idx];
      for (int64_t d = 0; d < D; ++d) acc[d] *= inv;
      l[idx] = m[idx] + std::log(l[idx]);
    } else {
      for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
      l[idx] = kNegInf;
    }
  }
}

// Common head_dim x block_size pairs get loops of compile-time length.
template <typename T>
void run_tiles(const Shape& s, const float* q, const int32_t* q_pos, const T* k_pages,
               const T* v_pages, const int32_t* item_tile, const int32_t* item_block,
               const int32_t* item_kstart, int64_t head_offset, float scale, float* o,
               float* m, float* l, int64_t tile_lo, int64_t tile_hi) {
#define DISTKV_CASE(DV, BV)                                                                   \
  if (s.head_dim == DV && s.block == BV)                                                      \
    return run_tiles_fixed<T, DV, BV>(s, q, q_pos, k_pages, v_pages, item_tile, item_block,  \
                                      item_kstart, head_offset, scale, o, m, l, tile_lo, tile_hi);
  DISTKV_CASE(8, 16) DISTKV_CASE(16, 16) DISTKV_CASE(32, 16) DISTKV_CASE(64, 16)
  DISTKV_CASE(128, 16) DISTKV_CASE(64, 32) DISTKV_CASE(128, 32)
#undef DISTKV_CASE
  run_tiles_fixed<T, 0, 0>(s, q, q_pos, k_pages, v_pages, item_tile, item_block, item_kstart,
                           head_offset, scale, o, m, l, tile_lo, tile_hi);
}

// Minimum items per range: below this a task's hand-off costs more than it saves.
constexpr int64_t kItemsPerRange = 64;

template <typename T, ffi::DataType DT>
ffi::Error micro_attention_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<DT> k_pages,
                                ffi::Buffer<DT> v_pages, ffi::Buffer<ffi::S32> item_tile,
                                ffi::Buffer<ffi::S32> item_block, ffi::Buffer<ffi::S32> item_kstart,
                                ffi::Buffer<ffi::S32> head_offset, float scale,
                                ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  const auto qd = q.dimensions();
  const auto kd = k_pages.dimensions();
  if (qd.size() != 5 || kd.size() != 4)
    return ffi::Error::InvalidArgument("q must be rank 5 and pages rank 4");
  Shape s{qd[0], qd[1], qd[2], qd[3], qd[4], kd[0], kd[1], kd[2],
          static_cast<int64_t>(item_tile.element_count())};
  if (kd[3] != s.head_dim) return ffi::Error::InvalidArgument("head_dim of q and pages differ");
  const int64_t offset = head_offset.typed_data()[0];
  if (offset < 0 || offset + s.num_kv > s.stored)
    return ffi::Error::InvalidArgument("kv_head_offset outside the stored heads");

  float* out = o->typed_data();
  float* l = lse->typed_data();  // the running sum l, then lse
  const int64_t rows = s.n_tiles * s.q_tile * s.num_kv * s.groups;
  std::fill(out, out + rows * s.head_dim, 0.0f);
  std::fill(l, l + rows, 0.0f);
  std::vector<float> m(rows, kNegInf);

  const int32_t* it = item_tile.typed_data();
  const T* kp = reinterpret_cast<const T*>(k_pages.untyped_data());
  const T* vp = reinterpret_cast<const T*>(v_pages.untyped_data());
  auto work = [&](int64_t lo, int64_t hi) {
    run_tiles<T>(s, q.typed_data(), q_pos.typed_data(), kp, vp, it, item_block.typed_data(),
                 item_kstart.typed_data(), offset, scale, out, m.data(), l, lo, hi);
  };

  // split tiles into contiguous ranges of about equal real-item counts
  std::vector<int64_t> per_tile(s.n_tiles, 0);
  int64_t real = 0;
  for (int64_t w = 0; w < s.items; ++w) {
    const int64_t t = it[w];
    if (t >= 0 && t < s.n_tiles) { ++per_tile[t]; ++real; }
  }
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  // two ranges per thread: claimed dynamically, they even out a thread that
  // the host's own work (planning the next step) slows down
  const int64_t parts = std::min({distkv::thread_cap(), 2 * workers, std::max<int64_t>(1, real / kItemsPerRange)});
  if (parts <= 1) {
    work(0, s.n_tiles);
    return ffi::Error::Success();
  }
  std::vector<int64_t> bounds{0};
  int64_t acc = 0;
  for (int64_t t = 0; t < s.n_tiles && static_cast<int64_t>(bounds.size()) < parts; ++t) {
    acc += per_tile[t];
    if (acc * parts >= real * static_cast<int64_t>(bounds.size())) bounds.push_back(t + 1);
  }
  bounds.push_back(s.n_tiles);
  distkv::parallel_for(pool, static_cast<int64_t>(bounds.size()) - 1,
                       [&](int64_t r) { work(bounds[r], bounds[r + 1]); });
  return ffi::Error::Success();
}

}  // namespace

#define DISTKV_BIND(DT)                          \
  ffi::Ffi::Bind()                               \
      .Ctx<ffi::ThreadPool>()                    \
      .Arg<ffi::Buffer<ffi::F32>>()              \
      .Arg<ffi::Buffer<ffi::S32>>()              \
      .Arg<ffi::Buffer<DT>>()                    \
      .Arg<ffi::Buffer<DT>>()                    \
      .Arg<ffi::Buffer<ffi::S32>>()              \
      .Arg<ffi::Buffer<ffi::S32>>()              \
      .Arg<ffi::Buffer<ffi::S32>>()              \
      .Arg<ffi::Buffer<ffi::S32>>()              \
      .Attr<float>("scale")                      \
      .Ret<ffi::Buffer<ffi::F32>>()              \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(DistkvMicroAttentionF32,
                              (micro_attention_impl<float, ffi::F32>), DISTKV_BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DistkvMicroAttentionBF16,
                              (micro_attention_impl<uint16_t, ffi::BF16>), DISTKV_BIND(ffi::BF16));
// bfloat16 pages stored as their bits (uint16): the engine's bfloat16 pools
XLA_FFI_DEFINE_HANDLER_SYMBOL(DistkvMicroAttentionBF16Bits,
                              (micro_attention_impl<uint16_t, ffi::U16>), DISTKV_BIND(ffi::U16));
