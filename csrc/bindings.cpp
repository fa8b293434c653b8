// Registers the fastalign ops with the PyTorch dispatcher (TORCH_LIBRARY), so the ops are torch
// custom ops that autograd wrappers and torch.compile can call. The kernels themselves are
// torch-free (csrc/cpu, csrc/cuda); this file only checks tensors and hands over raw pointers.
// A newer op lives whole in csrc/ops/<op>.cpp (its loops and a TORCH_LIBRARY_FRAGMENT of its own).
#include <Python.h>

#include <algorithm>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "common/advantages_row.h"
#include "cpu/kernels.h"
#include "ops/checks.h"

namespace fastalign {
namespace {

using at::Tensor;
using namespace checks;  // check_code, check_cpu, check_f32, ... (ops/checks.h, shared with csrc/ops/)

// Calls fn with the kernel storage type matching the tensor's dtype.
template <typename Fn>
void dispatch_float(const Tensor& t, Fn&& fn) {
  switch (t.scalar_type()) {
    case at::kFloat:
      fn(static_cast<float*>(nullptr));
      break;
    case at::kBFloat16:
      fn(static_cast<bf16_t*>(nullptr));
      break;
    case at::kHalf:
      fn(static_cast<fp16_t*>(nullptr));
      break;
    default:
      TORCH_CHECK(false, "fastalign: expected float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

template <typename T>
T* data_as(const Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

void check_logprobs_inputs(const Tensor& logits, const Tensor& labels) {
  check_cpu(logits, "logits");
  check_cpu(labels, "labels");
  TORCH_CHECK(logits.dim() == 2, "fastalign: logits must be 2-D [N, V], got ", logits.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), "fastalign: labels must be [N]");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "fastalign: labels must be int64");
}

std::tuple<Tensor, Tensor, Tensor> logprobs_fwd_cpu(const Tensor& logits, const Tensor& labels, double temperature,
                                                    int64_t ignore_index) {
  check_logprobs_inputs(logits, labels);
  const int64_t n = logits.size(0), vocab = logits.size(1);
  auto opts = logits.options().dtype(at::kFloat);
  Tensor logp = at::empty({n}, opts), entropy = at::empty({n}, opts), rel_lse = at::empty({n}, opts);
  dispatch_float(logits, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::logprobs_forward<T>(data_as<T>(logits), labels.data_ptr<int64_t>(), n, vocab,
                             static_cast<float>(temperature), ignore_index, logp.data_ptr<float>(),
                             entropy.data_ptr<float>(), rel_lse.data_ptr<float>());
  });
  return {logp, entropy, rel_lse};
}

void logprobs_bwd_into(const Tensor& logits, const Tensor& labels, const Tensor& rel_lse, const Tensor& entropy,
                       const Tensor& grad_logp, const std::optional<Tensor>& grad_entropy, double temperature,
                       int64_t ignore_index, const Tensor& grad) {
  check_logprobs_inputs(logits, labels);
  for (const Tensor* t : {&rel_lse, &entropy, &grad_logp}) {
    check_cpu(*t, "row statistics");
    check_float32(*t, "row statistics");
  }
  const float* g_ent = nullptr;
  if (grad_entropy.has_value() && grad_entropy->defined()) {
    check_cpu(*grad_entropy, "grad_entropy");
    check_float32(*grad_entropy, "grad_entropy");
    g_ent = grad_entropy->data_ptr<float>();
  }
  const int64_t n = logits.size(0), vocab = logits.size(1);
  dispatch_float(logits, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::logprobs_backward<T>(data_as<T>(logits), labels.data_ptr<int64_t>(), rel_lse.data_ptr<float>(),
                              entropy.data_ptr<float>(), grad_logp.data_ptr<float>(), g_ent, n, vocab,
                              static_cast<float>(temperature), ignore_index, data_as<T>(grad));
  });
}

Tensor logprobs_bwd_cpu(const Tensor& logits, const Tensor& labels, const Tensor& rel_lse, const Tensor& entropy,
                        const Tensor& grad_logp, const std::optional<Tensor>& grad_entropy, double temperature,
                        int64_t ignore_index) {
  Tensor grad = at::empty_like(logits);
  logprobs_bwd_into(logits, labels, rel_lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, grad);
  return grad;
}

void logprobs_bwd_inplace_cpu(const Tensor& logits, const Tensor& labels, const Tensor& rel_lse,
                              const Tensor& entropy, const Tensor& grad_logp,
                              const std::optional<Tensor>& grad_entropy, double temperature, int64_t ignore_index) {
  logprobs_bwd_into(logits, labels, rel_lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, logits);
}

Tensor group_advantages_cpu(const Tensor& rewards, int64_t group_size, int64_t scale, double eps) {
  check_cpu(rewards, "rewards");
  check_float32(rewards, "rewards");
  TORCH_CHECK(group_size >= 1 && rewards.numel() % group_size == 0, "fastalign: group_size must divide rewards");
  Tensor out = at::empty_like(rewards);
  cpu::group_advantages(rewards.data_ptr<float>(), out.data_ptr<float>(), rewards.numel(), group_size,
                        check_code(scale, kAdvantageScales, "scale"), static_cast<float>(eps));
  return out;
}

Tensor rloo_advantages_cpu(const Tensor& rewards, int64_t group_size) {
  check_cpu(rewards, "rewards");
  check_float32(rewards, "rewards");
  TORCH_CHECK(group_size >= 2 && rewards.numel() % group_size == 0, "fastalign: group_size must be >= 2 and divide rewards");
  Tensor out = at::empty_like(rewards);
  cpu::rloo_advantages(rewards.data_ptr<float>(), out.data_ptr<float>(), rewards.numel(), group_size);
  return out;
}

std::tuple<Tensor, Tensor> gae_cpu(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma,
                                   double lam) {
  for (const Tensor* t : {&rewards, &values, &mask}) {
    check_cpu(*t, "gae input");
    check_float32(*t, "gae input");
  }
  TORCH_CHECK(rewards.dim() == 2 && values.sizes() == rewards.sizes() && mask.sizes() == rewards.sizes(),
              "fastalign: gae inputs must share one [B, T] shape");
  Tensor adv = at::empty_like(rewards), ret = at::empty_like(rewards);
  cpu::gae(rewards.data_ptr<float>(), values.data_ptr<float>(), mask.data_ptr<float>(), adv.data_ptr<float>(),
           ret.data_ptr<float>(), rewards.size(0), rewards.size(1), static_cast<float>(gamma),
           static_cast<float>(gamma * lam));  // gamma * lam rounded once, as TRL does
  return {adv, ret};
}

// ---- RL and preference ops. Inputs are float32 (the Python wrappers upcast [B, T]-sized bf16/fp16
// tensors); masks are float weights. Forward and backward are separate ops; autograd lives in each op's
// fastalign/ops/<family>/cpu.py.
const float* optional_f32(const std::optional<Tensor>& t, int64_t numel, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_f32(*t, name);
  check_numel(*t, numel, name);
  return t->data_ptr<float>();
}

Tensor scalar_f32(const Tensor& like) { return at::empty({}, like.options().dtype(at::kFloat)); }

// The flat index of the first value of a contiguous mask that is neither 0 nor 1 (NaN included), or -1:
// one read of the mask instead of the three torch passes of fastalign.ops.validation.mask_tensor.
template <typename T>
int64_t first_non_binary_of(const T* x, int64_t n) {
  constexpr int64_t kBlock = 1024;
  for (int64_t s = 0; s < n; s += kBlock) {
    const int64_t e = std::min(n, s + kBlock);
    bool bad = false;
    for (int64_t i = s; i < e; ++i) bad |= (x[i] != T(0)) & (x[i] != T(1));  // branch-free: vectorizes
    if (bad) {
      for (int64_t i = s; i < e; ++i) {
        if (!(x[i] == T(0) || x[i] == T(1))) return i;
      }
    }
  }
  return -1;
}

int64_t first_non_binary_cpu(const Tensor& x) {
  TORCH_CHECK(x.is_contiguous(), "fastalign: first_non_binary needs a contiguous tensor");
  switch (x.scalar_type()) {
    case at::kFloat: return first_non_binary_of(x.data_ptr<float>(), x.numel());
    case at::kDouble: return first_non_binary_of(x.data_ptr<double>(), x.numel());
    case at::kLong: return first_non_binary_of(x.data_ptr<int64_t>(), x.numel());
    case at::kInt: return first_non_binary_of(x.data_ptr<int32_t>(), x.numel());
    default: TORCH_CHECK(false, "fastalign: first_non_binary takes float32/float64/int32/int64, got ", x.scalar_type());
  }
  return -1;
}

Tensor group_advantages_bwd_cpu(const Tensor& grad, const Tensor& rewards, int64_t group_size, int64_t scale,
                                double eps) {
  check_f32(grad, "grad");
  check_f32(rewards, "rewards");
  check_numel(grad, rewards.numel(), "grad");
  TORCH_CHECK(group_size >= 1 && rewards.numel() % group_size == 0, "fastalign: group_size must divide rewards");
  Tensor d_rewards = at::empty_like(rewards);
  cpu::group_advantages_backward(rewards.data_ptr<float>(), grad.data_ptr<float>(), d_rewards.data_ptr<float>(),
                                 rewards.numel(), group_size, check_code(scale, kAdvantageScales, "scale"), static_cast<float>(eps));
  return d_rewards;
}

// RLOO is linear and symmetric: its backward is the forward applied to the gradient.
Tensor rloo_advantages_bwd_cpu(const Tensor& grad, int64_t group_size) { return rloo_advantages_cpu(grad, group_size); }

std::tuple<Tensor, Tensor> gae_bwd_cpu(const std::optional<Tensor>& grad_adv, const std::optional<Tensor>& grad_ret,
                                       const Tensor& mask, double gamma, double lam) {
  check_f32(mask, "mask");
  TORCH_CHECK(mask.dim() == 2, "fastalign: gae mask must be [B, T], got ", mask.sizes());
  const float* g_adv = optional_f32(grad_adv, mask.numel(), "grad_advantages");
  const float* g_ret = optional_f32(grad_ret, mask.numel(), "grad_returns");
  Tensor d_rewards = at::empty_like(mask), d_values = at::empty_like(mask);
  cpu::gae_backward(g_adv, g_ret, mask.data_ptr<float>(), d_rewards.data_ptr<float>(), d_values.data_ptr<float>(),
                    mask.size(0), mask.size(1), static_cast<float>(gamma), static_cast<float>(gamma * lam));
  return {d_rewards, d_values};
}

std::tuple<Tensor, Tensor> whiten_fwd_cpu(const Tensor& x, const Tensor& mask, bool shift_mean, double eps) {
  check_f32(x, "x");
  check_f32(mask, "mask");
  check_numel(mask, x.numel(), "mask");
  Tensor out = at::empty_like(x), stats = at::empty({4}, x.options());
  cpu::whiten_forward(x.data_ptr<float>(), mask.data_ptr<float>(), out.data_ptr<float>(), stats.data_ptr<float>(),
                      x.numel(), shift_mean, static_cast<float>(eps));
  return {out, stats};
}

Tensor whiten_bwd_cpu(const Tensor& grad, const Tensor& x, const Tensor& mask, const Tensor& stats, bool shift_mean) {
  for (const Tensor* t : {&grad, &x, &mask, &stats}) check_f32(*t, "whiten input");
  check_numel(grad, x.numel(), "grad");
  check_numel(mask, x.numel(), "mask");
  check_numel(stats, 4, "stats");
  Tensor dx = at::empty_like(x);
  cpu::whiten_backward(grad.data_ptr<float>(), x.data_ptr<float>(), mask.data_ptr<float>(), stats.data_ptr<float>(),
                       dx.data_ptr<float>(), x.numel(), shift_mean);
  return dx;
}

Tensor kl_fwd_cpu(const Tensor& logp, const Tensor& ref_logp, int64_t kind) {
  check_f32(logp, "logp");
  check_f32(ref_logp, "ref_logp");
  check_numel(ref_logp, logp.numel(), "ref_logp");
  Tensor out = at::empty_like(logp);
  cpu::kl_forward(logp.data_ptr<float>(), ref_logp.data_ptr<float>(), out.data_ptr<float>(), logp.numel(),
                  check_code(kind, kKlKinds, "kl kind"));
  return out;
}

Tensor kl_bwd_cpu(const Tensor& grad, const Tensor& logp, const Tensor& ref_logp, int64_t kind) {
  for (const Tensor* t : {&grad, &logp, &ref_logp}) check_f32(*t, "kl input");
  check_numel(grad, logp.numel(), "grad");
  check_numel(ref_logp, logp.numel(), "ref_logp");
  Tensor d_logp = at::empty_like(logp);
  cpu::kl_backward(grad.data_ptr<float>(), logp.data_ptr<float>(), ref_logp.data_ptr<float>(),
                   d_logp.data_ptr<float>(), logp.numel(), check_code(kind, kKlKinds, "kl kind"));
  return d_logp;
}

Tensor sequence_logprobs_fwd_cpu(const Tensor& token_logp, const Tensor& mask, bool average) {
  check_f32(token_logp, "token_logp");
  check_f32(mask, "mask");
  TORCH_CHECK(token_logp.dim() == 2 && mask.sizes() == token_logp.sizes(), "fastalign: token_logp and mask must be [B, T]");
  Tensor out = at::empty({token_logp.size(0)}, token_logp.options());
  cpu::sequence_logprobs_forward(token_logp.data_ptr<float>(), mask.data_ptr<float>(), out.data_ptr<float>(),
                                 token_logp.size(0), token_logp.size(1), average);
  return out;
}

Tensor sequence_logprobs_bwd_cpu(const Tensor& grad, const Tensor& mask, bool average) {
  check_f32(grad, "grad");
  check_f32(mask, "mask");
  TORCH_CHECK(mask.dim() == 2 && grad.numel() == mask.size(0), "fastalign: grad must be [B] for a [B, T] mask");
  Tensor d_logp = at::empty_like(mask);
  cpu::sequence_logprobs_backward(grad.data_ptr<float>(), mask.data_ptr<float>(), d_logp.data_ptr<float>(),
                                  mask.size(0), mask.size(1), average);
  return d_logp;
}

PolicyConfig policy_config(double beta, int64_t kl_kind, double clip_low, double clip_high) {
  // The ratio bounds are rounded to float once, from double, as torch.clamp does with Python floats.
  return PolicyConfig{static_cast<float>(1.0 - clip_low), static_cast<float>(1.0 + clip_high), static_cast<float>(beta),
                      check_code(kl_kind, kKlKinds, "kl_kind")};
}

// (loss, row_sums [R, 4], d_logp, d_adv, d_row): see cpu::policy_tokens. logp, old_logp and mask are [R, T];
// advantages and scale are [R] or [R, T]; d_adv is empty unless advantages_grad. Issue 12's options:
// row_log_ratio [R] (required unless level is token), token_weights [R, T], level, objective, delta
// (inf = off), dual_clip (0 = off), kl_bias_correction.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> policy_tokens_cpu(
    const Tensor& logp, const Tensor& old_logp, const Tensor& adv, const Tensor& mask,
    const std::optional<Tensor>& ref_logp, const Tensor& scale, double beta, int64_t kl_kind, double clip_low,
    double clip_high, bool advantages_grad, const std::optional<Tensor>& row_log_ratio,
    const std::optional<Tensor>& token_weights, int64_t level, int64_t objective, double delta, double dual_clip,
    bool kl_bias_correction) {
  for (const Tensor* t : {&logp, &old_logp, &adv, &mask, &scale}) check_f32(*t, "policy_tokens input");
  TORCH_CHECK(logp.dim() == 2, "fastalign: logp must be [R, T], got ", logp.sizes());
  const int64_t rows = logp.size(0), len = logp.size(1);
  check_numel(old_logp, logp.numel(), "old_logp");
  check_numel(mask, logp.numel(), "mask");
  const bool adv_per_token = adv.dim() == 2 && adv.numel() == logp.numel();
  TORCH_CHECK(adv_per_token || (adv.dim() == 1 && adv.numel() == rows), "fastalign: advantages must be [R] or [R, T]");
  const bool scale_per_token = scale.dim() == 2 && scale.numel() == logp.numel();
  TORCH_CHECK(scale_per_token || (scale.dim() == 1 && scale.numel() == rows), "fastalign: scale must be [R] or [R, T]");
  TORCH_CHECK(beta <= 0.0 || (ref_logp.has_value() && ref_logp->defined()), "fastalign: ref_logp is required when beta > 0");
  const float* ref = beta > 0.0 ? optional_f32(ref_logp, logp.numel(), "ref_logp") : nullptr;
  PolicyConfig config = policy_config(beta, kl_kind, clip_low, clip_high);
  config.level = check_code(level, kImportanceLevels, "importance_sampling_level");
  config.objective = check_code(objective, kPolicyObjectives, "objective");
  config.cispo_cap = static_cast<float>(clip_high);
  config.delta = static_cast<float>(delta);
  config.dual_clip = static_cast<float>(dual_clip);
  config.kl_bias_correction = kl_bias_correction;
  TORCH_CHECK(config.level == kLevelToken || (row_log_ratio.has_value() && row_log_ratio->defined()),
              "fastalign: row_log_ratio [R] is required unless importance_sampling_level is token");
  const float* row_lr =
      config.level != kLevelToken ? optional_f32(row_log_ratio, rows, "row_log_ratio") : nullptr;
  const float* tw = token_weights.has_value() && token_weights->defined()
                        ? optional_f32(token_weights, logp.numel(), "token_weights")
                        : nullptr;
  Tensor loss = scalar_f32(logp), sums = at::empty({rows, 4}, logp.options()), d_logp = at::empty_like(logp);
  Tensor d_adv = advantages_grad ? at::empty_like(adv) : at::empty({0}, adv.options());
  Tensor d_row = at::empty({rows}, logp.options());
  cpu::policy_tokens(logp.data_ptr<float>(), old_logp.data_ptr<float>(), adv.data_ptr<float>(), adv_per_token,
                     mask.data_ptr<float>(), ref, scale.data_ptr<float>(), scale_per_token, rows, len, config,
                     loss.data_ptr<float>(), sums.data_ptr<float>(), d_logp.data_ptr<float>(),
                     advantages_grad ? d_adv.data_ptr<float>() : nullptr, row_lr, tw, d_row.data_ptr<float>());
  return {loss, sums, d_logp, d_adv, d_row};
}

// ------------------------------------------------------------ off-policy corrections (issue 12)
Tensor rollout_is_weights_cpu(const Tensor& old_logp, const Tensor& rollout_logp, const Tensor& mask, int64_t mode,
                              double low, double high) {
  for (const Tensor* t : {&old_logp, &rollout_logp, &mask}) check_f32(*t, "rollout_is_weights input");
  TORCH_CHECK(old_logp.dim() == 2, "fastalign: old_logp must be [B, T], got ", old_logp.sizes());
  check_numel(rollout_logp, old_logp.numel(), "rollout_logp");
  check_numel(mask, old_logp.numel(), "mask");
  Tensor out = at::empty_like(old_logp);
  cpu::rollout_is_weights(old_logp.data_ptr<float>(), rollout_logp.data_ptr<float>(), mask.data_ptr<float>(),
                          old_logp.size(0), old_logp.size(1), check_code(mode, kRolloutIsModes, "mode"),
                          static_cast<float>(low), static_cast<float>(high), out.data_ptr<float>());
  return out;
}

Tensor off_policy_mask_cpu(const Tensor& logp, const Tensor& sampling_logp, const Tensor& adv, const Tensor& mask,
                           double threshold) {
  for (const Tensor* t : {&logp, &sampling_logp, &adv, &mask}) check_f32(*t, "off_policy_mask input");
  TORCH_CHECK(logp.dim() == 2, "fastalign: logp must be [B, T], got ", logp.sizes());
  check_numel(sampling_logp, logp.numel(), "sampling_logp");
  check_numel(mask, logp.numel(), "mask");
  check_numel(adv, logp.size(0), "advantages");
  Tensor out = at::empty({logp.size(0)}, logp.options());
  cpu::off_policy_mask(logp.data_ptr<float>(), sampling_logp.data_ptr<float>(), adv.data_ptr<float>(),
                       mask.data_ptr<float>(), logp.size(0), logp.size(1), static_cast<float>(threshold),
                       out.data_ptr<float>());
  return out;
}

void check_value_inputs(const Tensor& values, const Tensor& old_values, const Tensor& returns, const Tensor& mask) {
  for (const Tensor* t : {&values, &old_values, &returns, &mask}) {
    check_f32(*t, "value_loss input");
    check_numel(*t, values.numel(), "value_loss input");
  }
}

std::tuple<Tensor, Tensor> value_loss_fwd_cpu(const Tensor& values, const Tensor& old_values, const Tensor& returns,
                                              const Tensor& mask, double clip) {
  check_value_inputs(values, old_values, returns, mask);
  Tensor loss = scalar_f32(values), metrics = at::empty({2}, values.options());
  cpu::value_loss_forward(values.data_ptr<float>(), old_values.data_ptr<float>(), returns.data_ptr<float>(),
                          mask.data_ptr<float>(), values.numel(), static_cast<float>(clip), loss.data_ptr<float>(),
                          metrics.data_ptr<float>());
  return {loss, metrics};
}

Tensor value_loss_bwd_cpu(const Tensor& grad_loss, const Tensor& values, const Tensor& old_values,
                          const Tensor& returns, const Tensor& mask, double clip) {
  check_value_inputs(values, old_values, returns, mask);
  check_f32(grad_loss, "grad_loss");
  check_numel(grad_loss, 1, "grad_loss");
  Tensor d_values = at::empty_like(values);
  cpu::value_loss_backward(grad_loss.data_ptr<float>(), values.data_ptr<float>(), old_values.data_ptr<float>(),
                           returns.data_ptr<float>(), mask.data_ptr<float>(), values.numel(), static_cast<float>(clip),
                           d_values.data_ptr<float>());
  return d_values;
}

std::tuple<Tensor, Tensor, Tensor> dpo_fwd_cpu(const Tensor& pc, const Tensor& pr, const Tensor& rc, const Tensor& rr,
                                               double beta, int64_t loss_type, double label_smoothing) {
  check_pairs({&pc, &pr, &rc, &rr});
  Tensor losses = at::empty_like(pc), chosen = at::empty_like(pc), rejected = at::empty_like(pc);
  cpu::dpo_forward(pc.data_ptr<float>(), pr.data_ptr<float>(), rc.data_ptr<float>(), rr.data_ptr<float>(), pc.numel(),
                   static_cast<float>(beta), check_code(loss_type, kDpoLossTypes, "dpo loss_type"), static_cast<float>(label_smoothing),
                   losses.data_ptr<float>(), chosen.data_ptr<float>(), rejected.data_ptr<float>());
  return {losses, chosen, rejected};
}

Tensor dpo_bwd_cpu(const Tensor& grad, const Tensor& pc, const Tensor& pr, const Tensor& rc, const Tensor& rr,
                   double beta, int64_t loss_type, double label_smoothing) {
  check_pairs({&grad, &pc, &pr, &rc, &rr});
  Tensor d_chosen = at::empty_like(pc);
  cpu::dpo_backward(grad.data_ptr<float>(), pc.data_ptr<float>(), pr.data_ptr<float>(), rc.data_ptr<float>(),
                    rr.data_ptr<float>(), pc.numel(), static_cast<float>(beta), check_code(loss_type, kDpoLossTypes, "dpo loss_type"),
                    static_cast<float>(label_smoothing), d_chosen.data_ptr<float>());
  return d_chosen;
}

std::tuple<Tensor, Tensor, Tensor> simpo_fwd_cpu(const Tensor& chosen, const Tensor& rejected, double beta,
                                                 double gamma, double label_smoothing) {
  check_pairs({&chosen, &rejected});
  Tensor losses = at::empty_like(chosen), cr = at::empty_like(chosen), rr = at::empty_like(chosen);
  cpu::simpo_forward(chosen.data_ptr<float>(), rejected.data_ptr<float>(), chosen.numel(), static_cast<float>(beta),
                     static_cast<float>(gamma), static_cast<float>(label_smoothing), losses.data_ptr<float>(),
                     cr.data_ptr<float>(), rr.data_ptr<float>());
  return {losses, cr, rr};
}

Tensor simpo_bwd_cpu(const Tensor& grad, const Tensor& chosen, const Tensor& rejected, double beta, double gamma,
                     double label_smoothing) {
  check_pairs({&grad, &chosen, &rejected});
  Tensor d_chosen = at::empty_like(chosen);
  cpu::simpo_backward(grad.data_ptr<float>(), chosen.data_ptr<float>(), rejected.data_ptr<float>(), chosen.numel(),
                      static_cast<float>(beta), static_cast<float>(gamma), static_cast<float>(label_smoothing),
                      d_chosen.data_ptr<float>());
  return d_chosen;
}

// ---- D2O, KTO, ORPO, CPO (issue 13): float32 [B] (D2O's samples [B, K]) in, fp32 out.
std::tuple<Tensor, Tensor, Tensor> d2o_fwd_cpu(const Tensor& ps, const Tensor& rs, const Tensor& pn, const Tensor& rn,
                                               double beta, double alpha) {
  check_f32(ps, "policy_sample_logps");
  check_f32(rs, "ref_sample_logps");
  TORCH_CHECK(ps.dim() == 2 && rs.sizes() == ps.sizes(), "fastalign: sample log-probs must both be [B, K], got ",
              ps.sizes(), " and ", rs.sizes());
  const int64_t n = ps.size(0), k = ps.size(1);
  check_pairs({&pn, &rn});
  check_numel(pn, n, "negative log-probs");
  Tensor losses = at::empty_like(pn), sample = at::empty_like(pn), negative = at::empty_like(pn);
  cpu::d2o_forward(ps.data_ptr<float>(), rs.data_ptr<float>(), pn.data_ptr<float>(), rn.data_ptr<float>(), n, k,
                   static_cast<float>(beta), static_cast<float>(alpha), losses.data_ptr<float>(),
                   sample.data_ptr<float>(), negative.data_ptr<float>());
  return {losses, sample, negative};
}

std::tuple<Tensor, Tensor> d2o_bwd_cpu(const Tensor& grad, const Tensor& sample_rewards,
                                       const Tensor& negative_rewards, int64_t k, double beta, double alpha) {
  check_pairs({&grad, &sample_rewards, &negative_rewards});
  TORCH_CHECK(k >= 1, "fastalign: d2o K must be >= 1, got ", k);
  const int64_t n = grad.numel();
  Tensor d_samples = at::empty({n, k}, grad.options()), d_negative = at::empty_like(grad);
  cpu::d2o_backward(grad.data_ptr<float>(), sample_rewards.data_ptr<float>(), negative_rewards.data_ptr<float>(), n,
                    k, static_cast<float>(beta), static_cast<float>(alpha), d_samples.data_ptr<float>(),
                    d_negative.data_ptr<float>());
  return {d_samples, d_negative};
}

float kl_ref_value(const Tensor& kl_ref) {
  check_f32(kl_ref, "kl_ref");
  check_numel(kl_ref, 1, "kl_ref");
  return kl_ref.data_ptr<float>()[0];
}

std::tuple<Tensor, Tensor> kto_fwd_cpu(const Tensor& policy, const Tensor& ref, const Tensor& desirable,
                                       const Tensor& kl_ref, double beta, double desirable_weight,
                                       double undesirable_weight) {
  check_pairs({&policy, &ref, &desirable});
  Tensor losses = at::empty_like(policy), rewards = at::empty_like(policy);
  cpu::kto_forward(policy.data_ptr<float>(), ref.data_ptr<float>(), desirable.data_ptr<float>(), kl_ref_value(kl_ref),
                   policy.numel(), static_cast<float>(beta), static_cast<float>(desirable_weight),
                   static_cast<float>(undesirable_weight), losses.data_ptr<float>(), rewards.data_ptr<float>());
  return {losses, rewards};
}

Tensor kto_bwd_cpu(const Tensor& grad, const Tensor& policy, const Tensor& ref, const Tensor& desirable,
                   const Tensor& kl_ref, double beta, double desirable_weight, double undesirable_weight) {
  check_pairs({&grad, &policy, &ref, &desirable});
  Tensor d_policy = at::empty_like(policy);
  cpu::kto_backward(grad.data_ptr<float>(), policy.data_ptr<float>(), ref.data_ptr<float>(),
                    desirable.data_ptr<float>(), kl_ref_value(kl_ref), policy.numel(), static_cast<float>(beta),
                    static_cast<float>(desirable_weight), static_cast<float>(undesirable_weight),
                    d_policy.data_ptr<float>());
  return d_policy;
}

std::tuple<Tensor, Tensor> orpo_fwd_cpu(const Tensor& chosen, const Tensor& rejected, double beta) {
  check_pairs({&chosen, &rejected});
  Tensor losses = at::empty_like(chosen), log_odds = at::empty_like(chosen);
  cpu::orpo_forward(chosen.data_ptr<float>(), rejected.data_ptr<float>(), chosen.numel(), static_cast<float>(beta),
                    losses.data_ptr<float>(), log_odds.data_ptr<float>());
  return {losses, log_odds};
}

std::tuple<Tensor, Tensor> orpo_bwd_cpu(const Tensor& grad, const Tensor& chosen, const Tensor& rejected,
                                        double beta) {
  check_pairs({&grad, &chosen, &rejected});
  Tensor d_chosen = at::empty_like(chosen), d_rejected = at::empty_like(chosen);
  cpu::orpo_backward(grad.data_ptr<float>(), chosen.data_ptr<float>(), rejected.data_ptr<float>(), chosen.numel(),
                     static_cast<float>(beta), d_chosen.data_ptr<float>(), d_rejected.data_ptr<float>());
  return {d_chosen, d_rejected};
}

// ---- end D2O, KTO, ORPO

std::tuple<Tensor, Tensor> bradley_terry_fwd_cpu(const Tensor& chosen, const Tensor& rejected,
                                                 const std::optional<Tensor>& margin, double margin_scalar,
                                                 double center_coef) {
  check_pairs({&chosen, &rejected});
  TORCH_CHECK(chosen.numel() > 0, "fastalign: bradley_terry needs at least one pair");
  const float* m = optional_f32(margin, chosen.numel(), "margin");
  Tensor loss = scalar_f32(chosen), metrics = at::empty({2}, chosen.options());
  cpu::bradley_terry_forward(chosen.data_ptr<float>(), rejected.data_ptr<float>(), m, static_cast<float>(margin_scalar),
                             chosen.numel(), static_cast<float>(center_coef), loss.data_ptr<float>(),
                             metrics.data_ptr<float>());
  return {loss, metrics};
}

std::tuple<Tensor, Tensor> bradley_terry_bwd_cpu(const Tensor& grad_loss, const Tensor& chosen, const Tensor& rejected,
                                                 const std::optional<Tensor>& margin, double margin_scalar,
                                                 double center_coef) {
  check_pairs({&chosen, &rejected});
  check_f32(grad_loss, "grad_loss");
  check_numel(grad_loss, 1, "grad_loss");
  const float* m = optional_f32(margin, chosen.numel(), "margin");
  Tensor d_chosen = at::empty_like(chosen), d_rejected = at::empty_like(chosen);
  cpu::bradley_terry_backward(grad_loss.data_ptr<float>(), chosen.data_ptr<float>(), rejected.data_ptr<float>(), m,
                              static_cast<float>(margin_scalar), chosen.numel(), static_cast<float>(center_coef),
                              d_chosen.data_ptr<float>(), d_rejected.data_ptr<float>());
  return {d_chosen, d_rejected};
}

// ---- steer_logits: inference only (no backward). Row strides are passed through, so slices such as
// logits[:, -1, :] need no copy; columns must be contiguous.
void check_steer_branch(const Tensor& t, const Tensor& value, int64_t dims, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastalign: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == value.scalar_type(), "fastalign: ", name, " must have value_logits' dtype ",
              value.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dims && t.size(dims - 2) == value.size(0) && t.size(dims - 1) == value.size(1),
              "fastalign: ", name, " must be [", dims == 3 ? "K, " : "", "B, V] with B, V of value_logits ",
              value.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.size(dims - 1) <= 1 || t.stride(dims - 1) == 1, "fastalign: ", name,
              " must have contiguous columns (stride 1 along V)");
}

