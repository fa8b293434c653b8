// Segmented advantage reductions and the GAE reverse scan, parallel over groups / sequences.
#include <cmath>

#include "../common/advantages_row.h"
#include "kernels.h"

namespace fastalign {
namespace cpu {

void group_advantages(const float* rewards, float* out, int64_t n, int64_t group_size, int scale, float eps) {
  float batch_std = 0.0f;
  if (scale == kScaleBatch) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += rewards[i];
    const float mean = static_cast<float>(sum / static_cast<double>(n));
    batch_std = unbiased_std(rewards, n, mean);
  }
  const int64_t groups = n / group_size;
#pragma omp parallel for schedule(static) if (n > kParallelMinElements)
  for (int64_t g = 0; g < groups; ++g) {
    group_advantages_row(rewards + g * group_size, out + g * group_size, group_size, scale, batch_std, eps);
  }
}

void rloo_advantages(const float* rewards, float* out, int64_t n, int64_t group_size) {
  const int64_t groups = n / group_size;
#pragma omp parallel for schedule(static) if (n > kParallelMinElements)
  for (int64_t g = 0; g < groups; ++g) rloo_advantages_row(rewards + g * group_size, out + g * group_size, group_size);
}

void gae(const float* rewards, const float* values, const float* mask, float* adv, float* ret, int64_t batch,
         int64_t len, float gamma, float gamma_lam) {
#pragma omp parallel for schedule(static) if (batch * len > kParallelMinElements)
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t o = b * len;
    gae_row(rewards + o, values + o, mask + o, adv + o, ret + o, len, gamma, gamma_lam);
  }
}

void group_advantages_backward(const float* rewards, const float* grad, float* d_rewards, int64_t n,
                               int64_t group_size, int scale, float eps) {
  const int64_t groups = n / group_size;
  float batch_denom = 1.0f, batch_coef = 0.0f, batch_mean = 0.0f;
  if (scale == kScaleBatch) {
    // The batch std couples every group: sum_i g_i (r_i - group mean_i) over all of them first.
    double sum = 0.0, sum_gx = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += rewards[i];
    batch_mean = static_cast<float>(sum / static_cast<double>(n));
    for (int64_t g = 0; g < groups; ++g) {
      const float* r = rewards + g * group_size;
      sum_gx += centered_dot(r, grad + g * group_size, group_size, group_mean(r, group_size));
    }
    const float s = unbiased_std(rewards, n, batch_mean);
    batch_denom = s + eps;
    batch_coef = std_backward_coef(static_cast<float>(sum_gx), batch_denom, s, n);
  }
#pragma omp parallel for schedule(static) if (n > kParallelMinElements)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t o = g * group_size;
    group_advantages_row_backward(rewards + o, grad + o, d_rewards + o, group_size, scale, batch_denom, batch_coef,
                                  batch_mean, eps);
  }
}

void gae_backward(const float* grad_adv, const float* grad_ret, const float* mask, float* d_rewards,
                  float* d_values, int64_t batch, int64_t len, float gamma, float gamma_lam) {
#pragma omp parallel for schedule(static) if (batch * len > kParallelMinElements)
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t o = b * len;
    gae_row_backward(grad_adv ? grad_adv + o : nullptr, grad_ret ? grad_ret + o : nullptr, mask + o, d_rewards + o,
                     d_values + o, len, gamma, gamma_lam);
  }
}

// Whitening needs two global reductions (mean, then the centered variance); done in double.
void whiten_forward(const float* x, const float* mask, float* out, float* stats, int64_t n, bool shift_mean,
                    float eps) {
  double count = 0.0, sum = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : count, sum) if (n > kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) {
    count += mask[i];
    sum += static_cast<double>(x[i]) * mask[i];
  }
  const double mean = sum / count;
  double sq = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : sq) if (n > kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) {
    const double d = x[i] - mean;
    sq += d * d * mask[i];
  }
  const double divisor = count > 1.0 ? count - 1.0 : count;  // unbiased when there is more than one sample
  const float mean_f = static_cast<float>(mean);
  const float inv_std = static_cast<float>(1.0 / std::sqrt(sq / divisor + eps));
  const float shift = shift_mean ? 0.0f : mean_f;
#pragma omp parallel for schedule(static) if (n > kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) out[i] = ((x[i] - mean_f) * inv_std + shift) * mask[i];
  stats[0] = mean_f;
  stats[1] = inv_std;
  stats[2] = static_cast<float>(count);
  stats[3] = static_cast<float>(divisor);
}

// With xhat = x - mean, Sg = sum g m, Sgx = sum g m xhat:
// dx_j = m_j (inv g_j - inv Sg / n - inv^3 Sgx xhat_j / divisor [+ Sg / n without shift_mean]).
void whiten_backward(const float* grad, const float* x, const float* mask, const float* stats, float* dx, int64_t n,
                     bool shift_mean) {
  const float mean = stats[0], inv = stats[1];
  const double count = stats[2], divisor = stats[3];
  double sg = 0.0, sgx = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : sg, sgx) if (n > kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) {
    const double gm = static_cast<double>(grad[i]) * mask[i];
    sg += gm;
    sgx += gm * (x[i] - mean);
  }
  // inv (g - mean g) rather than inv g - inv mean g: inv is 1/sqrt(eps) for a single sample.
  const float g_mean = static_cast<float>(sg / count);
  const float shift = shift_mean ? 0.0f : g_mean;
  const float b = static_cast<float>(static_cast<double>(inv) * inv * inv * sgx / divisor);
#pragma omp parallel for schedule(static) if (n > kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) dx[i] = mask[i] * (inv * (grad[i] - g_mean) + shift - b * (x[i] - mean));
}

}  // namespace cpu
}  // namespace fastalign
