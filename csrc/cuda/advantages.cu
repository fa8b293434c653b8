// CUDA kernels of the scans and segmented reductions: group advantages (GRPO), RLOO, GAE and the
// per-sequence sums of token log-probs. No torch here: raw pointers, sizes and a stream.
//
// Layout choices:
// - group_advantages / rloo: one warp per group. G is 2..64 in practice, so a group's mean and
//   std are a few strided loads per lane plus __shfl_xor_sync reductions, with no shared memory
//   and no block-wide synchronization; 8 groups per 256-thread block. A group larger than 32
//   is strided over the lanes, so any G works. "batch" scale adds a one-block statistics kernel.
// - gae: one warp per sequence. The warp stages kGaeChunk steps of its row (rewards, values, mask)
//   into shared memory with coalesced loads (each lane reads every 32nd float, so a warp-wide load
//   is one 128-byte line), lane 0 runs the recurrence over the chunk out of shared memory with the
//   very gae_step / gae_backward_step the CPU runs (so the CPU tests check the GPU's arithmetic step
//   for step, and the result stays bit-identical to TRL's loop), and the warp writes the chunk back
//   coalesced. Real cost: the recurrence is serial in t, one dependent FMA per step plus a
//   shared-memory read, ~10 cycles: about T x 10 / 1.8 GHz = 45 us at T = 8192 for any batch up to
//   a few thousand sequences (all warps run at once), while the 5 x B x T floats of traffic take
//   ~9 us at B = 256 (estimates, not yet measured on a GPU). The one-thread-per-sequence kernel it
//   replaces read 32 rows per load instruction (32 sectors instead of 1 line). A parallel affine
//   scan would cut the latency to O(log T) but reorders the float sums: no longer TRL's bits.
// - sequence_logprobs: one warp per row (a segmented sum).
#include <cuda_runtime.h>

#include "../common/advantages_row.h"
#include "kernels.cuh"

namespace fastalign {
namespace gpu {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpSize * kWarpsPerBlock;
constexpr int kStatsThreads = 1024;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum over the block; every thread gets the result. `shared` holds one float per warp.
__device__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  __syncthreads();  // the previous call's readers are done with shared
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
    v = warp_sum(lane < warps ? shared[lane] : 0.0f);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Batch statistics for scale == "batch": stats[0] = mean, stats[1] = std + eps and, when group_gx
// is given (backward), stats[2] = the std-backward coefficient from sum_i g_i (r_i - group mean).
__global__ void batch_stats_kernel(const float* rewards, int64_t n, const float* group_gx, int64_t groups, float eps,
                                   float* stats) {
  __shared__ float shared[kStatsThreads / kWarpSize];
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += rewards[i];
  const float mean = block_sum(acc, shared) / static_cast<float>(n);
  acc = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float d = rewards[i] - mean;
    acc += d * d;
  }
  const float sq = block_sum(acc, shared);
  const float s = n < 2 ? 0.0f : sqrtf(sq / static_cast<float>(n - 1));
  acc = 0.0f;
  if (group_gx != nullptr) {
    for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) acc += group_gx[g];
  }
  const float gx = block_sum(acc, shared);
  if (threadIdx.x == 0) {
    stats[0] = mean;
    stats[1] = s + eps;
    stats[2] = std_backward_coef(gx, s + eps, s, n);
  }
}

// The group this warp owns, or -1 past the end (the whole warp leaves together).
__device__ __forceinline__ int64_t warp_group(int64_t groups) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  return group < groups ? group : -1;
}

__global__ void group_advantages_kernel(const float* rewards, float* out, int64_t groups, int64_t group_size,
                                        int scale, float eps, const float* stats) {
  const int64_t group = warp_group(groups);
  if (group < 0) return;
  const int lane = threadIdx.x % kWarpSize;
  const float* r = rewards + group * group_size;
  float* o = out + group * group_size;
  // Mean shifted by the first reward, as group_mean(): equal rewards give exactly 0.
  const float r0 = r[0];
  float acc = 0.0f;
  for (int64_t i = lane; i < group_size; i += kWarpSize) acc += r[i] - r0;
  const float mean = r0 + warp_sum(acc) / static_cast<float>(group_size);
  float denom = 1.0f;
  if (scale == kScaleGroup) {
    acc = 0.0f;
    for (int64_t i = lane; i < group_size; i += kWarpSize) {
      const float d = r[i] - mean;
      acc += d * d;
    }
    const float sq = warp_sum(acc);
    denom = (group_size < 2 ? 0.0f : sqrtf(sq / static_cast<float>(group_size - 1))) + eps;
  } else if (scale == kScaleBatch) {
    denom = stats[1];
  }
  for (int64_t i = lane; i < group_size; i += kWarpSize) o[i] = (r[i] - mean) / denom;
}

