// CUDA implementations of the fastalign ops that have CUDA kernels (csrc/cuda): the scans and
// segmented reductions. Compiled by the host compiler, only when setup.py builds CUDA
// (-DFASTALIGN_WITH_CUDA). The kernels are torch-free; this file checks tensors, allocates
// outputs and hands raw pointers plus the current stream to the launchers in cuda/kernels.cuh.
// The op schemas are declared once, in bindings.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/kernels.cuh"

namespace fastalign {
namespace {

using at::Tensor;

void check_cuda_f32(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastalign: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "fastalign: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastalign: ", name, " must be float32, got ", t.scalar_type());
}

void check_same_device(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "fastalign: ", name, " must be on ", ref.device(), ", got ", t.device());
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "fastalign: CUDA kernel ", op, " failed: ", cudaGetErrorString(status));
}

// c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream names (ATen/cuda/CUDAContext.h
// re-exports it), without CUDAContext.h's cuBLAS/cuSPARSE includes.
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_groups(const Tensor& rewards, int64_t group_size, int64_t minimum) {
  check_cuda_f32(rewards, "rewards");
  TORCH_CHECK(group_size >= minimum && rewards.numel() % group_size == 0, "fastalign: group_size must be >= ",
              minimum, " and divide the number of rewards (", rewards.numel(), "), got ", group_size);
}

Tensor workspace(const Tensor& rewards, int64_t group_size) {
  return at::empty({gpu::group_advantages_workspace(rewards.numel(), group_size)}, rewards.options());
}

Tensor group_advantages_cuda(const Tensor& rewards, int64_t group_size, int64_t scale, double eps) {
  check_groups(rewards, group_size, 1);
  const c10::cuda::CUDAGuard guard(rewards.device());
  Tensor out = at::empty_like(rewards), ws = workspace(rewards, group_size);
  check_launch(gpu::group_advantages(rewards.data_ptr<float>(), out.data_ptr<float>(), ws.data_ptr<float>(),
                                     rewards.numel(), group_size, static_cast<int>(scale), static_cast<float>(eps),
                                     current_stream()),
               "group_advantages");
  return out;
}

Tensor group_advantages_bwd_cuda(const Tensor& grad, const Tensor& rewards, int64_t group_size, int64_t scale,
                                 double eps) {
  check_groups(rewards, group_size, 1);
  check_cuda_f32(grad, "grad");
  check_same_device(grad, rewards, "grad");
  TORCH_CHECK(grad.numel() == rewards.numel(), "fastalign: grad must have ", rewards.numel(), " elements");
  const c10::cuda::CUDAGuard guard(rewards.device());
  Tensor d_rewards = at::empty_like(rewards), ws = workspace(rewards, group_size);
  check_launch(gpu::group_advantages_backward(rewards.data_ptr<float>(), grad.data_ptr<float>(),
                                              d_rewards.data_ptr<float>(), ws.data_ptr<float>(), rewards.numel(),
                                              group_size, static_cast<int>(scale), static_cast<float>(eps),
                                              current_stream()),
               "group_advantages_bwd");
  return d_rewards;
}

Tensor rloo_advantages_cuda(const Tensor& rewards, int64_t group_size) {
  check_groups(rewards, group_size, 2);
  const c10::cuda::CUDAGuard guard(rewards.device());
  Tensor out = at::empty_like(rewards);
  check_launch(gpu::rloo_advantages(rewards.data_ptr<float>(), out.data_ptr<float>(), rewards.numel(), group_size,
                                    current_stream()),
               "rloo_advantages");
  return out;
}

// RLOO is linear and symmetric: its backward is the forward applied to the gradient.
Tensor rloo_advantages_bwd_cuda(const Tensor& grad, int64_t group_size) { return rloo_advantages_cuda(grad, group_size); }

std::tuple<Tensor, Tensor> gae_cuda(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma,
                                    double lam) {
  check_cuda_f32(rewards, "rewards");
  check_cuda_f32(values, "values");
  check_cuda_f32(mask, "mask");
  check_same_device(values, rewards, "values");
  check_same_device(mask, rewards, "mask");
  TORCH_CHECK(rewards.dim() == 2 && values.sizes() == rewards.sizes() && mask.sizes() == rewards.sizes(),
              "fastalign: gae inputs must share one [B, T] shape");
  const c10::cuda::CUDAGuard guard(rewards.device());
  Tensor adv = at::empty_like(rewards), ret = at::empty_like(rewards);
  check_launch(gpu::gae(rewards.data_ptr<float>(), values.data_ptr<float>(), mask.data_ptr<float>(),
                        adv.data_ptr<float>(), ret.data_ptr<float>(), rewards.size(0), rewards.size(1),
                        static_cast<float>(gamma), static_cast<float>(gamma * lam), current_stream()),
               "gae");
  return {adv, ret};
}

