// Per-channel batch statistics (mean and biased variance) of a 4-D activation.
//
// x is logically (N, C, H, W); we view it as [N, C, HW] with element strides
// (stride_n, stride_c, stride_hw), which covers both NCHW-contiguous
// (HW*C, HW, 1) and channels_last (HW*C, 1, C). A "row" is one (n, hw) pair,
// so each channel reduces over M = N * HW rows.
//
// Why Welford/Chan and not sum/sum-of-squares: var = E[x^2] - E[x]^2 cancels
// catastrophically when |mean| >> std (at |mean|/std = 1e3, fp32 loses ~6 of
// its ~7 digits). Welford keeps a running mean and the sum of squared
// deviations M2, and Chan's formula merges two such partial states exactly in
// real arithmetic, so the error stays at the level of the data's own spread.
//
// Determinism: every merge happens in a fixed order that depends only on the
// shape (never on timing), and no floating-point atomics are used, so results
// are bitwise identical from run to run on the same device.
//
// This header is included by the bindings (compiled by the host C++ compiler)
// and by bn_stats.cu (nvcc), so it must not depend on torch or on CUDA device
// headers beyond the runtime API types.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define RESNET_FUSED_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RESNET_FUSED_HOST_DEVICE inline
#endif

namespace resnet_fused {

// Element type of x. The bindings translate torch dtypes into this so the
// kernels never see a torch header.
enum class BnStatsDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// x viewed as [N, C, HW] with element strides. Sizes are >= 1.
struct BnStatsInput {
  int64_t N;
  int64_t C;
  int64_t HW;
  int64_t stride_n;
  int64_t stride_c;
  int64_t stride_hw;
};

// Running statistics of one set of values: count, mean and M2 = sum (x - mean)^2.
// Acc is float for 16/32-bit inputs and double for float64 inputs.
template <typename Acc>
struct WelfordState {
  Acc count;
  Acc mean;
  Acc m2;
};

// Adds one value. With count >= 1 after the increment, mean moves a fraction
// 1/count towards x and never overshoots, so delta and (x - new mean) have the
// same sign and M2 only grows: no negative variances.
template <typename Acc>
RESNET_FUSED_HOST_DEVICE void welford_update(WelfordState<Acc>& state, Acc x) {
  state.count += Acc(1);
  const Acc delta = x - state.mean;
  state.mean += delta / state.count;
  state.m2 += delta * (x - state.mean);
}

// Chan et al.'s pairwise merge of two partial states (a is the "left" one;
// the operation is not bitwise commutative, which is why callers fix the
// order). Empty states are returned unchanged so that threads or chunks
// without rows merge exactly.
template <typename Acc>
RESNET_FUSED_HOST_DEVICE WelfordState<Acc> chan_merge(const WelfordState<Acc>& a,
                                                      const WelfordState<Acc>& b) {
  if (b.count == Acc(0)) return a;
  if (a.count == Acc(0)) return b;
  WelfordState<Acc> out;
  out.count = a.count + b.count;
  const Acc delta = b.mean - a.mean;
  const Acc weight_b = b.count / out.count;
  out.mean = a.mean + delta * weight_b;
  // delta^2 * na * nb / n, written with weight_b = nb / n.
  out.m2 = a.m2 + b.m2 + delta * delta * (a.count * weight_b);
  return out;
}

// Threads per block of both passes.
constexpr int kBnStatsThreads = 256;
// Pass 2 reads the [P, C] workspace, which is channel-contiguous: 32 channels
// across a warp for coalescing, 8 lanes per channel splitting the P partials.
constexpr int kBnStatsMergeChannels = 32;
constexpr int kBnStatsMergeLanes = kBnStatsThreads / kBnStatsMergeChannels;

// How pass 1 splits the work. It is a pure function of the shape and strides,
// which is what makes the merge order (and so the result) reproducible. The
// host implementation follows the same plan, so CPU tests exercise the same
// chunking and the same merge tree as the GPU.
struct BnStatsPlan {
  // true: adjacent threads read adjacent channels (channels_last);
  // false: adjacent threads read adjacent rows of one channel (NCHW).
  bool channels_fast;
  int channels_per_block;  // channel tile of one block
  int lanes_per_channel;   // threads that share one channel inside a block (a power of 2)
  int64_t channel_tiles;   // gridDim.x of pass 1
  int64_t rows_per_chunk;  // rows of one chunk, a multiple of lanes_per_channel
  int64_t num_chunks;      // P: gridDim.y of pass 1, and partials per channel
};

inline BnStatsPlan bn_stats_plan(const BnStatsInput& in) {
  // About 8 resident 256-thread blocks on each of ~132 SMs: enough blocks to
  // fill an H100 once, few enough that pass 2 stays cheap.
  constexpr int64_t kTargetBlocks = 1024;
  // Each thread reads at least this many rows, so the per-block tree merge and
  // the partial write are amortised over real work.
  constexpr int64_t kMinRowsPerLane = 32;
  // At most this many chunks (CUDA limits gridDim.y to 65535).
  constexpr int64_t kMaxChunks = 65535;

  BnStatsPlan plan;
  // Unit channel stride means channels_last (or HW == 1): spread threads over
  // channels. Otherwise rows of one channel are contiguous (NCHW): spread
  // threads over rows. With C == 1 there is only the row direction.
  plan.channels_fast = in.stride_c == 1 && in.C > 1;
  plan.channels_per_block = plan.channels_fast ? 32 : 1;
  plan.lanes_per_channel = kBnStatsThreads / plan.channels_per_block;
  plan.channel_tiles = (in.C + plan.channels_per_block - 1) / plan.channels_per_block;

  const int64_t rows = in.N * in.HW;
  const int64_t lanes = plan.lanes_per_channel;
  int64_t target_chunks = (kTargetBlocks + plan.channel_tiles - 1) / plan.channel_tiles;
  if (target_chunks < 1) target_chunks = 1;
  int64_t rows_per_chunk = (rows + target_chunks - 1) / target_chunks;
  if (rows_per_chunk < lanes * kMinRowsPerLane) rows_per_chunk = lanes * kMinRowsPerLane;
  const int64_t min_for_grid_limit = (rows + kMaxChunks - 1) / kMaxChunks;
  if (rows_per_chunk < min_for_grid_limit) rows_per_chunk = min_for_grid_limit;
  rows_per_chunk = (rows_per_chunk + lanes - 1) / lanes * lanes;
  plan.rows_per_chunk = rows_per_chunk;
  plan.num_chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  return plan;
}

// Bytes of scratch memory bn_stats_cuda needs: three [P, C] planes (count,
// mean, M2) in the accumulation type. The caller allocates it (through torch's
// caching allocator) so the launcher never calls cudaMalloc.
size_t bn_stats_workspace_bytes(const BnStatsInput& in, BnStatsDtype dtype);

// Launches both passes on `stream`. x points at element (0, 0, 0); mean and
// var are fp32 arrays of C elements; var is the biased variance M2 / (N*HW).
// Returns the launch error, if any; does not synchronise.
cudaError_t bn_stats_cuda(const void* x, const BnStatsInput& in, BnStatsDtype dtype,
                          void* workspace, float* mean, float* var, cudaStream_t stream);

// The same two-pass algorithm on the host, single-threaded, following the same
// plan and merge order. x, mean and var are host pointers.
void bn_stats_host(const void* x, const BnStatsInput& in, BnStatsDtype dtype, float* mean,
                   float* var);

}  // namespace resnet_fused
