// Weight-gradient (wgrad) GEMM of the fused convolution (see conv_fused.h): the BN-backward
// apply on the gradient operand and the BN-apply + ReLU recompute of the saved input as
// prologues, split-K over the output rows.
//
// GEMM view, one launch per (tap, split): rows n = output channels of one group, columns
// c = input channels of that group, K = output rows m of this split. Each block writes its fp32
// (fp64 for fp64) partial [n, c] of one tap and split to the workspace [splits, C_out, cin_pg,
// k*k]; a second kernel sums the splits in ascending order into the weight layout (C_out,
// cin_pg, k, k). No float atomics, so the result is bitwise reproducible.
#include "conv_tile.cuh"

namespace resnet_fused {
namespace {

using namespace conv_tile;

template <typename T_>
struct WgradProblem {
  using T = T_;
  using Acc = AccOf<T>;

  struct Args {
    const T* g;
    const T* pro_y;
    const Acc* pro_a;
    const Acc* pro_b;
    const Acc* pro_c;
    const T* v;
    const Acc* scale;
    const Acc* shift;
    Acc* workspace;
    int64_t N, H, W, C_in, H_out, W_out, C_out;
    int ksize, stride, groups;
    int64_t rows_per_split;
    int64_t M, cin_pg, cout_pg;
    int tiles_n, tiles_c;  // per group
  };

  struct Block {
    int group;
    int row0;  // first output channel (GEMM row), local to the group
    int col0;  // first input channel (GEMM column), local to the group
    int tap;
    int64_t m_begin, m_end;  // this split's output rows
  };

  static RF_HD Block block(unsigned bx, unsigned by, unsigned bz, const Args& a) {
    Block b;
    const unsigned per_group = static_cast<unsigned>(a.tiles_n * a.tiles_c);
    b.group = static_cast<int>(bx / per_group);
    const unsigned rem = bx % per_group;
    b.row0 = static_cast<int>(rem / a.tiles_c) * kBM;
    b.col0 = static_cast<int>(rem % a.tiles_c) * kBN;
    b.tap = static_cast<int>(by);
    b.m_begin = static_cast<int64_t>(bz) * a.rows_per_split;
    const int64_t end = b.m_begin + a.rows_per_split;
    b.m_end = end < a.M ? end : a.M;
    return b;
  }

  static RF_HD void setup(const Block&, int, TileSmem<T, Acc>&, const Args&) {}

  static RF_HD int num_steps(const Block& blk, const Args&) {
    return blk.m_end > blk.m_begin ? static_cast<int>(ceil_div_hd(blk.m_end - blk.m_begin, kBK)) : 0;
  }

  static RF_HD int64_t ceil_div_hd(int64_t x, int64_t y) { return (x + y - 1) / y; }

  // A [kBM x kBK] = dy^T: A[n, m] = a*g + b*y + c at output row m, channel n (zero past the
  // split or the channels, after the affine). B [kBK x kBN]: relu(v * scale + shift) at the input
  // row this tap reads for output row m, zero at padding (in the ACTIVATED domain); without
  // scale/shift (null) the raw input v itself, a plain conv's wgrad.
  static RF_HD void load(const Block& blk, int step, int tid, TileSmem<T, Acc>& s, const Args& a) {
    const int64_t m0 = blk.m_begin + static_cast<int64_t>(step) * kBK;
    T* as = s.a();
    RF_UNROLL
    for (int i = 0; i < kBM * kBK / kThreads; ++i) {
      const int e = tid + kThreads * i;
      const int r = e % kBM, kk = e / kBM;  // adjacent threads: adjacent channels (coalesced)
      const int64_t m = m0 + kk;
      const int64_t n_local = blk.row0 + r;
      Acc value = Acc(0);
      if (m < blk.m_end && n_local < a.cout_pg) {
        const int64_t at = m * a.C_out + blk.group * a.cout_pg + n_local;
        const int64_t n = blk.group * a.cout_pg + n_local;
        value = static_cast<Acc>(widen(a.g[at]));
        if (a.pro_a != nullptr) {
          value = a.pro_a[n] * value + a.pro_b[n] * static_cast<Acc>(widen(a.pro_y[at])) + a.pro_c[n];
        }
      }
      as[r * kLdA + kk] = Narrow<T>::from(value);
    }
    T* bs = s.b();
    const int kh = blk.tap / a.ksize, kw = blk.tap % a.ksize, pad = a.ksize / 2;
    const int64_t hw_out = a.H_out * a.W_out;
    RF_UNROLL
    for (int i = 0; i < kBK * kBN / kThreads; ++i) {
      const int e = tid + kThreads * i;
      const int kk = e / kBN, j = e % kBN;
      const int64_t m = m0 + kk;
      const int64_t c_local = blk.col0 + j;
      Acc value = Acc(0);
      if (m < blk.m_end && c_local < a.cin_pg) {
        const int64_t img = m / hw_out;
        const int64_t rem = m - img * hw_out;
        const int64_t ih = (rem / a.W_out) * a.stride - pad + kh;
        const int64_t iw = (rem % a.W_out) * a.stride - pad + kw;
        if (ih >= 0 && ih < a.H && iw >= 0 && iw < a.W) {
          const int64_t c = blk.group * a.cin_pg + c_local;
          const Acc v = static_cast<Acc>(widen(a.v[((img * a.H + ih) * a.W + iw) * a.C_in + c]));
          value = a.scale != nullptr ? relu_keep_nan(v * a.scale[c] + a.shift[c]) : v;
        }
      }
      bs[kk * kLdB + j] = Narrow<T>::from(value);
    }
  }

