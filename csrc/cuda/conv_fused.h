// The fused convolution GEMMs of a pre-activation block (docs/design.md sections 3 and 4), NHWC:
//
//   conv_fwd    out = conv(relu(x * scale + shift), W) (+ shortcut | + projection K-loop),
//               epilogues: per-tile (count, mean, M2) partials of the stored output, and the
//               eval-mode "next BN + ReLU" fold.
//   conv_dgrad  dA = conv_transpose(dy, W) with dy = a*g + b*y + c applied to the gradient
//               operand as it is loaded, an optional second K-loop (the projection's dgrad),
//               epilogue g' = dA * [v*scale + shift > 0] and per-tile sums of g', g' * xhat.
//   conv_wgrad  dW = act(v)^T dy, split-K over the output rows with fp32 partials per split
//               reduced in a fixed order (deterministic, no float atomics).
//
// Every kernel is a thread-block algorithm made of phases, each a __host__ __device__
// function of (block, thread, shared storage, arguments) in conv_tile.cuh. The CUDA kernel
// runs the phases with __syncthreads() between them; the host implementation (`*_host`) runs
// the SAME phase functions for every block, all threads of one phase before the next, on an
// ordinary array standing in for shared memory. CPU tests therefore check the index math,
// prologues, predicates, epilogues and partial layouts the GPU runs, and for fp16/bf16 the WMMA
// multiply phase too (through a host implementation of the WMMA calls, wmma_host.cuh).
//
// Layouts (all tensors dense, element strides implied):
//   activations   NHWC: [N, H, W, C]
//   weights       PyTorch's (C_out, C_in/groups, k, k), contiguous, indexed directly
//   vectors       scale/shift/mean/invstd/a/b/c: fp32 for fp32/fp16/bf16 data, fp64 for fp64
//   partials      fwd [3, P, C_out] (count, mean, M2), dgrad [2, P, C_in] (sum g', sum g'*xhat),
//                 P = number of M tiles: conv_fwd_tiles_m() for the forward (2-D spatial tiles
//                 for a 3x3), ceil(M / kConvTileM) otherwise; accumulation type (fp32 / fp64)
//
// This header is included by the bindings (host compiler) and by the .cu files: no torch and
// no device-only headers here.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace resnet_fused {

enum class ConvDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Tile of every GEMM: kConvTileM x kConvTileN outputs per 256-thread block, K step kConvTileK.
// The statistics partials have one row per M tile, so the callers size them with these.
constexpr int kConvTileM = 64;
constexpr int kConvTileN = 64;
constexpr int kConvTileK = 32;
constexpr int kConvThreads = 256;

enum ConvShortcutKind : int { kShortcutNone = 0, kShortcutAdd = 1, kShortcutProjection = 2 };

inline int64_t conv_out_size(int64_t in, int ksize, int stride) {
  return (in + 2 * (ksize / 2) - ksize) / stride + 1;
}

inline int64_t conv_tiles_m(int64_t rows) { return (rows + kConvTileM - 1) / kConvTileM; }

// M tiles of the FORWARD conv, the one rule for the shape of its statistics partials [3, P, C_out]
// (mirrored by the fake in resnet_fused/_extension.py):
//   1x1: kConvTileM consecutive output rows, P = ceil(N*H_out*W_out / kConvTileM);
//   3x3: a kConvSpatialTileH x kConvSpatialTileW block of output pixels of ONE image,
//        P = N * ceil(H_out / 8) * ceil(W_out / 8); rows of the block past the image edge are
//        invalid (they count in no partial).
// Both 3x3 kernels (per-tap and halo, ConvFwdAlgo) use the spatial tiles, so P does not depend
// on which one runs. The halo kernel needs them (the tile's input patch is one rectangle); 8x8
// wastes at most 12.5% more MMA rows than the best block shape at ResNet's 56/28/14/7 widths.
constexpr int kConvSpatialTileH = 8;
constexpr int kConvSpatialTileW = 8;
static_assert(kConvSpatialTileH * kConvSpatialTileW == kConvTileM, "a spatial tile is one M tile");

