// The thread-block GEMM engine shared by conv_fwd.cu, conv_dgrad.cu and conv_wgrad.cu.
//
// A "problem" (one per kernel) says what its tiles are: how a block index maps to an output tile
// (`block`), a per-block setup phase (`setup`, e.g. decoding the tile's rows once), how many K
// steps there are (`num_steps`), how one K step fills the shared A [kConvTileM x kConvTileK] and
// B [kConvTileK x kConvTileN] tiles with the prologue applied (`load`), and two epilogue phases
// over the fp32/fp64 accumulator tile staged in shared memory (`epilogue_elementwise`: all
// threads, one element each in turn; `epilogue_columns`: one thread per column, for the
// per-tile statistics). Every phase is a __host__ __device__ function of
// (block, thread index, shared storage, arguments).
//
// conv_gemm_kernel runs the phases on the GPU with __syncthreads() between them.
// run_blocks_host runs them on the CPU for every block, looping over all 256 thread indices of a
// phase (in a scrambled order, on NaN-poisoned storage; see the emulator section) before
// starting the next one, with TileSmem as an ordinary host object: the same code,
// the same predicates, the same partial layouts, so CPU tests exercise what the GPU runs. The
// multiply step too: fp16/bf16 use tensor cores (WMMA fragments on the shared tiles), written once
// (WmmaMma) against a WMMA API policy that is nvcuda::wmma on the device and the host WMMA shim
// (wmma_host.cuh) in the emulator; fp32/fp64 use a plain per-thread 4x4 register tile on both.
//
// Correctness first; tuning ideas, in the order they are expected to pay (docs/design.md section 7):
//   * double-buffer the A/B tiles with cp.async (or TMA) so loads overlap the MMAs;
//   * (done for the 3x3 forward: conv_fwd_halo.cu stages the activated input patch of an 8x8
//     output tile once and runs the 9 taps from it; the dgrad/wgrad 3x3 still load per tap);
//   * pack the weights K-major once per step (they are indexed in PyTorch's layout now, which
//     makes the B loads strided), use ldmatrix + mma.sync or wgmma with 128x128 tiles;
//   * statistics epilogue: a warp-shuffle tree instead of one thread per column.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "conv_fused.h"
#include "wmma_host.cuh"

#if defined(__CUDACC__)
#define RF_HD __host__ __device__ __forceinline__
#else
#define RF_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define RF_UNROLL _Pragma("unroll")
#else
#define RF_UNROLL
#endif

