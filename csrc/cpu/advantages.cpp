// Segmented advantage reductions and the GAE reverse scan, parallel over groups / sequences.
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
#pragma omp parallel for schedule(static) if (groups > 256)
  for (int64_t g = 0; g < groups; ++g) {
    group_advantages_row(rewards + g * group_size, out + g * group_size, group_size, scale, batch_std, eps);
  }
}

void rloo_advantages(const float* rewards, float* out, int64_t n, int64_t group_size) {
  const int64_t groups = n / group_size;
#pragma omp parallel for schedule(static) if (groups > 256)
  for (int64_t g = 0; g < groups; ++g) rloo_advantages_row(rewards + g * group_size, out + g * group_size, group_size);
}

void gae(const float* rewards, const float* values, const float* mask, float* adv, float* ret, int64_t batch,
         int64_t len, float gamma, float lam) {
#pragma omp parallel for schedule(static) if (batch * len > 16384)
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t o = b * len;
    gae_row(rewards + o, values + o, mask + o, adv + o, ret + o, len, gamma, lam);
  }
}

}  // namespace cpu
}  // namespace fastalign
