// The forward fused convolution as a tile problem (see conv_fused.h and conv_tile.cuh), shared
// by the per-tap implicit GEMM (conv_fwd.cu) and the halo-staged 3x3 (conv_fwd_halo.cu): the
// M tiling, the row decode, the per-tap and projection operand loads and the epilogues.
//
// GEMM view: rows m = (image, oh, ow) of the output, columns n = output channels of one group,
// K = (tap, input channel of that group) then, for a projection shortcut, the C_sc input
// channels of the block input at the strided rows.
#pragma once

#include "conv_tile.cuh"

namespace resnet_fused {
namespace conv_fwd_detail {

using namespace conv_tile;

template <typename T_>
struct FwdProblem {
  using T = T_;
  using Acc = AccOf<T>;

  struct Args {
    const T* x;
    const Acc* scale;
    const Acc* shift;
    const T* w;
    T* out;
    int64_t N, H_in, W_in, C_in, H_out, W_out, C_out;
    int ksize, stride, groups;
    int shortcut_kind, shortcut_stride;
    const T* shortcut;
    int64_t H_sc, W_sc, C_sc;
    const T* proj_w;
    const Acc* proj_scale;
    const Acc* proj_shift;
    Acc* partials;
    const Acc* post_scale;
    const Acc* post_shift;
    // Eval-mode BatchNorms read from their buffers (channel_affine): mean null = scale/shift given.
    const Acc *pro_mean, *pro_var, *proj_mean, *proj_var, *post_mean, *post_var;
    Acc pro_eps, proj_eps, post_eps;
    int close;  // ConvFwdParams::postact_close
    // Derived once on the host (make_fwd_args).
    int64_t M, cin_pg, cout_pg, tiles_m;
    int tiles_n_per_group, k_chunks, main_steps, proj_steps;
    // M tiling (conv_fwd_tiles_m): spatial != 0 for a 3x3, tiles_h x tiles_w tiles per image.
    int spatial;
    int64_t tiles_h, tiles_w;
  };

  struct Block {
    int64_t tile_m;
    int group;
    int col0;  // first output channel of the tile, local to the group
    // Spatial tiles only: the image and the first output row/column of the tile.
    int64_t img;
    int oh0, ow0;
  };

  static RF_HD Block block(unsigned bx, unsigned by, unsigned /*bz*/, const Args& a) {
    Block b;
    b.tile_m = bx;
    b.group = static_cast<int>(by / a.tiles_n_per_group);
    b.col0 = static_cast<int>(by % a.tiles_n_per_group) * kBN;
    b.img = 0;
    b.oh0 = 0;
    b.ow0 = 0;
    if (a.spatial) {
      const int64_t per_image = a.tiles_h * a.tiles_w;
      b.img = b.tile_m / per_image;
      const int64_t rem = b.tile_m - b.img * per_image;
      b.oh0 = static_cast<int>(rem / a.tiles_w) * kConvSpatialTileH;
      b.ow0 = static_cast<int>(rem % a.tiles_w) * kConvSpatialTileW;
    }
    return b;
  }

  // Rows of the tile: (image, oh, ow), once per block instead of once per load; row_n = -1 marks
  // rows past the end (flat tiles) or past the image edge (spatial tiles, row r = (r / 8, r % 8)).
  template <size_t R>
  static RF_HD void setup(const Block& blk, int tid, TileSmem<T, Acc, R>& s, const Args& a) {
    if (tid >= kBM) return;
    int img = -1, oh = 0, ow = 0;
    if (a.spatial) {
      const int h = blk.oh0 + tid / kConvSpatialTileW, w = blk.ow0 + tid % kConvSpatialTileW;
      if (h < a.H_out && w < a.W_out) {
        img = static_cast<int>(blk.img);
        oh = h;
        ow = w;
      }
    } else {
      const int64_t m = blk.tile_m * kBM + tid;
      if (m < a.M) {
        const int64_t hw = a.H_out * a.W_out;
        const int64_t n = m / hw;
        const int64_t rem = m - n * hw;
        img = static_cast<int>(n);
        oh = static_cast<int>(rem / a.W_out);
        ow = static_cast<int>(rem % a.W_out);
      }
    }
    s.row_n[tid] = img;
    s.row_h[tid] = oh;
    s.row_w[tid] = ow;
  }

