// The argument checks every op's torch binding shares (csrc/bindings.cpp and each csrc/ops/<op>.cpp):
// a bad tensor is a Python error naming the argument, never a read out of bounds in a kernel.
#pragma once

#include <initializer_list>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastalign {
namespace checks {

using at::Tensor;

// Kind codes come from the Python enums (fastalign/ops/*/spec.py); one the kernels do not know is an
// error here, never some other formula in a switch's default branch.
inline int check_code(int64_t code, int count, const char* name) {
  TORCH_CHECK(code >= 0 && code < count, "fastalign: ", name, " must be a code in [0, ", count, "), got ", code);
  return static_cast<int>(code);
}

inline void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastalign: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "fastalign: ", name, " must be contiguous");
}

inline void check_float32(const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastalign: ", name, " must be float32, got ", t.scalar_type());
}

// RL and preference ops take float32 (the Python wrappers upcast [B, T]-sized bf16/fp16 tensors).
inline void check_f32(const Tensor& t, const char* name) {
  check_cpu(t, name);
  check_float32(t, name);
}

inline void check_numel(const Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.numel() == numel, "fastalign: ", name, " must have ", numel, " elements, got ", t.numel());
}

// Per-pair inputs of a preference loss: float32, CPU, contiguous, one value per pair each.
inline void check_pairs(std::initializer_list<const Tensor*> ts) {
  const int64_t n = (*ts.begin())->numel();
  for (const Tensor* t : ts) {
    check_f32(*t, "pair input");
    check_numel(*t, n, "pair input");
  }
}

}  // namespace checks
}  // namespace fastalign
