// Per-row math of log_softmax(z / T)[label] and the softmax entropy, shared by every launcher.
//
// Forward: max pass, then one pass for s = sum exp(x - m) and u = sum exp(x - m) * (x - m),
// x = z / T. Then lse = m + log s, entropy = log s - u / s (kept relative to m, so logits near
// 1e4 lose no precision), logp = x[label] - m - log s.
// Backward, with p = exp(x - lse) and logp_j = x_j - lse:
//   dL/dx_j = g_logp * (1[j == label] - p_j) - g_ent * p_j * (logp_j + entropy)
//   dL/dz_j = dL/dx_j / T.
// The backward takes log s (rel_lse, the lse relative to the row max) and recomputes the max (a
// cheap pass without exp that also brings the row into cache): logp_j = (x_j - m) - log s is then
// exact to float32 rounding even at |x| ~ 1e4, where x_j - lse would lose ~1e-3 to lse's rounding.
// Both loops are branch-free with SIMD reductions, so the host compiler vectorizes them.
// A label outside [0, vocab) (value checks off; the caller handles ignore_index) is never read:
// its row gets logp = NaN (lse and entropy as usual) and an all-zero gradient.
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
  float rel_lse;  // log s = lse - max_j x_j, what logprob_row_backward_rel takes
};

FA_HD bool label_in_row(int64_t label, int64_t vocab) { return label >= 0 && label < vocab; }

template <typename T>
FA_HD float row_max(const T* z, int64_t vocab) {
  float zmax = -INFINITY;
  FA_SIMD_REDUCE(reduction(max : zmax))
  for (int64_t j = 0; j < vocab; ++j) {
    const float x = to_float(z[j]);
    zmax = x > zmax ? x : zmax;
  }
  return zmax;
}

template <typename T>
FA_HD RowForward logprob_row_forward(const T* z, int64_t vocab, float inv_temp, int64_t label) {
  // The max of z, not of z / T: T > 0, so scaling afterwards gives the same shift with one multiply.
  const float m = row_max(z, vocab) * inv_temp;
  float s = 0.0f, u = 0.0f;
  FA_SIMD_REDUCE(reduction(+ : s, u))
  for (int64_t j = 0; j < vocab; ++j) {
    const float d = to_float(z[j]) * inv_temp - m;
    const float e = exp_nonpositive(d);
    s += e;
    u += e * d;
  }
  const float log_s = std::log(s);
  RowForward out;
  out.lse = m + log_s;
  out.rel_lse = log_s;
  out.entropy = log_s - u / s;
  out.logp = label_in_row(label, vocab) ? (to_float(z[label]) * inv_temp - m) - log_s : NAN;
  return out;
}

// Writes dL/dz for one row into grad (which may alias z: each element is read before written),
// with logp_j = (x_j - shift) - log_s.
template <typename T, typename G>
FA_HD void logprob_row_backward_shifted(const T* z, G* grad, int64_t vocab, float inv_temp, int64_t label,
                                        float shift, float log_s, float entropy, float g_logp, float g_ent) {
  if (!label_in_row(label, vocab)) {  // its logp is NaN: no gradient flows from the row
    for (int64_t j = 0; j < vocab; ++j) grad[j] = from_float<G>(0.0f);
    return;
  }
  // Read the label's logit before the loop: grad may alias z.
  const float lp_label = (to_float(z[label]) * inv_temp - shift) - log_s;
  // dz_j = -p_j * c_j / T with c_j = g_logp + g_ent * (logp_j + entropy): fold the constants once.
  const float a = -g_ent * inv_temp;
  const float b = -(g_logp + g_ent * entropy) * inv_temp;
  FA_SIMD
  for (int64_t j = 0; j < vocab; ++j) {
    const float lp = (to_float(z[j]) * inv_temp - shift) - log_s;
    const float p = exp_nonpositive(lp < 0.0f ? lp : 0.0f);
    grad[j] = from_float<G>(p * (a * lp + b));
  }
  // The label term is written after the loop so the loop body stays branch-free (vectorizable).
  const float p = exp_nonpositive(lp_label < 0.0f ? lp_label : 0.0f);
  grad[label] = from_float<G>((g_logp + p * (-g_ent * (lp_label + entropy) - g_logp)) * inv_temp);
}

// The backward from the absolute lse (RowForward::lse); fine where logits are moderate.
template <typename T, typename G>
FA_HD void logprob_row_backward(const T* z, G* grad, int64_t vocab, float inv_temp, int64_t label, float lse,
                                float entropy, float g_logp, float g_ent) {
  logprob_row_backward_shifted(z, grad, vocab, inv_temp, label, 0.0f, lse, entropy, g_logp, g_ent);
}

// The backward from RowForward::rel_lse, exact near |x| ~ 1e4: recomputes the row max first.
template <typename T, typename G>
FA_HD void logprob_row_backward_rel(const T* z, G* grad, int64_t vocab, float inv_temp, int64_t label,
                                    float rel_lse, float entropy, float g_logp, float g_ent) {
  const float m = row_max(z, vocab) * inv_temp;
  logprob_row_backward_shifted(z, grad, vocab, inv_temp, label, m, rel_lse, entropy, g_logp, g_ent);
}

}  // namespace fastalign
