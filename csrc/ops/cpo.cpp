// CPO (Xu et al., 2024): the preference term -(1-ε)·log σ(β(c - r)) - ε·log σ(-β(c - r)) per pair, on the
// average log-probs, no reference (fastalign/ops/preference/spec.py: cpo_loss). One file holds the op's
// CPU loops and its registration with the dispatcher (TORCH_LIBRARY_FRAGMENT): a new op is a new file
// here, with no shared C++ file to edit (README, "Cost of change").
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../common/rl_math.h"
#include "checks.h"

namespace fastalign {
namespace {

using at::Tensor;
constexpr int64_t kParallelMin = int64_t(1) << 18;  // elements below which threads cost more than they save

Tensor cpo_fwd_cpu(const Tensor& chosen, const Tensor& rejected, double beta, double label_smoothing) {
  checks::check_pairs({&chosen, &rejected});
  Tensor losses = at::empty_like(chosen);
  const float *c = chosen.data_ptr<float>(), *r = rejected.data_ptr<float>();
  float* out = losses.data_ptr<float>();
  const float b = static_cast<float>(beta), ls = static_cast<float>(label_smoothing);
  const int64_t n = chosen.numel();
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float x = b * (c[i] - r[i]);
    out[i] = -(1.0f - ls) * log_sigmoid(x) - ls * log_sigmoid(-x);
  }
  return losses;
}

// d loss / d chosen; d loss / d rejected is its negative (the Python wrapper returns both).
Tensor cpo_bwd_cpu(const Tensor& grad, const Tensor& chosen, const Tensor& rejected, double beta,
                   double label_smoothing) {
  checks::check_pairs({&grad, &chosen, &rejected});
  Tensor d_chosen = at::empty_like(chosen);
  const float *g = grad.data_ptr<float>(), *c = chosen.data_ptr<float>(), *r = rejected.data_ptr<float>();
  float* out = d_chosen.data_ptr<float>();
  const float b = static_cast<float>(beta), ls = static_cast<float>(label_smoothing);
  const int64_t n = chosen.numel();
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float x = b * (c[i] - r[i]);
    out[i] = g[i] * b * (-(1.0f - ls) * sigmoid(-x) + ls * sigmoid(x));
  }
  return d_chosen;
}

}  // namespace
}  // namespace fastalign

TORCH_LIBRARY_FRAGMENT(fastalign, m) {
  m.def("cpo_fwd(Tensor chosen, Tensor rejected, float beta, float label_smoothing) -> Tensor");
  m.def("cpo_bwd(Tensor grad, Tensor chosen, Tensor rejected, float beta, float label_smoothing) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastalign, CPU, m) {
  m.impl("cpo_fwd", &fastalign::cpo_fwd_cpu);
  m.impl("cpo_bwd", &fastalign::cpo_bwd_cpu);
}
