// exp(x) for x <= 0 as branch-free float arithmetic, so compilers vectorize loops that call it
// (libm's expf blocks vectorization). Relative error < 3e-7 on [-87, 0]; exactly 0 below -87.
#pragma once

#include <cstdint>

#include "dtype.h"
#include "macros.h"

// `#pragma omp simd` with a reduction clause lets the compiler vectorize float sums and maxima
// without -ffast-math (it may reorder them). Host code only; nvcc's device pass ignores it.
#if defined(_OPENMP) && !defined(__CUDA_ARCH__)
#define FA_PRAGMA(x) _Pragma(#x)
#define FA_SIMD_REDUCE(clauses) FA_PRAGMA(omp simd clauses)
#define FA_SIMD FA_PRAGMA(omp simd)
#else
#define FA_SIMD_REDUCE(clauses)
#define FA_SIMD
#endif

namespace fastalign {

FA_HD float exp_nonpositive(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  x = x < -87.0f ? -87.0f : x;
  // Round x / ln2 to the nearest integer n with the 1.5 * 2^23 trick: the sum's low mantissa bits
  // hold n, so 2^n is built with integer adds and shifts only (all of it maps to SIMD lanes).
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;  // x - n ln2, two parts
  // Degree-6 Taylor polynomial for exp(r) on [-ln2/2, ln2/2] (truncation error < 2e-8).
  float p = 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
#if defined(__GNUC__) || defined(__clang__)
  const uint32_t n_bits = __builtin_bit_cast(uint32_t, shifted) - 0x4b400000u;  // n as two's complement
  const float scale = __builtin_bit_cast(float, (n_bits + 127u) << 23);
#else
  const float scale = bits_to_float((static_cast<uint32_t>(static_cast<int32_t>(n)) + 127u) << 23);
#endif
  const float y = p * scale;
  return x <= -87.0f ? 0.0f : y;
#endif
}

}  // namespace fastalign
