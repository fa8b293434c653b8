// CPU launchers (C++17 + OpenMP), torch-free: raw pointers and sizes in, results out.
#pragma once

#include <cstdint>

#include "../common/dtype.h"
#include "../common/rl_math.h"

namespace fastalign {
namespace cpu {

// Work below this many elements runs on one thread. It takes well under a millisecond there, while
// an OpenMP fork costs a scheduler timeslice (4-8 ms) whenever another process holds a core: on a
// busy 2-core machine gae at 64 x 1024 took 8 ms on 2 threads and 0.14 ms on one.
constexpr int64_t kParallelMinElements = int64_t(1) << 18;

// logits [n, vocab] row-major; labels [n]. Rows whose label == ignore_index get logp = entropy = 0.
// rel_lse = log-sum-exp of logits / T minus the row max (for the backward, which re-finds the max).
template <typename T>
void logprobs_forward(const T* logits, const int64_t* labels, int64_t n, int64_t vocab, float temperature,
                      int64_t ignore_index, float* logp, float* entropy, float* rel_lse);

// grad [n, vocab] (may alias logits). grad_entropy may be null. Ignored rows get 0.
template <typename T>
void logprobs_backward(const T* logits, const int64_t* labels, const float* rel_lse, const float* entropy,
                       const float* grad_logp, const float* grad_entropy, int64_t n, int64_t vocab,
                       float temperature, int64_t ignore_index, T* grad);

void group_advantages(const float* rewards, float* out, int64_t n, int64_t group_size, int scale, float eps);
void rloo_advantages(const float* rewards, float* out, int64_t n, int64_t group_size);
// gamma_lam = gamma * lam, rounded to float once (see gae_row).
void gae(const float* rewards, const float* values, const float* mask, float* adv, float* ret, int64_t batch,
         int64_t len, float gamma, float gamma_lam);

// ---- RL and preference ops (advantages.cpp, rl_ops.cpp). All float32; masks are float weights
// (0 = ignored). Every *_backward takes the forward's inputs and the output gradient(s).
void group_advantages_backward(const float* rewards, const float* grad, float* d_rewards, int64_t n,
                               int64_t group_size, int scale, float eps);
// grad_adv / grad_ret may be null (no gradient from that output).
void gae_backward(const float* grad_adv, const float* grad_ret, const float* mask, float* d_rewards, float* d_values,
                  int64_t batch, int64_t len, float gamma, float gamma_lam);
// stats[4] = mean, 1/sqrt(var + eps), mask count, variance divisor: what the backward needs.
void whiten_forward(const float* x, const float* mask, float* out, float* stats, int64_t n, bool shift_mean,
                    float eps);
void whiten_backward(const float* grad, const float* x, const float* mask, const float* stats, float* dx, int64_t n,
                     bool shift_mean);

void kl_forward(const float* logp, const float* ref_logp, float* out, int64_t n, int kind);
void kl_backward(const float* grad, const float* logp, const float* ref_logp, float* d_logp, int64_t n, int kind);

void sequence_logprobs_forward(const float* token_logp, const float* mask, float* out, int64_t batch, int64_t len,
                               bool average);
void sequence_logprobs_backward(const float* grad, const float* mask, float* d_logp, int64_t batch, int64_t len,
                                bool average);

// The clipped policy loss's token terms in one pass (fastalign/ops/policy): with w = scale * mask,
// loss = sum w * loss_token, row_sums [rows, 4] = each row's masked sums of the low-clip and high-clip
// indicators, the KL estimator and (logp - old_logp)^2 (per row: TRL logs per-sequence clip extremes), d_logp = w * d loss_token / d logp. adv is [rows] or, with
// adv_per_token, [rows, len]; scale is [rows] or, with scale_per_token, [rows, len]; ref_logp may be
// null when c.beta == 0; d_adv (adv's shape) may be null. Issue 12's options: row_log_ratio [rows]
// (levels sequence/sequence_token; may be null at level token), token_weights [rows, len] (may be
// null), d_row [rows] = d loss / d row_log_ratio (may be null).
void policy_tokens(const float* logp, const float* old_logp, const float* adv, bool adv_per_token, const float* mask,
                   const float* ref_logp, const float* scale, bool scale_per_token, int64_t rows, int64_t len,
                   const PolicyConfig& c, float* loss, float* row_sums, float* d_logp, float* d_adv,
                   const float* row_log_ratio, const float* token_weights, float* d_row);

// Off-policy corrections (issue 12; fastalign/ops/offpolicy): out [rows, len] the rollout importance
// weights of RolloutIsMode mode (low = -inf / high = inf for no bound); out [rows] the off-policy
// sequence mask (1 = keep).
void rollout_is_weights(const float* old_logp, const float* rollout_logp, const float* mask, int64_t rows, int64_t len,
                        int mode, float low, float high, float* out);
void off_policy_mask(const float* logp, const float* sampling_logp, const float* adv, const float* mask, int64_t rows,
                     int64_t len, float threshold, float* out);

// metrics[2] = clip_fraction, value_mean.
void value_loss_forward(const float* values, const float* old_values, const float* returns, const float* mask,
                        int64_t n, float clip, float* loss, float* metrics);
void value_loss_backward(const float* grad_loss, const float* values, const float* old_values, const float* returns,
                         const float* mask, int64_t n, float clip, float* d_values);

// d_chosen = d loss / d policy_chosen; the rejected side's gradient is its negative.
void dpo_forward(const float* policy_chosen, const float* policy_rejected, const float* ref_chosen,
                 const float* ref_rejected, int64_t n, float beta, int type, float label_smoothing, float* losses,
                 float* chosen_rewards, float* rejected_rewards);
void dpo_backward(const float* grad, const float* policy_chosen, const float* policy_rejected, const float* ref_chosen,
                  const float* ref_rejected, int64_t n, float beta, int type, float label_smoothing, float* d_chosen);
void simpo_forward(const float* chosen, const float* rejected, int64_t n, float beta, float gamma,
                   float label_smoothing, float* losses, float* chosen_rewards, float* rejected_rewards);
void simpo_backward(const float* grad, const float* chosen, const float* rejected, int64_t n, float beta, float gamma,
                    float label_smoothing, float* d_chosen);
// margin may be null (then margin_scalar applies to every pair); metrics[2] = accuracy, margin.
void bradley_terry_forward(const float* chosen, const float* rejected, const float* margin, float margin_scalar,
                           int64_t n, float center_coef, float* loss, float* metrics);
void bradley_terry_backward(const float* grad_loss, const float* chosen, const float* rejected, const float* margin,
                            float margin_scalar, int64_t n, float center_coef, float* d_chosen, float* d_rejected);

// ---- D2O, KTO, ORPO, CPO (issue 13; rl_ops.cpp). samples are [n, k] row-major; desirable is a 0/1
// float weight per example; d2o_backward takes the forward's rewards; CPO's rejected gradient is
// minus d_chosen.
void d2o_forward(const float* policy_samples, const float* ref_samples, const float* policy_negative,
                 const float* ref_negative, int64_t n, int64_t k, float beta, float alpha, float* losses,
                 float* sample_rewards, float* negative_rewards);
void d2o_backward(const float* grad, const float* sample_rewards, const float* negative_rewards, int64_t n, int64_t k,
                  float beta, float alpha, float* d_samples, float* d_negative);
void kto_forward(const float* policy, const float* ref, const float* desirable, float kl_ref, int64_t n, float beta,
                 float desirable_weight, float undesirable_weight, float* losses, float* rewards);
void kto_backward(const float* grad, const float* policy, const float* ref, const float* desirable, float kl_ref,
                  int64_t n, float beta, float desirable_weight, float undesirable_weight, float* d_policy);
void orpo_forward(const float* chosen, const float* rejected, int64_t n, float beta, float* losses, float* log_odds);
void orpo_backward(const float* grad, const float* chosen, const float* rejected, int64_t n, float beta,
                   float* d_chosen, float* d_rejected);
// ---- steer_logits (steering.cpp). Rows of value/base/negatives have unit column stride and the
// given row strides (negatives: branch k, row i at negatives + k * neg_stride_k + i * neg_stride_b);
// betas[num_neg]; out [batch, vocab] float32. top_p >= 1 means no mask.
template <typename T>
void steer_logits(const T* value, int64_t value_stride, const T* base, int64_t base_stride, const T* negatives,
                  int64_t neg_stride_k, int64_t neg_stride_b, const float* betas, int64_t num_neg, int64_t batch,
                  int64_t vocab, float alpha, float temperature, float top_p, int64_t min_keep, float* out);

}  // namespace cpu
}  // namespace fastalign
