// The elementwise BatchNorm/ReLU passes of bn_elementwise.h. Each is a block algorithm over one
// [kBM rows x kBN channels] tile with at most two phases: `elementwise` (every thread takes the
// elements tid, tid + 256, ... with adjacent threads on adjacent channels, so the NHWC accesses
// coalesce) and `columns` (one thread per channel, for per-tile reductions in a fixed order).
// ew_kernel runs them on the GPU with a __syncthreads() between; run_ew_host runs the same
// functions for every block and thread on the CPU.
#include "bn_elementwise.h"

#include "conv_tile.cuh"

namespace resnet_fused {
namespace {

using namespace conv_tile;

struct EwBlock {
  int64_t tile_m;
  int col0;
  int rows;  // valid rows of the tile
};

RF_HD EwBlock ew_block(unsigned bx, unsigned by, int64_t M) {
  EwBlock b;
  b.tile_m = bx;
  b.col0 = static_cast<int>(by) * kBN;
  const int64_t left = M - b.tile_m * kBM;
  b.rows = static_cast<int>(left < kBM ? left : kBM);
  return b;
}

constexpr int kEwPerThread = kBM * kBN / kThreads;

template <typename T_>
struct BnReluApply {
  using T = T_;
  using Acc = AccOf<T>;
  struct Args {
    const T* x;
    const Acc* scale;
    const Acc* shift;
    T* out;
    int64_t M, C;
  };
  static constexpr bool kColumns = false;
  static RF_HD void elementwise(const EwBlock& blk, int tid, TileSmem<T, Acc>&, const Args& a) {
    RF_UNROLL
    for (int i = 0; i < kEwPerThread; ++i) {
      const int e = tid + kThreads * i;
      const int r = e / kBN;
      const int64_t col = blk.col0 + e % kBN;
      if (r >= blk.rows || col >= a.C) continue;
      const int64_t at = (blk.tile_m * kBM + r) * a.C + col;
      a.out[at] = Narrow<T>::from(relu_keep_nan(static_cast<Acc>(widen(a.x[at])) * a.scale[col] + a.shift[col]));
    }
  }
  static RF_HD void columns(const EwBlock&, int, TileSmem<T, Acc>&, const Args&) {}
};

template <typename T_>
struct ReluGradSums {
  using T = T_;
  using Acc = AccOf<T>;
  struct Args {
    const T* grad;
    const T* extra;
    const T* v;
    const Acc* scale;
    const Acc* shift;
    const Acc* mean;
    const Acc* invstd;
    T* out;
    Acc* sums;
    int64_t M, C, tiles_m;
  };
  static constexpr bool kColumns = true;
  // The extra gradient (the projection's, of the same activation) joins BEFORE the mask/sums.
  static RF_HD void elementwise(const EwBlock& blk, int tid, TileSmem<T, Acc>& s, const Args& a) {
    Acc* c = s.c();
    RF_UNROLL
    for (int i = 0; i < kEwPerThread; ++i) {
      const int e = tid + kThreads * i;
      const int r = e / kBN, j = e % kBN;
      const int64_t col = blk.col0 + j;
      if (r >= blk.rows || col >= a.C) {
        c[r * kLdC + j] = Acc(0);
        continue;
      }
      const int64_t at = (blk.tile_m * kBM + r) * a.C + col;
      Acc g = static_cast<Acc>(widen(a.grad[at]));
      if (a.extra != nullptr) g += static_cast<Acc>(widen(a.extra[at]));
      c[r * kLdC + j] = relu_mask_store(g, static_cast<Acc>(widen(a.v[at])), a.scale[col], a.shift[col], a.out + at);
    }
  }
  static RF_HD void columns(const EwBlock& blk, int tid, TileSmem<T, Acc>& s, const Args& a) {
    const int64_t col = blk.col0 + tid;
    if (tid >= kBN || col >= a.C) return;
    relu_sums_column(s.c() + tid, kLdC, blk.rows, a.v + blk.tile_m * kBM * a.C + col, a.C, a.mean[col],
                     a.invstd[col], a.sums, a.tiles_m * a.C, blk.tile_m * a.C + col);
  }
};

template <typename T_>
struct BnBackwardApply {
  using T = T_;
  using Acc = AccOf<T>;
  struct Args {
    const T* g;
    const T* v;
    const Acc* a;
    const Acc* b;
    const Acc* c;
    const T* shortcut_grad;
    T* out;
    int64_t M, H, W, C, H_sc, W_sc;
    int shortcut_stride;
  };
  static constexpr bool kColumns = false;
  // The shortcut's gradient: the block-output gradient at the (strided) position this input row
  // feeds; rows off the stride grid get nothing.
  static RF_HD void elementwise(const EwBlock& blk, int tid, TileSmem<T, Acc>&, const Args& p) {
    RF_UNROLL
    for (int i = 0; i < kEwPerThread; ++i) {
      const int e = tid + kThreads * i;
      const int r = e / kBN;
      const int64_t col = blk.col0 + e % kBN;
      if (r >= blk.rows || col >= p.C) continue;
      const int64_t m = blk.tile_m * kBM + r;
      const int64_t at = m * p.C + col;
      Acc dv = p.a[col] * static_cast<Acc>(widen(p.g[at])) + p.b[col] * static_cast<Acc>(widen(p.v[at])) + p.c[col];
      if (p.shortcut_grad != nullptr) {
        const int64_t hw = p.H * p.W;
        const int64_t img = m / hw;
        const int64_t ih = (m - img * hw) / p.W, iw = m % p.W;
        const int s = p.shortcut_stride;
        if (ih % s == 0 && iw % s == 0) {
          dv += static_cast<Acc>(widen(p.shortcut_grad[((img * p.H_sc + ih / s) * p.W_sc + iw / s) * p.C + col]));
        }
      }
      p.out[at] = Narrow<T>::from(dv);
    }
  }
  static RF_HD void columns(const EwBlock&, int, TileSmem<T, Acc>&, const Args&) {}
};

template <typename T_>
struct StatsPartials {
  using T = T_;
  using Acc = AccOf<T>;
  struct Args {
    const T* x;
    Acc* partials;
    int64_t M, C, tiles_m;
  };
  static constexpr bool kColumns = true;
  static RF_HD void elementwise(const EwBlock& blk, int tid, TileSmem<T, Acc>& s, const Args& a) {
    Acc* c = s.c();
    RF_UNROLL
    for (int i = 0; i < kEwPerThread; ++i) {
      const int e = tid + kThreads * i;
      const int r = e / kBN, j = e % kBN;
      const int64_t col = blk.col0 + j;
      c[r * kLdC + j] = r < blk.rows && col < a.C ? static_cast<Acc>(widen(a.x[(blk.tile_m * kBM + r) * a.C + col]))
                                                  : Acc(0);
    }
  }
  static RF_HD void columns(const EwBlock& blk, int tid, TileSmem<T, Acc>& s, const Args& a) {
    const int64_t col = blk.col0 + tid;
    if (tid >= kBN || col >= a.C) return;
    stats_column(s.c() + tid, kLdC, blk.rows, a.partials, a.tiles_m * a.C, blk.tile_m * a.C + col);
  }
};

// z = y * scale + shift + (sc, or sc * sc_scale + sc_shift with a projection) at element `at`.
template <typename T, typename Acc>
RF_HD Acc postact_z(const T* y, const T* sc, const Acc* scale, const Acc* shift, const Acc* sc_scale,
                    const Acc* sc_shift, int64_t at, int64_t col) {
  const Acc s = static_cast<Acc>(widen(sc[at]));
  const Acc z = static_cast<Acc>(widen(y[at])) * scale[col] + shift[col];
  return sc_scale != nullptr ? z + (s * sc_scale[col] + sc_shift[col]) : z + s;
}

template <typename T_>
struct PostactOut {
  using T = T_;
  using Acc = AccOf<T>;
  struct Args {
    const T* y;
    const T* sc;
    const Acc* scale;
    const Acc* shift;
    const Acc* sc_scale;
    const Acc* sc_shift;
    T* out;
    int64_t M, C;
  };
  static constexpr bool kColumns = false;
  static RF_HD void elementwise(const EwBlock& blk, int tid, TileSmem<T, Acc>&, const Args& a) {
    RF_UNROLL
    for (int i = 0; i < kEwPerThread; ++i) {
      const int e = tid + kThreads * i;
      const int r = e / kBN;
      const int64_t col = blk.col0 + e % kBN;
      if (r >= blk.rows || col >= a.C) continue;
      const int64_t at = (blk.tile_m * kBM + r) * a.C + col;
      a.out[at] = Narrow<T>::from(relu_keep_nan(postact_z(a.y, a.sc, a.scale, a.shift, a.sc_scale, a.sc_shift, at, col)));
    }
  }
  static RF_HD void columns(const EwBlock&, int, TileSmem<T, Acc>&, const Args&) {}
};

template <typename T_>
struct PostactOutBackward {
  using T = T_;
  using Acc = AccOf<T>;
  struct Args {
    const T* grad;
    const T* y;
    const T* sc;
    const Acc* scale;
    const Acc* shift;
    const Acc* sc_scale;
    const Acc* sc_shift;
    const Acc* mean;
    const Acc* invstd;
    const Acc* sc_mean;
    const Acc* sc_invstd;
    T* out;
    Acc* sums;
    Acc* sc_sums;
    int64_t M, C, tiles_m;
  };
  static constexpr bool kColumns = true;
  // g' = grad where z > 0 (NaN masks to 0), stored; the staged tile keeps g' as stored.
  static RF_HD void elementwise(const EwBlock& blk, int tid, TileSmem<T, Acc>& s, const Args& a) {
    Acc* c = s.c();
    RF_UNROLL
    for (int i = 0; i < kEwPerThread; ++i) {
      const int e = tid + kThreads * i;
      const int r = e / kBN, j = e % kBN;
      const int64_t col = blk.col0 + j;
      if (r >= blk.rows || col >= a.C) {
        c[r * kLdC + j] = Acc(0);
        continue;
      }
      const int64_t at = (blk.tile_m * kBM + r) * a.C + col;
      const Acc z = postact_z(a.y, a.sc, a.scale, a.shift, a.sc_scale, a.sc_shift, at, col);
      const T stored = Narrow<T>::from(z > Acc(0) ? static_cast<Acc>(widen(a.grad[at])) : Acc(0));
      a.out[at] = stored;
      c[r * kLdC + j] = static_cast<Acc>(widen(stored));
    }
  }
  static RF_HD void columns(const EwBlock& blk, int tid, TileSmem<T, Acc>& s, const Args& a) {
    const int64_t col = blk.col0 + tid;
    if (tid >= kBN || col >= a.C) return;
    const int64_t row0 = blk.tile_m * kBM * a.C + col;
    const int64_t plane = a.tiles_m * a.C, at = blk.tile_m * a.C + col;
    relu_sums_column(s.c() + tid, kLdC, blk.rows, a.y + row0, a.C, a.mean[col], a.invstd[col], a.sums, plane, at);
    if (a.sc_sums != nullptr) {
      relu_sums_column(s.c() + tid, kLdC, blk.rows, a.sc + row0, a.C, a.sc_mean[col], a.sc_invstd[col], a.sc_sums,
                       plane, at);
    }
  }
};

template <class Problem>
__global__ void __launch_bounds__(kThreads) ew_kernel(const typename Problem::Args args) {
  __shared__ TileSmem<typename Problem::T, typename Problem::Acc> smem;
  const EwBlock blk = ew_block(blockIdx.x, blockIdx.y, args.M);
  Problem::elementwise(blk, threadIdx.x, smem, args);
  if (Problem::kColumns) {
    __syncthreads();
    Problem::columns(blk, threadIdx.x, smem, args);
  }
}

template <class Problem>
dim3 ew_grid(const typename Problem::Args& a) {
  return dim3(static_cast<unsigned>(conv_tiles_m(a.M)), static_cast<unsigned>(ceil_div(a.C, kBN)), 1);
}

template <class Problem>
cudaError_t launch_ew(const typename Problem::Args& args, cudaStream_t stream) {
  const dim3 grid = ew_grid<Problem>(args);
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  if (conv_tiles_m(args.M) > kMaxGridX || grid.y > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  ew_kernel<Problem><<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <class Problem>
void run_ew_host(const typename Problem::Args& args) {
  using Smem = TileSmem<typename Problem::T, typename Problem::Acc>;
  std::unique_ptr<Smem> smem(new Smem());
  const dim3 grid = ew_grid<Problem>(args);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      const EwBlock blk = ew_block(bx, by, args.M);
      poison_host(*smem);  // see conv_tile.cuh: unwritten staging reads show up as NaN
      for_each_thread_host([&](int tid) { Problem::elementwise(blk, tid, *smem, args); });
      if (Problem::kColumns) {
        for_each_thread_host([&](int tid) { Problem::columns(blk, tid, *smem, args); });
      }
    }
  }
}

template <typename T>
typename BnReluApply<T>::Args args_of(const BnReluApplyParams& p) {
  using Acc = AccOf<T>;
  return {static_cast<const T*>(p.x), static_cast<const Acc*>(p.scale), static_cast<const Acc*>(p.shift),
          static_cast<T*>(p.out), p.M, p.C};
}

template <typename T>
typename ReluGradSums<T>::Args args_of(const ReluGradSumsParams& p) {
  using Acc = AccOf<T>;
  return {static_cast<const T*>(p.grad), static_cast<const T*>(p.extra), static_cast<const T*>(p.v),
          static_cast<const Acc*>(p.scale), static_cast<const Acc*>(p.shift), static_cast<const Acc*>(p.mean),
          static_cast<const Acc*>(p.invstd), static_cast<T*>(p.out), static_cast<Acc*>(p.sums), p.M, p.C,
          conv_tiles_m(p.M)};
}

template <typename T>
typename BnBackwardApply<T>::Args args_of(const BnBackwardApplyParams& p) {
  using Acc = AccOf<T>;
  return {static_cast<const T*>(p.g), static_cast<const T*>(p.v), static_cast<const Acc*>(p.a),
          static_cast<const Acc*>(p.b), static_cast<const Acc*>(p.c), static_cast<const T*>(p.shortcut_grad),
          static_cast<T*>(p.out), p.N * p.H * p.W, p.H, p.W, p.C, p.H_sc, p.W_sc, p.shortcut_stride};
}

template <typename T>
typename StatsPartials<T>::Args args_of(const StatsPartialsParams& p) {
  using Acc = AccOf<T>;
  return {static_cast<const T*>(p.x), static_cast<Acc*>(p.partials), p.M, p.C, conv_tiles_m(p.M)};
}

template <typename T>
typename PostactOut<T>::Args args_of(const PostactOutParams& p) {
  using Acc = AccOf<T>;
  return {static_cast<const T*>(p.y), static_cast<const T*>(p.sc), static_cast<const Acc*>(p.scale),
          static_cast<const Acc*>(p.shift), static_cast<const Acc*>(p.sc_scale), static_cast<const Acc*>(p.sc_shift),
          static_cast<T*>(p.out), p.M, p.C};
}

template <typename T>
typename PostactOutBackward<T>::Args args_of(const PostactOutBackwardParams& p) {
  using Acc = AccOf<T>;
  return {static_cast<const T*>(p.grad), static_cast<const T*>(p.y), static_cast<const T*>(p.sc),
          static_cast<const Acc*>(p.scale), static_cast<const Acc*>(p.shift), static_cast<const Acc*>(p.sc_scale),
          static_cast<const Acc*>(p.sc_shift), static_cast<const Acc*>(p.mean), static_cast<const Acc*>(p.invstd),
          static_cast<const Acc*>(p.sc_mean), static_cast<const Acc*>(p.sc_invstd), static_cast<T*>(p.out),
          static_cast<Acc*>(p.sums), static_cast<Acc*>(p.sc_sums), p.M, p.C, conv_tiles_m(p.M)};
}

template <template <typename> class Problem, class Params>
cudaError_t dispatch_cuda(const Params& p, ConvDtype dtype, cudaStream_t stream) {
  return dispatch_conv_dtype(dtype, [&](auto tag) {
    using T = TagType<decltype(tag)>;
    return launch_ew<Problem<T>>(args_of<T>(p), stream);
  });
}

template <template <typename> class Problem, class Params>
void dispatch_host(const Params& p, ConvDtype dtype) {
  dispatch_conv_dtype(dtype, [&](auto tag) {
    using T = TagType<decltype(tag)>;
    run_ew_host<Problem<T>>(args_of<T>(p));
  });
}

}  // namespace

cudaError_t bn_relu_apply_cuda(const BnReluApplyParams& p, ConvDtype dtype, cudaStream_t stream) {
  return dispatch_cuda<BnReluApply>(p, dtype, stream);
}
cudaError_t relu_grad_sums_cuda(const ReluGradSumsParams& p, ConvDtype dtype, cudaStream_t stream) {
  return dispatch_cuda<ReluGradSums>(p, dtype, stream);
}
cudaError_t bn_backward_apply_cuda(const BnBackwardApplyParams& p, ConvDtype dtype, cudaStream_t stream) {
  return dispatch_cuda<BnBackwardApply>(p, dtype, stream);
}
cudaError_t stats_partials_cuda(const StatsPartialsParams& p, ConvDtype dtype, cudaStream_t stream) {
  return dispatch_cuda<StatsPartials>(p, dtype, stream);
}

cudaError_t postact_out_cuda(const PostactOutParams& p, ConvDtype dtype, cudaStream_t stream) {
  return dispatch_cuda<PostactOut>(p, dtype, stream);
}
cudaError_t postact_out_backward_cuda(const PostactOutBackwardParams& p, ConvDtype dtype, cudaStream_t stream) {
  return dispatch_cuda<PostactOutBackward>(p, dtype, stream);
}
void postact_out_host(const PostactOutParams& p, ConvDtype dtype) { dispatch_host<PostactOut>(p, dtype); }
void postact_out_backward_host(const PostactOutBackwardParams& p, ConvDtype dtype) {
  dispatch_host<PostactOutBackward>(p, dtype);
}

void bn_relu_apply_host(const BnReluApplyParams& p, ConvDtype dtype) { dispatch_host<BnReluApply>(p, dtype); }
void relu_grad_sums_host(const ReluGradSumsParams& p, ConvDtype dtype) { dispatch_host<ReluGradSums>(p, dtype); }
void bn_backward_apply_host(const BnBackwardApplyParams& p, ConvDtype dtype) {
  dispatch_host<BnBackwardApply>(p, dtype);
}
void stats_partials_host(const StatsPartialsParams& p, ConvDtype dtype) { dispatch_host<StatsPartials>(p, dtype); }

}  // namespace resnet_fused
