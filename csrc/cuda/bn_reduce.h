// Per-channel reductions of tile partials: the BatchNorm finalize and the BN-backward
// coefficients, each one op call of two kernels.
//
//   bn_finalize       partials [3, P, C] (count, mean, M2 per tile) -> out [5, C] = (mean, biased
//                     var, invstd, scale, shift), optionally the running update (running_mean,
//                     running_var with the unbiased variance, num_batches_tracked += 1), or the
//                     same outputs from the running statistics (eval / frozen norm).
//   bn_backward_coef  sums [2, P, C] (sum g', sum g' * xhat per tile) -> dgamma, dbeta and the
//                     per-channel A, B, C of dv = A g' + B v + C.
//
// Both split the P partials over many blocks, in a fixed order (no float atomics), so results
// are bitwise reproducible from run to run:
//
//   chunk kernel   grid (channel tiles, chunks). Block = 32 channels x 8 lanes. Lane l merges the
//                  partials chunk_begin + l, + 8, ... of its channel in ascending order, then the
//                  8 lane states meet in a fixed binary tree (lane i absorbs lane i + stride).
//                  One state per (chunk, channel) goes to a workspace [planes, chunks, C].
//   finish kernel  grid (channel tiles). The same lanes-and-tree merge over the chunk states,
//                  then one thread per channel computes the outputs and the running update.
//
// Both carry their states in fp64 whatever the partials' type and round once at the end: the
// merge adds no rounding of its own to statistics or gradients at any P.
//
// The plan (reduce_plan) depends only on (P, C), which is what fixes the order. With
// momentum=None the cumulative factor 1 / (num_batches_tracked + 1) is computed on the device:
// the chunk kernel copies num_batches_tracked into an int64 workspace before anything writes it,
// so every finish block reads the same count and block 0 alone writes count + 1 back.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "conv_fused.h"

namespace resnet_fused {

// Block geometry of both kernels (256 threads = kReduceChannels x kReduceLanes).
constexpr int kReduceChannels = 32;
constexpr int kReduceLanes = 8;
// Chunk kernel blocks to aim for: a few resident blocks on each of ~132 SMs.
constexpr int64_t kReduceTargetBlocks = 1024;
// At least this many partials per chunk (2 per lane), so a block's tree merge and its workspace
// write are amortised over real loads.
constexpr int64_t kReduceMinChunk = 16;

struct ReducePlan {
  int64_t channel_tiles;  // gridDim.x of both kernels
  int64_t chunks;         // gridDim.y of the chunk kernel (>= 1), rows of the workspace
  int64_t chunk_size;     // partials per chunk
};

inline ReducePlan reduce_plan(int64_t P, int64_t C) {
  ReducePlan plan;
  plan.channel_tiles = (C + kReduceChannels - 1) / kReduceChannels;
  int64_t target_chunks = plan.channel_tiles > 0 ? (kReduceTargetBlocks + plan.channel_tiles - 1) / plan.channel_tiles
                                                 : 1;
  if (target_chunks < 1) target_chunks = 1;
  int64_t size = (P + target_chunks - 1) / target_chunks;
  if (size < kReduceMinChunk) size = kReduceMinChunk;
  const int64_t for_grid_limit = (P + 65534) / 65535;  // gridDim.y <= 65535
  if (size < for_grid_limit) size = for_grid_limit;
  plan.chunk_size = size;
  plan.chunks = P > 0 ? (P + size - 1) / size : 1;
  return plan;
}

struct BnFinalizeParams {
  const void* part;          // [3, P, C] in the accumulation type; null with from_running
  const void* weight;        // [C] accumulation type, may be null
  const void* bias;          // [C] accumulation type, may be null
  void* out;                 // [5, C] accumulation type
  void* running_mean;        // [C] running-buffer type; null: none
  void* running_var;         // [C]
  int64_t* num_batches_tracked;  // [1] or null
  void* workspace;           // [3, chunks, C] float64 (unused with from_running)
  int64_t* count_snapshot;   // [1] int64 scratch, or null
  int64_t P, C;
  double eps;
  double momentum;           // used when !cumulative
  bool update;               // move the running statistics (needs running_mean/var)
  bool cumulative;           // momentum=None: factor 1 / (num_batches_tracked + 1)
  bool count_batch;          // num_batches_tracked += 1
  bool from_running;         // mean/var from the running buffers, no partials
};

struct BnBackwardCoefParams {
  const void* part;    // [2, P, C] accumulation type
  const void* weight;  // [C] accumulation type, may be null
  const void* mean;    // [C]
  const void* invstd;  // [C]
  void* dgamma;        // [C] each
  void* dbeta;
  void* a;
  void* b;
  void* c;
  void* workspace;     // [2, chunks, C] float64: the sums are carried in fp64
  int64_t P, C;
  double count;        // values per channel
  bool training;
};

// acc: the partials' (and outputs') type, kFloat32 or kFloat64; running: the running buffers'
// storage type (any of the four).
cudaError_t bn_finalize_cuda(const BnFinalizeParams& p, ConvDtype acc, ConvDtype running, cudaStream_t stream);
void bn_finalize_host(const BnFinalizeParams& p, ConvDtype acc, ConvDtype running);
cudaError_t bn_backward_coef_cuda(const BnBackwardCoefParams& p, ConvDtype acc, cudaStream_t stream);
void bn_backward_coef_host(const BnBackwardCoefParams& p, ConvDtype acc);

}  // namespace resnet_fused
