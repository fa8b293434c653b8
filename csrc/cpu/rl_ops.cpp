// CPU launchers of the RL and preference ops: KL estimators, sequence sums, the clipped policy
// loss's token terms, the clipped value loss, DPO, SimPO and Bradley-Terry. The per-token math lives in
// ../common/rl_math.h (shared with CUDA); here are only the loops, OpenMP and the reductions.
//
// Reductions are deterministic: partial sums over fixed-size chunks (or rows), in double, then a
// serial combine, so the result does not depend on the thread count.
// No floating-point trap semantics: lets GCC if-convert the selects of the exp helpers (both sides
// computed, one kept) so the elementwise loops vectorize. No result changes: no reassociation.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/rl_math.h"
#include "kernels.h"

// The per-token policy-loss rows are compiled for several x86 vector widths and picked at load
// time (as in logprobs.cpp); `flatten` inlines the row math into each clone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FA_ROW_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), flatten))
#else
#define FA_ROW_CLONES
#endif

namespace fastalign {
namespace cpu {
namespace {

constexpr int64_t kParallelMin = kParallelMinElements;
constexpr int64_t kChunk = 4096;

// out[k] = sum over chunks of the K partial sums body(begin, end, acc) fills in.
template <int K, typename Body>
void chunked_sums(int64_t n, Body body, double* out) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(std::max<int64_t>(chunks, 1)) * K, 0.0);
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t c = 0; c < chunks; ++c) {
    body(c * kChunk, std::min(n, (c + 1) * kChunk), partial.data() + c * K);
  }
  for (int k = 0; k < K; ++k) out[k] = 0.0;
  for (int64_t c = 0; c < chunks; ++c)
    for (int k = 0; k < K; ++k) out[k] += partial[c * K + k];
}

float clamp_min_one(double x) { return static_cast<float>(x < 1.0 ? 1.0 : x); }

}  // namespace

// ---------------------------------------------------------------------------------------- KL
namespace {

// The estimator is a template argument so its switch folds away and the loop vectorizes.
// Chunks of the elementwise loops run in clones for AVX-512/AVX2/baseline (an OpenMP region's own
// body is never cloned, so the parallel loop hands each chunk to a cloned function).
template <int Kind>
FA_ROW_CLONES void kl_forward_chunk(const float* logp, const float* ref_logp, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = kl_value(ref_logp[i] - logp[i], Kind);
}

template <int Kind>
FA_ROW_CLONES void kl_backward_chunk(const float* grad, const float* logp, const float* ref_logp, float* d_logp,
                                     int64_t n) {
  for (int64_t i = 0; i < n; ++i) d_logp[i] = grad[i] * kl_grad_logp(ref_logp[i] - logp[i], Kind);
}

template <int Kind>
void kl_forward_kind(const float* logp, const float* ref_logp, float* out, int64_t n) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t o = c * kChunk;
    kl_forward_chunk<Kind>(logp + o, ref_logp + o, out + o, std::min(kChunk, n - o));
  }
}

template <int Kind>
void kl_backward_kind(const float* grad, const float* logp, const float* ref_logp, float* d_logp, int64_t n) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t o = c * kChunk;
    kl_backward_chunk<Kind>(grad + o, logp + o, ref_logp + o, d_logp + o, std::min(kChunk, n - o));
  }
}

}  // namespace

void kl_forward(const float* logp, const float* ref_logp, float* out, int64_t n, int kind) {
  switch (kind) {
    case kKlK1:
      return kl_forward_kind<kKlK1>(logp, ref_logp, out, n);
    case kKlK2:
      return kl_forward_kind<kKlK2>(logp, ref_logp, out, n);
    case kKlK3:
      return kl_forward_kind<kKlK3>(logp, ref_logp, out, n);
    default:
      return kl_forward_kind<kKlAbs>(logp, ref_logp, out, n);
  }
}

