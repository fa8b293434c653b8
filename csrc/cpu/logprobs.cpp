// Row-parallel log-softmax gather, entropy and their gradient over materialized logits.

// GCC refuses to if-convert float compares (the clamps in exp_nonpositive) while FP exceptions
// may trap, which keeps the row loops scalar on AVX2. Nothing here reads FP exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <cstring>

#include "../common/logprobs_row.h"
#include "kernels.h"

// Compile the hot row loops for several x86 vector widths and pick one at load time, so a
// portable build still runs AVX-512/AVX2 code where the machine has it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FA_CLONES
#endif

namespace fastalign {
namespace cpu {
namespace {

template <typename T>
FA_CLONES RowForward forward_row(const T* z, int64_t vocab, float inv_temp, int64_t label) {
  return logprob_row_forward(z, vocab, inv_temp, label);
}

template <typename T>
FA_CLONES void backward_row(const T* z, T* grad, int64_t vocab, float inv_temp, int64_t label, float rel_lse,
                            float entropy, float g_logp, float g_ent) {
  logprob_row_backward_rel(z, grad, vocab, inv_temp, label, rel_lse, entropy, g_logp, g_ent);
}

}  // namespace

template <typename T>
void logprobs_forward(const T* logits, const int64_t* labels, int64_t n, int64_t vocab, float temperature,
                      int64_t ignore_index, float* logp, float* entropy, float* rel_lse) {
  const float inv_temp = 1.0f / temperature;
#pragma omp parallel for schedule(static) if (n * vocab > kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) {
    if (labels[i] == ignore_index) {
      logp[i] = 0.0f;
      entropy[i] = 0.0f;
      rel_lse[i] = 0.0f;
      continue;
    }
    const RowForward r = forward_row(logits + i * vocab, vocab, inv_temp, labels[i]);
    logp[i] = r.logp;
    entropy[i] = r.entropy;
    rel_lse[i] = r.rel_lse;
  }
}

template <typename T>
void logprobs_backward(const T* logits, const int64_t* labels, const float* rel_lse, const float* entropy,
                       const float* grad_logp, const float* grad_entropy, int64_t n, int64_t vocab,
                       float temperature, int64_t ignore_index, T* grad) {
  const float inv_temp = 1.0f / temperature;
#pragma omp parallel for schedule(static) if (n * vocab > kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) {
    T* g = grad + i * vocab;
    if (labels[i] == ignore_index) {
      std::memset(static_cast<void*>(g), 0, sizeof(T) * static_cast<size_t>(vocab));
      continue;
    }
    const float g_ent = grad_entropy ? grad_entropy[i] : 0.0f;
    backward_row(logits + i * vocab, g, vocab, inv_temp, labels[i], rel_lse[i], entropy[i], grad_logp[i], g_ent);
  }
}

#define FA_INSTANTIATE(T)                                                                                \
  template void logprobs_forward<T>(const T*, const int64_t*, int64_t, int64_t, float, int64_t, float*, \
                                    float*, float*);                                                     \
  template void logprobs_backward<T>(const T*, const int64_t*, const float*, const float*, const float*, \
                                     const float*, int64_t, int64_t, float, int64_t, T*);
FA_INSTANTIATE(float)
FA_INSTANTIATE(bf16_t)
FA_INSTANTIATE(fp16_t)
#undef FA_INSTANTIATE

}  // namespace cpu
}  // namespace fastalign