namespace resnet_fused {
namespace conv_tile {

constexpr int kBM = kConvTileM;
constexpr int kBN = kConvTileN;
constexpr int kBK = kConvTileK;
constexpr int kThreads = kConvThreads;
// Row pitches of the shared tiles. WMMA needs a multiple of 8 16-bit elements (16 bytes) for
// A/B and of 4 floats for C, and 32-byte aligned fragment pointers; the padding also spreads
// the rows over shared-memory banks.
constexpr int kLdA = kBK + 8;
constexpr int kLdB = kBN + 8;
constexpr int kLdC = kBN + 4;

static_assert(kBM * kBK % kThreads == 0 && kBK * kBN % kThreads == 0 && kBM * kBN % kThreads == 0,
              "each phase gives every thread the same number of elements");

// ---- element conversions (same code on both sides) ----------------------------------------

RF_HD float widen(float v) { return v; }
RF_HD double widen(double v) { return v; }
RF_HD float widen(__half v) { return __half2float(v); }
RF_HD float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct Narrow;
template <>
struct Narrow<float> {
  RF_HD static float from(float v) { return v; }
};
template <>
struct Narrow<double> {
  RF_HD static double from(double v) { return v; }
};
template <>
struct Narrow<__half> {
  RF_HD static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Narrow<__nv_bfloat16> {
  RF_HD static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// Accumulation (and vector) type of a storage type: fp64 for fp64, fp32 otherwise.
template <typename T>
using AccOf = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// relu that lets NaN through, as eager's relu does (a max() would turn NaN into 0 and hide it).
template <typename Acc>
RF_HD Acc relu_keep_nan(Acc v) {
  return v < Acc(0) ? Acc(0) : v;
}

// The per-channel affine of a conv operand or epilogue: v * scale[c] + shift[c], or, when `mean`
// is given (an eval-mode BatchNorm read straight from its buffers), with scale = weight[c] /
// sqrt(var[c] + eps) and shift = bias[c] - mean[c] * scale (weight/bias null: 1/0), in the
// finalize's operation order (bn_reduce.cu), so both routes give the same affine.
// channel_coeffs gives the (scale, shift) pair itself, for a scale applied to a weight.
template <typename Acc>
RF_HD void channel_coeffs(int64_t c, const Acc* scale, const Acc* shift, const Acc* mean, const Acc* var, Acc eps,
                          Acc& s, Acc& b) {
  if (mean == nullptr) {
    s = scale[c];
    b = shift[c];
    return;
  }
  const Acc invstd = Acc(1) / static_cast<Acc>(sqrt(var[c] + eps));
  s = scale != nullptr ? invstd * scale[c] : invstd;
  b = -mean[c] * s;
  if (shift != nullptr) b += shift[c];
}

template <typename Acc>
RF_HD Acc channel_affine(Acc v, int64_t c, const Acc* scale, const Acc* shift, const Acc* mean, const Acc* var,
                         Acc eps) {
  if (mean == nullptr) return v * scale[c] + shift[c];
  Acc s, b;
  channel_coeffs(c, scale, shift, mean, var, eps, s, b);
  return v * s + b;
}

// ---- epilogue pieces shared with the elementwise kernels (bn_elementwise.cu) ----------------

// g' = value * [v * scale + shift > 0] (NaN in v masks to 0, as in the Triton kernels), stored in
// T at *out; returns g' as stored, widened, which is what the BN sums must be taken of.
template <typename T, typename Acc>
RF_HD Acc relu_mask_store(Acc value, Acc v, Acc scale, Acc shift, T* out) {
  const T stored = Narrow<T>::from(v * scale + shift > Acc(0) ? value : Acc(0));
  *out = stored;
  return static_cast<Acc>(widen(stored));
}

// Sums of g' and g' * (v - mean) * invstd over `rows` rows of one column, ascending: g' from a
// staged tile column (pitch ld), v from global memory (pitch v_pitch). Writes sums[at] and
// sums[plane + at] (layout [2, P, C]).
template <typename T, typename Acc>
RF_HD void relu_sums_column(const Acc* g_col, int ld, int rows, const T* v_col, int64_t v_pitch, Acc mean,
                            Acc invstd, Acc* sums, int64_t plane, int64_t at) {
  Acc sum = Acc(0), sum_xhat = Acc(0);
  for (int r = 0; r < rows; ++r) {
    const Acc g = g_col[r * ld];
    const Acc v = static_cast<Acc>(widen(v_col[r * v_pitch]));
    sum += g;
    sum_xhat += g * ((v - mean) * invstd);
  }
  sums[at] = sum;
  sums[plane + at] = sum_xhat;
}

// (count, mean, M2) of the first `rows` values of a staged tile column, two passes (exact within
// the tile), written to partials[at], [plane + at], [2 plane + at] (layout [3, P, C]).
template <typename Acc>
RF_HD void stats_column(const Acc* col, int ld, int rows, Acc* partials, int64_t plane, int64_t at) {
  Acc sum = Acc(0);
  for (int r = 0; r < rows; ++r) sum += col[r * ld];
  const Acc mean = sum / static_cast<Acc>(rows);
  Acc m2 = Acc(0);
  for (int r = 0; r < rows; ++r) {
    const Acc d = col[r * ld] - mean;
    m2 += d * d;
  }
  partials[at] = static_cast<Acc>(rows);
  partials[plane + at] = mean;
  partials[2 * plane + at] = m2;
}

// The same for tiles whose valid rows are not a prefix (the 2-D spatial M tiles of the 3x3
// forward, conv_fused.h): row r counts when row_n[r] >= 0; rows in ascending order.
template <typename Acc>
RF_HD void stats_column_rows(const Acc* col, int ld, const int* row_n, Acc* partials, int64_t plane, int64_t at) {
  int count = 0;
  Acc sum = Acc(0);
  for (int r = 0; r < kBM; ++r) {
    if (row_n[r] < 0) continue;
    sum += col[r * ld];
    ++count;
  }
  const Acc mean = count > 0 ? sum / static_cast<Acc>(count) : Acc(0);
  Acc m2 = Acc(0);
  for (int r = 0; r < kBM; ++r) {
    if (row_n[r] < 0) continue;
    const Acc d = col[r * ld] - mean;
    m2 += d * d;
  }
  partials[at] = static_cast<Acc>(count);
  partials[plane + at] = mean;
  partials[2 * plane + at] = m2;
}

// ---- shared storage -------------------------------------------------------------------------

// Raw bytes (no constructors, so it can be a __shared__ variable): the A and B operand tiles
// of one K step, and over the same bytes after the main loop the accumulator tile C. A kernel
// that needs more staging space (the halo forward, conv_fwd_halo.cu) asks for kMinRawBytes; the
// A/B/C views stay at the start of raw, so the phase functions work on either size.
template <typename T, typename Acc, size_t kMinRawBytes = 0>
struct TileSmem {
  static constexpr size_t kABytes = sizeof(T) * kBM * kLdA;
  static constexpr size_t kBBytes = sizeof(T) * kBK * kLdB;
  static constexpr size_t kCBytes = sizeof(Acc) * kBM * kLdC;
  static constexpr size_t kGemmBytes = kABytes + kBBytes > kCBytes ? kABytes + kBBytes : kCBytes;
  static constexpr size_t kBytes = kGemmBytes > kMinRawBytes ? kGemmBytes : kMinRawBytes;
  static_assert(kABytes % 32 == 0, "B tile must stay 32-byte aligned for WMMA");

  alignas(128) unsigned char raw[kBytes];
  // Per-row decode of the block's M tile, written by `setup`: image, and two spatial
  // coordinates whose meaning the problem defines; row_n < 0 marks rows past the end.
  int row_n[kBM];
  int row_h[kBM];
  int row_w[kBM];

  RF_HD T* a() { return reinterpret_cast<T*>(raw); }
  RF_HD T* b() { return reinterpret_cast<T*>(raw + kABytes); }
  RF_HD Acc* c() { return reinterpret_cast<Acc*>(raw); }
  RF_HD const T* a() const { return reinterpret_cast<const T*>(raw); }
  RF_HD const T* b() const { return reinterpret_cast<const T*>(raw + kABytes); }
};

// ---- the multiply step ----------------------------------------------------------------------

// Portable path: each thread owns a 4x4 register tile at rows tr + 16 i, columns tc + 16 j
// (interleaved so a warp reads 16 distinct B columns per step).
template <typename Acc>
struct SimtAcc {
  Acc v[4][4];
};

template <typename Acc>
RF_HD void mma_zero_simt(SimtAcc<Acc>& acc) {
  RF_UNROLL
  for (int i = 0; i < 4; ++i) {
    RF_UNROLL
    for (int j = 0; j < 4; ++j) acc.v[i][j] = Acc(0);
  }
}

template <typename T, typename Acc, size_t R>
RF_HD void mma_step_simt(int tid, const TileSmem<T, Acc, R>& s, SimtAcc<Acc>& acc) {
  const int tr = tid / 16, tc = tid % 16;
  const T* a = s.a();
  const T* b = s.b();
  RF_UNROLL
  for (int kk = 0; kk < kBK; ++kk) {
    Acc av[4], bv[4];
    RF_UNROLL
    for (int i = 0; i < 4; ++i) av[i] = static_cast<Acc>(widen(a[(tr + 16 * i) * kLdA + kk]));
    RF_UNROLL
    for (int j = 0; j < 4; ++j) bv[j] = static_cast<Acc>(widen(b[kk * kLdB + tc + 16 * j]));
    RF_UNROLL
    for (int i = 0; i < 4; ++i) {
      RF_UNROLL
      for (int j = 0; j < 4; ++j) acc.v[i][j] += av[i] * bv[j];
    }
  }
}

template <typename T, typename Acc, size_t R>
RF_HD void mma_stash_simt(int tid, const SimtAcc<Acc>& acc, TileSmem<T, Acc, R>& s) {
  const int tr = tid / 16, tc = tid % 16;
  Acc* c = s.c();
  RF_UNROLL
  for (int i = 0; i < 4; ++i) {
    RF_UNROLL
    for (int j = 0; j < 4; ++j) c[(tr + 16 * i) * kLdC + tc + 16 * j] = acc.v[i][j];
  }
}

// The multiply phase as an object per thread (its accumulator is the thread's registers):
// zero(), then step(tid, smem) once per K step, then stash(tid, smem) writes the accumulator tile
// C [kBM x kBN] (pitch kLdC) over the A/B tiles. Two implementations:
//   SimtMma   the portable 4x4 register tile: fp32/fp64 on the device and on the host;
//   WmmaMma   tensor cores for fp16/bf16 (fp32 accumulate), written against a WMMA API policy W:
//             DeviceWmmaApi (nvcuda::wmma) in the kernel, HostWmmaApi (wmma_host.cuh) in the
//             emulator, so the CPU runs the same fragment pointers, ldm and layouts as the GPU.
template <typename T, typename Acc>
struct SimtMma {
  SimtAcc<Acc> acc;
  RF_HD void zero() { mma_zero_simt(acc); }
  template <size_t R>
  RF_HD void step(int tid, const TileSmem<T, Acc, R>& s) {
    mma_step_simt(tid, s, acc);
  }
  template <size_t R>
  RF_HD void stash(int tid, TileSmem<T, Acc, R>& s) {
    mma_stash_simt(tid, acc, s);
  }
};

// 8 warps as 4 (rows) x 2 (columns), each a 16x32 slab of two m16n16k16 accumulators. Pointer and
// ldm rules (32-byte aligned pointer, ldm a multiple of 16 bytes): A rows are kLdA = 40 elements
// (80 B), a warp's first row row0 * 80 B = 1280 B multiples, kk steps 32 B; B rows kLdB = 72
// elements (144 B), kk steps 16 rows (2304 B), columns 32 B; C rows kLdC = 68 floats (272 B),
// 16 rows 4352 B; raw is alignas(128).
// (The hd_warning pragma: each instantiation calls only its own side's API, the device one from
// the kernel and the host one from the emulator.)
template <typename T, class W>
struct WmmaMma {
  using FragAcc = typename W::template fragment<typename W::accumulator, 16, 16, 16, float>;
  using FragA = typename W::template fragment<typename W::matrix_a, 16, 16, 16, T, typename W::row_major>;
  using FragB = typename W::template fragment<typename W::matrix_b, 16, 16, 16, T, typename W::row_major>;
  FragAcc frag[2];
#pragma nv_exec_check_disable
  RF_HD void zero() {
    W::fill_fragment(frag[0], 0.0f);
    W::fill_fragment(frag[1], 0.0f);
  }
#pragma nv_exec_check_disable
  template <size_t R>
  RF_HD void step(int tid, const TileSmem<T, float, R>& s) {
    const int warp = tid / 32;
    const int row0 = (warp / 2) * 16, col0 = (warp % 2) * 32;
    RF_UNROLL
    for (int kk = 0; kk < kBK; kk += 16) {
      FragA fa;
      W::load_matrix_sync(fa, s.a() + row0 * kLdA + kk, kLdA);
      RF_UNROLL
      for (int j = 0; j < 2; ++j) {
        FragB fb;
        W::load_matrix_sync(fb, s.b() + kk * kLdB + col0 + 16 * j, kLdB);
        W::mma_sync(frag[j], fa, fb, frag[j]);
      }
    }
  }
#pragma nv_exec_check_disable
  template <size_t R>
  RF_HD void stash(int tid, TileSmem<T, float, R>& s) {
    const int warp = tid / 32;
    const int row0 = (warp / 2) * 16, col0 = (warp % 2) * 32;
    RF_UNROLL
    for (int j = 0; j < 2; ++j) {
      W::store_matrix_sync(s.c() + row0 * kLdC + col0 + 16 * j, frag[j], kLdC, W::mem_row_major);
    }
  }
};

// The multiply a storage type gets: WMMA for the 16-bit types, the register tile otherwise.
template <typename T>
struct IsWmmaType : std::integral_constant<bool, std::is_same<T, __half>::value ||
                                                     std::is_same<T, __nv_bfloat16>::value> {};
template <typename T, typename Acc, class W>
using MmaFor = typename std::conditional<IsWmmaType<T>::value, WmmaMma<T, W>, SimtMma<T, Acc>>::type;

// What the emulator runs (wmma_host.cuh for the 16-bit types).
template <typename T, typename Acc>
using HostMma = MmaFor<T, Acc, HostWmmaApi>;

#if defined(__CUDACC__)
// nvcuda::wmma behind the same names as HostWmmaApi.
struct DeviceWmmaApi {
  template <class Use, int M, int N, int K, class T, class Layout = void>
  using fragment = nvcuda::wmma::fragment<Use, M, N, K, T, Layout>;
  using matrix_a = nvcuda::wmma::matrix_a;
  using matrix_b = nvcuda::wmma::matrix_b;
  using accumulator = nvcuda::wmma::accumulator;
  using row_major = nvcuda::wmma::row_major;
  using col_major = nvcuda::wmma::col_major;
  using layout_t = nvcuda::wmma::layout_t;
  static constexpr layout_t mem_row_major = nvcuda::wmma::mem_row_major;
  static constexpr layout_t mem_col_major = nvcuda::wmma::mem_col_major;

  template <class F, class V>
  static __device__ __forceinline__ void fill_fragment(F& f, V value) {
    nvcuda::wmma::fill_fragment(f, value);
  }
  template <class F, class P>
  static __device__ __forceinline__ void load_matrix_sync(F& f, const P* ptr, unsigned ldm) {
    nvcuda::wmma::load_matrix_sync(f, ptr, ldm);
  }
  template <class F, class P>
  static __device__ __forceinline__ void load_matrix_sync(F& f, const P* ptr, unsigned ldm, layout_t layout) {
    nvcuda::wmma::load_matrix_sync(f, ptr, ldm, layout);
  }
  template <class P, class F>
  static __device__ __forceinline__ void store_matrix_sync(P* ptr, const F& f, unsigned ldm, layout_t layout) {
    nvcuda::wmma::store_matrix_sync(ptr, f, ldm, layout);
  }
  template <class D, class A, class B, class C>
  static __device__ __forceinline__ void mma_sync(D& d, const A& a, const B& b, const C& c) {
    nvcuda::wmma::mma_sync(d, a, b, c);
  }
};

template <typename T, typename Acc>
using DeviceMma = MmaFor<T, Acc, DeviceWmmaApi>;

// One thread block of `Problem`; the phase order is the definition of the algorithm and is
// mirrored exactly by run_blocks_host below. At least 2 resident blocks per SM: caps registers
// at 128 a thread (without it ptxas gave the fp16 forward 154, one block of 8 warps per SM).
template <class Problem>
__global__ void __launch_bounds__(kThreads, 2) conv_gemm_kernel(const typename Problem::Args args) {
  using T = typename Problem::T;
  using Acc = typename Problem::Acc;
  __shared__ TileSmem<T, Acc> smem;
  const int tid = threadIdx.x;
  const typename Problem::Block blk = Problem::block(blockIdx.x, blockIdx.y, blockIdx.z, args);
  Problem::setup(blk, tid, smem, args);
  __syncthreads();
  DeviceMma<T, Acc> mma;
  mma.zero();
  const int steps = Problem::num_steps(blk, args);
  for (int step = 0; step < steps; ++step) {
    Problem::load(blk, step, tid, smem, args);
    __syncthreads();
    mma.step(tid, smem);
    __syncthreads();  // the next load overwrites the tiles; the stash below aliases them
  }
  mma.stash(tid, smem);
  __syncthreads();
  Problem::epilogue_elementwise(blk, tid, smem, args);
  __syncthreads();
  Problem::epilogue_columns(blk, tid, smem, args);
}

template <class Problem>
cudaError_t launch_blocks(const typename Problem::Args& args, dim3 grid, cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;  // empty problem
  conv_gemm_kernel<Problem><<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}
#endif  // __CUDACC__

// ---- the CPU thread-block emulator ------------------------------------------------------------
//
// Two things the emulator does so that host runs catch what only the device would show:
//  * shared memory starts every block as all-ones bytes, a NaN in every floating type, so a
//    phase that reads staging space nothing wrote in this block (a partial tile, a pitch pad)
//    turns the result into NaN instead of silently reusing the previous block's values;
//  * the threads of one phase run in a scrambled order (a fixed permutation of 0..255), so a
//    phase that reads what another thread writes in the SAME phase (a missing __syncthreads())
//    does not pass by accident of ascending order.
template <class Smem>
void poison_host(Smem& s) {
  std::memset(s.raw, 0xff, sizeof(s.raw));
}

// tid = (i * 97) mod 256 visits every thread once (97 is odd). Inside an emulator run with WMMA
// (wmma_host::Emulation in scope) the phase also tells the WMMA shim which thread is calling and
// checks, at its end, that the lanes of each warp made the same WMMA calls.
template <class F>
void for_each_thread_host(F&& f) {
  static_assert((kThreads & (kThreads - 1)) == 0, "the permutation needs a power-of-two block");
  wmma_host::Phase phase;
  for (int i = 0; i < kThreads; ++i) {
    const int tid = (i * 97) & (kThreads - 1);
    phase.enter(tid);
    f(tid);
  }
  phase.finish();
}

// Every block of the grid, every phase over all thread indices before the next phase (which is
// what __syncthreads() guarantees on the device). `Mma` is the multiply phase (HostMma: the WMMA
// shim for fp16/bf16, the register tile otherwise), one object per thread as on the device.
template <class Problem, class Mma = HostMma<typename Problem::T, typename Problem::Acc>>
void run_blocks_host(const typename Problem::Args& args, dim3 grid) {
  using T = typename Problem::T;
  using Acc = typename Problem::Acc;
  std::unique_ptr<TileSmem<T, Acc>> smem(new TileSmem<T, Acc>());
  const wmma_host::Emulation emulation(smem->raw, sizeof(smem->raw), kThreads);
  std::vector<Mma> mma(kThreads);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        const typename Problem::Block blk = Problem::block(bx, by, bz, args);
        poison_host(*smem);
        for_each_thread_host([&](int tid) { Problem::setup(blk, tid, *smem, args); });
        for_each_thread_host([&](int tid) { mma[tid].zero(); });
        const int steps = Problem::num_steps(blk, args);
        for (int step = 0; step < steps; ++step) {
          for_each_thread_host([&](int tid) { Problem::load(blk, step, tid, *smem, args); });
          for_each_thread_host([&](int tid) { mma[tid].step(tid, *smem); });
        }
        for_each_thread_host([&](int tid) { mma[tid].stash(tid, *smem); });
        for_each_thread_host([&](int tid) { Problem::epilogue_elementwise(blk, tid, *smem, args); });
        for_each_thread_host([&](int tid) { Problem::epilogue_columns(blk, tid, *smem, args); });
      }
    }
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// CUDA's grid limits.
constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr unsigned kMaxGridYZ = 65535;

// ---- storage-dtype dispatch of the entry points ---------------------------------------------
//
// dispatch_conv_dtype(dtype, f) calls f(TypeTag<T>{}) with T the storage type `dtype` names
// (float, __half, __nv_bfloat16, double) and returns what f returns; f is a generic lambda that
// reads T as `TagType<decltype(tag)>`. A dtype outside the enum runs nothing: the launchers
// (cudaError_t) get cudaErrorInvalidValue, the host versions (void) just return.
template <typename T>
struct TypeTag {
  using type = T;
};
template <class Tag>
using TagType = typename Tag::type;

template <typename F>
auto dispatch_conv_dtype(ConvDtype dtype, F&& f) -> decltype(f(TypeTag<float>{})) {
  using R = decltype(f(TypeTag<float>{}));
  static_assert(std::is_void<R>::value || std::is_same<R, cudaError_t>::value,
                "dispatch_conv_dtype serves the void host versions and the cudaError_t launchers");
  switch (dtype) {
    case ConvDtype::kFloat32:
      return f(TypeTag<float>{});
    case ConvDtype::kFloat16:
      return f(TypeTag<__half>{});
    case ConvDtype::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    case ConvDtype::kFloat64:
      return f(TypeTag<double>{});
  }
  if constexpr (!std::is_void<R>::value) return cudaErrorInvalidValue;
}

// ---- make_args pieces of the dgrad and wgrad problems ---------------------------------------
//
// ConvDgradParams and ConvWgradParams (conv_fused.h) and the Args of their problems share these
// fields under the same names: the gradient operand with its prologue dy = pro_a*g + pro_b*pro_y
// + pro_c (vectors in the accumulation type) and the conv geometry.
template <typename T, class Args, class Params>
void copy_grad_operand(Args& a, const Params& p) {
  using Acc = AccOf<T>;
  a.g = static_cast<const T*>(p.g);
  a.pro_y = static_cast<const T*>(p.pro_y);
  a.pro_a = static_cast<const Acc*>(p.pro_a);
  a.pro_b = static_cast<const Acc*>(p.pro_b);
  a.pro_c = static_cast<const Acc*>(p.pro_c);
}

template <class Args, class Params>
void copy_backward_geometry(Args& a, const Params& p) {
  a.N = p.N;
  a.H = p.H;
  a.W = p.W;
  a.C_in = p.C_in;
  a.H_out = p.H_out;
  a.W_out = p.W_out;
  a.C_out = p.C_out;
  a.ksize = p.ksize;
  a.stride = p.stride;
  a.groups = p.groups;
}

}  // namespace conv_tile
}  // namespace resnet_fused