// sum_i g_i (r_i - group mean) per group, for the batch-scale backward.
__global__ void group_gx_kernel(const float* rewards, const float* grad, float* group_gx, int64_t groups,
                                int64_t group_size) {
  const int64_t group = warp_group(groups);
  if (group < 0) return;
  const int lane = threadIdx.x % kWarpSize;
  const float* r = rewards + group * group_size;
  const float* g = grad + group * group_size;
  const float r0 = r[0];
  float acc = 0.0f;
  for (int64_t i = lane; i < group_size; i += kWarpSize) acc += r[i] - r0;
  const float mean = r0 + warp_sum(acc) / static_cast<float>(group_size);
  acc = 0.0f;
  for (int64_t i = lane; i < group_size; i += kWarpSize) acc += g[i] * (r[i] - mean);
  acc = warp_sum(acc);
  if (lane == 0) group_gx[group] = acc;
}

// Mirrors group_advantages_row_backward (advantages_row.h) with warp reductions.
__global__ void group_advantages_backward_kernel(const float* rewards, const float* grad, float* d_rewards,
                                                 int64_t groups, int64_t group_size, int scale, float eps,
                                                 const float* stats) {
  const int64_t group = warp_group(groups);
  if (group < 0) return;
  const int lane = threadIdx.x % kWarpSize;
  const float* r = rewards + group * group_size;
  const float* g = grad + group * group_size;
  float* dr = d_rewards + group * group_size;
  const float r0 = r[0];
  float g_acc = 0.0f, shift_acc = 0.0f;
  for (int64_t i = lane; i < group_size; i += kWarpSize) {
    g_acc += g[i];
    shift_acc += r[i] - r0;
  }
  const float inv_n = 1.0f / static_cast<float>(group_size);
  const float g_mean = warp_sum(g_acc) * inv_n;
  const float shift_mean = warp_sum(shift_acc) * inv_n;
  if (scale == kScaleBatch) {
    for (int64_t i = lane; i < group_size; i += kWarpSize) dr[i] = (g[i] - g_mean) / stats[1] - stats[2] * (r[i] - stats[0]);
    return;
  }
  float denom = 1.0f, coef = 0.0f;
  if (scale == kScaleGroup && group_size > 1) {
    float sq = 0.0f, gx = 0.0f;
    for (int64_t i = lane; i < group_size; i += kWarpSize) {
      const float x = (r[i] - r0) - shift_mean;
      sq += x * x;
      gx += g[i] * x;
    }
    const float s = sqrtf(warp_sum(sq) / static_cast<float>(group_size - 1));
    denom = s + eps;
    coef = std_backward_coef(warp_sum(gx), denom, s, group_size);
  } else if (scale == kScaleGroup) {
    denom = eps;
  }
  for (int64_t i = lane; i < group_size; i += kWarpSize) {
    dr[i] = (g[i] - g_mean) / denom - coef * ((r[i] - r0) - shift_mean);
  }
}

__global__ void rloo_kernel(const float* rewards, float* out, int64_t groups, int64_t group_size) {
  const int64_t group = warp_group(groups);
  if (group < 0) return;
  const int lane = threadIdx.x % kWarpSize;
  const float* r = rewards + group * group_size;
  float* o = out + group * group_size;
  float acc = 0.0f;
  for (int64_t i = lane; i < group_size; i += kWarpSize) acc += r[i];
  const float sum = warp_sum(acc);
  for (int64_t i = lane; i < group_size; i += kWarpSize) {
    o[i] = r[i] - (sum - r[i]) / static_cast<float>(group_size - 1);
  }
}

constexpr int kGaeChunk = 256;  // steps staged per round: 3 inputs + 2 outputs x 1 KB per warp
constexpr int kGaeWarps = 4;    // sequences per block (20 KB of shared memory)