Tensor steer_logits_cpu(const Tensor& value, const Tensor& base, const std::optional<Tensor>& negatives,
                        const Tensor& betas, double alpha, double temperature, double top_p, int64_t min_keep) {
  check_steer_branch(value, value, 2, "value_logits");
  check_steer_branch(base, value, 2, "base_logits");
  const bool has_neg = negatives.has_value() && negatives->defined() && negatives->size(0) > 0;
  const int64_t num_neg = has_neg ? negatives->size(0) : 0;
  if (has_neg) check_steer_branch(*negatives, value, 3, "negative_logits");
  check_f32(betas, "betas");
  check_numel(betas, num_neg, "betas");
  TORCH_CHECK(temperature > 0.0, "fastalign: temperature must be > 0, got ", temperature);
  TORCH_CHECK(min_keep >= 1, "fastalign: min_tokens_to_keep must be >= 1, got ", min_keep);
  const int64_t batch = value.size(0), vocab = value.size(1);
  Tensor out = at::empty({batch, vocab}, value.options().dtype(at::kFloat));
  if (batch == 0 || vocab == 0) return out;
  dispatch_float(value, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::steer_logits<T>(data_as<T>(value), value.stride(0), data_as<T>(base), base.stride(0),
                         has_neg ? data_as<T>(*negatives) : nullptr, has_neg ? negatives->stride(0) : 0,
                         has_neg ? negatives->stride(1) : 0, betas.data_ptr<float>(), num_neg, batch, vocab,
                         static_cast<float>(alpha), static_cast<float>(temperature),
                         top_p >= 1.0 ? 1.0f : static_cast<float>(top_p), min_keep, out.data_ptr<float>());
  });
  return out;
}

}  // namespace
}  // namespace fastalign

