// Input-gradient (dgrad) GEMM of the fused convolution (see conv_fused.h), with the BN-backward
// apply of the following norm as the gradient operand's prologue, the projection shortcut's
// dgrad as a second K-loop into the same accumulator, and the ReLU mask + BN sums of the
// preceding norm as the epilogue (docs/design.md section 4).
//
// GEMM view: rows p = (image, ih, iw) of the conv INPUT, columns c = input channels of one group,
// K = (tap, output channel k of that group): output position o(p, tap) is the one whose tap
// reads p, oh = (ih + pad - kh) / stride when that divides exactly and lies inside the output
// (stride holes and borders contribute nothing). The gather form (one output element per
// thread-block row) needs no atomics and no zero-initialised output.
#include "conv_tile.cuh"

namespace resnet_fused {
namespace {

using namespace conv_tile;

template <typename T_>
struct DgradProblem {
  using T = T_;
  using Acc = AccOf<T>;

  struct Args {
    const T* g;
    const T* pro_y;
    const Acc* pro_a;
    const Acc* pro_b;
    const Acc* pro_c;
    const T* w;
    const T* second_grad;
    const T* second_w;
    int64_t K2, H2, W2;
    int second_stride;
    const T* v;
    const Acc* scale;
    const Acc* shift;
    const Acc* mean;
    const Acc* invstd;
    T* out;
    Acc* sums;
    int64_t N, H, W, C_in, H_out, W_out, C_out;
    int ksize, stride, groups;
    int64_t M, cin_pg, cout_pg, tiles_m;
    int tiles_n_per_group, k_chunks, main_steps, second_steps;
  };

  struct Block {
    int64_t tile_m;
    int group;
    int col0;  // first input channel of the tile, local to the group
  };

  static RF_HD Block block(unsigned bx, unsigned by, unsigned, const Args& a) {
    Block b;
    b.tile_m = bx;
    b.group = static_cast<int>(by / a.tiles_n_per_group);
    b.col0 = static_cast<int>(by % a.tiles_n_per_group) * kBN;
    return b;
  }

  static RF_HD void setup(const Block& blk, int tid, TileSmem<T, Acc>& s, const Args& a) {
    if (tid >= kBM) return;
    const int64_t m = blk.tile_m * kBM + tid;
    if (m < a.M) {
      const int64_t hw = a.H * a.W;
      const int64_t img = m / hw;
      const int64_t rem = m - img * hw;
      s.row_n[tid] = static_cast<int>(img);
      s.row_h[tid] = static_cast<int>(rem / a.W);
      s.row_w[tid] = static_cast<int>(rem % a.W);
    } else {
      s.row_n[tid] = -1;
      s.row_h[tid] = 0;
      s.row_w[tid] = 0;
    }
  }

  static RF_HD int num_steps(const Block&, const Args& a) { return a.main_steps + a.second_steps; }

  // A [kBM x kBK]: dy at the output position each input row feeds through this tap, with the
  // BN-backward apply a*g + b*y + c; zero where no such position exists, set AFTER the affine (a
  // zero-filled load would otherwise become c). Second loop: the projection's output gradient at
  // the rows on its stride grid, as is.
  // B [kBK x kBN]: W[k, c, tap] (or second_w[k2, c]).
  static RF_HD void load(const Block& blk, int step, int tid, TileSmem<T, Acc>& s, const Args& a) {
    const bool main = step < a.main_steps;
    int tap = 0, k0;
    if (main) {
      tap = step / a.k_chunks;
      k0 = (step % a.k_chunks) * kBK;
    } else {
      k0 = (step - a.main_steps) * kBK;
    }
    const int kh = tap / a.ksize, kw = tap % a.ksize, pad = a.ksize / 2;
    const int64_t k_extent = main ? a.cout_pg : a.K2;
    T* as = s.a();
    RF_UNROLL
    for (int i = 0; i < kBM * kBK / kThreads; ++i) {
      const int e = tid + kThreads * i;
      const int r = e / kBK, kk = e % kBK;
      const int64_t k = k0 + kk;
      const int img = s.row_n[r];
      const int ih = s.row_h[r], iw = s.row_w[r];
      Acc value = Acc(0);
      if (img >= 0 && k < k_extent) {
        if (main) {
          const int oh_s = ih + pad - kh, ow_s = iw + pad - kw;
          if (oh_s >= 0 && ow_s >= 0 && oh_s % a.stride == 0 && ow_s % a.stride == 0 &&
              oh_s / a.stride < a.H_out && ow_s / a.stride < a.W_out) {
            const int64_t o = (img * a.H_out + oh_s / a.stride) * a.W_out + ow_s / a.stride;
            const int64_t kg = blk.group * a.cout_pg + k;
            value = static_cast<Acc>(widen(a.g[o * a.C_out + kg]));
            if (a.pro_a != nullptr) {
              value = a.pro_a[kg] * value + a.pro_b[kg] * static_cast<Acc>(widen(a.pro_y[o * a.C_out + kg])) +
                      a.pro_c[kg];
            }
          }
        } else {
          const int s2 = a.second_stride;
          if (ih % s2 == 0 && iw % s2 == 0 && ih / s2 < a.H2 && iw / s2 < a.W2) {
            value = static_cast<Acc>(widen(a.second_grad[((img * a.H2 + ih / s2) * a.W2 + iw / s2) * a.K2 + k]));
          }
        }
      }
      as[r * kLdA + kk] = Narrow<T>::from(value);
    }
    T* bs = s.b();
    const int taps = a.ksize * a.ksize;
    RF_UNROLL
    for (int i = 0; i < kBK * kBN / kThreads; ++i) {
      const int e = tid + kThreads * i;
      const int kk = e / kBN, j = e % kBN;
      const int64_t k = k0 + kk;
      const int64_t c_local = blk.col0 + j;
      T value = Narrow<T>::from(Acc(0));
      if (k < k_extent && c_local < a.cin_pg) {
        if (main) {
          value = a.w[((blk.group * a.cout_pg + k) * a.cin_pg + c_local) * taps + tap];
        } else {
          value = a.second_w[k * a.C_in + blk.group * a.cin_pg + c_local];
        }
      }
      bs[kk * kLdB + j] = value;
    }
  }

