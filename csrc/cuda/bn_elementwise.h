// Memory-bound BatchNorm/ReLU passes around the convolution GEMMs (NHWC, viewed as [M, C] with
// M = N*H*W rows), with the same tile (kConvTileM rows x kConvTileN channels, 256 threads), the
// same epilogue code and the same partial layouts as the fused GEMMs of conv_fused.h:
//
//   bn_relu_apply      out = relu(x * scale + shift)                       (the hybrid 3x3 path)
//   relu_grad_sums     g' = (grad + extra) * [v * scale + shift > 0], sums [2, P, C] of g' and
//                      g' * (v - mean) * invstd, taken of g' as stored
//   bn_backward_apply  dv = a * g + b * v + c (+ shortcut_grad at the rows on its stride grid)
//   stats_partials     per-tile (count, mean, M2) [3, P, C]
//   postact_out        out = relu(y * scale + shift + s), s = sc (identity shortcut) or
//                      sc * sc_scale + sc_shift (projection with its BN): a post-activation
//                      block's closing pass
//   postact_out_back   g' = grad * [z > 0] (z the closing pass's pre-ReLU value), sums [2, P, C]
//                      of g' and g' * (y - mean) * invstd, and with a projection the sums of g'
//                      and g' * (sc - sc_mean) * sc_invstd, taken of g' as stored
//
// P = ceil(M / kConvTileM). Vectors and partials in the accumulation type (fp32, fp64 for fp64
// data); data tensors in one storage dtype. Each kernel is one block algorithm whose phases run
// on the GPU and, through the same functions, in the host emulation (`*_host`).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "conv_fused.h"

namespace resnet_fused {

struct BnReluApplyParams {
  const void* x;
  const void* scale;
  const void* shift;
  void* out;
  int64_t M, C;
};

struct ReluGradSumsParams {
  const void* grad;
  const void* extra;  // may be null
  const void* v;
  const void* scale;
  const void* shift;
  const void* mean;
  const void* invstd;
  void* out;
  void* sums;  // [2, P, C]
  int64_t M, C;
};

struct BnBackwardApplyParams {
  const void* g;
  const void* v;
  const void* a;
  const void* b;
  const void* c;
  const void* shortcut_grad;  // [N, H_sc, W_sc, C] or null
  void* out;
  int64_t N, H, W, C, H_sc, W_sc;
  int shortcut_stride;
};

struct StatsPartialsParams {
  const void* x;
  void* partials;  // [3, P, C]
  int64_t M, C;
};

struct PostactOutParams {
  const void* y;
  const void* sc;
  const void* scale;
  const void* shift;
  const void* sc_scale;  // both null: identity shortcut
  const void* sc_shift;
  void* out;
  int64_t M, C;
};

struct PostactOutBackwardParams {
  const void* grad;
  const void* y;
  const void* sc;
  const void* scale;
  const void* shift;
  const void* sc_scale;  // all four null: identity shortcut
  const void* sc_shift;
  const void* mean;
  const void* invstd;
  const void* sc_mean;
  const void* sc_invstd;
  void* out;
  void* sums;     // [2, P, C]
  void* sc_sums;  // [2, P, C] or null
  int64_t M, C;
};

cudaError_t postact_out_cuda(const PostactOutParams& p, ConvDtype dtype, cudaStream_t stream);
cudaError_t postact_out_backward_cuda(const PostactOutBackwardParams& p, ConvDtype dtype, cudaStream_t stream);
void postact_out_host(const PostactOutParams& p, ConvDtype dtype);
void postact_out_backward_host(const PostactOutBackwardParams& p, ConvDtype dtype);

cudaError_t bn_relu_apply_cuda(const BnReluApplyParams& p, ConvDtype dtype, cudaStream_t stream);
cudaError_t relu_grad_sums_cuda(const ReluGradSumsParams& p, ConvDtype dtype, cudaStream_t stream);
cudaError_t bn_backward_apply_cuda(const BnBackwardApplyParams& p, ConvDtype dtype, cudaStream_t stream);
cudaError_t stats_partials_cuda(const StatsPartialsParams& p, ConvDtype dtype, cudaStream_t stream);

void bn_relu_apply_host(const BnReluApplyParams& p, ConvDtype dtype);
void relu_grad_sums_host(const ReluGradSumsParams& p, ConvDtype dtype);
void bn_backward_apply_host(const BnBackwardApplyParams& p, ConvDtype dtype);
void stats_partials_host(const StatsPartialsParams& p, ConvDtype dtype);

}  // namespace resnet_fused
