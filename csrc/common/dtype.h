// 16-bit float storage types and their conversion to float, free of torch and CUDA headers so
// the same kernels compile with g++ and nvcc. Arithmetic always happens in float32.
#pragma once

#include <cstdint>
#include <cstring>

#include "macros.h"

namespace fastalign {

struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

FA_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FA_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FA_HD float to_float(float x) { return x; }
FA_HD float to_float(bf16_t x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

FA_HD float to_float(fp16_t h) {
  // IEEE half -> float, including subnormals, infinities and NaN.
  uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t man = h.bits & 0x3ffu;
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    float f = static_cast<float>(man) * (1.0f / 16777216.0f);  // man * 2^-24
    return sign ? -f : f;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

template <typename T>
FA_HD T from_float(float f);

template <>
FA_HD float from_float<float>(float f) {
  return f;
}

template <>
FA_HD bf16_t from_float<bf16_t>(float f) {
  // Round to nearest even; NaN stays NaN.
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

template <>
FA_HD fp16_t from_float<fp16_t>(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return fp16_t{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (absu >= 0x477ff000u) return fp16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (absu < 0x38800000u) {                                                       // subnormal or zero
    float a = bits_to_float(absu) * 16777216.0f;                                  // * 2^24
    uint32_t m = static_cast<uint32_t>(a);
    float rem = a - static_cast<float>(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return fp16_t{static_cast<uint16_t>(sign | m)};
  }
  uint32_t mant = absu & 0x7fffffu;
  uint32_t exp = (absu >> 23) - 112u;
  uint32_t half = (exp << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
  return fp16_t{static_cast<uint16_t>(sign | half)};
}

}  // namespace fastalign
