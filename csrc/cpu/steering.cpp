// steer_logits on the CPU: OpenMP over rows, the row math in ../common/steering_row.h.

// no-trapping-math, as in logprobs.cpp: lets GCC if-convert the float compares of the row loops
// (vectorize them). fp-contract=off: equal logits must get bit-equal exp values wherever they sit in
// the row, or the tie rule breaks; with contraction GCC fused multiply-adds in the vector body but
// not in the scalar remainder (measured: the last columns of a bf16 row got exp(-1) one ulp higher).
// Clang contracts per source expression, the same way in both paths.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
#endif

#include <vector>

#include "../common/steering_row.h"
#include "kernels.h"

// Compile the row loops for several x86 vector widths, picked at load time. `flatten` inlines the
// shared row functions into each clone: without it GCC calls one out-of-line, baseline-ISA copy
// from every clone (measured: the exp pass ran at SSE2 speed, 3x slower than the AVX-512 clone).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FA_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), flatten))
#else
#define FA_CLONES
#endif

namespace fastalign {
namespace cpu {
namespace {

template <typename T>
FA_CLONES void combine_row(const T* value, const T* base, const T* neg, int64_t neg_stride, int64_t num_neg,
                           const float* betas, int64_t vocab, float alpha, float temperature, float* out) {
  steer_row_combine(value, base, neg, neg_stride, num_neg, betas, vocab, alpha, temperature, out);
}

template <typename T>
FA_CLONES void mask_row(const T* value, int64_t vocab, float temperature, float top_p, int64_t min_keep, float* e,
                        float* buf, float* out) {
  const SteerExpRow row = steer_row_exp(value, vocab, temperature, e);
  const float threshold = steer_row_threshold(e, vocab, row, top_p, min_keep, buf);
  steer_row_apply_mask(e, threshold, vocab, out);
}

}  // namespace

template <typename T>
void steer_logits(const T* value, int64_t value_stride, const T* base, int64_t base_stride, const T* negatives,
                  int64_t neg_stride_k, int64_t neg_stride_b, const float* betas, int64_t num_neg, int64_t batch,
                  int64_t vocab, float alpha, float temperature, float top_p, int64_t min_keep, float* out) {
  const bool masked = top_p < 1.0f;
#pragma omp parallel if (batch * vocab * (num_neg + 2) > kParallelMinElements)
  {
    // Per-thread scratch: the value row's exp values and the threshold search's candidates.
    std::vector<float> e, buf;
    if (masked) {
      e.resize(static_cast<size_t>(vocab));
      buf.resize(static_cast<size_t>(vocab));
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < batch; ++i) {
      const T* v = value + i * value_stride;
      float* o = out + i * vocab;
      combine_row(v, base + i * base_stride, num_neg ? negatives + i * neg_stride_b : nullptr, neg_stride_k, num_neg,
                  betas, vocab, alpha, temperature, o);
      if (masked) mask_row(v, vocab, temperature, top_p, min_keep, e.data(), buf.data(), o);
    }
  }
}

#define FA_INSTANTIATE(T)                                                                                      \
  template void steer_logits<T>(const T*, int64_t, const T*, int64_t, const T*, int64_t, int64_t, const float*, \
                                int64_t, int64_t, int64_t, float, float, float, int64_t, float*);
FA_INSTANTIATE(float)
FA_INSTANTIATE(bf16_t)
FA_INSTANTIATE(fp16_t)
#undef FA_INSTANTIATE

}  // namespace cpu
}  // namespace fastalign