  // The block's partial, unrounded, into its (split, tap) slice of the workspace.
  static RF_HD void epilogue_elementwise(const Block& blk, int tid, TileSmem<T, Acc>& s, const Args& a) {
    const Acc* c = s.c();
    const int taps = a.ksize * a.ksize;
    const int64_t split = a.rows_per_split > 0 ? blk.m_begin / a.rows_per_split : 0;
    RF_UNROLL
    for (int i = 0; i < kBM * kBN / kThreads; ++i) {
      const int e = tid + kThreads * i;
      const int r = e / kBN, j = e % kBN;
      const int64_t n_local = blk.row0 + r, c_local = blk.col0 + j;
      if (n_local >= a.cout_pg || c_local >= a.cin_pg) continue;
      const int64_t n = blk.group * a.cout_pg + n_local;
      a.workspace[((split * a.C_out + n) * a.cin_pg + c_local) * taps + blk.tap] = c[r * kLdC + j];
    }
  }

  static RF_HD void epilogue_columns(const Block&, int, TileSmem<T, Acc>&, const Args&) {}
};

// dW[e] = sum over splits, in ascending order, of workspace[split][e]; e runs over the weight
// layout (C_out, cin_pg, k, k), which is the workspace slice layout. With `taps` > 0 the result is
// stored channels_last: element (n, c, tap) at (n * taps + tap) * cin_pg + c.
template <typename T, typename Acc>
RF_HD void reduce_splits(const Acc* workspace, int splits, int64_t elements, int64_t e, T* dw, int64_t cin_pg,
                         int taps) {
  Acc sum = Acc(0);
  for (int split = 0; split < splits; ++split) sum += workspace[split * elements + e];
  int64_t at = e;
  if (taps > 0) {
    const int64_t tap = e % taps, c = (e / taps) % cin_pg, n = e / (taps * cin_pg);
    at = (n * taps + tap) * cin_pg + c;
  }
  dw[at] = Narrow<T>::from(sum);
}

constexpr int kReduceThreads = 256;

template <typename T, typename Acc>
__global__ void __launch_bounds__(kReduceThreads)
    wgrad_reduce_kernel(const Acc* __restrict__ workspace, int splits, int64_t elements, T* __restrict__ dw,
                        int64_t cin_pg, int taps) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (e < elements) reduce_splits(workspace, splits, elements, e, dw, cin_pg, taps);
}

template <typename T>
typename WgradProblem<T>::Args make_args(const ConvWgradParams& p, dim3& grid) {
  using Acc = AccOf<T>;
  typename WgradProblem<T>::Args a;
  copy_grad_operand<T>(a, p);
  a.v = static_cast<const T*>(p.v);
  a.scale = static_cast<const Acc*>(p.scale);
  a.shift = static_cast<const Acc*>(p.shift);
  a.workspace = static_cast<Acc*>(p.workspace);
  copy_backward_geometry(a, p);
  a.rows_per_split = p.rows_per_split;
  a.M = p.N * p.H_out * p.W_out;
  a.cin_pg = p.C_in / p.groups;
  a.cout_pg = p.C_out / p.groups;
  a.tiles_n = static_cast<int>(ceil_div(a.cout_pg, kBM));
  a.tiles_c = static_cast<int>(ceil_div(a.cin_pg, kBN));
  grid = dim3(static_cast<unsigned>(p.groups * a.tiles_n * a.tiles_c),
              static_cast<unsigned>(p.ksize * p.ksize), static_cast<unsigned>(p.splits));
  return a;
}

template <typename T>
cudaError_t launch_typed(const ConvWgradParams& p, cudaStream_t stream) {
  using Acc = AccOf<T>;
  dim3 grid;
  const auto args = make_args<T>(p, grid);
  if (grid.z > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  cudaError_t err = launch_blocks<WgradProblem<T>>(args, grid, stream);
  if (err != cudaSuccess) return err;
  const int64_t elements = p.C_out * args.cin_pg * p.ksize * p.ksize;
  const int64_t blocks = ceil_div(elements, kReduceThreads);
  if (blocks == 0) return cudaSuccess;
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  wgrad_reduce_kernel<T, Acc><<<static_cast<unsigned>(blocks), kReduceThreads, 0, stream>>>(
      static_cast<const Acc*>(p.workspace), p.splits, elements, static_cast<T*>(p.dw), args.cin_pg,
      p.dw_channels_last ? p.ksize * p.ksize : 0);
  return cudaGetLastError();
}

template <typename T>
void host_typed(const ConvWgradParams& p) {
  using Acc = AccOf<T>;
  dim3 grid;
  const auto args = make_args<T>(p, grid);
  run_blocks_host<WgradProblem<T>>(args, grid);
  const int64_t elements = p.C_out * args.cin_pg * p.ksize * p.ksize;
  for (int64_t e = 0; e < elements; ++e) {
    reduce_splits(static_cast<const Acc*>(p.workspace), p.splits, elements, e, static_cast<T*>(p.dw), args.cin_pg,
                  p.dw_channels_last ? p.ksize * p.ksize : 0);
  }
}

}  // namespace

cudaError_t conv_wgrad_cuda(const ConvWgradParams& p, ConvDtype dtype, cudaStream_t stream) {
  return dispatch_conv_dtype(dtype, [&](auto tag) { return launch_typed<TagType<decltype(tag)>>(p, stream); });
}

void conv_wgrad_host(const ConvWgradParams& p, ConvDtype dtype) {
  dispatch_conv_dtype(dtype, [&](auto tag) { host_typed<TagType<decltype(tag)>>(p); });
}

}  // namespace resnet_fused
