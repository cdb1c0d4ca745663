// The halo-staged 3x3 forward as phases (see conv_fwd_halo.cu for the algorithm): the shared
// memory layout, the staging and weight-load phases, the multiply phases (register tile and
// WMMA), and the host emulator. conv_fwd_halo.cu holds the kernel and the entry points.
#pragma once

#include "conv_fwd.cuh"

namespace resnet_fused {
namespace conv_fwd_halo_detail {

using namespace conv_tile;
using conv_fwd_detail::FwdProblem;
using conv_fwd_detail::make_fwd_args;

constexpr int kTaps = 9;
constexpr int kTileSide = kConvSpatialTileW;
static_assert(kConvSpatialTileH == kConvSpatialTileW, "the staged patch is sized for a square tile");
// Patch side for stride s: (kTileSide - 1) * s + 3; the largest (stride 2) sizes the buffer.
constexpr int kMaxPatchSide = (kTileSide - 1) * 2 + 3;
constexpr int kMaxPatchPixels = kMaxPatchSide * kMaxPatchSide;

constexpr size_t round_up_128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// Shared-memory layout of the staged patch and the two weight buffers, per storage type.
// kK (channels per chunk) keeps patch + 2 B buffers at ~32-37 KB for every dtype, under the
// 48 KB of static shared memory, and leaves room for more than one block per SM.
template <typename T>
struct HaloLayout {
  static constexpr int kK = sizeof(T) == 2 ? 32 : (sizeof(T) == 4 ? 16 : 8);
  // Pixel pitch in elements. 16-bit: 48 = 96 bytes, so every pixel's channel row starts 32-byte
  // aligned (WMMA's pointer rule, whatever pixel a tap starts at) and a warp's row stride s * 48
  // is a multiple of 8 elements (WMMA's ldm rule). fp32/fp64: 16 bytes of padding.
  static constexpr int kLd = sizeof(T) == 2 ? kK + 16 : kK + static_cast<int>(16 / sizeof(T));
  static constexpr size_t kPatchBytes = round_up_128(sizeof(T) * kMaxPatchPixels * kLd);
  static constexpr size_t kBBytes = round_up_128(sizeof(T) * kK * kLdB);
  static constexpr size_t kBytes = kPatchBytes + 2 * kBBytes;
  static_assert(kK * kBN % kThreads == 0, "every thread loads the same number of weights");
  static_assert(sizeof(T) != 2 || (kLd * sizeof(T)) % 32 == 0, "16-bit pixel rows must be 32-byte aligned");
};

template <typename T>
using HaloSmem = TileSmem<T, AccOf<T>, HaloLayout<T>::kBytes>;

template <typename T>
RF_HD T* patch_of(HaloSmem<T>& s) {
  return reinterpret_cast<T*>(s.raw);
}
template <typename T>
RF_HD const T* patch_of(const HaloSmem<T>& s) {
  return reinterpret_cast<const T*>(s.raw);
}
template <typename T>
RF_HD T* b_buffer(HaloSmem<T>& s, int which) {
  return reinterpret_cast<T*>(s.raw + HaloLayout<T>::kPatchBytes + which * HaloLayout<T>::kBBytes);
}
template <typename T>
RF_HD const T* b_buffer(const HaloSmem<T>& s, int which) {
  return reinterpret_cast<const T*>(s.raw + HaloLayout<T>::kPatchBytes + which * HaloLayout<T>::kBBytes);
}

template <typename T>
struct HaloArgs {
  typename FwdProblem<T>::Args fwd;
  int chunks;      // ceil(cin_pg / kK)
  int patch_side;  // (kTileSide - 1) * stride + 3
};

// Offset, in patch pixels, of the window tap (kh, kw) reads.
RF_HD int tap_offset(int tap, int patch_side) { return (tap / 3) * patch_side + tap % 3; }

template <typename T_>
struct HaloPhases {
  using T = T_;
  using Acc = AccOf<T>;
  using Problem = FwdProblem<T>;
  using Args = typename Problem::Args;
  using Block = typename Problem::Block;
  using Layout = HaloLayout<T>;
  static constexpr int kK = Layout::kK;
  static constexpr int kLd = Layout::kLd;