void kl_backward(const float* grad, const float* logp, const float* ref_logp, float* d_logp, int64_t n, int kind) {
  switch (kind) {
    case kKlK1:
      return kl_backward_kind<kKlK1>(grad, logp, ref_logp, d_logp, n);
    case kKlK2:
      return kl_backward_kind<kKlK2>(grad, logp, ref_logp, d_logp, n);
    case kKlK3:
      return kl_backward_kind<kKlK3>(grad, logp, ref_logp, d_logp, n);
    default:
      return kl_backward_kind<kKlAbs>(grad, logp, ref_logp, d_logp, n);
  }
}

// ---------------------------------------------------------------------------------------- sequence sums
void sequence_logprobs_forward(const float* token_logp, const float* mask, float* out, int64_t batch, int64_t len,
                               bool average) {
#pragma omp parallel for schedule(static) if (batch * len > kParallelMin)
  for (int64_t b = 0; b < batch; ++b) {
    const float* lp = token_logp + b * len;
    const float* m = mask + b * len;
    double total = 0.0, count = 0.0;
    for (int64_t t = 0; t < len; ++t) {
      total += static_cast<double>(lp[t] * m[t]);
      count += m[t];
    }
    out[b] = average ? static_cast<float>(total / count) : static_cast<float>(total);
  }
}

void sequence_logprobs_backward(const float* grad, const float* mask, float* d_logp, int64_t batch, int64_t len,
                                bool average) {
#pragma omp parallel for schedule(static) if (batch * len > kParallelMin)
  for (int64_t b = 0; b < batch; ++b) {
    const float* m = mask + b * len;
    float scale = grad[b];
    if (average) {
      double count = 0.0;
      for (int64_t t = 0; t < len; ++t) count += m[t];
      scale = static_cast<float>(grad[b] / count);
    }
    for (int64_t t = 0; t < len; ++t) d_logp[b * len + t] = scale * m[t];
  }
}

