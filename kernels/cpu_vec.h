// 16-float GCC vectors and an exp on them, shared by the native CPU kernels
// (micro_attention_cpu.cc: the softmax; dense_cpu.cc: the MLP's silu).
#pragma once

#include <cstdint>

namespace distkv {

// 16 floats as one GCC vector (one AVX-512 register, or two AVX2 ones). The
// loops that need them are written on these: GCC unrolled the fixed-length
// scalar loops and then left them scalar.
typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));

inline f16v load16(const float* p) {
  f16v v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store16(float* p, f16v v) { __builtin_memcpy(p, &v, sizeof v); }

// exp(x) for x <= 0 on 16 lanes, no libm call: 2^n * p(r), n = round(x / ln2)
// (the 1.5 * 2^23 trick), r in [-ln2/2, ln2/2], degree-6 Taylor polynomial
// (relative error < 2e-7), 2^n from the exponent bits. Below -87 it returns
// exp(-87).
inline f16v exp_nonpos16(f16v x) {
  x = x < -87.0f ? f16v{} - 87.0f : x;
  const f16v shifter = f16v{} + 12582912.0f;
  const f16v n = (x * 1.44269504088896341f + shifter) - shifter;
  const f16v r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  f16v p = f16v{} + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const i16v bits = (__builtin_convertvector(n, i16v) + 127) << 23;
  return p * (f16v)bits;  // the same bits
}

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

}  // namespace distkv