  // Weights of one tap and chunk, B[kk][j] = W[n, k0 + kk, tap], into buffer tap % 2 (adjacent
  // threads: adjacent k, the weight's inner dimensions).
  static RF_HD void load_b(const Block& blk, int chunk, int tap, int tid, HaloSmem<T>& s, const HaloArgs<T>& h) {
    const Args& a = h.fwd;
    T* b = b_buffer(s, tap & 1);
    const int64_t k0 = static_cast<int64_t>(chunk) * kK;
    RF_UNROLL
    for (int i = 0; i < kK * kBN / kThreads; ++i) {
      const int e = tid + kThreads * i;
      const int j = e / kK, kk = e % kK;
      const int64_t k = k0 + kk;
      const int64_t n_local = blk.col0 + j;
      T value = Narrow<T>::from(Acc(0));
      if (k < a.cin_pg && n_local < a.cout_pg) {
        const int64_t n = blk.group * a.cout_pg + n_local;
        value = a.w[(n * a.cin_pg + k) * kTaps + tap];
        if (a.close && a.proj_steps > 0) value = FwdProblem<T>::closing_weight(value, n, true, a);
      }
      b[kk * kLdB + j] = value;
    }
  }

  // The activated input patch of the tile for one chunk of channels, and tap 0's weights.
  static RF_HD void stage(const Block& blk, int chunk, int tid, HaloSmem<T>& s, const HaloArgs<T>& h) {
    const Args& a = h.fwd;
    T* patch = patch_of(s);
    const int side = h.patch_side;
    const int64_t k0 = static_cast<int64_t>(chunk) * kK;
    const int64_t ih0 = static_cast<int64_t>(blk.oh0) * a.stride - 1;  // padding 1
    const int64_t iw0 = static_cast<int64_t>(blk.ow0) * a.stride - 1;
    const int elements = side * side * kK;
    for (int e = tid; e < elements; e += kThreads) {
      const int p = e / kK, kk = e % kK;  // adjacent threads: adjacent channels (coalesced)
      const int64_t ih = ih0 + p / side, iw = iw0 + p % side;
      const int64_t k = k0 + kk;
      Acc value = Acc(0);
      if (k < a.cin_pg && ih >= 0 && ih < a.H_in && iw >= 0 && iw < a.W_in) {
        const int64_t c = blk.group * a.cin_pg + k;
        value = static_cast<Acc>(widen(a.x[((blk.img * a.H_in + ih) * a.W_in + iw) * a.C_in + c]));
        if (a.scale != nullptr || a.pro_mean != nullptr) {
          value = relu_keep_nan(channel_affine(value, c, a.scale, a.shift, a.pro_mean, a.pro_var, a.pro_eps));
        }
      }
      patch[p * kLd + kk] = Narrow<T>::from(value);
    }
    load_b(blk, chunk, 0, tid, s, h);
  }
};

// ---- the multiply step on the staged patch ------------------------------------------------------

// Portable path (fp32/fp64, device and host): the 4x4 register tile of
// conv_tile.cuh (rows tr + 16 i, columns tc + 16 j), with row r = (r / 8, r % 8) of the tile
// reading patch pixel ((r / 8) * s + kh, (r % 8) * s + kw).
template <typename T, typename Acc>
RF_HD void halo_mma_step_simt(int tid, const HaloSmem<T>& s, const T* b, int stride, int side, int tap_off,
                              SimtAcc<Acc>& acc) {
  constexpr int kK = HaloLayout<T>::kK;
  constexpr int kLd = HaloLayout<T>::kLd;
  const int tr = tid / 16, tc = tid % 16;
  const T* patch = patch_of(s);
  int at[4];
  RF_UNROLL
  for (int i = 0; i < 4; ++i) {
    const int r = tr + 16 * i;
    at[i] = ((r / kTileSide) * stride * side + (r % kTileSide) * stride + tap_off) * kLd;
  }
  RF_UNROLL
  for (int kk = 0; kk < kK; ++kk) {
    Acc av[4], bv[4];
    RF_UNROLL
    for (int i = 0; i < 4; ++i) av[i] = static_cast<Acc>(widen(patch[at[i] + kk]));
    RF_UNROLL
    for (int j = 0; j < 4; ++j) bv[j] = static_cast<Acc>(widen(b[kk * kLdB + tc + 16 * j]));
    RF_UNROLL
    for (int i = 0; i < 4; ++i) {
      RF_UNROLL
      for (int j = 0; j < 4; ++j) acc.v[i][j] += av[i] * bv[j];
    }
  }
}

// The multiply phases of the halo kernel as an object per thread: zero(); halo_step(tid, smem,
// B buffer, stride, side, tap offset) per tap and chunk; flat_step(tid, smem) per projection K
// step (the per-tap kernel's flat A/B tiles); stash(tid, smem). SimtHaloMma for fp32/fp64,
// HaloWmma<T, W> for fp16/bf16 with W = DeviceWmmaApi in the kernel and HostWmmaApi (the WMMA
// shim, wmma_host.cuh) in the emulator.
template <typename T, typename Acc>
struct SimtHaloMma {
  SimtAcc<Acc> acc;
  RF_HD void zero() { mma_zero_simt(acc); }
  RF_HD void halo_step(int tid, const HaloSmem<T>& s, const T* b, int stride, int side, int tap_off) {
    halo_mma_step_simt(tid, s, b, stride, side, tap_off, acc);
  }
  RF_HD void flat_step(int tid, const HaloSmem<T>& s) { mma_step_simt(tid, s, acc); }
  RF_HD void stash(int tid, HaloSmem<T>& s) { mma_stash_simt(tid, acc, s); }
};

// Tensor cores for fp16/bf16 (fp32 accumulate): warp w computes rows 8w..8w+7 of the tile (output
// row w, its 8 pixels) x all 64 columns as two m8n32k16 accumulators. The A fragment of one tap is
// 8 patch pixels s apart: rows at a constant stride of s * kLd elements. Pointer and stride
// rules of load_matrix_sync (32-byte aligned pointer, ldm a multiple of 16 bytes): patch pixel
// rows are 96 bytes, kk is 0 or 16 elements (32 bytes); B rows are kLdB = 72 elements (144 B,
// ldm rule) and the k16 steps 16 rows (2304 B); C rows are kLdC = 68 floats, 8 rows 2176 B.
template <typename T, class W>
struct HaloWmma {
  static constexpr int kK = HaloLayout<T>::kK;
  static constexpr int kLd = HaloLayout<T>::kLd;
  static_assert(kK % 16 == 0, "whole k16 steps per chunk");
  using FragAcc = typename W::template fragment<typename W::accumulator, 8, 32, 16, float>;
  using FragA = typename W::template fragment<typename W::matrix_a, 8, 32, 16, T, typename W::row_major>;
  using FragB = typename W::template fragment<typename W::matrix_b, 8, 32, 16, T, typename W::row_major>;
  FragAcc frag[2];

#pragma nv_exec_check_disable
  RF_HD void zero() {
    W::fill_fragment(frag[0], 0.0f);
    W::fill_fragment(frag[1], 0.0f);
  }
#pragma nv_exec_check_disable
  RF_HD void halo_step(int tid, const HaloSmem<T>& s, const T* b, int stride, int side, int tap_off) {
    const int warp = tid / 32;
    const T* a = patch_of(s) + (warp * stride * side + tap_off) * kLd;
    const unsigned lda = static_cast<unsigned>(stride * kLd);
    RF_UNROLL
    for (int kk = 0; kk < kK; kk += 16) {
      FragA fa;
      W::load_matrix_sync(fa, a + kk, lda);
      RF_UNROLL
      for (int j = 0; j < 2; ++j) {
        FragB fb;
        W::load_matrix_sync(fb, b + kk * kLdB + 32 * j, kLdB);
        W::mma_sync(frag[j], fa, fb, frag[j]);
      }
    }
  }
  // The projection K-loop's flat A tile (s.a(), kLdA = 40 elements: 8 rows are 640 bytes).
#pragma nv_exec_check_disable
  RF_HD void flat_step(int tid, const HaloSmem<T>& s) {
    const int warp = tid / 32;
    const T* a = s.a() + warp * 8 * kLdA;
    RF_UNROLL
    for (int kk = 0; kk < kBK; kk += 16) {
      FragA fa;
      W::load_matrix_sync(fa, a + kk, kLdA);
      RF_UNROLL
      for (int j = 0; j < 2; ++j) {
        FragB fb;
        W::load_matrix_sync(fb, s.b() + kk * kLdB + 32 * j, kLdB);
        W::mma_sync(frag[j], fa, fb, frag[j]);
      }
    }
  }
#pragma nv_exec_check_disable
  RF_HD void stash(int tid, HaloSmem<T>& s) {
    const int warp = tid / 32;
    RF_UNROLL
    for (int j = 0; j < 2; ++j) {
      W::store_matrix_sync(s.c() + warp * 8 * kLdC + 32 * j, frag[j], kLdC, W::mem_row_major);
    }
  }
};

template <typename T, class W>
using HaloMmaFor =
    typename std::conditional<IsWmmaType<T>::value, HaloWmma<T, W>, SimtHaloMma<T, AccOf<T>>>::type;

// The emulator: the kernel's phases in the kernel's order, all threads of a phase before the next.
// `Mma` is the multiply phase object (HaloMmaFor<T, HostWmmaApi> by default).
template <typename T, class Mma = HaloMmaFor<T, HostWmmaApi>>
void run_halo_blocks_host(const HaloArgs<T>& h, dim3 grid) {
  using Phases = HaloPhases<T>;
  using Problem = FwdProblem<T>;
  const typename Problem::Args& a = h.fwd;
  std::unique_ptr<HaloSmem<T>> smem(new HaloSmem<T>());
  const wmma_host::Emulation emulation(smem->raw, sizeof(smem->raw), kThreads);
  std::vector<Mma> mma(kThreads);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      const typename Problem::Block blk = Problem::block(bx, by, 0, a);
      poison_host(*smem);
      for_each_thread_host([&](int tid) {
        Problem::setup(blk, tid, *smem, a);
        mma[tid].zero();
      });
      for (int chunk = 0; chunk < h.chunks; ++chunk) {
        for_each_thread_host([&](int tid) { Phases::stage(blk, chunk, tid, *smem, h); });
        for (int tap = 0; tap < kTaps; ++tap) {
          for_each_thread_host([&](int tid) {
            mma[tid].halo_step(tid, *smem, b_buffer(*smem, tap & 1), a.stride, h.patch_side,
                               tap_offset(tap, h.patch_side));
            if (tap + 1 < kTaps) Phases::load_b(blk, chunk, tap + 1, tid, *smem, h);
          });
        }
      }
      for (int step = 0; step < a.proj_steps; ++step) {
        for_each_thread_host([&](int tid) { Problem::load(blk, a.main_steps + step, tid, *smem, a); });
        for_each_thread_host([&](int tid) { mma[tid].flat_step(tid, *smem); });
      }
      for_each_thread_host([&](int tid) { mma[tid].stash(tid, *smem); });
      for_each_thread_host([&](int tid) { Problem::epilogue_elementwise(blk, tid, *smem, a); });
      for_each_thread_host([&](int tid) { Problem::epilogue_columns(blk, tid, *smem, a); });
    }
  }
}

template <typename T>
HaloArgs<T> make_halo_args(const ConvFwdParams& p, dim3& grid) {
  HaloArgs<T> h;
  h.fwd = make_fwd_args<T>(p, grid);
  h.chunks = static_cast<int>(ceil_div(h.fwd.cin_pg, HaloLayout<T>::kK));
  h.patch_side = (kTileSide - 1) * p.stride + 3;
  return h;
}

}  // namespace conv_fwd_halo_detail
}  // namespace resnet_fused