// ---------------------------------------------------------------------------------------- policy loss
namespace {

// Calls fn(kind, adv per token, scale per token) with compile-time constants, so the per-token
// loops see no conditional loads and vectorize. An unknown KL code never reaches here (the binding
// rejects it).
template <typename Fn>
void with_policy_variant(int kind, bool adv_per_token, bool scale_per_token, Fn&& fn) {
  auto with_layout = [&](auto kl) {
    if (adv_per_token && scale_per_token) return fn(kl, std::true_type{}, std::true_type{});
    if (adv_per_token) return fn(kl, std::true_type{}, std::false_type{});
    if (scale_per_token) return fn(kl, std::false_type{}, std::true_type{});
    return fn(kl, std::false_type{}, std::false_type{});
  };
  switch (kind) {
    case kKlK1:
      return with_layout(std::integral_constant<int, kKlK1>{});
    case kKlK2:
      return with_layout(std::integral_constant<int, kKlK2>{});
    case kKlK3:
      return with_layout(std::integral_constant<int, kKlK3>{});
    default:
      return with_layout(std::integral_constant<int, kKlAbs>{});
  }
}

// One row's scaled loss, metric sums (low, high, kl, log-ratio²) and d adv sum; writes d_logp (and
// d_adv per token when asked). Float partial sums within the row (SIMD lanes), double across rows.
// Masked tokens are selected out rather than multiplied by 0, so padding holding inf/NaN cannot leak in.
template <int Kind, bool AdvPerToken, bool ScalePerToken>
FA_ROW_CLONES void policy_row(const float* logp, const float* old_logp, const float* adv, const float* mask,
                              const float* ref, const float* scale, int64_t len, const PolicyConfig& c,
                              float* d_logp, float* d_adv_token, double* out) {
  const float row_adv = adv[0], row_scale = scale[0];
  float s_loss = 0.0f, s_low = 0.0f, s_high = 0.0f, s_kl = 0.0f, s_lr2 = 0.0f, s_dadv = 0.0f;
#pragma omp simd reduction(+ : s_loss, s_low, s_high, s_kl, s_lr2, s_dadv)
  for (int64_t t = 0; t < len; ++t) {
    const float m = mask[t];
    const bool on = m != 0.0f;
    const float w = (ScalePerToken ? scale[t] : row_scale) * m;
    const PolicyTokenTerms tok =
        policy_token_terms<Kind>(logp[t], old_logp[t], AdvPerToken ? adv[t] : row_adv, ref[t], c);
    s_loss += on ? w * tok.loss : 0.0f;
    s_low += on ? m * tok.low : 0.0f;
    s_high += on ? m * tok.high : 0.0f;
    s_kl += on ? m * tok.kl : 0.0f;
    s_lr2 += on ? m * tok.log_ratio * tok.log_ratio : 0.0f;
    s_dadv += on ? w * tok.d_adv : 0.0f;
    d_logp[t] = on ? w * tok.d_logp : 0.0f;
  }
  if (AdvPerToken && d_adv_token != nullptr) {  // a second pass only when per-token advantages need a gradient
    for (int64_t t = 0; t < len; ++t) {
      const float m = mask[t];
      const float w = (ScalePerToken ? scale[t] : row_scale) * m;
      const PolicyTokenTerms tok = policy_token_terms<Kind>(logp[t], old_logp[t], adv[t], ref[t], c);
      d_adv_token[t] = m != 0.0f ? w * tok.d_adv : 0.0f;
    }
  }
  out[0] = s_loss;
  out[1] = s_low;
  out[2] = s_high;
  out[3] = s_kl;
  out[4] = s_lr2;
  out[5] = s_dadv;
}

// ---------------------------------------------------------------- this year's objectives (issue 12)
// The row loop with every option of PolicyConfig (policy_token_terms_ext) and the optional token
// weights; out[6] is the row's d loss / d row_log_ratio. Taken only when an option is on, so the
// plain loop above keeps its body.
template <int Kind, bool AdvPerToken, bool ScalePerToken>
FA_ROW_CLONES void policy_row_ext(const float* logp, const float* old_logp, const float* adv, const float* mask,
                                  const float* ref, const float* scale, const float* token_weights, float row_lr,
                                  int64_t len, const PolicyConfig& c, float* d_logp, float* d_adv_token, double* out) {
  const float row_adv = adv[0], row_scale = scale[0];
  const bool has_tw = token_weights != nullptr;
  const float* tw = has_tw ? token_weights : mask;  // loads stay unconditional; the select drops them
  float s_loss = 0.0f, s_low = 0.0f, s_high = 0.0f, s_kl = 0.0f, s_lr2 = 0.0f, s_dadv = 0.0f, s_drow = 0.0f;
#pragma omp simd reduction(+ : s_loss, s_low, s_high, s_kl, s_lr2, s_dadv, s_drow)
  for (int64_t t = 0; t < len; ++t) {
    const float m = mask[t];
    const bool on = m != 0.0f;
    const float w = (ScalePerToken ? scale[t] : row_scale) * m;
    const PolicyTokenTerms tok = policy_token_terms_ext<Kind>(logp[t], old_logp[t], AdvPerToken ? adv[t] : row_adv,
                                                              ref[t], row_lr, has_tw ? tw[t] : 1.0f, c);
    s_loss += on ? w * tok.loss : 0.0f;
    s_low += on ? m * tok.low : 0.0f;
    s_high += on ? m * tok.high : 0.0f;
    s_kl += on ? m * tok.kl : 0.0f;
    s_lr2 += on ? m * tok.log_ratio * tok.log_ratio : 0.0f;
    s_dadv += on ? w * tok.d_adv : 0.0f;
    s_drow += on ? w * tok.d_row : 0.0f;
    d_logp[t] = on ? w * tok.d_logp : 0.0f;
    if (AdvPerToken && d_adv_token != nullptr) d_adv_token[t] = on ? w * tok.d_adv : 0.0f;
  }
  out[0] = s_loss;
  out[1] = s_low;
  out[2] = s_high;
  out[3] = s_kl;
  out[4] = s_lr2;
  out[5] = s_dadv;
  out[6] = s_drow;
}

}  // namespace

