// Per-row math of steer_logits (fastalign/ops/reference/steering.py is the spec), shared by the
// launchers.
//
// Combination, float32, in the reference's order of operations:
//   z = v + alpha * (v - b) - sum_k beta_k * (n_k - b);  out = z / T
// (a true division, so alpha = 0 with no negatives returns exactly v / T, as the reference does).
//
// Top-p mask of the value-conditioned distribution, sort-free. With e_j = exp(v_j / T - max) and
// s = sum e_j, the kept tokens are {j : e_j >= t} for the largest t such that
//   P(t) = mass{e >= t} >= top_p * s  and  count{e >= t} >= min_keep.
// P only gets harder as t grows, and the largest t where it holds is one of the e_j: the
// probability of the last token the top-p set needs. Tokens tied with it are kept (the reference's
// tie rule). t is found exactly on its float bit pattern (for non-negative floats the bit order is
// the numeric order): a histogram over the top bits narrows it to one bucket, then bisection
// over that bucket's values pins it. O(V) per row, no sort.
#pragma once

#include <cmath>
#include <cstdint>

#include "dtype.h"
#include "fast_exp.h"
#include "macros.h"

namespace fastalign {

// out[j] = combined logits / T for one row. neg points at branch 0's row; branch k's row is
// neg + k * neg_stride.
template <typename T>
FA_HD void steer_row_combine(const T* value, const T* base, const T* neg, int64_t neg_stride, int64_t num_neg,
                             const float* betas, int64_t vocab, float alpha, float temperature, float* out) {
  FA_SIMD
  for (int64_t j = 0; j < vocab; ++j) {
    const float zv = to_float(value[j]);
    out[j] = zv + alpha * (zv - to_float(base[j]));
  }
  // One pass per branch keeps every loop a plain vectorizable stream.
  for (int64_t k = 0; k < num_neg; ++k) {
    const T* nk = neg + k * neg_stride;
    const float beta = betas[k];
    FA_SIMD
    for (int64_t j = 0; j < vocab; ++j) out[j] = out[j] - beta * (to_float(nk[j]) - to_float(base[j]));
  }
  FA_SIMD
  for (int64_t j = 0; j < vocab; ++j) out[j] = out[j] / temperature;
}

struct SteerExpRow {
  float sum;  // s = sum_j e_j
  float min;  // smallest e_j: keeping every e_j >= min keeps the whole row
  float max;  // largest e_j (1, the max token's exp(0))
};

// e[j] = exp(v_j / T - max_j v_j / T) for the value row (max(v) / T is max(v / T): T > 0).
template <typename T>
FA_HD SteerExpRow steer_row_exp(const T* value, int64_t vocab, float temperature, float* e) {
  float vmax = -INFINITY;
  FA_SIMD_REDUCE(reduction(max : vmax))
  for (int64_t j = 0; j < vocab; ++j) {
    const float x = to_float(value[j]);
    vmax = x > vmax ? x : vmax;
  }
  const float m = vmax / temperature;
  float s = 0.0f, lo = INFINITY, hi = 0.0f;
  FA_SIMD_REDUCE(reduction(+ : s) reduction(min : lo) reduction(max : hi))
  for (int64_t j = 0; j < vocab; ++j) {
    const float d = to_float(value[j]) / temperature - m;
    const float x = exp_nonpositive(d < 0.0f ? d : 0.0f);
    e[j] = x;
    s += x;
    lo = x < lo ? x : lo;
    hi = x > hi ? x : hi;
  }
  return SteerExpRow{s, lo, hi};
}

// Buckets of e by the top bits of its float pattern: exponent and 3 mantissa bits, 8 per octave.
constexpr int kSteerBucketShift = 20;
constexpr int kSteerBuckets = (0x3F800000 >> kSteerBucketShift) + 1;  // e <= 1

FA_HD int steer_bucket(float x) {
  const uint32_t b = float_to_bits(x) >> kSteerBucketShift;
  return b < static_cast<uint32_t>(kSteerBuckets) ? static_cast<int>(b) : kSteerBuckets - 1;  // NaN stays in range
}

// The keep threshold t described above, over e[0, vocab). buf: scratch of vocab floats.
// One histogram pass (mass and count per bucket) finds the bucket holding t; the bisection then
// runs over that bucket's few values only, with the buckets above it as running totals.
FA_HD float steer_row_threshold(const float* e, int64_t vocab, const SteerExpRow& row, float top_p,
                                int64_t min_keep, float* buf) {
  const float target = top_p * row.sum;
  float bucket_mass[kSteerBuckets] = {};
  int64_t bucket_count[kSteerBuckets] = {};
  for (int64_t j = 0; j < vocab; ++j) {
    const int b = steer_bucket(e[j]);
    bucket_mass[b] += e[j];
    bucket_count[b] += 1;
  }
  float mass_above = 0.0f;   // mass of the values >= every t still possible
  int64_t count_above = 0;
  int bucket = kSteerBuckets - 1;
  for (; bucket >= 0; --bucket) {
    if (mass_above + bucket_mass[bucket] >= target && count_above + bucket_count[bucket] >= min_keep) break;
    mass_above += bucket_mass[bucket];
    count_above += bucket_count[bucket];
  }
  if (bucket < 0) return row.min;  // P fails even at the smallest value: keep every token
  // P holds at the bucket's lower edge and fails at the next bucket's: t lies in this bucket.
  // P(lo) is taken as true (at lo = min every token is kept, the answer when nothing larger holds).
  const uint32_t edge = static_cast<uint32_t>(bucket) << kSteerBucketShift;
  const uint32_t min_bits = float_to_bits(row.min), max_bits = float_to_bits(row.max);
  const uint32_t next_edge = edge + (1u << kSteerBucketShift);
  uint32_t lo = edge > min_bits ? edge : min_bits;
  uint32_t hi = next_edge - 1 < max_bits ? next_edge - 1 : max_bits;
  int64_t n = 0;
  for (int64_t j = 0; j < vocab; ++j) {
    buf[n] = e[j];
    n += steer_bucket(e[j]) == bucket ? 1 : 0;
  }
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    const float t = bits_to_float(mid);
    float mass = 0.0f;
    int64_t count = 0;
    FA_SIMD_REDUCE(reduction(+ : mass, count))
    for (int64_t i = 0; i < n; ++i) {
      const bool in = buf[i] >= t;
      mass += in ? buf[i] : 0.0f;
      count += in ? 1 : 0;
    }
    const bool holds = mass_above + mass >= target && count_above + count >= min_keep;
    if (holds) {
      lo = mid;
    } else {
      hi = mid - 1;
      mass_above += mass;
      count_above += count;
    }
    // Keep the values that can still decide: values below an accepted t never count again, values
    // at or above a rejected t always count from now on (they moved into the totals).
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float x = buf[i];
      buf[kept] = x;
      kept += (x >= t) == holds ? 1 : 0;
    }
    n = kept;
  }
  return bits_to_float(lo);
}

// out[j] = -inf where e[j] < threshold.
FA_HD void steer_row_apply_mask(const float* e, float threshold, int64_t vocab, float* out) {
  FA_SIMD
  for (int64_t j = 0; j < vocab; ++j) out[j] = e[j] >= threshold ? out[j] : -INFINITY;
}

}  // namespace fastalign
