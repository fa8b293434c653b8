// CUDA launchers of the scans and segmented reductions: plain C++ declarations (no CUDA syntax),
// so csrc/cuda_bindings.cpp, compiled by the host compiler, can call them with raw pointers and the
// current stream. Every launcher returns the launch status (cudaGetLastError()).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastalign {
namespace gpu {

// Floats of scratch the group-advantage launchers need (batch statistics and per-group sums).
int64_t group_advantages_workspace(int64_t n, int64_t group_size);

// One warp per group (segmented mean / std with warp shuffles); scale as in advantages_row.h.
cudaError_t group_advantages(const float* rewards, float* out, float* workspace, int64_t n, int64_t group_size,
                             int scale, float eps, cudaStream_t stream);
cudaError_t group_advantages_backward(const float* rewards, const float* grad, float* d_rewards, float* workspace,
                                      int64_t n, int64_t group_size, int scale, float eps, cudaStream_t stream);
// RLOO; also its own backward (the map is linear and symmetric).
cudaError_t rloo_advantages(const float* rewards, float* out, int64_t n, int64_t group_size, cudaStream_t stream);

// One warp per sequence, coalesced through shared memory, running the very steps the CPU runs
// (gae_step / gae_backward_step); gamma_lam = gamma * lam rounded to float once.
cudaError_t gae(const float* rewards, const float* values, const float* mask, float* adv, float* ret, int64_t batch,
                int64_t len, float gamma, float gamma_lam, cudaStream_t stream);
cudaError_t gae_backward(const float* grad_adv, const float* grad_ret, const float* mask, float* d_rewards,
                         float* d_values, int64_t batch, int64_t len, float gamma, float gamma_lam, cudaStream_t stream);

// One warp per row: masked sum (or mean) of per-token log-probs, and its backward.
cudaError_t sequence_logprobs_forward(const float* token_logp, const float* mask, float* out, int64_t batch,
                                      int64_t len, bool average, cudaStream_t stream);
cudaError_t sequence_logprobs_backward(const float* grad, const float* mask, float* d_logp, int64_t batch, int64_t len,
                                       bool average, cudaStream_t stream);

}  // namespace gpu
}  // namespace fastalign
