// Per-group and per-sequence advantage math shared by the CPU and CUDA launchers.
#pragma once

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace fastalign {

enum AdvantageScale : int { kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2 };

// Mean of one group, shifted by its first reward so equal rewards give exactly that reward.
FA_HD float group_mean(const float* r, int64_t g) {
  float acc = 0.0f;
  for (int64_t i = 0; i < g; ++i) acc += r[i] - r[0];
  return r[0] + acc / static_cast<float>(g);
}

// Unbiased standard deviation around `mean`; 0 for a single sample.
FA_HD float unbiased_std(const float* r, int64_t n, float mean) {
  if (n < 2) return 0.0f;
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float d = r[i] - mean;
    acc += d * d;
  }
  return std::sqrt(acc / static_cast<float>(n - 1));
}

// One group's advantages. `batch_std` is used when scale == kScaleBatch.
FA_HD void group_advantages_row(const float* r, float* out, int64_t g, int scale, float batch_std, float eps) {
  const float mean = group_mean(r, g);
  float denom = 1.0f;
  if (scale == kScaleGroup) denom = unbiased_std(r, g, mean) + eps;
  if (scale == kScaleBatch) denom = batch_std + eps;
  for (int64_t i = 0; i < g; ++i) out[i] = (r[i] - mean) / denom;
}

// One group's RLOO advantages: r_i minus the mean of the other g - 1 rewards.
FA_HD void rloo_advantages_row(const float* r, float* out, int64_t g) {
  float sum = 0.0f;
  for (int64_t i = 0; i < g; ++i) sum += r[i];
  for (int64_t i = 0; i < g; ++i) out[i] = r[i] - (sum - r[i]) / static_cast<float>(g - 1);
}

// Reverse GAE scan over one sequence; masked steps get 0 and carry the chain through.
FA_HD void gae_row(const float* rewards, const float* values, const float* mask, float* adv, float* ret,
                   int64_t len, float gamma, float lam) {
  float running = 0.0f, next_value = 0.0f;
  for (int64_t t = len - 1; t >= 0; --t) {
    if (mask[t] == 0.0f) {
      adv[t] = 0.0f;
      ret[t] = 0.0f;
      continue;
    }
    const float delta = rewards[t] + gamma * next_value - values[t];
    running = delta + gamma * lam * running;
    adv[t] = running;
    ret[t] = running + values[t];
    next_value = values[t];
  }
}

}  // namespace fastalign
