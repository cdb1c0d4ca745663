// A host implementation of the WMMA API subset the kernels use (nvcuda::wmma in <mma.h>), so the
// CPU thread-block emulator runs the kernels' own tensor-core multiply phases for fp16/bf16.
//
// What it emulates, with matrix-level semantics (the same pointers, ldm and layouts as the
// device code):
//   fragment<matrix_a | matrix_b | accumulator, M, N, K, T, row_major | col_major>
//       shapes m16n16k16, m8n32k16, m32n8k16; T = __half or __nv_bfloat16 for A/B (stored as T,
//       so the operands round exactly as on the device), float for the accumulator;
//   fill_fragment, load_matrix_sync(frag, ptr, ldm) (A/B) and (frag, ptr, ldm, layout)
//   (accumulator), mma_sync(d, a, b, c) (exact products, fp32 accumulation in ascending k),
//   store_matrix_sync(ptr, frag, ldm, layout).
// It checks what the hardware requires of every call and throws WmmaHostError with the call,
// the values and the emulated thread when one is broken:
//   * the pointer 32-byte (256-bit) aligned;
//   * ldm a multiple of 16 bytes (8 elements for 16-bit types, 4 for float);
//   * the same call with the same arguments from all 32 lanes of a warp (the *_sync calls are
//     warp-collective), checked at the end of each phase;
//   * (emulator only) every element the call touches inside the block's shared memory.
//
// What it does NOT emulate: the per-lane register layout of a fragment (the device's layout is
// opaque, `fragment::x[]` is not provided, so code may not depend on it) and the tensor cores'
// internal accumulation order (the shim sums k in ascending order in fp32; the device may group
// and order the partial products differently, which is rounding noise of the fp32 sum).
//
// Warp-collective execution in the emulator. The emulator runs a phase for all 256 thread
// indices one after another (scrambled order, conv_tile.cuh), and each thread calls the WMMA
// functions on its own fragment objects, exactly as on the device. The shim performs a call's
// matrix operation ONCE per warp, when lane 0 of that warp makes it, on lane 0's fragments,
// which therefore hold the warp's whole matrix; the calls of lanes 1..31 are checked (alignment,
// ldm, bounds) and recorded, and do nothing else. At the end of the phase every lane's sequence
// of calls must equal its warp's lane 0 sequence (operation, shape, pointer, ldm, layout), which
// is the collective's contract on the device. A phase boundary is a __syncthreads() in the
// kernel, so all WMMA calls of a warp within one phase see the same shared memory whichever lane
// performs them. Outside an emulator run (no Emulation in scope) a call throws.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace resnet_fused {
namespace wmma_host {

constexpr int kWarpSize = 32;

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

class WmmaHostError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// ---- counters (read through the extension: torch.ops.resnet_fused.wmma_host_counts_cuda) ------

enum Counter : int { kMmaSync = 0, kLoadMatrixSync = 1, kStoreMatrixSync = 2, kFillFragment = 3, kNumCounters = 4 };

// Warp-level operations performed (once per warp, see above), since the library was loaded.
inline std::atomic<int64_t>* counters() {
  static std::atomic<int64_t> c[kNumCounters] = {};
  return c;
}

// ---- the emulator's context -----------------------------------------------------------------

enum Op : int { kOpFill = 0, kOpLoad = 1, kOpStore = 2, kOpMma = 3 };

struct Call {
  int op;
  int use;  // 0 = matrix_a, 1 = matrix_b, 2 = accumulator
  int m, n, k;
  const void* ptr;
  unsigned ldm;
  int layout;  // 0 row, 1 col, -1 none
  bool operator==(const Call& o) const {
    return op == o.op && use == o.use && m == o.m && n == o.n && k == o.k && ptr == o.ptr && ldm == o.ldm &&
           layout == o.layout;
  }
};

struct State {
  int tid = -1;                            // emulated thread of the running call, -1 between phases
  const unsigned char* smem_lo = nullptr;  // the block's shared memory, [lo, hi)
  const unsigned char* smem_hi = nullptr;
  std::vector<std::vector<Call>> calls;    // per thread, this phase
  bool any_call = false;
};

inline State*& current_state() {
  static thread_local State* state = nullptr;
  return state;
}

// Installed by an emulator run (run_blocks_host, run_halo_blocks_host) for its duration: WMMA
// calls are legal only inside it. `smem`/`bytes`: the emulated shared memory every fragment
// load and store must stay within.
class Emulation {
 public:
  Emulation(const void* smem, size_t bytes, int threads) : previous_(current_state()) {
    state_.calls.resize(threads);
    state_.smem_lo = static_cast<const unsigned char*>(smem);
    state_.smem_hi = state_.smem_lo + bytes;
    current_state() = &state_;
  }
  ~Emulation() { current_state() = previous_; }
  Emulation(const Emulation&) = delete;
  Emulation& operator=(const Emulation&) = delete;