void policy_tokens(const float* logp, const float* old_logp, const float* adv, bool adv_per_token, const float* mask,
                   const float* ref_logp, const float* scale, bool scale_per_token, int64_t rows, int64_t len,
                   const PolicyConfig& c, float* loss, float* row_sums, float* d_logp, float* d_adv,
                   const float* row_log_ratio, const float* token_weights, float* d_row) {
  constexpr int K = 7;
  std::vector<double> per_row(static_cast<size_t>(std::max<int64_t>(rows, 1)) * K, 0.0);
  const float* ref = ref_logp ? ref_logp : logp;  // read but unused when beta == 0: keeps loads unconditional
  const bool ext = c.extended() || token_weights != nullptr;
  with_policy_variant(c.kl_kind, adv_per_token, scale_per_token, [&](auto kind, auto adv_tok, auto scale_tok) {
    constexpr int Kind = decltype(kind)::value;
    constexpr bool AdvTok = decltype(adv_tok)::value, ScaleTok = decltype(scale_tok)::value;
#pragma omp parallel for schedule(static) if (rows * len > kParallelMin)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t o = r * len;
      if (ext) {
        policy_row_ext<Kind, AdvTok, ScaleTok>(logp + o, old_logp + o, AdvTok ? adv + o : adv + r, mask + o, ref + o,
                                               ScaleTok ? scale + o : scale + r,
                                               token_weights ? token_weights + o : nullptr,
                                               row_log_ratio ? row_log_ratio[r] : 0.0f, len, c, d_logp + o,
                                               AdvTok && d_adv ? d_adv + o : nullptr, per_row.data() + r * K);
      } else {
        policy_row<Kind, AdvTok, ScaleTok>(logp + o, old_logp + o, AdvTok ? adv + o : adv + r, mask + o, ref + o,
                                           ScaleTok ? scale + o : scale + r, len, c, d_logp + o,
                                           AdvTok && d_adv ? d_adv + o : nullptr, per_row.data() + r * K);
        per_row[r * K + 6] = 0.0;
      }
    }
  });
  double total = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    total += per_row[r * K];
    for (int k = 0; k < 4; ++k) row_sums[r * 4 + k] = static_cast<float>(per_row[r * K + 1 + k]);
    if (!adv_per_token && d_adv != nullptr) d_adv[r] = static_cast<float>(per_row[r * K + 5]);
    if (d_row != nullptr) d_row[r] = static_cast<float>(per_row[r * K + 6]);
  }
  *loss = static_cast<float>(total);
}

// ------------------------------------------------------------ off-policy corrections (issue 12)
void rollout_is_weights(const float* old_logp, const float* rollout_logp, const float* mask, int64_t rows, int64_t len,
                        int mode, float low, float high, float* out) {
  const bool per_sequence = mode == kRolloutSequenceTruncate || mode == kRolloutSequenceMask;
#pragma omp parallel for schedule(static) if (rows * len > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const float* o = old_logp + r * len;
    const float* s = rollout_logp + r * len;
    const float* m = mask + r * len;
    float* w = out + r * len;
    if (per_sequence) {
      double sum = 0.0;  // the row's log of the product of ratios
      for (int64_t t = 0; t < len; ++t) {
        const float d = (o[t] - s[t]) * m[t];
        sum += d != d ? 0.0f : d;  // NaN (an unscored token) counts as log-ratio 0, as TRL
      }
      const float weight = rollout_is_weight(static_cast<float>(sum), mode, low, high);
      for (int64_t t = 0; t < len; ++t) w[t] = weight;
    } else {
      for (int64_t t = 0; t < len; ++t) {
        const float d = (o[t] - s[t]) * m[t];
        w[t] = rollout_is_weight(d != d ? 0.0f : d, mode, low, high);
      }
    }
  }
}

void off_policy_mask(const float* logp, const float* sampling_logp, const float* adv, const float* mask, int64_t rows,
                     int64_t len, float threshold, float* out) {
#pragma omp parallel for schedule(static) if (rows * len > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0.0, count = 0.0;
    for (int64_t t = 0; t < len; ++t) {
      const float d = sampling_logp[r * len + t] - logp[r * len + t];
      const float m = mask[r * len + t];
      sum += (d != d ? 0.0f : d) * m;
      count += m;
    }
    const float mean = static_cast<float>(sum) / static_cast<float>(count > 1.0 ? count : 1.0);
    out[r] = (adv[r] >= 0.0f) | (mean <= threshold) ? 1.0f : 0.0f;
  }
}

