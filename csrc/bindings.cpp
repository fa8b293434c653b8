// Registers every fastalign op with the PyTorch dispatcher (TORCH_LIBRARY), so the ops are torch
// custom ops that autograd wrappers and torch.compile can call. The kernels themselves are
// torch-free (csrc/cpu, csrc/cuda); this file only checks tensors and hands over raw pointers.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu/kernels.h"

namespace fastalign {
namespace {

using at::Tensor;

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastalign: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "fastalign: ", name, " must be contiguous");
}

void check_float32(const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastalign: ", name, " must be float32, got ", t.scalar_type());
}

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
  Tensor logp = at::empty({n}, opts), entropy = at::empty({n}, opts), lse = at::empty({n}, opts);
  dispatch_float(logits, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::logprobs_forward<T>(data_as<T>(logits), labels.data_ptr<int64_t>(), n, vocab,
                             static_cast<float>(temperature), ignore_index, logp.data_ptr<float>(),
                             entropy.data_ptr<float>(), lse.data_ptr<float>());
  });
  return {logp, entropy, lse};
}

void logprobs_bwd_into(const Tensor& logits, const Tensor& labels, const Tensor& lse, const Tensor& entropy,
                       const Tensor& grad_logp, const std::optional<Tensor>& grad_entropy, double temperature,
                       int64_t ignore_index, const Tensor& grad) {
  check_logprobs_inputs(logits, labels);
  for (const Tensor* t : {&lse, &entropy, &grad_logp}) {
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
    cpu::logprobs_backward<T>(data_as<T>(logits), labels.data_ptr<int64_t>(), lse.data_ptr<float>(),
                              entropy.data_ptr<float>(), grad_logp.data_ptr<float>(), g_ent, n, vocab,
                              static_cast<float>(temperature), ignore_index, data_as<T>(grad));
  });
}

Tensor logprobs_bwd_cpu(const Tensor& logits, const Tensor& labels, const Tensor& lse, const Tensor& entropy,
                        const Tensor& grad_logp, const std::optional<Tensor>& grad_entropy, double temperature,
                        int64_t ignore_index) {
  Tensor grad = at::empty_like(logits);
  logprobs_bwd_into(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, grad);
  return grad;
}

void logprobs_bwd_inplace_cpu(const Tensor& logits, const Tensor& labels, const Tensor& lse, const Tensor& entropy,
                              const Tensor& grad_logp, const std::optional<Tensor>& grad_entropy, double temperature,
                              int64_t ignore_index) {
  logprobs_bwd_into(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, logits);
}

Tensor group_advantages_cpu(const Tensor& rewards, int64_t group_size, int64_t scale, double eps) {
  check_cpu(rewards, "rewards");
  check_float32(rewards, "rewards");
  TORCH_CHECK(group_size >= 1 && rewards.numel() % group_size == 0, "fastalign: group_size must divide rewards");
  Tensor out = at::empty_like(rewards);
  cpu::group_advantages(rewards.data_ptr<float>(), out.data_ptr<float>(), rewards.numel(), group_size,
                        static_cast<int>(scale), static_cast<float>(eps));
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
           static_cast<float>(lam));
  return {adv, ret};
}

}  // namespace
}  // namespace fastalign

TORCH_LIBRARY(fastalign, m) {
  m.def("logprobs_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index) -> (Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_bwd(Tensor logits, Tensor labels, Tensor lse, Tensor entropy, Tensor grad_logp, "
      "Tensor? grad_entropy, float temperature, int ignore_index) -> Tensor");
  m.def(
      "logprobs_bwd_(Tensor(a!) logits, Tensor labels, Tensor lse, Tensor entropy, Tensor grad_logp, "
      "Tensor? grad_entropy, float temperature, int ignore_index) -> ()");
  m.def("group_advantages(Tensor rewards, int group_size, int scale, float eps) -> Tensor");
  m.def("rloo_advantages(Tensor rewards, int group_size) -> Tensor");
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastalign, CPU, m) {
  m.impl("logprobs_fwd", &fastalign::logprobs_fwd_cpu);
  m.impl("logprobs_bwd", &fastalign::logprobs_bwd_cpu);
  m.impl("logprobs_bwd_", &fastalign::logprobs_bwd_inplace_cpu);
  m.impl("group_advantages", &fastalign::group_advantages_cpu);
  m.impl("rloo_advantages", &fastalign::rloo_advantages_cpu);
  m.impl("gae", &fastalign::gae_cpu);
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