TORCH_LIBRARY(fastalign, m) {
  // steer_logits (fastalign/ops/native_steering.py): inference only, float32 [B, V] out.
  m.def(
      "steer_logits(Tensor value_logits, Tensor base_logits, Tensor? negative_logits, Tensor betas, float alpha, "
      "float temperature, float top_p, int min_tokens_to_keep) -> Tensor");
  // logprobs_fwd -> (logp, entropy, rel_lse): rel_lse = log-sum-exp minus the row max, for the backward.
  m.def("logprobs_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index) -> (Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_bwd(Tensor logits, Tensor labels, Tensor rel_lse, Tensor entropy, Tensor grad_logp, "
      "Tensor? grad_entropy, float temperature, int ignore_index) -> Tensor");
  m.def(
      "logprobs_bwd_(Tensor(a!) logits, Tensor labels, Tensor rel_lse, Tensor entropy, Tensor grad_logp, "
      "Tensor? grad_entropy, float temperature, int ignore_index) -> ()");
  m.def("first_non_binary(Tensor x) -> int");
  m.def("group_advantages(Tensor rewards, int group_size, int scale, float eps) -> Tensor");
  m.def("rloo_advantages(Tensor rewards, int group_size) -> Tensor");
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  // RL and preference ops (fastalign/ops/native_rl.py): float32 in, fp32 out; masks are float weights.
  m.def("group_advantages_bwd(Tensor grad, Tensor rewards, int group_size, int scale, float eps) -> Tensor");
  m.def("rloo_advantages_bwd(Tensor grad, int group_size) -> Tensor");
  m.def("gae_bwd(Tensor? grad_advantages, Tensor? grad_returns, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def("whiten_fwd(Tensor x, Tensor mask, bool shift_mean, float eps) -> (Tensor, Tensor)");
  m.def("whiten_bwd(Tensor grad, Tensor x, Tensor mask, Tensor stats, bool shift_mean) -> Tensor");
  m.def("kl_fwd(Tensor logp, Tensor ref_logp, int kind) -> Tensor");
  m.def("kl_bwd(Tensor grad, Tensor logp, Tensor ref_logp, int kind) -> Tensor");
  m.def("sequence_logprobs_fwd(Tensor token_logp, Tensor mask, bool average) -> Tensor");
  m.def("sequence_logprobs_bwd(Tensor grad, Tensor mask, bool average) -> Tensor");
  m.def(
      "policy_tokens(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, Tensor? ref_logp, Tensor scale, "
      "float beta, int kl_kind, float clip_low, float clip_high, bool advantages_grad, Tensor? row_log_ratio, "
      "Tensor? token_weights, int level, int objective, float delta, float dual_clip, bool kl_bias_correction) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("rollout_is_weights(Tensor old_logp, Tensor rollout_logp, Tensor mask, int mode, float low, float high) -> Tensor");
  m.def("off_policy_mask(Tensor logp, Tensor sampling_logp, Tensor advantages, Tensor mask, float threshold) -> Tensor");
  m.def("value_loss_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float clip) -> (Tensor, Tensor)");
  m.def(
      "value_loss_bwd(Tensor grad_loss, Tensor values, Tensor old_values, Tensor returns, Tensor mask, float clip) "
      "-> Tensor");
  m.def(
      "dpo_fwd(Tensor policy_chosen, Tensor policy_rejected, Tensor ref_chosen, Tensor ref_rejected, float beta, "
      "int loss_type, float label_smoothing) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dpo_bwd(Tensor grad, Tensor policy_chosen, Tensor policy_rejected, Tensor ref_chosen, Tensor ref_rejected, "
      "float beta, int loss_type, float label_smoothing) -> Tensor");
  m.def("simpo_fwd(Tensor chosen, Tensor rejected, float beta, float gamma, float label_smoothing) -> (Tensor, Tensor, Tensor)");
  m.def("simpo_bwd(Tensor grad, Tensor chosen, Tensor rejected, float beta, float gamma, float label_smoothing) -> Tensor");
  m.def(
      "bradley_terry_fwd(Tensor chosen, Tensor rejected, Tensor? margin, float margin_scalar, float center_coef) "
      "-> (Tensor, Tensor)");
  m.def(
      "bradley_terry_bwd(Tensor grad_loss, Tensor chosen, Tensor rejected, Tensor? margin, float margin_scalar, "
      "float center_coef) -> (Tensor, Tensor)");
  // D2O, KTO, ORPO, CPO (issue 13; fastalign/ops/preference/cpu.py).
  m.def("d2o_fwd(Tensor policy_samples, Tensor ref_samples, Tensor policy_negative, Tensor ref_negative, float beta, "
        "float alpha) -> (Tensor, Tensor, Tensor)");
  m.def("d2o_bwd(Tensor grad, Tensor sample_rewards, Tensor negative_rewards, int k, float beta, float alpha) "
        "-> (Tensor, Tensor)");
  m.def("kto_fwd(Tensor policy, Tensor ref, Tensor desirable, Tensor kl_ref, float beta, float desirable_weight, "
        "float undesirable_weight) -> (Tensor, Tensor)");
  m.def("kto_bwd(Tensor grad, Tensor policy, Tensor ref, Tensor desirable, Tensor kl_ref, float beta, "
        "float desirable_weight, float undesirable_weight) -> Tensor");
  m.def("orpo_fwd(Tensor chosen, Tensor rejected, float beta) -> (Tensor, Tensor)");
  m.def("orpo_bwd(Tensor grad, Tensor chosen, Tensor rejected, float beta) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastalign, CPU, m) {
  m.impl("steer_logits", &fastalign::steer_logits_cpu);
  m.impl("logprobs_fwd", &fastalign::logprobs_fwd_cpu);
  m.impl("logprobs_bwd", &fastalign::logprobs_bwd_cpu);
  m.impl("logprobs_bwd_", &fastalign::logprobs_bwd_inplace_cpu);
  m.impl("first_non_binary", &fastalign::first_non_binary_cpu);
  m.impl("group_advantages", &fastalign::group_advantages_cpu);
  m.impl("rloo_advantages", &fastalign::rloo_advantages_cpu);
  m.impl("gae", &fastalign::gae_cpu);
  m.impl("group_advantages_bwd", &fastalign::group_advantages_bwd_cpu);
  m.impl("rloo_advantages_bwd", &fastalign::rloo_advantages_bwd_cpu);
  m.impl("gae_bwd", &fastalign::gae_bwd_cpu);
  m.impl("whiten_fwd", &fastalign::whiten_fwd_cpu);
  m.impl("whiten_bwd", &fastalign::whiten_bwd_cpu);
  m.impl("kl_fwd", &fastalign::kl_fwd_cpu);
  m.impl("kl_bwd", &fastalign::kl_bwd_cpu);
  m.impl("sequence_logprobs_fwd", &fastalign::sequence_logprobs_fwd_cpu);
  m.impl("sequence_logprobs_bwd", &fastalign::sequence_logprobs_bwd_cpu);
  m.impl("policy_tokens", &fastalign::policy_tokens_cpu);
  m.impl("rollout_is_weights", &fastalign::rollout_is_weights_cpu);
  m.impl("off_policy_mask", &fastalign::off_policy_mask_cpu);
  m.impl("value_loss_fwd", &fastalign::value_loss_fwd_cpu);
  m.impl("value_loss_bwd", &fastalign::value_loss_bwd_cpu);
  m.impl("dpo_fwd", &fastalign::dpo_fwd_cpu);
  m.impl("dpo_bwd", &fastalign::dpo_bwd_cpu);
  m.impl("simpo_fwd", &fastalign::simpo_fwd_cpu);
  m.impl("simpo_bwd", &fastalign::simpo_bwd_cpu);
  m.impl("bradley_terry_fwd", &fastalign::bradley_terry_fwd_cpu);
  m.impl("bradley_terry_bwd", &fastalign::bradley_terry_bwd_cpu);
  m.impl("d2o_fwd", &fastalign::d2o_fwd_cpu);
  m.impl("d2o_bwd", &fastalign::d2o_bwd_cpu);
  m.impl("kto_fwd", &fastalign::kto_fwd_cpu);
  m.impl("kto_bwd", &fastalign::kto_bwd_cpu);
  m.impl("orpo_fwd", &fastalign::orpo_fwd_cpu);
  m.impl("orpo_bwd", &fastalign::orpo_bwd_cpu);
}

// The Python module: importing fastalign._C runs the registrations above.
namespace {

#ifdef FASTALIGN_WITH_CUDA
constexpr bool kCudaBuilt = true;
#else
constexpr bool kCudaBuilt = false;
#endif

PyObject* cuda_built(PyObject*, PyObject*) { return PyBool_FromLong(kCudaBuilt ? 1 : 0); }

PyMethodDef methods[] = {
    {"cuda_built", cuda_built, METH_NOARGS, "Whether the CUDA kernels were compiled into this build."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastalign native kernels (torch.ops.fastalign)", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
