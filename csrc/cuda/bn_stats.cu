// Per-channel batch statistics: two deterministic passes (see bn_stats.h).
//
// Pass 1 (bn_stats_partial_kernel): grid (channel tiles, row chunks). Each
//   thread runs Welford over the rows lane, lane + L, lane + 2L, ... of its
//   chunk for one channel (L = lanes per channel); the L thread states of a
//   channel are merged by a fixed binary tree in shared memory and written as
//   one partial (count, mean, M2) per (chunk, channel) to the workspace.
// Pass 2 (bn_stats_finalize_kernel): per channel, 8 lanes each merge every
//   8th partial in ascending chunk order, then a fixed 8-way tree; writes mean
//   and M2 / count.
//
// bn_stats_host runs the same plan and the same merge order on the CPU, calling
// the same per-thread and merge functions, so the CPU tests check the math the
// GPU runs. (Results agree closely, not necessarily bitwise: nvcc contracts
// a*b+c into FMAs by default, the host compiler does not.)
//
// Only CUDA headers here: no torch, so this file compiles in seconds.

#include "bn_stats.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <vector>

// `#pragma unroll` for code compiled for both sides: the host compiler does not
// know the pragma (and warns), so it only applies to the device pass.
#if defined(__CUDA_ARCH__)
#define RESNET_FUSED_UNROLL _Pragma("unroll")
#else
#define RESNET_FUSED_UNROLL
#endif