// Chunks of a row in scan order: [start, end) aligned to kGaeChunk so the loads are line-aligned
// whenever the row itself is.
__device__ __forceinline__ int64_t gae_chunk_end(int64_t start, int64_t len) {
  return start + kGaeChunk < len ? start + kGaeChunk : len;
}

__global__ void gae_kernel(const float* rewards, const float* values, const float* mask, float* adv, float* ret,
                           int64_t batch, int64_t len, float gamma, float gamma_lam) {
  __shared__ float stage[kGaeWarps][5][kGaeChunk];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kGaeWarps + warp;
  if (b >= batch) return;  // the whole warp leaves: only __syncwarp below, no block barrier
  const int64_t o = b * len;
  float *r = stage[warp][0], *v = stage[warp][1], *m = stage[warp][2], *a = stage[warp][3], *rt = stage[warp][4];
  GaeCarry carry;  // meaningful in lane 0 only
  for (int64_t start = (len - 1) / kGaeChunk * kGaeChunk; start >= 0; start -= kGaeChunk) {
    const int n = static_cast<int>(gae_chunk_end(start, len) - start);
    for (int i = lane; i < n; i += kWarpSize) {
      r[i] = rewards[o + start + i];
      v[i] = values[o + start + i];
      m[i] = mask[o + start + i];
    }
    __syncwarp();
    if (lane == 0) {
      for (int i = n - 1; i >= 0; --i) gae_step(r[i], v[i], m[i], a + i, rt + i, carry, gamma, gamma_lam);
    }
    __syncwarp();
    for (int i = lane; i < n; i += kWarpSize) {
      adv[o + start + i] = a[i];
      ret[o + start + i] = rt[i];
    }
    __syncwarp();  // the next chunk's loads overwrite the staging buffers
  }
}

__global__ void gae_backward_kernel(const float* grad_adv, const float* grad_ret, const float* mask, float* d_rewards,
                                    float* d_values, int64_t batch, int64_t len, float gamma, float gamma_lam) {
  __shared__ float stage[kGaeWarps][5][kGaeChunk];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kGaeWarps + warp;
  if (b >= batch) return;
  const int64_t o = b * len;
  float *ga = stage[warp][0], *gr = stage[warp][1], *m = stage[warp][2], *dr = stage[warp][3], *dv = stage[warp][4];
  GaeCarry carry;
  for (int64_t start = 0; start < len; start += kGaeChunk) {
    const int n = static_cast<int>(gae_chunk_end(start, len) - start);
    for (int i = lane; i < n; i += kWarpSize) {
      ga[i] = grad_adv ? grad_adv[o + start + i] : 0.0f;
      gr[i] = grad_ret ? grad_ret[o + start + i] : 0.0f;
      m[i] = mask[o + start + i];
    }
    __syncwarp();
    if (lane == 0) {
      for (int i = 0; i < n; ++i) gae_backward_step(ga[i], gr[i], m[i], dr + i, dv + i, carry, gamma, gamma_lam);
    }
    __syncwarp();
    for (int i = lane; i < n; i += kWarpSize) {
      d_rewards[o + start + i] = dr[i];
      d_values[o + start + i] = dv[i];
    }
    __syncwarp();
  }
}

__global__ void sequence_logprobs_kernel(const float* token_logp, const float* mask, float* out, int64_t batch,
                                         int64_t len, bool average) {
  const int64_t row = warp_group(batch);
  if (row < 0) return;
  const int lane = threadIdx.x % kWarpSize;
  const float* lp = token_logp + row * len;
  const float* m = mask + row * len;
  float total = 0.0f, count = 0.0f;
  for (int64_t t = lane; t < len; t += kWarpSize) {
    total += lp[t] * m[t];
    count += m[t];
  }
  total = warp_sum(total);
  count = warp_sum(count);
  if (lane == 0) out[row] = average ? total / count : total;
}

__global__ void sequence_logprobs_backward_kernel(const float* grad, const float* mask, float* d_logp, int64_t batch,
                                                  int64_t len, bool average) {
  const int64_t row = warp_group(batch);
  if (row < 0) return;
  const int lane = threadIdx.x % kWarpSize;
  const float* m = mask + row * len;
  float scale = grad[row];
  if (average) {
    float count = 0.0f;
    for (int64_t t = lane; t < len; t += kWarpSize) count += m[t];
    scale /= warp_sum(count);
  }
  for (int64_t t = lane; t < len; t += kWarpSize) d_logp[row * len + t] = scale * m[t];
}