const float* optional_grad(const std::optional<Tensor>& grad, const Tensor& mask, const char* name) {
  if (!grad.has_value() || !grad->defined()) return nullptr;
  check_cuda_f32(*grad, name);
  check_same_device(*grad, mask, name);
  TORCH_CHECK(grad->numel() == mask.numel(), "fastalign: ", name, " must have ", mask.numel(), " elements");
  return grad->data_ptr<float>();
}

std::tuple<Tensor, Tensor> gae_bwd_cuda(const std::optional<Tensor>& grad_adv, const std::optional<Tensor>& grad_ret,
                                        const Tensor& mask, double gamma, double lam) {
  check_cuda_f32(mask, "mask");
  TORCH_CHECK(mask.dim() == 2, "fastalign: gae mask must be [B, T], got ", mask.sizes());
  const float* g_adv = optional_grad(grad_adv, mask, "grad_advantages");
  const float* g_ret = optional_grad(grad_ret, mask, "grad_returns");
  const c10::cuda::CUDAGuard guard(mask.device());
  Tensor d_rewards = at::empty_like(mask), d_values = at::empty_like(mask);
  check_launch(gpu::gae_backward(g_adv, g_ret, mask.data_ptr<float>(), d_rewards.data_ptr<float>(),
                                 d_values.data_ptr<float>(), mask.size(0), mask.size(1), static_cast<float>(gamma),
                                 static_cast<float>(gamma * lam), current_stream()),
               "gae_bwd");
  return {d_rewards, d_values};
}

Tensor sequence_logprobs_fwd_cuda(const Tensor& token_logp, const Tensor& mask, bool average) {
  check_cuda_f32(token_logp, "token_logp");
  check_cuda_f32(mask, "mask");
  check_same_device(mask, token_logp, "mask");
  TORCH_CHECK(token_logp.dim() == 2 && mask.sizes() == token_logp.sizes(),
              "fastalign: token_logp and mask must be [B, T]");
  const c10::cuda::CUDAGuard guard(token_logp.device());
  Tensor out = at::empty({token_logp.size(0)}, token_logp.options());
  check_launch(gpu::sequence_logprobs_forward(token_logp.data_ptr<float>(), mask.data_ptr<float>(),
                                              out.data_ptr<float>(), token_logp.size(0), token_logp.size(1), average,
                                              current_stream()),
               "sequence_logprobs_fwd");
  return out;
}

Tensor sequence_logprobs_bwd_cuda(const Tensor& grad, const Tensor& mask, bool average) {
  check_cuda_f32(grad, "grad");
  check_cuda_f32(mask, "mask");
  check_same_device(grad, mask, "grad");
  TORCH_CHECK(mask.dim() == 2 && grad.numel() == mask.size(0), "fastalign: grad must be [B] for a [B, T] mask");
  const c10::cuda::CUDAGuard guard(mask.device());
  Tensor d_logp = at::empty_like(mask);
  check_launch(gpu::sequence_logprobs_backward(grad.data_ptr<float>(), mask.data_ptr<float>(),
                                               d_logp.data_ptr<float>(), mask.size(0), mask.size(1), average,
                                               current_stream()),
               "sequence_logprobs_bwd");
  return d_logp;
}

}  // namespace
}  // namespace fastalign

TORCH_LIBRARY_IMPL(fastalign, CUDA, m) {
  m.impl("group_advantages", &fastalign::group_advantages_cuda);
  m.impl("group_advantages_bwd", &fastalign::group_advantages_bwd_cuda);
  m.impl("rloo_advantages", &fastalign::rloo_advantages_cuda);
  m.impl("rloo_advantages_bwd", &fastalign::rloo_advantages_bwd_cuda);
  m.impl("gae", &fastalign::gae_cuda);
  m.impl("gae_bwd", &fastalign::gae_bwd_cuda);
  m.impl("sequence_logprobs_fwd", &fastalign::sequence_logprobs_fwd_cuda);
  m.impl("sequence_logprobs_bwd", &fastalign::sequence_logprobs_bwd_cuda);
}
