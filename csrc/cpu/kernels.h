// CPU launchers (C++17 + OpenMP), torch-free: raw pointers and sizes in, results out.
#pragma once

#include <cstdint>

#include "../common/dtype.h"

namespace fastalign {
namespace cpu {

// logits [n, vocab] row-major; labels [n]. Rows whose label == ignore_index get logp = entropy = 0
// (lse is still written, for the backward).
template <typename T>
void logprobs_forward(const T* logits, const int64_t* labels, int64_t n, int64_t vocab, float temperature,
                      int64_t ignore_index, float* logp, float* entropy, float* lse);

// grad [n, vocab] (may alias logits). grad_entropy may be null. Ignored rows get 0.
template <typename T>
void logprobs_backward(const T* logits, const int64_t* labels, const float* lse, const float* entropy,
                       const float* grad_logp, const float* grad_entropy, int64_t n, int64_t vocab,
                       float temperature, int64_t ignore_index, T* grad);

void group_advantages(const float* rewards, float* out, int64_t n, int64_t group_size, int scale, float eps);
void rloo_advantages(const float* rewards, float* out, int64_t n, int64_t group_size);
void gae(const float* rewards, const float* values, const float* mask, float* adv, float* ret, int64_t batch,
         int64_t len, float gamma, float lam);

}  // namespace cpu
}  // namespace fastalign