// ---------------------------------------------------------------------------------------- value loss
void value_loss_forward(const float* values, const float* old_values, const float* returns, const float* mask,
                        int64_t n, float clip, float* loss, float* metrics) {
  double sums[4];  // loss, count, clipped, value
  chunked_sums<4>(
      n,
      [&](int64_t begin, int64_t end, double* acc) {
        for (int64_t i = begin; i < end; ++i) {
          const float m = mask[i];
          if (m == 0.0f) continue;
          const ValueToken t = value_token_forward(values[i], old_values[i], returns[i], clip);
          acc[0] += t.loss * m;
          acc[1] += m;
          acc[2] += t.clipped * m;
          acc[3] += values[i] * m;
        }
      },
      sums);
  const double count = clamp_min_one(sums[1]);
  *loss = static_cast<float>(0.5 * sums[0] / count);
  metrics[0] = static_cast<float>(sums[2] / count);
  metrics[1] = static_cast<float>(sums[3] / count);
}

void value_loss_backward(const float* grad_loss, const float* values, const float* old_values, const float* returns,
                         const float* mask, int64_t n, float clip, float* d_values) {
  double count;
  chunked_sums<1>(
      n,
      [&](int64_t begin, int64_t end, double* acc) {
        for (int64_t i = begin; i < end; ++i) acc[0] += mask[i];
      },
      &count);
  const float scale = static_cast<float>(0.5 * *grad_loss / clamp_min_one(count));
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float m = mask[i];
    d_values[i] = m == 0.0f ? 0.0f : scale * m * value_token_backward(values[i], old_values[i], returns[i], clip);
  }
}

// ---------------------------------------------------------------------------------------- preference
namespace {

// The loss type is a template argument so each loop body is small and branch-free; losses and
// rewards are separate loops because with seven pointers in one loop GCC gives up on the runtime
// alias checks it needs to vectorize.
template <int Type>
void dpo_forward_typed(const float* pc, const float* pr, const float* rc, const float* rr, int64_t n, float beta,
                       float ls, float* losses, float* chosen_rewards, float* rejected_rewards) {
#pragma omp parallel if (n > kParallelMin)
  {
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n; ++i) losses[i] = dpo_pair_loss<Type>((pc[i] - rc[i]) - (pr[i] - rr[i]), beta, ls);
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n; ++i) {
      chosen_rewards[i] = beta * (pc[i] - rc[i]);
      rejected_rewards[i] = beta * (pr[i] - rr[i]);
    }
  }
}

template <int Type>
void dpo_backward_typed(const float* grad, const float* pc, const float* pr, const float* rc, const float* rr,
                        int64_t n, float beta, float ls, float* d_chosen) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    d_chosen[i] = grad[i] * dpo_pair_grad<Type>((pc[i] - rc[i]) - (pr[i] - rr[i]), beta, ls);
  }
}

}  // namespace

void dpo_forward(const float* policy_chosen, const float* policy_rejected, const float* ref_chosen,
                 const float* ref_rejected, int64_t n, float beta, int type, float label_smoothing, float* losses,
                 float* chosen_rewards, float* rejected_rewards) {
  auto run = [&](auto kernel) {
    kernel(policy_chosen, policy_rejected, ref_chosen, ref_rejected, n, beta, label_smoothing, losses, chosen_rewards,
           rejected_rewards);
  };
  switch (type) {
    case kDpoSigmoid:
      return run(dpo_forward_typed<kDpoSigmoid>);
    case kDpoHinge:
      return run(dpo_forward_typed<kDpoHinge>);
    case kDpoIpo:
      return run(dpo_forward_typed<kDpoIpo>);
    default:
      return run(dpo_forward_typed<kDpoRobust>);
  }
}

void dpo_backward(const float* grad, const float* policy_chosen, const float* policy_rejected, const float* ref_chosen,
                  const float* ref_rejected, int64_t n, float beta, int type, float label_smoothing, float* d_chosen) {
  auto run = [&](auto kernel) {
    kernel(grad, policy_chosen, policy_rejected, ref_chosen, ref_rejected, n, beta, label_smoothing, d_chosen);
  };
  switch (type) {
    case kDpoSigmoid:
      return run(dpo_backward_typed<kDpoSigmoid>);
    case kDpoHinge:
      return run(dpo_backward_typed<kDpoHinge>);
    case kDpoIpo:
      return run(dpo_backward_typed<kDpoIpo>);
    default:
      return run(dpo_backward_typed<kDpoRobust>);
  }
}

