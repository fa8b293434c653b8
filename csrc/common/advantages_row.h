// Per-group and per-sequence advantage math shared by the CPU and CUDA launchers.
#pragma once

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace fastalign {

// Codes as declared in fastalign/ops/advantages/spec.py (AdvantageScale); tests/test_kinds.py checks them.
enum AdvantageScale : int { kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2 };
constexpr int kAdvantageScales = 3;

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
  if (scale < 0 || scale >= kAdvantageScales) denom = NAN;  // unknown code (the launchers reject it first)
  for (int64_t i = 0; i < g; ++i) out[i] = (r[i] - mean) / denom;
}

// Backward of the std: d/dr_j of -sum_i g_i x_i / D with D = s + eps, s = sqrt(sum x^2 / (n-1)),
// is -coef * x_j with coef = (sum_i g_i x_i) / (D^2 (n-1) s). At s = 0 (equal rewards) the
// reference's sqrt backward gives 0/0 = NaN; the limit with sum g x = 0 there is coef = 0.
FA_HD float std_backward_coef(float sum_gx, float denom, float s, int64_t n) {
  if (n < 2 || s == 0.0f) return 0.0f;
  return sum_gx / (denom * denom * static_cast<float>(n - 1) * s);
}

// sum_i g_i (r_i - mean) over one group.
FA_HD float centered_dot(const float* r, const float* g, int64_t n, float mean) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += g[i] * (r[i] - mean);
  return acc;
}

// d rewards of one group from d advantages g. For scale == kScaleBatch the batch-wide
// denominator, std coefficient and mean come in (they need a reduction over every group).
// The centered rewards are formed as (r_i - r_0) - mean(r - r_0): r_i - r_0 is exact for close
// rewards, so x keeps its digits when the spread is small against the rewards' magnitude (the two
// terms of the gradient cancel there, and any error in x would be what remains).
FA_HD void group_advantages_row_backward(const float* r, const float* g, float* dr, int64_t n, int scale,
                                         float batch_denom, float batch_coef, float batch_mean, float eps) {
  float g_sum = 0.0f, shift_sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    g_sum += g[i];
    shift_sum += r[i] - r[0];
  }
  const float g_mean = g_sum / static_cast<float>(n);
  const float shift_mean = shift_sum / static_cast<float>(n);
  if (scale == kScaleBatch) {
    for (int64_t i = 0; i < n; ++i) dr[i] = (g[i] - g_mean) / batch_denom - batch_coef * (r[i] - batch_mean);
    return;
  }
  float denom = 1.0f, coef = 0.0f;
  if (scale == kScaleGroup && n > 1) {
    float sq = 0.0f, gx = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float x = (r[i] - r[0]) - shift_mean;
      sq += x * x;
      gx += g[i] * x;
    }
    const float s = std::sqrt(sq / static_cast<float>(n - 1));
    denom = s + eps;
    coef = std_backward_coef(gx, denom, s, n);
  } else if (scale == kScaleGroup) {
    denom = eps;  // one sample: std 0
  }
  for (int64_t i = 0; i < n; ++i) dr[i] = (g[i] - g_mean) / denom - coef * ((r[i] - r[0]) - shift_mean);
}

// One group's RLOO advantages: r_i minus the mean of the other g - 1 rewards. The map is linear
// and symmetric, so the same function is its own backward (d rewards = rloo(d advantages)).
FA_HD void rloo_advantages_row(const float* r, float* out, int64_t g) {
  float sum = 0.0f;
  for (int64_t i = 0; i < g; ++i) sum += r[i];
  for (int64_t i = 0; i < g; ++i) out[i] = r[i] - (sum - r[i]) / static_cast<float>(g - 1);
}

// The GAE recurrences as single steps, so a launcher can feed them from wherever it staged the
// inputs (the CUDA kernel runs them out of shared memory) with the very arithmetic of the rows below.
struct GaeCarry {
  float running = 0.0f;     // forward: A_{t+1}; backward: D of the previous unmasked step
  float next_value = 0.0f;  // forward only: V of the next unmasked step
};

// One step t of the reverse scan; masked steps get 0 and carry the chain through.
FA_HD void gae_step(float reward, float value, float mask, float* adv, float* ret, GaeCarry& c, float gamma,
                    float gamma_lam) {
  if (mask == 0.0f) {
    *adv = 0.0f;
    *ret = 0.0f;
    return;
  }
  const float delta = reward + gamma * c.next_value - value;
  c.running = delta + gamma_lam * c.running;
  *adv = c.running;
  *ret = c.running + value;
  c.next_value = value;
}

// One step t of the backward (a forward scan). With G_t = g_adv_t + g_ret_t, the gradient reaching
// delta_t is D_t = G_t + gamma_lam D_prev (prev = the previous unmasked step); V_t enters
// delta_t (-1), delta_prev (+gamma, as its next value) and ret_t (+1). Masked steps get 0.
FA_HD void gae_backward_step(float g_adv, float g_ret, float mask, float* d_reward, float* d_value, GaeCarry& c,
                             float gamma, float gamma_lam) {
  if (mask == 0.0f) {
    *d_reward = 0.0f;
    *d_value = 0.0f;
    return;
  }
  const float d = g_adv + g_ret + gamma_lam * c.running;
  *d_reward = d;
  *d_value = g_ret - d + gamma * c.running;
  c.running = d;
}

// Reverse GAE scan over one sequence.
// gamma_lam = gamma * lam rounded once from double, as TRL's `args.gamma * args.lam` is, so the
// scan reproduces TRL's per-timestep loop bit for bit.
FA_HD void gae_row(const float* rewards, const float* values, const float* mask, float* adv, float* ret,
                   int64_t len, float gamma, float gamma_lam) {
  GaeCarry c;
  for (int64_t t = len - 1; t >= 0; --t) gae_step(rewards[t], values[t], mask[t], adv + t, ret + t, c, gamma, gamma_lam);
}

// Backward of gae_row; g_adv and g_ret may be null (no gradient from that output).
FA_HD void gae_row_backward(const float* g_adv, const float* g_ret, const float* mask, float* d_rewards,
                            float* d_values, int64_t len, float gamma, float gamma_lam) {
  GaeCarry c;
  for (int64_t t = 0; t < len; ++t) {
    gae_backward_step(g_adv ? g_adv[t] : 0.0f, g_ret ? g_ret[t] : 0.0f, mask[t], d_rewards + t, d_values + t, c,
                      gamma, gamma_lam);
  }
}

}  // namespace fastalign