  static RF_HD int num_steps(const Block&, const Args& a) { return a.main_steps + a.proj_steps; }

  // A [kBM x kBK]: the activated input at one tap (or, in the projection steps, the activated
  // block input at the strided rows). Padding, tile overhang and K overhang are zero in the
  // ACTIVATED domain: relu(shift) is not zero, so they are set after the prologue, not loaded.
  // B [kBK x kBN]: W[n, k, tap] (or proj_w[n, k]).
  template <size_t R>
  static RF_HD void load(const Block& blk, int step, int tid, TileSmem<T, Acc, R>& s, const Args& a) {
    const bool main = step < a.main_steps;
    int tap = 0, k0;
    if (main) {
      tap = step / a.k_chunks;
      k0 = (step % a.k_chunks) * kBK;
    } else {
      k0 = (step - a.main_steps) * kBK;
    }
    const int kh = tap / a.ksize, kw = tap % a.ksize, pad = a.ksize / 2;
    const int64_t k_extent = main ? a.cin_pg : a.C_sc;
    T* as = s.a();
    RF_UNROLL
    for (int i = 0; i < kBM * kBK / kThreads; ++i) {
      const int e = tid + kThreads * i;
      const int r = e / kBK, kk = e % kBK;
      const int64_t k = k0 + kk;
      const int img = s.row_n[r];
      Acc value = Acc(0);
      if (img >= 0 && k < k_extent) {
        if (main) {
          const int64_t ih = static_cast<int64_t>(s.row_h[r]) * a.stride - pad + kh;
          const int64_t iw = static_cast<int64_t>(s.row_w[r]) * a.stride - pad + kw;
          if (ih >= 0 && ih < a.H_in && iw >= 0 && iw < a.W_in) {
            const int64_t c = blk.group * a.cin_pg + k;
            value = static_cast<Acc>(widen(a.x[((img * a.H_in + ih) * a.W_in + iw) * a.C_in + c]));
            if (a.scale != nullptr || a.pro_mean != nullptr) {
              value = relu_keep_nan(channel_affine(value, c, a.scale, a.shift, a.pro_mean, a.pro_var, a.pro_eps));
            }
          }
        } else {
          const int64_t ih = static_cast<int64_t>(s.row_h[r]) * a.shortcut_stride;
          const int64_t iw = static_cast<int64_t>(s.row_w[r]) * a.shortcut_stride;
          value = static_cast<Acc>(widen(a.shortcut[((img * a.H_sc + ih) * a.W_sc + iw) * a.C_sc + k]));
          if (!a.close && (a.proj_scale != nullptr || a.proj_mean != nullptr)) {
            value = relu_keep_nan(
                channel_affine(value, k, a.proj_scale, a.proj_shift, a.proj_mean, a.proj_var, a.proj_eps));
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
      const int j = e / kBK, kk = e % kBK;  // adjacent threads: adjacent k (the weight's inner dims)
      const int64_t k = k0 + kk;
      const int64_t n_local = blk.col0 + j;
      T value = Narrow<T>::from(Acc(0));
      if (k < k_extent && n_local < a.cout_pg) {
        const int64_t n = blk.group * a.cout_pg + n_local;
        value = main ? a.w[(n * a.cin_pg + k) * taps + tap] : a.proj_w[n * a.C_sc + k];
        if (a.close && a.proj_steps > 0) value = closing_weight(value, n, main, a);
      }
      bs[kk * kLdB + j] = value;
    }
  }

  // A closing conv with a projection (ConvFwdParams::postact_close): the weight of output channel n
  // times its norm's scale (the main conv's post norm, or the projection's), rounded to T as the
  // operand is stored.
  static RF_HD T closing_weight(T w, int64_t n, bool main, const Args& a) {
    Acc s, b;
    if (main) {
      channel_coeffs(n, a.post_scale, a.post_shift, a.post_mean, a.post_var, a.post_eps, s, b);
    } else {
      channel_coeffs(n, a.proj_scale, a.proj_shift, a.proj_mean, a.proj_var, a.proj_eps, s, b);
    }
    return Narrow<T>::from(static_cast<Acc>(widen(w)) * s);
  }

  // The closing epilogue's value before its ReLU: post(acc) + shortcut, or, with the scales in the
  // weights (closing_weight), acc + both norms' shifts.
  template <size_t R>
  static RF_HD Acc closing_value(Acc value, int r, int64_t col, int img, const TileSmem<T, Acc, R>& s,
                                 const Args& a) {
    if (a.shortcut_kind == kShortcutProjection) {
      Acc ps, pb, qs, qb;
      channel_coeffs(col, a.post_scale, a.post_shift, a.post_mean, a.post_var, a.post_eps, ps, pb);
      channel_coeffs(col, a.proj_scale, a.proj_shift, a.proj_mean, a.proj_var, a.proj_eps, qs, qb);
      return value + (pb + qb);
    }
    const int64_t ih = static_cast<int64_t>(s.row_h[r]) * a.shortcut_stride;
    const int64_t iw = static_cast<int64_t>(s.row_w[r]) * a.shortcut_stride;
    return channel_affine(value, col, a.post_scale, a.post_shift, a.post_mean, a.post_var, a.post_eps) +
           static_cast<Acc>(widen(a.shortcut[((img * a.H_sc + ih) * a.W_sc + iw) * a.C_sc + col]));
  }

  // Shortcut add, rounding to the storage dtype, optional post BN+ReLU, store (or the closing
  // epilogue, closing_value). The C tile keeps the value as stored (widened) for the statistics
  // phase.
  template <size_t R>
  static RF_HD void epilogue_elementwise(const Block& blk, int tid, TileSmem<T, Acc, R>& s, const Args& a) {
    Acc* c = s.c();
    RF_UNROLL
    for (int i = 0; i < kBM * kBN / kThreads; ++i) {
      const int e = tid + kThreads * i;
      const int r = e / kBN, j = e % kBN;  // adjacent threads: adjacent channels (coalesced)
      const int img = s.row_n[r];
      const int64_t n_local = blk.col0 + j;
      if (img < 0 || n_local >= a.cout_pg) {
        c[r * kLdC + j] = Acc(0);
        continue;
      }
      const int64_t col = blk.group * a.cout_pg + n_local;
      Acc value = c[r * kLdC + j];
      const int64_t m = (static_cast<int64_t>(img) * a.H_out + s.row_h[r]) * a.W_out + s.row_w[r];
      if (a.close) {
        const T closed = Narrow<T>::from(relu_keep_nan(closing_value(value, r, col, img, s, a)));
        c[r * kLdC + j] = static_cast<Acc>(widen(closed));
        a.out[m * a.C_out + col] = closed;
        continue;
      }
      if (a.shortcut_kind == kShortcutAdd) {
        const int64_t ih = static_cast<int64_t>(s.row_h[r]) * a.shortcut_stride;
        const int64_t iw = static_cast<int64_t>(s.row_w[r]) * a.shortcut_stride;
        value += static_cast<Acc>(widen(a.shortcut[((img * a.H_sc + ih) * a.W_sc + iw) * a.C_sc + col]));
      }
      const T stored = Narrow<T>::from(value);
      const Acc stored_wide = static_cast<Acc>(widen(stored));
      c[r * kLdC + j] = stored_wide;
      T out = stored;
      if (a.post_scale != nullptr || a.post_mean != nullptr) {
        out = Narrow<T>::from(relu_keep_nan(
            channel_affine(stored_wide, col, a.post_scale, a.post_shift, a.post_mean, a.post_var, a.post_eps)));
      }
      a.out[m * a.C_out + col] = out;
    }
  }

  // Per-tile (count, mean, M2) of each column over the tile's valid rows, two passes over the
  // staged tile (exact within the tile), one thread per column, rows in ascending order:
  // deterministic.
  template <size_t R>
  static RF_HD void epilogue_columns(const Block& blk, int tid, TileSmem<T, Acc, R>& s, const Args& a) {
    if (a.partials == nullptr || tid >= kBN) return;
    const int64_t n_local = blk.col0 + tid;
    if (n_local >= a.cout_pg) return;
    const int64_t col = blk.group * a.cout_pg + n_local;
    stats_column_rows(s.c() + tid, kLdC, s.row_n, a.partials, a.tiles_m * a.C_out, blk.tile_m * a.C_out + col);
  }
};

// The kernel arguments and the grid (M tiles x (groups x N tiles per group)) of a forward conv.
template <typename T>
typename FwdProblem<T>::Args make_fwd_args(const ConvFwdParams& p, dim3& grid) {
  using Acc = AccOf<T>;
  typename FwdProblem<T>::Args a;
  a.x = static_cast<const T*>(p.x);
  a.scale = static_cast<const Acc*>(p.scale);
  a.shift = static_cast<const Acc*>(p.shift);
  a.w = static_cast<const T*>(p.w);
  a.out = static_cast<T*>(p.out);
  a.N = p.N;
  a.H_in = p.H_in;
  a.W_in = p.W_in;
  a.C_in = p.C_in;
  a.H_out = p.H_out;
  a.W_out = p.W_out;
  a.C_out = p.C_out;
  a.ksize = p.ksize;
  a.stride = p.stride;
  a.groups = p.groups;
  a.shortcut_kind = p.shortcut_kind;
  a.shortcut_stride = p.shortcut_stride;
  a.shortcut = static_cast<const T*>(p.shortcut);
  a.H_sc = p.H_sc;
  a.W_sc = p.W_sc;
  a.C_sc = p.C_sc;
  a.proj_w = static_cast<const T*>(p.proj_w);
  a.proj_scale = static_cast<const Acc*>(p.proj_scale);
  a.proj_shift = static_cast<const Acc*>(p.proj_shift);
  a.partials = static_cast<Acc*>(p.partials);
  a.post_scale = static_cast<const Acc*>(p.post_scale);
  a.post_shift = static_cast<const Acc*>(p.post_shift);
  a.pro_mean = static_cast<const Acc*>(p.pro_mean);
  a.pro_var = static_cast<const Acc*>(p.pro_var);
  a.pro_eps = static_cast<Acc>(p.pro_eps);
  a.proj_mean = static_cast<const Acc*>(p.proj_mean);
  a.proj_var = static_cast<const Acc*>(p.proj_var);
  a.proj_eps = static_cast<Acc>(p.proj_eps);
  a.post_mean = static_cast<const Acc*>(p.post_mean);
  a.post_var = static_cast<const Acc*>(p.post_var);
  a.post_eps = static_cast<Acc>(p.post_eps);
  a.close = p.postact_close;
  a.M = p.N * p.H_out * p.W_out;
  a.cin_pg = p.C_in / p.groups;
  a.cout_pg = p.C_out / p.groups;
  a.spatial = p.ksize != 1;
  a.tiles_h = ceil_div(p.H_out, kConvSpatialTileH);
  a.tiles_w = ceil_div(p.W_out, kConvSpatialTileW);
  a.tiles_m = conv_fwd_tiles_m(p.N, p.H_out, p.W_out, p.ksize);
  a.tiles_n_per_group = static_cast<int>(ceil_div(a.cout_pg, kBN));
  a.k_chunks = static_cast<int>(ceil_div(a.cin_pg, kBK));
  a.main_steps = p.ksize * p.ksize * a.k_chunks;
  a.proj_steps = p.shortcut_kind == kShortcutProjection ? static_cast<int>(ceil_div(p.C_sc, kBK)) : 0;
  grid = dim3(static_cast<unsigned>(a.tiles_m), static_cast<unsigned>(p.groups * a.tiles_n_per_group), 1);
  return a;
}

}  // namespace conv_fwd_detail
}  // namespace resnet_fused