inline int64_t conv_fwd_tiles_m(int64_t N, int64_t H_out, int64_t W_out, int ksize) {
  if (ksize == 1) return conv_tiles_m(N * H_out * W_out);
  return N * ((H_out + kConvSpatialTileH - 1) / kConvSpatialTileH) *
         ((W_out + kConvSpatialTileW - 1) / kConvSpatialTileW);
}

// Which forward kernel runs a conv: kConvFwdAuto picks the halo-staged kernel for every 3x3 with
// stride 1 or 2 (any groups) and the per-tap kernel otherwise; the other two force one (halo only
// where it applies, see conv_fwd_halo_applies).
enum ConvFwdAlgo : int { kConvFwdAuto = 0, kConvFwdPerTap = 1, kConvFwdHalo = 2 };

inline bool conv_fwd_halo_applies(int ksize, int stride) { return ksize == 3 && (stride == 1 || stride == 2); }

// Forward: out[m, n] = sum_{tap, k} act(x)[in_row(m, tap), group*cin_pg + k] * W[n, k, tap].
// Pointers to vectors may be null: scale == null means no prologue (act = identity),
// post_scale == null no post epilogue, partials == null no statistics.
struct ConvFwdParams {
  const void* x;      // [N, H_in, W_in, C_in]
  const void* scale;  // [C_in]
  const void* shift;  // [C_in]
  const void* w;      // (C_out, C_in/groups, k, k)
  void* out;          // [N, H_out, W_out, C_out]
  int64_t N, H_in, W_in, C_in, H_out, W_out, C_out;
  int ksize, stride, groups;
  // kShortcutAdd: out += shortcut[n, oh*s, ow*s, col] (C_sc == C_out).
  // kShortcutProjection: a second K-loop over relu(shortcut*proj_scale + proj_shift) at the
  // rows (n, oh*s, ow*s) times proj_w (C_out, C_sc, 1, 1) (proj_scale null: no activation).
  int shortcut_kind, shortcut_stride;
  const void* shortcut;  // [N, H_sc, W_sc, C_sc]
  int64_t H_sc, W_sc, C_sc;
  const void* proj_w;
  const void* proj_scale;
  const void* proj_shift;
  void* partials;  // [3, P, C_out]
  const void* post_scale;  // out = relu(out * post_scale + post_shift)
  const void* post_shift;
  // Eval-mode BatchNorms from their buffers: with *_mean/*_var set, the matching scale/shift
  // pointers hold the norm's weight/bias (null: 1/0) and the kernel forms the affine itself
  // (channel_affine in conv_tile.cuh). Null *_mean: scale/shift are the affine.
  const void* pro_mean = nullptr;
  const void* pro_var = nullptr;
  double pro_eps = 0.0;
  const void* proj_mean = nullptr;
  const void* proj_var = nullptr;
  double proj_eps = 0.0;
  const void* post_mean = nullptr;
  const void* post_var = nullptr;
  double post_eps = 0.0;
  int algo;  // ConvFwdAlgo
  // A post-activation block's closing conv (eval): out = relu(post(acc) + shortcut) for
  // kShortcutAdd; for kShortcutProjection the proj_* affine is the projection OUTPUT's norm
  // (C_out channels, no activation of the shortcut input) and both affines' scales are applied
  // to the weights as they are loaded (B), their shifts summed in the epilogue:
  // out = relu(sum(x * W * post_s) + sum(sc * proj_w * proj_s) + post_b + proj_b).
  int postact_close = 0;
};

inline bool conv_fwd_uses_halo(const ConvFwdParams& p) {
  return p.algo != kConvFwdPerTap && conv_fwd_halo_applies(p.ksize, p.stride);
}