  // g' = dA * [v * scale + shift > 0], rounded to the grad dtype and stored; the C tile keeps
  // g' as stored (widened) for the sums, which must be of what the next kernels read.
  static RF_HD void epilogue_elementwise(const Block& blk, int tid, TileSmem<T, Acc>& s, const Args& a) {
    Acc* c = s.c();
    RF_UNROLL
    for (int i = 0; i < kBM * kBN / kThreads; ++i) {
      const int e = tid + kThreads * i;
      const int r = e / kBN, j = e % kBN;
      const int64_t c_local = blk.col0 + j;
      if (s.row_n[r] < 0 || c_local >= a.cin_pg) {
        c[r * kLdC + j] = Acc(0);
        continue;
      }
      const int64_t col = blk.group * a.cin_pg + c_local;
      const int64_t at = (blk.tile_m * kBM + r) * a.C_in + col;
      c[r * kLdC + j] = relu_mask_store(c[r * kLdC + j], static_cast<Acc>(widen(a.v[at])), a.scale[col],
                                        a.shift[col], a.out + at);
    }
  }

  // Per-tile sums of g' and g' * xhat (dbeta and dgamma partials), rows in ascending order.
  static RF_HD void epilogue_columns(const Block& blk, int tid, TileSmem<T, Acc>& s, const Args& a) {
    if (tid >= kBN) return;
    const int64_t c_local = blk.col0 + tid;
    if (c_local >= a.cin_pg) return;
    const int64_t col = blk.group * a.cin_pg + c_local;
    const int64_t rows_left = a.M - blk.tile_m * kBM;
    const int rows = static_cast<int>(rows_left < kBM ? rows_left : kBM);
    relu_sums_column(s.c() + tid, kLdC, rows, a.v + blk.tile_m * kBM * a.C_in + col, a.C_in, a.mean[col],
                     a.invstd[col], a.sums, a.tiles_m * a.C_in, blk.tile_m * a.C_in + col);
  }
};

template <typename T>
typename DgradProblem<T>::Args make_args(const ConvDgradParams& p, dim3& grid) {
  using Acc = AccOf<T>;
  typename DgradProblem<T>::Args a;
  copy_grad_operand<T>(a, p);
  a.w = static_cast<const T*>(p.w);
  a.second_grad = static_cast<const T*>(p.second_grad);
  a.second_w = static_cast<const T*>(p.second_w);
  a.K2 = p.second_grad != nullptr ? p.K2 : 0;
  a.H2 = p.H2;
  a.W2 = p.W2;
  a.second_stride = p.second_stride;
  a.v = static_cast<const T*>(p.v);
  a.scale = static_cast<const Acc*>(p.scale);
  a.shift = static_cast<const Acc*>(p.shift);
  a.mean = static_cast<const Acc*>(p.mean);
  a.invstd = static_cast<const Acc*>(p.invstd);
  a.out = static_cast<T*>(p.out);
  a.sums = static_cast<Acc*>(p.sums);
  copy_backward_geometry(a, p);
  a.M = p.N * p.H * p.W;
  a.cin_pg = p.C_in / p.groups;
  a.cout_pg = p.C_out / p.groups;
  a.tiles_m = conv_tiles_m(a.M);
  a.tiles_n_per_group = static_cast<int>(ceil_div(a.cin_pg, kBN));
  a.k_chunks = static_cast<int>(ceil_div(a.cout_pg, kBK));
  a.main_steps = p.ksize * p.ksize * a.k_chunks;
  a.second_steps = static_cast<int>(ceil_div(a.K2, kBK));
  grid = dim3(static_cast<unsigned>(a.tiles_m), static_cast<unsigned>(p.groups * a.tiles_n_per_group), 1);
  return a;
}

template <typename T>
cudaError_t launch_typed(const ConvDgradParams& p, cudaStream_t stream) {
  dim3 grid;
  const auto args = make_args<T>(p, grid);
  if (args.tiles_m > kMaxGridX || grid.y > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  return launch_blocks<DgradProblem<T>>(args, grid, stream);
}

template <typename T>
void host_typed(const ConvDgradParams& p) {
  dim3 grid;
  const auto args = make_args<T>(p, grid);
  run_blocks_host<DgradProblem<T>>(args, grid);
}

}  // namespace

cudaError_t conv_dgrad_cuda(const ConvDgradParams& p, ConvDtype dtype, cudaStream_t stream) {
  return dispatch_conv_dtype(dtype, [&](auto tag) { return launch_typed<TagType<decltype(tag)>>(p, stream); });
}

void conv_dgrad_host(const ConvDgradParams& p, ConvDtype dtype) {
  dispatch_conv_dtype(dtype, [&](auto tag) { host_typed<TagType<decltype(tag)>>(p); });
}

}  // namespace resnet_fused
