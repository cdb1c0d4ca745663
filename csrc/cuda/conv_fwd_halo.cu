// The halo-staged 3x3 forward (stride 1 or 2, any groups; DESIGN section 7, way (a)).
//
// The per-tap kernel (conv_fwd.cu) loads one tap's shifted input rows per K step and applies the
// BN-apply + ReLU prologue as it loads them, so every input element is loaded and transformed up
// to nine times. Here one block owns an 8x8 block of output pixels of one image (the spatial M
// tile of conv_fused.h) and, per chunk of kK input channels of its group:
//
//   stage   loads the input patch those 64 outputs read, (7s + 3) x (7s + 3) pixels x kK channels
//           (10x10 at stride 1, 17x17 at stride 2), applies relu(x * scale + shift) ONCE per
//           element and stores it in shared memory; padding and K overhang are stored as zero in
//           the ACTIVATED domain (relu(shift) is not zero, so they are never loaded), and the
//           weights of tap 0 go to B buffer 0;
//   tap t   (t = 0..8) multiplies the window of the staged patch that tap (kh, kw) reads
//           (output (oh, ow) of the tile reads patch pixel (oh*s + kh, ow*s + kw)) by B buffer
//           t % 2, while the same phase loads the weights of tap t + 1 into the other buffer.
//
// Then the projection K-loop and the epilogues of the per-tap kernel, unchanged (FwdProblem in
// conv_fwd.cuh: shortcut add, rounding, post BN+ReLU, per-tile statistics). The phases run with
// __syncthreads() between them on the GPU (conv_fwd_halo_kernel) and one after another for all
// threads on the CPU (run_halo_blocks_host), as in conv_tile.cuh.
//
// The multiply reads the A operand straight from the staged patch: on the device, fp16/bf16 use
// WMMA m8n32k16 (warp w owns output row w of the tile: its 8 pixels are 8 patch rows s pixels
// apart, a constant stride, which is what load_matrix_sync needs), fp32/fp64 the portable 4x4
// register tile, which is also what the host runs for every dtype.
#include "conv_fwd.cuh"

namespace resnet_fused {
namespace {

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
        value = a.w[((blk.group * a.cout_pg + n_local) * a.cin_pg + k) * kTaps + tap];
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
        if (a.scale != nullptr) value = relu_keep_nan(value * a.scale[c] + a.shift[c]);
      }
      patch[p * kLd + kk] = Narrow<T>::from(value);
    }
    load_b(blk, chunk, 0, tid, s, h);
  }
};

// ---- the multiply step on the staged patch ------------------------------------------------------

// Portable path (host for every dtype, device for fp32/fp64): the 4x4 register tile of
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

#if defined(__CUDACC__)
template <typename T, typename Acc>
struct HaloDeviceMma {
  SimtAcc<Acc> acc;
  __device__ __forceinline__ void zero() { mma_zero_simt(acc); }
  __device__ __forceinline__ void halo_step(int tid, const HaloSmem<T>& s, const T* b, int stride, int side,
                                            int tap_off) {
    halo_mma_step_simt(tid, s, b, stride, side, tap_off, acc);
  }
  __device__ __forceinline__ void flat_step(int tid, const HaloSmem<T>& s) { mma_step_simt(tid, s, acc); }
  __device__ __forceinline__ void stash(int tid, HaloSmem<T>& s) { mma_stash_simt(tid, acc, s); }
};

// Tensor cores for fp16/bf16 (fp32 accumulate): warp w computes rows 8w..8w+7 of the tile (output
// row w, its 8 pixels) x all 64 columns as two m8n32k16 accumulators. The A fragment of one tap is
// 8 patch pixels s apart: rows at a constant stride of s * kLd elements. Pointer and stride
// rules of load_matrix_sync (32-byte aligned pointer, ldm a multiple of 16 bytes): patch pixel
// rows are 96 bytes, kk is 0 or 16 elements (32 bytes); B rows are kLdB = 72 elements (144 B,
// ldm rule) and the k16 steps 16 rows (2304 B); C rows are kLdC = 68 floats, 8 rows 2176 B.
template <typename T>
struct HaloWmma {
  static constexpr int kK = HaloLayout<T>::kK;
  static constexpr int kLd = HaloLayout<T>::kLd;
  static_assert(kK % 16 == 0, "whole k16 steps per chunk");
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 8, 32, 16, float> frag[2];

