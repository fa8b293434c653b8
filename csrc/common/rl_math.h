// Per-token and per-pair math of the RL and preference losses, shared by the CPU and CUDA
// launchers: forward values and analytic derivatives. Every derivative follows PyTorch's autograd
// conventions for the reference formulas (fastalign/ops/reference), including ties:
// torch.minimum / torch.maximum split the gradient equally between equal operands, torch.clamp
// passes it on the closed interval [low, high], relu and |x| have derivative 0 at 0.
//
// Plain C math (expf, log1pf, ...) rather than std:: overloads: both g++ and nvcc device code have it.
#pragma once

#include <math.h>

#include <cstdint>

#include "fast_exp.h"
#include "macros.h"

namespace fastalign {

// exp(x) for any x: the branch-free exp_nonpositive of -|x| and, for x > 0, its reciprocal, so
// elementwise CPU loops vectorize (libm's expf does not). Relative error < 3e-7; inf above ~87.
FA_HD float exp_any(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float e = exp_nonpositive(-fabsf(x));
  const float inverse = 1.0f / e;  // computed unconditionally: a select, not a branch, so loops vectorize
  return x > 0.0f ? inverse : e;
#endif
}

// expm1(x) with full relative precision near 0 (Taylor series for |x| < 0.5, error < 4e-8
// relative), exp(x) - 1 elsewhere; both sides computed and one selected, so loops vectorize.
FA_HD float expm1_any(float x) {
  float p = 1.0f / 362880.0f;
  p = p * x + 1.0f / 40320.0f;
  p = p * x + 1.0f / 5040.0f;
  p = p * x + 1.0f / 720.0f;
  p = p * x + 1.0f / 120.0f;
  p = p * x + 1.0f / 24.0f;
  p = p * x + 1.0f / 6.0f;
  p = p * x + 0.5f;
  const float series = x + p * x * x;
  const float direct = exp_any(x) - 1.0f;
  return fabsf(x) < 0.5f ? series : direct;
}

// ------------------------------------------------------------------------------------ scalars
// ln(1 + e) for e in [0, 1] without libm, so loops vectorize: 2 atanh(s) with s = e / (2 + e) in
// [0, 1/3], odd series through s^13 (truncation < 2e-8 relative, full precision near 0).
FA_HD float log1p_unit(float e) {
#if defined(__CUDA_ARCH__)
  return log1pf(e);
#else
  const float s = e / (2.0f + e), s2 = s * s;
  float p = 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
#endif
}

FA_HD float log_sigmoid(float x) {
  // min(x, 0) - log1p(exp(-|x|)): never exp() of a large positive number.
  return (x < 0.0f ? x : 0.0f) - log1p_unit(exp_nonpositive(-fabsf(x)));
}

FA_HD float sigmoid(float x) {
  // 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) below: both from e = exp(-|x|) <= 1, a select not a branch.
  const float e = exp_nonpositive(-fabsf(x));
  const float inv = 1.0f / (1.0f + e);
  return x >= 0.0f ? inv : e * inv;
}

// ------------------------------------------------------------------------------------ KL
// Codes as declared in fastalign/ops/kl/spec.py (KlKind); tests/test_kinds.py checks they agree.
enum KlKind : int { kKlK1 = 0, kKlK2 = 1, kKlK3 = 2, kKlAbs = 3 };
constexpr int kKlKinds = 4;

// Estimator of KL(policy || ref) from d = ref_logp - logp.
FA_HD float kl_value(float d, int kind) {
  switch (kind) {
    case kKlK1:
      return -d;
    case kKlK2:
      return 0.5f * d * d;
    case kKlK3: {
      // exp(d) - d - 1 cancels near d = 0: there its Taylor series d^2 (1/2 + d/6 + ...), exact
      // to 4e-8 relative for |d| < 0.5; elsewhere exp(d) - d - 1 loses at most a few bits.
      float p = 1.0f / 362880.0f;
      p = p * d + 1.0f / 40320.0f;
      p = p * d + 1.0f / 5040.0f;
      p = p * d + 1.0f / 720.0f;
      p = p * d + 1.0f / 120.0f;
      p = p * d + 1.0f / 24.0f;
      p = p * d + 1.0f / 6.0f;
      p = p * d + 0.5f;
      const float series = p * d * d;
      const float direct = (exp_any(d) - d) - 1.0f;
      return fabsf(d) < 0.5f ? series : direct;
    }
    case kKlAbs:
      return fabsf(d);
    default:  // unknown code: the launchers reject it first; never some other estimator
      return NAN;
  }
}

// d kl / d logp (d = ref_logp - logp, so dd/dlogp = -1).
FA_HD float kl_grad_logp(float d, int kind) {
  switch (kind) {
    case kKlK1:
      return 1.0f;
    case kKlK2:
      return -d;
    case kKlK3:
      return -expm1_any(d);
    case kKlAbs:
      return d > 0.0f ? -1.0f : (d < 0.0f ? 1.0f : 0.0f);
    default:
      return NAN;
  }
}

// ------------------------------------------------------------------------------------ policy loss
// clamp(x, lo, hi) as compare-and-select: libm's fminf/fmaxf are calls that block vectorization
// (and they drop a NaN x, where torch.clamp keeps it; this keeps it too).
FA_HD float clamp_range(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Codes as declared in fastalign/ops/policy/spec.py (ImportanceLevel, PolicyObjective); tests/test_kinds.py
// checks they agree.
enum ImportanceLevel : int { kLevelToken = 0, kLevelSequence = 1, kLevelSequenceToken = 2 };
constexpr int kImportanceLevels = 3;
enum PolicyObjective : int { kObjectiveClip = 0, kObjectiveCispo = 1 };
constexpr int kPolicyObjectives = 2;

struct PolicyConfig {
  float ratio_low;   // 1 - clip_low
  float ratio_high;  // 1 + clip_high
  float beta;        // KL weight; 0 disables the KL term (ref_logp unused)
  int kl_kind;
  // This year's objectives (issue 12); the defaults reproduce the plain clipped loss.
  int level = kLevelToken;          // ImportanceLevel: the weight from the token or from the row's mean log-ratio
  int objective = kObjectiveClip;   // PolicyObjective
  float cispo_cap = 0.0f;           // CISPO's absolute cap on the weight (clip_high)
  float delta = INFINITY;           // two-sided clip: the unclipped branch uses min(w, delta)
  float dual_clip = 0.0f;           // dual clip c > 1 for A < 0; 0 = off
  bool kl_bias_correction = false;  // KL term times the weight (TRL's use_bias_correction_kl)
  bool extended() const {
    return level != kLevelToken || objective != kObjectiveClip || delta != INFINITY || dual_clip > 0.0f ||
           kl_bias_correction;
  }
};

// One token of the clipped policy loss: its value, its derivatives and its metric indicators, from
// one exp. Aggregation over tokens (the normalizer of each loss type) is the caller's: it arrives as
// a per-row or per-token scale computed once in Python (fastalign/ops/policy/spec.py, row_scale).
struct PolicyTokenTerms {
  float loss;       // -min(r A, clip(r) A) + beta kl
  float d_logp;     // d loss / d logp
  float d_adv;      // d loss / d A
  float d_row;      // d loss / d row_log_ratio (level == sequence only; else 0)
  float low;        // 1 where r < 1 - clip_low and A < 0 (TRL's is_low_clipped)
  float high;       // 1 where r > 1 + clip_high and A > 0
  float kl;         // 0 when beta == 0
  float log_ratio;  // logp - old_logp
};

// KlKind >= 0 fixes the KL estimator at compile time (the CPU loops dispatch on it once, so they
// vectorize); -1 reads c.kl_kind. Derivatives follow torch's conventions (see the top of the file).
template <int KlKind = -1>
FA_HD PolicyTokenTerms policy_token_terms(float logp, float old_logp, float adv, float ref_logp,
                                          const PolicyConfig& c) {
  PolicyTokenTerms t;
  t.log_ratio = logp - old_logp;
  const float ratio = exp_any(t.log_ratio);
  const float clipped = clamp_range(ratio, c.ratio_low, c.ratio_high);
  const float a = ratio * adv, b = clipped * adv;
  t.loss = -(a < b ? a : b);
  // torch.minimum's split: all to the smaller operand, half each on a tie; torch.clamp passes the
  // gradient on the closed interval.
  const float wa = a < b ? 1.0f : (a > b ? 0.0f : 0.5f);
  const float wb = 1.0f - wa;
  const float inside = ((ratio >= c.ratio_low) & (ratio <= c.ratio_high)) ? 1.0f : 0.0f;
  t.d_logp = -(wa + wb * inside) * adv * ratio;
  t.d_adv = -(wa * ratio + wb * clipped);
  t.d_row = 0.0f;
  t.kl = 0.0f;
  if (c.beta > 0.0f) {
    const int kind = KlKind >= 0 ? KlKind : c.kl_kind;
    t.kl = kl_value(ref_logp - logp, kind);
    t.loss += c.beta * t.kl;
    t.d_logp += c.beta * kl_grad_logp(ref_logp - logp, kind);
  }
  // Bitwise &, | (not &&, ||): no short-circuit branches, so SIMD loops stay branch-free.
  t.low = ((ratio < c.ratio_low) & (adv < 0.0f)) ? 1.0f : 0.0f;
  t.high = ((ratio > c.ratio_high) & (adv > 0.0f)) ? 1.0f : 0.0f;
  return t;
}

// ----------------------------------------------------------------- this year's objectives (issue 12)
// The same token with every option of c (GSPO levels, CISPO, two-sided and dual clip, KL bias
// correction) and a detached token weight tw multiplying the surrogate before the KL term
// (fastalign/ops/policy/spec.py, policy_token_terms, is the spec). row_lr is the row's mean
// log-ratio (levels sequence and sequence_token). The weight's derivative g_w = d term / d w goes to
// logp (token, sequence_token: dw/dlogp = w) or to row_lr (sequence: dw/drow_lr = w). Kept apart
// from policy_token_terms so the plain loop keeps its fast, vectorized body.
template <int KlKind = -1>
FA_HD PolicyTokenTerms policy_token_terms_ext(float logp, float old_logp, float adv, float ref_logp, float row_lr,
                                              float tw, const PolicyConfig& c) {
  PolicyTokenTerms t;
  t.log_ratio = logp - old_logp;
  const float ratio = exp_any(c.level == kLevelToken ? t.log_ratio : row_lr);
  float pg, g_w, g_logp, g_adv;
  if (c.objective == kObjectiveCispo) {
    const float q = ratio < c.cispo_cap ? ratio : c.cispo_cap;  // detached
    pg = -q * adv * logp;
    g_w = 0.0f;
    g_logp = -q * adv;
    g_adv = -q * logp;
    t.low = 0.0f;
    t.high = ((ratio > c.cispo_cap) & (adv > 0.0f)) ? 1.0f : 0.0f;
  } else if (c.objective == kObjectiveClip) {
    const float r1 = ratio > c.delta ? c.delta : ratio;
    const float d_r1 = ratio <= c.delta ? 1.0f : 0.0f;  // torch.clamp(max=delta) passes on x <= delta
    const float clipped = clamp_range(ratio, c.ratio_low, c.ratio_high);
    const float a = r1 * adv, b = clipped * adv;
    pg = -(a < b ? a : b);
    const float wa = a < b ? 1.0f : (a > b ? 0.0f : 0.5f);
    const float wb = 1.0f - wa;
    const float inside = ((ratio >= c.ratio_low) & (ratio <= c.ratio_high)) ? 1.0f : 0.0f;
    g_w = -(wa * d_r1 + wb * inside) * adv;
    g_adv = -(wa * r1 + wb * clipped);
    g_logp = 0.0f;
    if ((c.dual_clip > 0.0f) & (adv < 0.0f)) {  // min(pg, -c A), torch.minimum's split on a tie
      const float bound = -c.dual_clip * adv;
      const float wd = pg < bound ? 1.0f : (pg > bound ? 0.0f : 0.5f);
      pg = pg < bound ? pg : bound;
      g_w *= wd;
      g_adv = wd * g_adv - (1.0f - wd) * c.dual_clip;
    }
    t.low = ((r1 < c.ratio_low) & (adv < 0.0f)) ? 1.0f : 0.0f;
    t.high = ((r1 > c.ratio_high) & (adv > 0.0f)) ? 1.0f : 0.0f;
  } else {  // unknown code: the launchers reject it first
    pg = g_w = g_logp = g_adv = NAN;
    t.low = t.high = NAN;
  }
  t.loss = tw * pg;
  g_w *= tw;
  g_logp *= tw;
  t.d_adv = tw * g_adv;
  t.kl = 0.0f;
  if (c.beta > 0.0f) {
    const int kind = KlKind >= 0 ? KlKind : c.kl_kind;
    const float kl = kl_value(ref_logp - logp, kind), d_kl = kl_grad_logp(ref_logp - logp, kind);
    t.kl = c.kl_bias_correction ? kl * ratio : kl;
    t.loss += c.beta * t.kl;
    g_logp += c.beta * (c.kl_bias_correction ? d_kl * ratio : d_kl);
    if (c.kl_bias_correction) g_w += c.beta * kl;
  }
  const bool to_row = c.level == kLevelSequence;
  t.d_logp = g_logp + (to_row ? 0.0f : g_w * ratio);
  t.d_row = to_row ? g_w * ratio : 0.0f;
  return t;
}

// ----------------------------------------------------- off-policy corrections (issue 12)
// Codes as declared in fastalign/ops/offpolicy/spec.py (RolloutIsMode); tests/test_kinds.py checks them.
enum RolloutIsMode : int {
  kRolloutTokenTruncate = 0,
  kRolloutTokenMask = 1,
  kRolloutSequenceTruncate = 2,
  kRolloutSequenceMask = 3
};
constexpr int kRolloutIsModes = 4;

// The rollout importance weight from rho = exp(log_rho): truncated to [low, high] or zeroed outside it.
FA_HD float rollout_is_weight(float log_rho, int mode, float low, float high) {
  const float rho = exp_any(log_rho);
  switch (mode) {
    case kRolloutTokenTruncate:
    case kRolloutSequenceTruncate:
      return clamp_range(rho, low, high);
    case kRolloutTokenMask:
    case kRolloutSequenceMask:
      return ((rho < low) | (rho > high)) ? 0.0f : rho;
    default:  // unknown code: the launchers reject it first
      return NAN;
  }
}

// ------------------------------------------------------------------------------------ value loss
struct ValueToken {
  float loss;     // max((v - R)^2, (clip(v, v_old +- clip) - R)^2), before the 0.5 and the mean
  float clipped;  // 1 where the clipped term is the larger
};

FA_HD ValueToken value_token_forward(float v, float old_v, float ret, float clip) {
  // Clamp v itself (not old + clamp(v - old)): exactly v inside the range, so no rounding tie counts as clipped.
  const float vc = clamp_range(v, old_v - clip, old_v + clip);
  const float u = (v - ret) * (v - ret), w = (vc - ret) * (vc - ret);
  ValueToken t;
  t.loss = u > w ? u : w;
  t.clipped = w > u ? 1.0f : 0.0f;
  return t;
}

// d max(...) / dv.
FA_HD float value_token_backward(float v, float old_v, float ret, float clip) {
  const float lo = old_v - clip, hi = old_v + clip;
  const float vc = clamp_range(v, lo, hi);
  const float u = (v - ret) * (v - ret), w = (vc - ret) * (vc - ret);
  const float wu = u > w ? 1.0f : (u < w ? 0.0f : 0.5f);  // torch.maximum's split
  const float inside = ((v >= lo) & (v <= hi)) ? 1.0f : 0.0f;  // torch.clamp's gradient mask
  return wu * 2.0f * (v - ret) + (1.0f - wu) * inside * 2.0f * (vc - ret);
}

// ------------------------------------------------------------------------------------ preference
// Codes as declared in fastalign/ops/preference/spec.py (DpoLossType); tests/test_kinds.py checks them.
enum DpoLossType : int { kDpoSigmoid = 0, kDpoHinge = 1, kDpoIpo = 2, kDpoRobust = 3 };
constexpr int kDpoLossTypes = 4;

// DPO loss of one pair from delta = (pc - rc) - (pr - rr). The loss type is a template argument:
// one small branch-free body per type inlines into the pair loops, which then vectorize.
template <int Type>
FA_HD float dpo_pair_loss(float delta, float beta, float ls) {
  const float x = beta * delta;
  if constexpr (Type == kDpoSigmoid) {
    return -(1.0f - ls) * log_sigmoid(x) - ls * log_sigmoid(-x);
  } else if constexpr (Type == kDpoHinge) {
    const float h = 1.0f - x;
    return h > 0.0f ? h : 0.0f;
  } else if constexpr (Type == kDpoIpo) {
    const float e = delta - 1.0f / (2.0f * beta);
    return e * e;
  } else {
    return (-(1.0f - ls) * log_sigmoid(x) + ls * log_sigmoid(-x)) / (1.0f - 2.0f * ls);
  }
}

// d loss / d delta (d/dx log sigmoid(x) = sigmoid(-x)).
template <int Type>
FA_HD float dpo_pair_grad(float delta, float beta, float ls) {
  const float x = beta * delta;
  if constexpr (Type == kDpoSigmoid) {
    return beta * (-(1.0f - ls) * sigmoid(-x) + ls * sigmoid(x));
  } else if constexpr (Type == kDpoHinge) {
    return 1.0f - x > 0.0f ? -beta : 0.0f;
  } else if constexpr (Type == kDpoIpo) {
    return 2.0f * (delta - 1.0f / (2.0f * beta));
  } else {
    return beta * (-(1.0f - ls) * sigmoid(-x) - ls * sigmoid(x)) / (1.0f - 2.0f * ls);
  }
}

// SimPO from z = beta (avg_w - avg_l) - gamma.
FA_HD float simpo_pair_loss(float z, float ls) { return -(1.0f - ls) * log_sigmoid(z) - ls * log_sigmoid(-z); }
FA_HD float simpo_pair_grad_z(float z, float ls) { return -(1.0f - ls) * sigmoid(-z) + ls * sigmoid(z); }

}  // namespace fastalign