unsigned warp_blocks(int64_t items) { return static_cast<unsigned>(ceil_div(items, kWarpsPerBlock)); }

}  // namespace

int64_t group_advantages_workspace(int64_t n, int64_t group_size) { return 4 + n / group_size; }

cudaError_t group_advantages(const float* rewards, float* out, float* workspace, int64_t n, int64_t group_size,
                             int scale, float eps, cudaStream_t stream) {
  const int64_t groups = n / group_size;
  if (groups == 0) return cudaSuccess;
  if (scale == kScaleBatch) batch_stats_kernel<<<1, kStatsThreads, 0, stream>>>(rewards, n, nullptr, 0, eps, workspace);
  group_advantages_kernel<<<warp_blocks(groups), kThreads, 0, stream>>>(rewards, out, groups, group_size, scale, eps,
                                                                       workspace);
  return cudaGetLastError();
}

cudaError_t group_advantages_backward(const float* rewards, const float* grad, float* d_rewards, float* workspace,
                                      int64_t n, int64_t group_size, int scale, float eps, cudaStream_t stream) {
  const int64_t groups = n / group_size;
  if (groups == 0) return cudaSuccess;
  if (scale == kScaleBatch) {
    float* group_gx = workspace + 4;
    group_gx_kernel<<<warp_blocks(groups), kThreads, 0, stream>>>(rewards, grad, group_gx, groups, group_size);
    batch_stats_kernel<<<1, kStatsThreads, 0, stream>>>(rewards, n, group_gx, groups, eps, workspace);
  }
  group_advantages_backward_kernel<<<warp_blocks(groups), kThreads, 0, stream>>>(rewards, grad, d_rewards, groups,
                                                                                group_size, scale, eps, workspace);
  return cudaGetLastError();
}

cudaError_t rloo_advantages(const float* rewards, float* out, int64_t n, int64_t group_size, cudaStream_t stream) {
  const int64_t groups = n / group_size;
  if (groups == 0) return cudaSuccess;
  rloo_kernel<<<warp_blocks(groups), kThreads, 0, stream>>>(rewards, out, groups, group_size);
  return cudaGetLastError();
}

cudaError_t gae(const float* rewards, const float* values, const float* mask, float* adv, float* ret, int64_t batch,
                int64_t len, float gamma, float gamma_lam, cudaStream_t stream) {
  if (batch == 0 || len == 0) return cudaSuccess;
  gae_kernel<<<static_cast<unsigned>(ceil_div(batch, kGaeWarps)), kGaeWarps * kWarpSize, 0, stream>>>(
      rewards, values, mask, adv, ret, batch, len, gamma, gamma_lam);
  return cudaGetLastError();
}

cudaError_t gae_backward(const float* grad_adv, const float* grad_ret, const float* mask, float* d_rewards,
                         float* d_values, int64_t batch, int64_t len, float gamma, float gamma_lam, cudaStream_t stream) {
  if (batch == 0 || len == 0) return cudaSuccess;
  gae_backward_kernel<<<static_cast<unsigned>(ceil_div(batch, kGaeWarps)), kGaeWarps * kWarpSize, 0, stream>>>(
      grad_adv, grad_ret, mask, d_rewards, d_values, batch, len, gamma, gamma_lam);
  return cudaGetLastError();
}

cudaError_t sequence_logprobs_forward(const float* token_logp, const float* mask, float* out, int64_t batch,
                                      int64_t len, bool average, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  sequence_logprobs_kernel<<<warp_blocks(batch), kThreads, 0, stream>>>(token_logp, mask, out, batch, len, average);
  return cudaGetLastError();
}

cudaError_t sequence_logprobs_backward(const float* grad, const float* mask, float* d_logp, int64_t batch, int64_t len,
                                       bool average, cudaStream_t stream) {
  if (batch == 0 || len == 0) return cudaSuccess;
  sequence_logprobs_backward_kernel<<<warp_blocks(batch), kThreads, 0, stream>>>(grad, mask, d_logp, batch, len,
                                                                                average);
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace fastalign