void simpo_forward(const float* chosen, const float* rejected, int64_t n, float beta, float gamma,
                   float label_smoothing, float* losses, float* chosen_rewards, float* rejected_rewards) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    losses[i] = simpo_pair_loss(beta * (chosen[i] - rejected[i]) - gamma, label_smoothing);
    chosen_rewards[i] = beta * chosen[i];
    rejected_rewards[i] = beta * rejected[i];
  }
}

void simpo_backward(const float* grad, const float* chosen, const float* rejected, int64_t n, float beta, float gamma,
                    float label_smoothing, float* d_chosen) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    d_chosen[i] = grad[i] * beta * simpo_pair_grad_z(beta * (chosen[i] - rejected[i]) - gamma, label_smoothing);
  }
}

void bradley_terry_forward(const float* chosen, const float* rejected, const float* margin, float margin_scalar,
                           int64_t n, float center_coef, float* loss, float* metrics) {
  double sums[4];  // -log sigmoid, (r_w + r_l)^2, r_w > r_l, r_w - r_l
  chunked_sums<4>(
      n,
      [&](int64_t begin, int64_t end, double* acc) {
        // Float partial sums over one chunk (SIMD lanes), double across chunks; the margin's
        // layout is a compile-time constant so the loop has no conditional load.
        // By-value captures (local copies) and local sums: see dpo_forward.
        auto sum_chunk = [=](auto per_pair) {
          constexpr bool PerPair = decltype(per_pair)::value;
          float s_loss = 0.0f, s_sq = 0.0f, s_acc = 0.0f, s_diff = 0.0f;
#pragma omp simd reduction(+ : s_loss, s_sq, s_acc, s_diff)
          for (int64_t i = begin; i < end; ++i) {
            const float diff = chosen[i] - rejected[i];
            const float shifted = diff - (PerPair ? margin[i] : margin_scalar);
            const float s = chosen[i] + rejected[i];
            s_loss -= log_sigmoid(shifted);
            s_sq += s * s;
            s_acc += chosen[i] > rejected[i] ? 1.0f : 0.0f;
            s_diff += diff;
          }
          acc[0] = s_loss;
          acc[1] = s_sq;
          acc[2] = s_acc;
          acc[3] = s_diff;
        };
        if (margin) {
          sum_chunk(std::true_type{});
        } else {
          sum_chunk(std::false_type{});
        }
      },
      sums);
  const double inv_n = 1.0 / static_cast<double>(n);
  *loss = static_cast<float>(sums[0] * inv_n + (center_coef != 0.0f ? center_coef * sums[1] * inv_n : 0.0));
  metrics[0] = static_cast<float>(sums[2] * inv_n);
  metrics[1] = static_cast<float>(sums[3] * inv_n);
}

void bradley_terry_backward(const float* grad_loss, const float* chosen, const float* rejected, const float* margin,
                            float margin_scalar, int64_t n, float center_coef, float* d_chosen, float* d_rejected) {
  const float scale = *grad_loss / static_cast<float>(n);
  auto run = [&](auto per_pair) {
    constexpr bool PerPair = decltype(per_pair)::value;  // no conditional load inside the SIMD loop
    const float *w = chosen, *l = rejected, *mg = margin;  // local copies: see dpo_forward
    float *out_w = d_chosen, *out_l = d_rejected;
    const float ms = margin_scalar, cc = center_coef, sc = scale;
#pragma omp parallel for schedule(static) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const float shifted = w[i] - l[i] - (PerPair ? mg[i] : ms);
      const float d_diff = -sigmoid(-shifted);  // d(-log sigmoid(x))/dx
      const float d_center = 2.0f * cc * (w[i] + l[i]);
      out_w[i] = sc * (d_diff + d_center);
      out_l[i] = sc * (-d_diff + d_center);
    }
  };
  if (margin) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
}

