// Memory-bound BatchNorm/ReLU passes around the convolution GEMMs (NHWC, viewed as [M, C] with
// M = N*H*W rows), with the same tile (kConvTileM rows x kConvTileN channels, 256 threads), the
// same epilogue code and the same partial layouts as the fused GEMMs of conv_fused.h:
//
//   bn_relu_apply      out = relu(x * scale + shift)                       (the hybrid 3x3 path)
//   relu_grad_sums     g' = (grad + extra) * [v * scale + shift > 0], sums [2, P, C] of g' and
//                      g' * (v - mean) * invstd, taken of g' as stored
//   bn_backward_apply  dv = a * g + b * v + c (+ shortcut_grad at the rows on its stride grid)
//   stats_partials     per-tile (count, mean, M2) [3, P, C]
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

cudaError_t bn_relu_apply_cuda(const BnReluApplyParams& p, ConvDtype dtype, cudaStream_t stream);
cudaError_t relu_grad_sums_cuda(const ReluGradSumsParams& p, ConvDtype dtype, cudaStream_t stream);
cudaError_t bn_backward_apply_cuda(const BnBackwardApplyParams& p, ConvDtype dtype, cudaStream_t stream);
cudaError_t stats_partials_cuda(const StatsPartialsParams& p, ConvDtype dtype, cudaStream_t stream);

void bn_relu_apply_host(const BnReluApplyParams& p, ConvDtype dtype);
void relu_grad_sums_host(const ReluGradSumsParams& p, ConvDtype dtype);
void bn_backward_apply_host(const BnBackwardApplyParams& p, ConvDtype dtype);
void stats_partials_host(const StatsPartialsParams& p, ConvDtype dtype);

}  // namespace resnet_fused