  __device__ __forceinline__ void zero() {
    nvcuda::wmma::fill_fragment(frag[0], 0.0f);
    nvcuda::wmma::fill_fragment(frag[1], 0.0f);
  }
  __device__ __forceinline__ void halo_step(int tid, const HaloSmem<T>& s, const T* b, int stride, int side,
                                            int tap_off) {
    const int warp = tid / 32;
    const T* a = patch_of(s) + (warp * stride * side + tap_off) * kLd;
    const unsigned lda = static_cast<unsigned>(stride * kLd);
#pragma unroll
    for (int kk = 0; kk < kK; kk += 16) {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 8, 32, 16, T, nvcuda::wmma::row_major> fa;
      nvcuda::wmma::load_matrix_sync(fa, a + kk, lda);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 8, 32, 16, T, nvcuda::wmma::row_major> fb;
        nvcuda::wmma::load_matrix_sync(fb, b + kk * kLdB + 32 * j, kLdB);
        nvcuda::wmma::mma_sync(frag[j], fa, fb, frag[j]);
      }
    }
  }
  // The projection K-loop's flat A tile (s.a(), kLdA = 40 elements: 8 rows are 640 bytes).
  __device__ __forceinline__ void flat_step(int tid, const HaloSmem<T>& s) {
    const int warp = tid / 32;
    const T* a = s.a() + warp * 8 * kLdA;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 8, 32, 16, T, nvcuda::wmma::row_major> fa;
      nvcuda::wmma::load_matrix_sync(fa, a + kk, kLdA);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 8, 32, 16, T, nvcuda::wmma::row_major> fb;
        nvcuda::wmma::load_matrix_sync(fb, s.b() + kk * kLdB + 32 * j, kLdB);
        nvcuda::wmma::mma_sync(frag[j], fa, fb, frag[j]);
      }
    }
  }
  __device__ __forceinline__ void stash(int tid, HaloSmem<T>& s) {
    const int warp = tid / 32;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      nvcuda::wmma::store_matrix_sync(s.c() + warp * 8 * kLdC + 32 * j, frag[j], kLdC, nvcuda::wmma::mem_row_major);
    }
  }
};
template <>
struct HaloDeviceMma<__half, float> : HaloWmma<__half> {};
template <>
struct HaloDeviceMma<__nv_bfloat16, float> : HaloWmma<__nv_bfloat16> {};

// The phase order is the definition of the algorithm; run_halo_blocks_host mirrors it exactly.
template <typename T>
__global__ void __launch_bounds__(kThreads) conv_fwd_halo_kernel(const HaloArgs<T> h) {
  using Phases = HaloPhases<T>;
  using Problem = FwdProblem<T>;
  __shared__ HaloSmem<T> smem;
  const int tid = threadIdx.x;
  const typename Problem::Args& a = h.fwd;
  const typename Problem::Block blk = Problem::block(blockIdx.x, blockIdx.y, blockIdx.z, a);
  Problem::setup(blk, tid, smem, a);  // same phase as the first stage: disjoint storage
  HaloDeviceMma<T, AccOf<T>> mma;
  mma.zero();
  for (int chunk = 0; chunk < h.chunks; ++chunk) {
    Phases::stage(blk, chunk, tid, smem, h);
    __syncthreads();
    for (int tap = 0; tap < kTaps; ++tap) {
      // Reads the patch and B buffer tap % 2, writes the other buffer: no conflict in the phase.
      mma.halo_step(tid, smem, b_buffer(smem, tap & 1), a.stride, h.patch_side, tap_offset(tap, h.patch_side));
      if (tap + 1 < kTaps) Phases::load_b(blk, chunk, tap + 1, tid, smem, h);
      __syncthreads();  // the next phase reads what this one loaded and overwrites what it read
    }
  }
  for (int step = 0; step < a.proj_steps; ++step) {
    Problem::load(blk, a.main_steps + step, tid, smem, a);  // the projection steps of conv_fwd.cuh
    __syncthreads();
    mma.flat_step(tid, smem);
    __syncthreads();
  }
  mma.stash(tid, smem);
  __syncthreads();
  Problem::epilogue_elementwise(blk, tid, smem, a);
  __syncthreads();
  Problem::epilogue_columns(blk, tid, smem, a);
}
#endif  // __CUDACC__