// ------------------------------------------------------------------ D2O, KTO, ORPO (issue 13; CPO: csrc/ops/cpo.cpp)
// Per-example math of fastalign/ops/preference/spec.py (d2o_loss, kto_loss, orpo_loss);
// derivatives are the analytic ones of those formulas. No kinds: nothing to switch on.
namespace {

// log(1 - e^l) for l < 0, exact near 0 (1 - e^l would cancel).
float log1m_exp(float l) { return logf(-expm1f(l)); }

}  // namespace

void d2o_forward(const float* policy_samples, const float* ref_samples, const float* policy_negative,
                 const float* ref_negative, int64_t n, int64_t k, float beta, float alpha, float* losses,
                 float* sample_rewards, float* negative_rewards) {
#pragma omp parallel for schedule(static) if (n * k > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    double sum = 0.0;  // K can be large: accumulate the log-ratios in double
    for (int64_t j = 0; j < k; ++j) sum += policy_samples[i * k + j] - ref_samples[i * k + j];
    const float sample = beta * static_cast<float>(sum / static_cast<double>(k));
    const float negative = alpha * (policy_negative[i] - ref_negative[i]);
    losses[i] = -log_sigmoid(sample - negative);
    sample_rewards[i] = sample;
    negative_rewards[i] = negative;
  }
}

void d2o_backward(const float* grad, const float* sample_rewards, const float* negative_rewards, int64_t n, int64_t k,
                  float beta, float alpha, float* d_samples, float* d_negative) {
#pragma omp parallel for schedule(static) if (n * k > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float slope = -grad[i] * sigmoid(negative_rewards[i] - sample_rewards[i]);  // d loss / d z
    const float per_sample = slope * beta / static_cast<float>(k);
    for (int64_t j = 0; j < k; ++j) d_samples[i * k + j] = per_sample;
    d_negative[i] = -slope * alpha;
  }
}

void kto_forward(const float* policy, const float* ref, const float* desirable, float kl_ref, int64_t n, float beta,
                 float desirable_weight, float undesirable_weight, float* losses, float* rewards) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float r = policy[i] - ref[i];
    const float x = beta * (r - kl_ref);
    // 1 - sigmoid(x) = sigmoid(-x)
    losses[i] = desirable[i] != 0.0f ? desirable_weight * sigmoid(-x) : undesirable_weight * sigmoid(x);
    rewards[i] = beta * r;
  }
}

void kto_backward(const float* grad, const float* policy, const float* ref, const float* desirable, float kl_ref,
                  int64_t n, float beta, float desirable_weight, float undesirable_weight, float* d_policy) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float x = beta * ((policy[i] - ref[i]) - kl_ref);
    const float s = sigmoid(x) * sigmoid(-x);  // sigma'(x)
    const float w = desirable[i] != 0.0f ? -desirable_weight : undesirable_weight;
    d_policy[i] = grad[i] * w * beta * s;
  }
}

void orpo_forward(const float* chosen, const float* rejected, int64_t n, float beta, float* losses, float* log_odds) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float lo = (chosen[i] - rejected[i]) - (log1m_exp(chosen[i]) - log1m_exp(rejected[i]));
    losses[i] = -beta * log_sigmoid(lo);
    log_odds[i] = lo;
  }
}

// d log_odds / d l_w = 1 / (1 - e^{l_w}) = -1 / expm1(l_w); d / d l_l = 1 / expm1(l_l).
void orpo_backward(const float* grad, const float* chosen, const float* rejected, int64_t n, float beta,
                   float* d_chosen, float* d_rejected) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float lo = (chosen[i] - rejected[i]) - (log1m_exp(chosen[i]) - log1m_exp(rejected[i]));
    const float slope = -grad[i] * beta * sigmoid(-lo);  // d loss / d log_odds
    d_chosen[i] = -slope / expm1f(chosen[i]);
    d_rejected[i] = slope / expm1f(rejected[i]);
  }
}

// ------------------------------------------------------------------ end D2O, KTO, ORPO

}  // namespace cpu
}  // namespace fastalign