// dgrad: for every input position p and input channel c,
//   dA[p, c] = sum_{tap, k in c's group} dy[o(p, tap), k] * W[k, c_local, tap]
//   (+ sum_k2 second_grad[p / s2, k2] * second_w[k2, c] when p is on the s2 grid),
// dy = a*g + b*y + c per output channel when pro_a != null (zero where o(p, tap) does not exist,
// after the affine). Epilogue: g' = dA * [v*scale + shift > 0] stored in the grad dtype, and
// sums [2, P, C_in] of g' and g' * (v - mean) * invstd of g' as stored.
struct ConvDgradParams {
  const void* g;      // [N, H_out, W_out, C_out]
  const void* pro_y;  // same shape as g, or null with pro_a
  const void* pro_a;  // [C_out] (all three or none)
  const void* pro_b;
  const void* pro_c;
  const void* w;      // (C_out, C_in/groups, k, k)
  const void* second_grad;  // [N, H2, W2, K2] or null
  const void* second_w;     // [K2, C_in]
  int64_t K2, H2, W2;
  int second_stride;
  const void* v;      // [N, H, W, C_in]
  const void* scale;  // [C_in] each
  const void* shift;
  const void* mean;
  const void* invstd;
  void* out;          // [N, H, W, C_in]
  void* sums;         // [2, P, C_in]
  int64_t N, H, W, C_in, H_out, W_out, C_out;
  int ksize, stride, groups;
};

// wgrad: dW[n, c_local, tap] = sum_m dy[m, n] * act(v)[in_row(m, tap), group*cin_pg + c_local],
// act = relu(v * scale + shift) (zero at padding), dy as in dgrad.
struct ConvWgradParams {
  const void* g;      // [N, H_out, W_out, C_out]
  const void* pro_y;
  const void* pro_a;
  const void* pro_b;
  const void* pro_c;
  const void* v;      // [N, H, W, C_in]
  const void* scale;  // null (with shift): no BN+ReLU on v
  const void* shift;
  void* workspace;    // [splits, C_out, C_in/groups, k*k] in the accumulation type
  void* dw;           // (C_out, C_in/groups, k, k) in the grad dtype
  int64_t N, H, W, C_in, H_out, W_out, C_out;
  int ksize, stride, groups;
  int64_t rows_per_split;  // from conv_wgrad_plan
  int splits;
  // dw stored channels_last ((C_out, k, k, C_in/groups) in memory) instead of contiguous: the
  // layout of a channels_last model's 3x3 weight, so its gradient needs no copy.
  int dw_channels_last = 0;
};

// Split-K plan of the wgrad: rows per split is a multiple of the K step; `requested` <= 0
// picks about 4096 rows a split (at most 64 splits). The workspace has `splits` slices.
struct ConvWgradPlan {
  int64_t rows_per_split;
  int splits;
};

inline ConvWgradPlan conv_wgrad_plan(int64_t rows, int64_t requested) {
  int64_t splits = requested;
  if (splits <= 0) {
    splits = (rows + 4095) / 4096;
    if (splits > 64) splits = 64;
  }
  if (splits < 1) splits = 1;
  int64_t per = (rows + splits - 1) / splits;
  per = (per + kConvTileK - 1) / kConvTileK * kConvTileK;
  if (per < kConvTileK) per = kConvTileK;
  ConvWgradPlan plan;
  plan.rows_per_split = per;
  plan.splits = static_cast<int>(rows > 0 ? (rows + per - 1) / per : 1);
  return plan;
}

// Launch on `stream`; return the launch error. Never synchronise, never allocate.
// conv_fwd_cuda / conv_fwd_host run the kernel conv_fwd_uses_halo() picks; the *_halo_* entry
// points are that kernel itself (conv_fwd_halo.cu; only for conv_fwd_halo_applies shapes).
cudaError_t conv_fwd_cuda(const ConvFwdParams& p, ConvDtype dtype, cudaStream_t stream);
cudaError_t conv_fwd_halo_cuda(const ConvFwdParams& p, ConvDtype dtype, cudaStream_t stream);
void conv_fwd_halo_host(const ConvFwdParams& p, ConvDtype dtype);
cudaError_t conv_dgrad_cuda(const ConvDgradParams& p, ConvDtype dtype, cudaStream_t stream);
cudaError_t conv_wgrad_cuda(const ConvWgradParams& p, ConvDtype dtype, cudaStream_t stream);

// The same thread-block algorithms on the host (the CPU "thread block emulator").
void conv_fwd_host(const ConvFwdParams& p, ConvDtype dtype);
void conv_dgrad_host(const ConvDgradParams& p, ConvDtype dtype);
void conv_wgrad_host(const ConvWgradParams& p, ConvDtype dtype);

}  // namespace resnet_fused
