// Per-row math of log_softmax(z / T)[label] and the softmax entropy, shared by every launcher.
//
// Forward: max pass, then one pass for s = sum exp(x - m) and u = sum exp(x - m) * (x - m),
// x = z / T. Then lse = m + log s, entropy = log s - u / s (kept relative to m, so logits near
// 1e4 lose no precision), logp = x[label] - lse.
// Backward, with p = exp(x - lse) and logp_j = x_j - lse:
//   dL/dx_j = g_logp * (1[j == label] - p_j) - g_ent * p_j * (logp_j + entropy)
//   dL/dz_j = dL/dx_j / T.
#pragma once

#include <cmath>
#include <cstdint>

#include "dtype.h"
#include "fast_exp.h"
#include "macros.h"

namespace fastalign {

struct RowForward {
  float logp;
  float entropy;
  float lse;
};

template <typename T>
FA_HD RowForward logprob_row_forward(const T* z, int64_t vocab, float inv_temp, int64_t label) {
  float m = -INFINITY;
  for (int64_t j = 0; j < vocab; ++j) {
    const float x = to_float(z[j]) * inv_temp;
    m = x > m ? x : m;
  }
  float s = 0.0f, u = 0.0f;
  for (int64_t j = 0; j < vocab; ++j) {
    const float d = to_float(z[j]) * inv_temp - m;
    const float e = exp_nonpositive(d);
    s += e;
    u += e * d;
  }
  const float log_s = std::log(s);
  RowForward out;
  out.lse = m + log_s;
  out.entropy = log_s - u / s;
  out.logp = to_float(z[label]) * inv_temp - out.lse;
  return out;
}

// Writes dL/dz for one row into grad (which may alias z: each element is read before written).
template <typename T, typename G>
FA_HD void logprob_row_backward(const T* z, G* grad, int64_t vocab, float inv_temp, int64_t label, float lse,
                                float entropy, float g_logp, float g_ent) {
  // Read the label's logit before the loop: grad may alias z.
  const float lp_label = to_float(z[label]) * inv_temp - lse;
  for (int64_t j = 0; j < vocab; ++j) {
    const float lp = to_float(z[j]) * inv_temp - lse;
    const float p = exp_nonpositive(lp < 0.0f ? lp : 0.0f);
    const float dx = -g_logp * p - g_ent * p * (lp + entropy);
    grad[j] = from_float<G>(dx * inv_temp);
  }
  // The label term is written after the loop so the loop body stays branch-free (vectorizable).
  const float p = exp_nonpositive(lp_label < 0.0f ? lp_label : 0.0f);
  const float dx = g_logp * (1.0f - p) - g_ent * p * (lp_label + entropy);
  grad[label] = from_float<G>(dx * inv_temp);
}

}  // namespace fastalign