template <typename T>
void run_halo_blocks_host(const HaloArgs<T>& h, dim3 grid) {
  using Phases = HaloPhases<T>;
  using Problem = FwdProblem<T>;
  using Acc = AccOf<T>;
  const typename Problem::Args& a = h.fwd;
  std::unique_ptr<HaloSmem<T>> smem(new HaloSmem<T>());
  std::vector<SimtAcc<Acc>> acc(kThreads);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      const typename Problem::Block blk = Problem::block(bx, by, 0, a);
      poison_host(*smem);
      for_each_thread_host([&](int tid) {
        Problem::setup(blk, tid, *smem, a);
        mma_zero_simt(acc[tid]);
      });
      for (int chunk = 0; chunk < h.chunks; ++chunk) {
        for_each_thread_host([&](int tid) { Phases::stage(blk, chunk, tid, *smem, h); });
        for (int tap = 0; tap < kTaps; ++tap) {
          for_each_thread_host([&](int tid) {
            halo_mma_step_simt(tid, *smem, b_buffer(*smem, tap & 1), a.stride, h.patch_side,
                               tap_offset(tap, h.patch_side), acc[tid]);
            if (tap + 1 < kTaps) Phases::load_b(blk, chunk, tap + 1, tid, *smem, h);
          });
        }
      }
      for (int step = 0; step < a.proj_steps; ++step) {
        for_each_thread_host([&](int tid) { Problem::load(blk, a.main_steps + step, tid, *smem, a); });
        for_each_thread_host([&](int tid) { mma_step_simt(tid, *smem, acc[tid]); });
      }
      for_each_thread_host([&](int tid) { mma_stash_simt(tid, acc[tid], *smem); });
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

template <typename T>
cudaError_t launch_typed(const ConvFwdParams& p, cudaStream_t stream) {
#if defined(__CUDACC__)
  dim3 grid;
  const HaloArgs<T> h = make_halo_args<T>(p, grid);
  if (h.fwd.tiles_m > kMaxGridX || grid.y > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  conv_fwd_halo_kernel<T><<<grid, kThreads, 0, stream>>>(h);
  return cudaGetLastError();
#else
  return cudaErrorInvalidValue;
#endif
}

template <typename T>
void host_typed(const ConvFwdParams& p) {
  dim3 grid;
  const HaloArgs<T> h = make_halo_args<T>(p, grid);
  run_halo_blocks_host<T>(h, grid);
}

}  // namespace

// Callers (conv_fwd_cuda / conv_fwd_host, the bindings) only pass conv_fwd_halo_applies shapes.
cudaError_t conv_fwd_halo_cuda(const ConvFwdParams& p, ConvDtype dtype, cudaStream_t stream) {
  if (!conv_fwd_halo_applies(p.ksize, p.stride)) return cudaErrorInvalidValue;
  return dispatch_conv_dtype(dtype, [&](auto tag) { return launch_typed<TagType<decltype(tag)>>(p, stream); });
}

void conv_fwd_halo_host(const ConvFwdParams& p, ConvDtype dtype) {
  if (!conv_fwd_halo_applies(p.ksize, p.stride)) return;
  dispatch_conv_dtype(dtype, [&](auto tag) { host_typed<TagType<decltype(tag)>>(p); });
}

}  // namespace resnet_fused