 private:
  State state_;
  State* previous_;
};

inline const char* op_name(int op) {
  switch (op) {
    case kOpFill:
      return "fill_fragment";
    case kOpLoad:
      return "load_matrix_sync";
    case kOpStore:
      return "store_matrix_sync";
    default:
      return "mma_sync";
  }
}

inline std::string describe(const Call& c) {
  static const char* uses[] = {"matrix_a", "matrix_b", "accumulator"};
  std::ostringstream s;
  s << op_name(c.op) << "(" << uses[c.use] << " m" << c.m << "n" << c.n << "k" << c.k;
  if (c.op == kOpLoad || c.op == kOpStore) {
    s << ", ptr " << c.ptr << ", ldm " << c.ldm << ", " << (c.layout == 1 ? "col_major" : "row_major");
  }
  s << ")";
  return s.str();
}

// One phase of the emulator (for_each_thread_host): sets the emulated thread of each call and,
// at the end, checks that the lanes of every warp made the same WMMA calls. A no-op outside an
// Emulation (the elementwise and statistics kernels).
class Phase {
 public:
  Phase() : state_(current_state()) {
    if (state_ == nullptr) return;
    for (auto& c : state_->calls) c.clear();
    state_->any_call = false;
  }
  ~Phase() {
    if (state_ != nullptr) state_->tid = -1;
  }
  void enter(int tid) {
    if (state_ != nullptr) state_->tid = tid;
  }
  void finish() {
    if (state_ == nullptr) return;
    state_->tid = -1;
    if (!state_->any_call) return;
    const std::vector<std::vector<Call>>& calls = state_->calls;
    for (size_t t = 0; t < calls.size(); ++t) {
      const size_t lead = t - t % kWarpSize;
      const std::vector<Call>& ref = calls[lead];
      const std::vector<Call>& mine = calls[t];
      if (t == lead || mine == ref) continue;
      size_t i = 0;
      while (i < ref.size() && i < mine.size() && mine[i] == ref[i]) ++i;
      std::ostringstream s;
      s << "WMMA host shim: the *_sync calls are warp-collective (every lane of a warp makes the same call with "
           "the same arguments), but in one phase lane "
        << t % kWarpSize << " of warp " << t / kWarpSize << " (thread " << t << ") made call #" << i << " "
        << (i < mine.size() ? describe(mine[i]) : std::string("<none>")) << " where lane 0 made "
        << (i < ref.size() ? describe(ref[i]) : std::string("<none>"));
      throw WmmaHostError(s.str());
    }
  }