namespace resnet_fused {
namespace {

// Storage type -> arithmetic type. Half and bfloat16 are widened to fp32,
// float64 stays double (the caller picks Acc = double for it).
RESNET_FUSED_HOST_DEVICE float widen(float v) { return v; }
RESNET_FUSED_HOST_DEVICE double widen(double v) { return v; }
RESNET_FUSED_HOST_DEVICE float widen(__half v) { return __half2float(v); }
RESNET_FUSED_HOST_DEVICE float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// Welford over the rows first_row, first_row + step, ... < row_end of one
// channel (x_channel points at element (0, c, 0)). Rows are visited in
// ascending order; that order is part of the result's definition.
template <typename T, typename Acc>
RESNET_FUSED_HOST_DEVICE void accumulate_rows(const T* x_channel, const BnStatsInput& in,
                                              int64_t first_row, int64_t row_end, int64_t step,
                                              WelfordState<Acc>& state) {
  int64_t row = first_row;
  if (row >= row_end) return;
  // Walk (n, hw) with a carry instead of dividing by HW for every element
  // (64-bit division is ~100 instructions on the GPU).
  int64_t n = row / in.HW;
  int64_t hw = row - n * in.HW;
  const int64_t step_n = step / in.HW;
  const int64_t step_hw = step - step_n * in.HW;
  // Load a few values before using any: the Welford updates form a serial
  // dependency chain, the loads do not, so batching keeps several loads in
  // flight per thread.
  constexpr int kBatch = 4;
  while (row < row_end) {
    Acc values[kBatch] = {};
    int loaded = 0;
RESNET_FUSED_UNROLL
    for (int k = 0; k < kBatch; ++k) {
      if (row < row_end) {
        values[k] = static_cast<Acc>(widen(x_channel[n * in.stride_n + hw * in.stride_hw]));
        ++loaded;
        row += step;
        n += step_n;
        hw += step_hw;
        if (hw >= in.HW) {
          hw -= in.HW;
          ++n;
        }
      }
    }
RESNET_FUSED_UNROLL
    for (int k = 0; k < kBatch; ++k) {
      if (k < loaded) welford_update(state, values[k]);
    }
  }
}

// Workspace layout: three [P, C] planes (count, mean, M2), channel-contiguous
// so that pass 2 reads them coalesced with threads across channels.
template <typename Acc>
RESNET_FUSED_HOST_DEVICE void store_partial(Acc* workspace, int64_t num_chunks, int64_t C,
                                            int64_t chunk, int64_t c,
                                            const WelfordState<Acc>& state) {
  const int64_t plane = num_chunks * C;
  const int64_t at = chunk * C + c;
  workspace[at] = state.count;
  workspace[plane + at] = state.mean;
  workspace[2 * plane + at] = state.m2;
}

// One pass-2 lane: merges partials lane, lane + lanes, ... of channel c in
// ascending chunk order.
template <typename Acc>
RESNET_FUSED_HOST_DEVICE WelfordState<Acc> merge_partials(const Acc* workspace,
                                                          int64_t num_chunks, int64_t C,
                                                          int64_t c, int lane, int lanes) {
  const int64_t plane = num_chunks * C;
  WelfordState<Acc> state{Acc(0), Acc(0), Acc(0)};
  for (int64_t chunk = lane; chunk < num_chunks; chunk += lanes) {
    const int64_t at = chunk * C + c;
    const WelfordState<Acc> partial{workspace[at], workspace[plane + at],
                                    workspace[2 * plane + at]};
    state = chan_merge(state, partial);
  }
  return state;
}

// The merge tree both passes use for the lane states of one channel: at each
// level lane l (< stride) absorbs lane l + stride, lower lane on the left.
// The device kernels run the same levels in shared memory.
template <typename Acc>
void tree_merge_host(WelfordState<Acc>* lane_states, int lanes) {
  for (int stride = lanes / 2; stride > 0; stride /= 2) {
    for (int lane = 0; lane < stride; ++lane) {
      lane_states[lane] = chan_merge(lane_states[lane], lane_states[lane + stride]);
    }
  }
}

// Device side of the same tree. Thread t of a block holds lane t / channels
// of channel t % channels (channels-fast) or lane t (channels == 1), so the
// partner of thread t at distance `stride` lanes is t + stride * channels.
template <typename Acc, int kChannels, int kLanes>
__device__ __forceinline__ WelfordState<Acc> tree_merge_block(WelfordState<Acc>* shared,
                                                              WelfordState<Acc> state, int lane) {
  const int tid = threadIdx.x;
  shared[tid] = state;
  __syncthreads();
#pragma unroll
  for (int stride = kLanes / 2; stride > 0; stride /= 2) {
    if (lane < stride) shared[tid] = chan_merge(shared[tid], shared[tid + stride * kChannels]);
    __syncthreads();
  }
  return shared[tid];
}

template <typename T, typename Acc, bool kChannelsFast>
__global__ void __launch_bounds__(kBnStatsThreads)
    bn_stats_partial_kernel(const T* __restrict__ x, BnStatsInput in, int64_t rows_per_chunk,
                            int64_t num_chunks, Acc* __restrict__ workspace) {
  // channels_last: a warp covers 32 adjacent channels of one row (coalesced),
  // 8 warps take different rows. NCHW: all 256 threads walk adjacent rows of
  // a single channel, which are contiguous.
  constexpr int kChannels = kChannelsFast ? 32 : 1;
  constexpr int kLanes = kBnStatsThreads / kChannels;
  const int tid = threadIdx.x;
  const int channel_in_tile = tid % kChannels;
  const int lane = tid / kChannels;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChannels + channel_in_tile;
  const int64_t chunk = blockIdx.y;
  const int64_t rows = in.N * in.HW;
  const int64_t row_begin = chunk * rows_per_chunk;
  const int64_t row_end = row_begin + rows_per_chunk < rows ? row_begin + rows_per_chunk : rows;

  WelfordState<Acc> state{Acc(0), Acc(0), Acc(0)};
  if (c < in.C) accumulate_rows(x + c * in.stride_c, in, row_begin + lane, row_end, kLanes, state);

  __shared__ WelfordState<Acc> shared[kBnStatsThreads];
  state = tree_merge_block<Acc, kChannels, kLanes>(shared, state, lane);
  if (lane == 0 && c < in.C) store_partial(workspace, num_chunks, in.C, chunk, c, state);
}

template <typename Acc>
__global__ void __launch_bounds__(kBnStatsThreads)
    bn_stats_finalize_kernel(const Acc* __restrict__ workspace, int64_t C, int64_t num_chunks,
                             float* __restrict__ mean, float* __restrict__ var) {
  const int tid = threadIdx.x;
  const int channel_in_tile = tid % kBnStatsMergeChannels;
  const int lane = tid / kBnStatsMergeChannels;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBnStatsMergeChannels + channel_in_tile;

  WelfordState<Acc> state{Acc(0), Acc(0), Acc(0)};
  if (c < C) state = merge_partials(workspace, num_chunks, C, c, lane, kBnStatsMergeLanes);

  __shared__ WelfordState<Acc> shared[kBnStatsThreads];
  state = tree_merge_block<Acc, kBnStatsMergeChannels, kBnStatsMergeLanes>(shared, state, lane);
  if (lane == 0 && c < C) {
    mean[c] = static_cast<float>(state.mean);
    var[c] = static_cast<float>(state.m2 / state.count);
  }
}

template <typename T, typename Acc>
cudaError_t launch(const void* x, const BnStatsInput& in, void* workspace, float* mean,
                   float* var, cudaStream_t stream) {
  const BnStatsPlan plan = bn_stats_plan(in);
  const int64_t merge_tiles = (in.C + kBnStatsMergeChannels - 1) / kBnStatsMergeChannels;
  if (plan.channel_tiles > INT_MAX || merge_tiles > INT_MAX) return cudaErrorInvalidConfiguration;

  const T* x_typed = static_cast<const T*>(x);
  Acc* ws = static_cast<Acc*>(workspace);
  const dim3 partial_grid(static_cast<unsigned>(plan.channel_tiles),
                          static_cast<unsigned>(plan.num_chunks));
  if (plan.channels_fast) {
    bn_stats_partial_kernel<T, Acc, true><<<partial_grid, kBnStatsThreads, 0, stream>>>(
        x_typed, in, plan.rows_per_chunk, plan.num_chunks, ws);
  } else {
    bn_stats_partial_kernel<T, Acc, false><<<partial_grid, kBnStatsThreads, 0, stream>>>(
        x_typed, in, plan.rows_per_chunk, plan.num_chunks, ws);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  bn_stats_finalize_kernel<Acc><<<static_cast<unsigned>(merge_tiles), kBnStatsThreads, 0, stream>>>(
      ws, in.C, plan.num_chunks, mean, var);
  return cudaGetLastError();
}

template <typename T, typename Acc>
void run_host(const void* x, const BnStatsInput& in, float* mean, float* var) {
  const BnStatsPlan plan = bn_stats_plan(in);
  const T* x_typed = static_cast<const T*>(x);
  const int64_t rows = in.N * in.HW;
  const int lanes = plan.lanes_per_channel;
  std::vector<Acc> workspace(static_cast<size_t>(3 * plan.num_chunks * in.C));
  std::vector<WelfordState<Acc>> lane_states(static_cast<size_t>(lanes));

  // Pass 1: one partial per (chunk, channel), lanes exactly as on the GPU.
  for (int64_t chunk = 0; chunk < plan.num_chunks; ++chunk) {
    const int64_t row_begin = chunk * plan.rows_per_chunk;
    const int64_t row_end =
        row_begin + plan.rows_per_chunk < rows ? row_begin + plan.rows_per_chunk : rows;
    for (int64_t c = 0; c < in.C; ++c) {
      for (int lane = 0; lane < lanes; ++lane) {
        lane_states[lane] = WelfordState<Acc>{Acc(0), Acc(0), Acc(0)};
        accumulate_rows(x_typed + c * in.stride_c, in, row_begin + lane, row_end, lanes,
                        lane_states[lane]);
      }
      tree_merge_host(lane_states.data(), lanes);
      store_partial(workspace.data(), plan.num_chunks, in.C, chunk, c, lane_states[0]);
    }
  }

  // Pass 2: fixed-order merge of the P partials of each channel.
  WelfordState<Acc> merge_states[kBnStatsMergeLanes];
  for (int64_t c = 0; c < in.C; ++c) {
    for (int lane = 0; lane < kBnStatsMergeLanes; ++lane) {
      merge_states[lane] =
          merge_partials(workspace.data(), plan.num_chunks, in.C, c, lane, kBnStatsMergeLanes);
    }
    tree_merge_host(merge_states, kBnStatsMergeLanes);
    mean[c] = static_cast<float>(merge_states[0].mean);
    var[c] = static_cast<float>(merge_states[0].m2 / merge_states[0].count);
  }
}

}  // namespace

size_t bn_stats_workspace_bytes(const BnStatsInput& in, BnStatsDtype dtype) {
  const BnStatsPlan plan = bn_stats_plan(in);
  const size_t acc_bytes = dtype == BnStatsDtype::kFloat64 ? sizeof(double) : sizeof(float);
  return 3 * static_cast<size_t>(plan.num_chunks) * static_cast<size_t>(in.C) * acc_bytes;
}

cudaError_t bn_stats_cuda(const void* x, const BnStatsInput& in, BnStatsDtype dtype,
                          void* workspace, float* mean, float* var, cudaStream_t stream) {
  switch (dtype) {
    case BnStatsDtype::kFloat32:
      return launch<float, float>(x, in, workspace, mean, var, stream);
    case BnStatsDtype::kFloat16:
      return launch<__half, float>(x, in, workspace, mean, var, stream);
    case BnStatsDtype::kBFloat16:
      return launch<__nv_bfloat16, float>(x, in, workspace, mean, var, stream);
    case BnStatsDtype::kFloat64:
      return launch<double, double>(x, in, workspace, mean, var, stream);
  }
  return cudaErrorInvalidValue;
}

void bn_stats_host(const void* x, const BnStatsInput& in, BnStatsDtype dtype, float* mean,
                   float* var) {
  switch (dtype) {
    case BnStatsDtype::kFloat32:
      return run_host<float, float>(x, in, mean, var);
    case BnStatsDtype::kFloat16:
      return run_host<__half, float>(x, in, mean, var);
    case BnStatsDtype::kBFloat16:
      return run_host<__nv_bfloat16, float>(x, in, mean, var);
    case BnStatsDtype::kFloat64:
      return run_host<double, double>(x, in, mean, var);
  }
}

}  // namespace resnet_fused