 private:
  State* state_;
};

// ---- fragments --------------------------------------------------------------------------------

template <class Use, int M, int N, int K>
struct FragmentShape;
template <int M, int N, int K>
struct FragmentShape<matrix_a, M, N, K> {
  static constexpr int kRows = M, kCols = K, kUse = 0;
};
template <int M, int N, int K>
struct FragmentShape<matrix_b, M, N, K> {
  static constexpr int kRows = K, kCols = N, kUse = 1;
};
template <int M, int N, int K>
struct FragmentShape<accumulator, M, N, K> {
  static constexpr int kRows = M, kCols = N, kUse = 2;
};

template <class Layout>
struct LayoutCode {
  static constexpr int value = -1;
};
template <>
struct LayoutCode<row_major> {
  static constexpr int value = 0;
};
template <>
struct LayoutCode<col_major> {
  static constexpr int value = 1;
};

// The warp's whole matrix, row-major [kRows][kCols], in the element type (16-bit operands stay
// 16-bit). Starts as NaN (all-ones bytes) so that using an unfilled fragment shows.
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert((M == 16 && N == 16 && K == 16) || (M == 8 && N == 32 && K == 16) || (M == 32 && N == 8 && K == 16),
                "WMMA host shim: shapes m16n16k16, m8n32k16 and m32n8k16 only");
  static_assert(std::is_same<Use, accumulator>::value
                    ? std::is_same<T, float>::value && std::is_void<Layout>::value
                    : (std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value) &&
                          (std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value),
                "WMMA host shim: 16-bit (half / bfloat16) A and B fragments with a layout, float accumulators "
                "without one");
  using Shape = FragmentShape<Use, M, N, K>;
  using element_type = T;
  static constexpr int kRows = Shape::kRows;
  static constexpr int kCols = Shape::kCols;
  T v[kRows * kCols];
  fragment() { std::memset(v, 0xff, sizeof(v)); }
};

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Checks the call, records it for the lane-uniformity check and returns whether this thread is
// lane 0 (the one that performs the warp's operation).
inline bool enter_call(const Call& call, size_t element_bytes, int rows, int cols) {
  State* state = current_state();
  if (state == nullptr || state->tid < 0) {
    throw WmmaHostError(std::string("WMMA host shim: ") + describe(call) +
                        " called outside a phase of the thread-block emulator");
  }
  const int tid = state->tid;
  auto fail = [&](const std::string& what) {
    std::ostringstream s;
    s << "WMMA host shim: " << describe(call) << " in thread " << tid << " (warp " << tid / kWarpSize << ", lane "
      << tid % kWarpSize << "): " << what;
    throw WmmaHostError(s.str());
  };
  if (call.op == kOpLoad || call.op == kOpStore) {
    const auto address = reinterpret_cast<uintptr_t>(call.ptr);
    if (address % 32 != 0) {
      std::ostringstream s;
      s << "the pointer is " << address % 32
        << " bytes past a 32-byte boundary; the hardware requires a 256-bit (32-byte) aligned pointer";
      fail(s.str());
    }
    if (call.ldm == 0 || (call.ldm * element_bytes) % 16 != 0) {
      std::ostringstream s;
      s << "ldm = " << call.ldm << " elements (" << call.ldm * element_bytes
        << " bytes) is not a positive multiple of 16 bytes; the hardware requires ldm to be a multiple of "
        << 16 / element_bytes << " elements for " << element_bytes << "-byte elements";
      fail(s.str());
    }
    if (state->smem_lo != nullptr) {
      // Row-major: rows of `cols` elements ldm apart; column-major: the transpose.
      const int lines = call.layout == 1 ? cols : rows, run = call.layout == 1 ? rows : cols;
      const auto* first = static_cast<const unsigned char*>(call.ptr);
      const unsigned char* end = first + (static_cast<size_t>(lines - 1) * call.ldm + run) * element_bytes;
      if (first < state->smem_lo || end > state->smem_hi) {
        std::ostringstream s;
        s << "the " << rows << "x" << cols << " matrix spans bytes [" << first - state->smem_lo << ", "
          << end - state->smem_lo << ") of the block's shared memory, which has " << state->smem_hi - state->smem_lo
          << " bytes";
        fail(s.str());
      }
    }
  }
  if (state->calls.size() <= static_cast<size_t>(tid)) fail("thread index past the emulated block");
  state->calls[tid].push_back(call);
  state->any_call = true;
  return tid % kWarpSize == 0;
}

template <class Use, int M, int N, int K, class T, class L>
Call make_call(int op, const void* ptr, unsigned ldm, int layout) {
  return Call{op, FragmentShape<Use, M, N, K>::kUse, M, N, K, ptr, ldm, layout};
}

template <class Use, int M, int N, int K, class T, class L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, T value) {
  if (!enter_call(make_call<Use, M, N, K, T, L>(kOpFill, nullptr, 0, -1), sizeof(T), 0, 0)) return;
  for (auto& e : f.v) e = value;
  counters()[kFillFragment].fetch_add(1, std::memory_order_relaxed);
}

// A / B: element (r, c) of the fragment at ptr[r * ldm + c] (row_major) or ptr[c * ldm + r]
// (col_major).
template <class Use, int M, int N, int K, class T, class L>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* ptr, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load takes a layout_t");
  using F = fragment<Use, M, N, K, T, L>;
  constexpr int layout = LayoutCode<L>::value;
  if (!enter_call(make_call<Use, M, N, K, T, L>(kOpLoad, ptr, ldm, layout), sizeof(T), F::kRows, F::kCols)) return;
  for (int r = 0; r < F::kRows; ++r) {
    for (int c = 0; c < F::kCols; ++c) {
      f.v[r * F::kCols + c] = layout == 1 ? ptr[static_cast<size_t>(c) * ldm + r] : ptr[static_cast<size_t>(r) * ldm + c];
    }
  }
  counters()[kLoadMatrixSync].fetch_add(1, std::memory_order_relaxed);
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* ptr, unsigned ldm, layout_t layout) {
  using F = fragment<accumulator, M, N, K, float>;
  const int code = layout == mem_col_major ? 1 : 0;
  if (!enter_call(make_call<accumulator, M, N, K, float, void>(kOpLoad, ptr, ldm, code), sizeof(float), F::kRows,
                  F::kCols)) {
    return;
  }
  for (int r = 0; r < F::kRows; ++r) {
    for (int c = 0; c < F::kCols; ++c) {
      f.v[r * F::kCols + c] = code == 1 ? ptr[static_cast<size_t>(c) * ldm + r] : ptr[static_cast<size_t>(r) * ldm + c];
    }
  }
  counters()[kLoadMatrixSync].fetch_add(1, std::memory_order_relaxed);
}

template <int M, int N, int K>
void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  using F = fragment<accumulator, M, N, K, float>;
  const int code = layout == mem_col_major ? 1 : 0;
  if (!enter_call(make_call<accumulator, M, N, K, float, void>(kOpStore, ptr, ldm, code), sizeof(float), F::kRows,
                  F::kCols)) {
    return;
  }
  for (int r = 0; r < F::kRows; ++r) {
    for (int c = 0; c < F::kCols; ++c) {
      const float value = f.v[r * F::kCols + c];
      if (code == 1) {
        ptr[static_cast<size_t>(c) * ldm + r] = value;
      } else {
        ptr[static_cast<size_t>(r) * ldm + c] = value;
      }
    }
  }
  counters()[kStoreMatrixSync].fetch_add(1, std::memory_order_relaxed);
}

// d = a * b + c: products of the 16-bit operands are exact in fp32; the sum runs over k in
// ascending order in fp32, starting from c. d may be c.
template <int M, int N, int K, class T, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  if (!enter_call(make_call<accumulator, M, N, K, float, void>(kOpMma, nullptr, 0, -1), sizeof(float), 0, 0)) return;
  float out[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float acc = c.v[i * N + j];
      for (int kk = 0; kk < K; ++kk) acc += to_float(a.v[i * K + kk]) * to_float(b.v[kk * N + j]);
      out[i * N + j] = acc;
    }
  }
  std::memcpy(d.v, out, sizeof(out));
  counters()[kMmaSync].fetch_add(1, std::memory_order_relaxed);
}

}  // namespace wmma_host

// The API policies the multiply phases are written against (conv_tile.cuh, conv_fwd_halo.cuh):
// the same phase code is instantiated with DeviceWmmaApi in the kernels and with HostWmmaApi in
// the emulator.
struct HostWmmaApi {
  template <class Use, int M, int N, int K, class T, class Layout = void>
  using fragment = wmma_host::fragment<Use, M, N, K, T, Layout>;
  using matrix_a = wmma_host::matrix_a;
  using matrix_b = wmma_host::matrix_b;
  using accumulator = wmma_host::accumulator;
  using row_major = wmma_host::row_major;
  using col_major = wmma_host::col_major;
  using layout_t = wmma_host::layout_t;
  static constexpr layout_t mem_row_major = wmma_host::mem_row_major;
  static constexpr layout_t mem_col_major = wmma_host::mem_col_major;

  template <class F, class V>
  static void fill_fragment(F& f, V value) {
    wmma_host::fill_fragment(f, static_cast<typename F::element_type>(value));
  }
  template <class F, class P>
  static void load_matrix_sync(F& f, const P* ptr, unsigned ldm) {
    wmma_host::load_matrix_sync(f, ptr, ldm);
  }
  template <class F, class P>
  static void load_matrix_sync(F& f, const P* ptr, unsigned ldm, layout_t layout) {
    wmma_host::load_matrix_sync(f, ptr, ldm, layout);
  }
  template <class P, class F>
  static void store_matrix_sync(P* ptr, const F& f, unsigned ldm, layout_t layout) {
    wmma_host::store_matrix_sync(ptr, f, ldm, layout);
  }
  template <class D, class A, class B, class C>
  static void mma_sync(D& d, const A& a, const B& b, const C& c) {
    wmma_host::mma_sync(d, a, b, c);
  }
};

}  // namespace resnet_fused
