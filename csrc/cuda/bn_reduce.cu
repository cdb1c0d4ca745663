// The per-channel reductions of bn_reduce.h: a chunk kernel and a finish kernel per op, each a
// block algorithm of phases (lane merge -> tree levels -> store/finish). The kernels run the
// phases with __syncthreads() between them; the host versions run the same phase functions for
// every block and thread of the same grid (conv_tile.cuh's emulator rules: poisoned shared
// memory, scrambled thread order), so the CPU tests check the device's index math and merge order.
#include "bn_reduce.h"

#include "bn_stats.h"
#include "conv_tile.cuh"

namespace resnet_fused {
namespace {

using namespace conv_tile;

static_assert(kReduceChannels * kReduceLanes == kThreads, "one reduction block is 256 threads");

// ---- the two states: Welford (count, mean, M2) and plain sums -------------------------------

// (count, mean, M2) merged by Chan's formula, carried in fp64 whatever the partials' type and
// rounded once at the end (Ws: the chunk states between the two kernels).
template <typename Acc_>
struct StatsState {
  using Acc = Acc_;
  using State = WelfordState<double>;
  using Ws = double;
  static RF_HD State identity() { return State{0.0, 0.0, 0.0}; }
  static RF_HD State merge(const State& a, const State& b) { return chan_merge(a, b); }
  template <typename Src>
  static RF_HD State load(const Src* src, int64_t plane, int64_t at) {
    return State{static_cast<double>(src[at]), static_cast<double>(src[plane + at]),
                 static_cast<double>(src[2 * plane + at])};
  }
  static RF_HD void store(Ws* dst, int64_t plane, int64_t at, const State& s) {
    dst[at] = s.count;
    dst[plane + at] = s.mean;
    dst[2 * plane + at] = s.m2;
  }
};

template <typename Acc>
struct SumPair {
  Acc s0, s1;
};

// Plain sums, carried in fp64 whatever the partials' type (rounded once, at the end).
template <typename Acc_>
struct SumsState {
  using Acc = Acc_;
  using State = SumPair<double>;
  using Ws = double;
  static RF_HD State identity() { return State{0.0, 0.0}; }
  static RF_HD State merge(const State& a, const State& b) { return State{a.s0 + b.s0, a.s1 + b.s1}; }
  template <typename Src>
  static RF_HD State load(const Src* src, int64_t plane, int64_t at) {
    return State{static_cast<double>(src[at]), static_cast<double>(src[plane + at])};
  }
  static RF_HD void store(Ws* dst, int64_t plane, int64_t at, const State& s) {
    dst[at] = s.s0;
    dst[plane + at] = s.s1;
  }
};

template <class S>
struct ReduceSmem {
  typename S::State lane[kThreads];
  // The emulator's poison (0xFF bytes) needs a byte view.
  unsigned char* bytes() { return reinterpret_cast<unsigned char*>(lane); }
};

// ---- phases shared by both kernels -----------------------------------------------------------

// Thread tid holds lane tid / 32 of channel tile-column tid % 32.
RF_HD int lane_of(int tid) { return tid / kReduceChannels; }
RF_HD int64_t channel_of(int64_t tile, int tid) { return tile * kReduceChannels + tid % kReduceChannels; }

// Phase 0: lane state over items [begin, end) of `src` (planes of n_items x C), every 8th.
template <class S, typename Src>
RF_HD void lane_phase(int tid, ReduceSmem<S>& smem, const Src* src, int64_t n_items, int64_t C,
                      int64_t tile, int64_t begin, int64_t end) {
  const int64_t c = channel_of(tile, tid);
  typename S::State state = S::identity();
  if (c < C) {
    const int64_t plane = n_items * C;
    for (int64_t i = begin + lane_of(tid); i < end; i += kReduceLanes) state = S::merge(state, S::load(src, plane, i * C + c));
  }
  smem.lane[tid] = state;
}

// One level of the fixed tree: lane l < stride absorbs lane l + stride (lower lane on the left).
template <class S>
RF_HD void tree_phase(int tid, int stride, ReduceSmem<S>& smem) {
  if (lane_of(tid) < stride) smem.lane[tid] = S::merge(smem.lane[tid], smem.lane[tid + stride * kReduceChannels]);
}

// Chunk kernel's last phase: lane 0 writes the chunk's state.
template <class S>
RF_HD void store_chunk_phase(int tid, const ReduceSmem<S>& smem, typename S::Ws* ws, int64_t chunks, int64_t C,
                             int64_t tile, int64_t chunk) {
  const int64_t c = channel_of(tile, tid);
  if (lane_of(tid) != 0 || c >= C) return;
  S::store(ws, chunks * C, chunk * C + c, smem.lane[tid]);
}

// ---- the two problems: what the finish phase computes ---------------------------------------

template <typename R>
using UpdateOf = typename std::conditional<std::is_same<R, double>::value, double, float>::type;

// torch.lerp's formula (the running update nn.BatchNorm2d's module path gets from lerp_).
template <typename U>
RF_HD U lerp_torch(U from, U to, U w) {
  return w < U(0.5) ? from + w * (to - from) : to - (to - from) * (U(1) - w);
}

template <typename Acc_, typename R>
struct Finalize {
  using Acc = Acc_;
  using S = StatsState<Acc>;
  using U = UpdateOf<R>;  // the update's arithmetic: fp64 for fp64 buffers, fp32 otherwise
  struct Args {
    const Acc* part;
    const Acc* weight;
    const Acc* bias;
    Acc* out;
    R* running_mean;
    R* running_var;
    int64_t* nbt;
    double* ws;
    int64_t* snapshot;
    int64_t P, C, chunks, chunk_size;
    Acc eps;
    double momentum;
    bool update, cumulative, count_batch, from_running;
  };
  static RF_HD void chunk_lanes(int64_t tile, int64_t chunk, int tid, ReduceSmem<S>& smem, const Args& a) {
    const int64_t begin = chunk * a.chunk_size;
    const int64_t end = begin + a.chunk_size < a.P ? begin + a.chunk_size : a.P;
    lane_phase<S>(tid, smem, a.part, a.P, a.C, tile, begin, end);
    // The count as it was before this op: read here, written only by the finish kernel.
    if (tile == 0 && chunk == 0 && tid == 0 && a.snapshot != nullptr) a.snapshot[0] = a.nbt[0];
  }
  static RF_HD void finish_lanes(int64_t tile, int tid, ReduceSmem<S>& smem, const Args& a) {
    if (a.from_running) {
      smem.lane[tid] = S::identity();
      return;
    }
    lane_phase<S>(tid, smem, a.ws, a.chunks, a.C, tile, 0, a.chunks);
  }
  static RF_HD void finish(int64_t tile, int tid, const ReduceSmem<S>& smem, const Args& a) {
    if (lane_of(tid) != 0) return;
    const int64_t c = channel_of(tile, tid);
    const int64_t batches = a.snapshot != nullptr ? a.snapshot[0] + 1 : 0;
    if (tile == 0 && tid == 0 && a.count_batch) a.nbt[0] = batches;
    if (c >= a.C) return;
    Acc mean, var;
    if (a.from_running) {
      mean = static_cast<Acc>(widen(a.running_mean[c]));
      var = static_cast<Acc>(widen(a.running_var[c]));
    } else {
      const WelfordState<double> st = smem.lane[tid];
      mean = static_cast<Acc>(st.mean);
      var = static_cast<Acc>(st.m2 / (st.count > 1.0 ? st.count : 1.0));
      // An empty batch moves nothing (it still counts, above).
      if (a.update && st.count > 0.0) {
        const U factor = a.cumulative ? U(1) / static_cast<U>(batches) : static_cast<U>(a.momentum);
        const Acc unbiased = static_cast<Acc>(st.m2 / (st.count - 1.0 > 1.0 ? st.count - 1.0 : 1.0));
        a.running_mean[c] =
            Narrow<R>::from(lerp_torch<U>(static_cast<U>(widen(a.running_mean[c])), static_cast<U>(mean), factor));
        a.running_var[c] =
            Narrow<R>::from(lerp_torch<U>(static_cast<U>(widen(a.running_var[c])), static_cast<U>(unbiased), factor));
      }
    }
    const Acc invstd = Acc(1) / static_cast<Acc>(sqrt(var + a.eps));
    const Acc scale = a.weight != nullptr ? invstd * a.weight[c] : invstd;
    Acc shift = -mean * scale;
    if (a.bias != nullptr) shift += a.bias[c];
    a.out[c] = mean;
    a.out[a.C + c] = var;
    a.out[2 * a.C + c] = invstd;
    a.out[3 * a.C + c] = scale;
    a.out[4 * a.C + c] = shift;
  }
  static bool has_chunks(const Args& a) { return !a.from_running; }
};

template <typename Acc_>
struct BackwardCoef {
  using Acc = Acc_;
  using S = SumsState<Acc>;
  struct Args {
    const Acc* part;
    const Acc* weight;
    const Acc* mean;
    const Acc* invstd;
    Acc *dgamma, *dbeta, *a, *b, *c;
    double* ws;
    int64_t P, C, chunks, chunk_size;
    Acc count;
    bool training;
  };
  static RF_HD void chunk_lanes(int64_t tile, int64_t chunk, int tid, ReduceSmem<S>& smem, const Args& a) {
    const int64_t begin = chunk * a.chunk_size;
    const int64_t end = begin + a.chunk_size < a.P ? begin + a.chunk_size : a.P;
    lane_phase<S>(tid, smem, a.part, a.P, a.C, tile, begin, end);
  }
  static RF_HD void finish_lanes(int64_t tile, int tid, ReduceSmem<S>& smem, const Args& a) {
    lane_phase<S>(tid, smem, a.ws, a.chunks, a.C, tile, 0, a.chunks);
  }
  static RF_HD void finish(int64_t tile, int tid, const ReduceSmem<S>& smem, const Args& p) {
    const int64_t c = channel_of(tile, tid);
    if (lane_of(tid) != 0 || c >= p.C) return;
    const Acc dbeta = static_cast<Acc>(smem.lane[tid].s0), dgamma = static_cast<Acc>(smem.lane[tid].s1);
    const Acc invstd = p.invstd[c];
    const Acc a = p.weight != nullptr ? invstd * p.weight[c] : invstd;
    Acc b = Acc(0), cc = Acc(0);
    if (p.training) {
      b = -a * invstd * dgamma / p.count;
      cc = -a * dbeta / p.count - b * p.mean[c];
    }
    p.dgamma[c] = dgamma;
    p.dbeta[c] = dbeta;
    p.a[c] = a;
    p.b[c] = b;
    p.c[c] = cc;
  }
  static bool has_chunks(const Args&) { return true; }
};

// ---- kernels and their host emulation --------------------------------------------------------

template <class Problem>
__global__ void __launch_bounds__(kThreads) reduce_chunk_kernel(const typename Problem::Args args) {
  using S = typename Problem::S;
  __shared__ ReduceSmem<S> smem;
  const int tid = threadIdx.x;
  Problem::chunk_lanes(blockIdx.x, blockIdx.y, tid, smem, args);
  __syncthreads();
  RF_UNROLL
  for (int stride = kReduceLanes / 2; stride > 0; stride /= 2) {
    tree_phase<S>(tid, stride, smem);
    __syncthreads();
  }
  store_chunk_phase<S>(tid, smem, args.ws, args.chunks, args.C, blockIdx.x, blockIdx.y);
}

template <class Problem>
__global__ void __launch_bounds__(kThreads) reduce_finish_kernel(const typename Problem::Args args) {
  using S = typename Problem::S;
  __shared__ ReduceSmem<S> smem;
  const int tid = threadIdx.x;
  Problem::finish_lanes(blockIdx.x, tid, smem, args);
  __syncthreads();
  RF_UNROLL
  for (int stride = kReduceLanes / 2; stride > 0; stride /= 2) {
    tree_phase<S>(tid, stride, smem);
    __syncthreads();
  }
  Problem::finish(blockIdx.x, tid, smem, args);
}

template <class Problem>
cudaError_t launch_reduce(const typename Problem::Args& args, int64_t channel_tiles, cudaStream_t stream) {
  if (channel_tiles == 0) return cudaSuccess;
  if (channel_tiles > kMaxGridX || args.chunks > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  if (Problem::has_chunks(args)) {
    const dim3 grid(static_cast<unsigned>(channel_tiles), static_cast<unsigned>(args.chunks), 1);
    reduce_chunk_kernel<Problem><<<grid, kThreads, 0, stream>>>(args);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  reduce_finish_kernel<Problem><<<static_cast<unsigned>(channel_tiles), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <class Problem>
void run_reduce_host(const typename Problem::Args& args, int64_t channel_tiles) {
  using S = typename Problem::S;
  std::unique_ptr<ReduceSmem<S>> smem(new ReduceSmem<S>());
  auto tree = [&] {
    for (int stride = kReduceLanes / 2; stride > 0; stride /= 2) {
      for_each_thread_host([&](int tid) { tree_phase<S>(tid, stride, *smem); });
    }
  };
  if (Problem::has_chunks(args)) {
    for (int64_t chunk = 0; chunk < args.chunks; ++chunk) {
      for (int64_t tile = 0; tile < channel_tiles; ++tile) {
        std::memset(smem->bytes(), 0xff, sizeof(smem->lane));
        for_each_thread_host([&](int tid) { Problem::chunk_lanes(tile, chunk, tid, *smem, args); });
        tree();
        for_each_thread_host(
            [&](int tid) { store_chunk_phase<S>(tid, *smem, args.ws, args.chunks, args.C, tile, chunk); });
      }
    }
  }
  // Finish blocks: the last block first, so a block that wrote num_batches_tracked before another
  // read it would show (the device runs them in any order).
  for (int64_t tile = channel_tiles - 1; tile >= 0; --tile) {
    std::memset(smem->bytes(), 0xff, sizeof(smem->lane));
    for_each_thread_host([&](int tid) { Problem::finish_lanes(tile, tid, *smem, args); });
    tree();
    for_each_thread_host([&](int tid) { Problem::finish(tile, tid, *smem, args); });
  }
}

template <typename Acc, typename R>
typename Finalize<Acc, R>::Args finalize_args(const BnFinalizeParams& p) {
  const ReducePlan plan = reduce_plan(p.P, p.C);
  typename Finalize<Acc, R>::Args a;
  a.part = static_cast<const Acc*>(p.part);
  a.weight = static_cast<const Acc*>(p.weight);
  a.bias = static_cast<const Acc*>(p.bias);
  a.out = static_cast<Acc*>(p.out);
  a.running_mean = static_cast<R*>(p.running_mean);
  a.running_var = static_cast<R*>(p.running_var);
  a.nbt = p.num_batches_tracked;
  a.ws = static_cast<double*>(p.workspace);
  a.snapshot = p.count_snapshot;
  a.P = p.P;
  a.C = p.C;
  a.chunks = plan.chunks;
  a.chunk_size = plan.chunk_size;
  a.eps = static_cast<Acc>(p.eps);
  a.momentum = p.momentum;
  a.update = p.update;
  a.cumulative = p.cumulative;
  a.count_batch = p.count_batch;
  a.from_running = p.from_running;
  return a;
}

template <typename Acc>
typename BackwardCoef<Acc>::Args coef_args(const BnBackwardCoefParams& p) {
  const ReducePlan plan = reduce_plan(p.P, p.C);
  typename BackwardCoef<Acc>::Args a;
  a.part = static_cast<const Acc*>(p.part);
  a.weight = static_cast<const Acc*>(p.weight);
  a.mean = static_cast<const Acc*>(p.mean);
  a.invstd = static_cast<const Acc*>(p.invstd);
  a.dgamma = static_cast<Acc*>(p.dgamma);
  a.dbeta = static_cast<Acc*>(p.dbeta);
  a.a = static_cast<Acc*>(p.a);
  a.b = static_cast<Acc*>(p.b);
  a.c = static_cast<Acc*>(p.c);
  a.ws = static_cast<double*>(p.workspace);
  a.P = p.P;
  a.C = p.C;
  a.chunks = plan.chunks;
  a.chunk_size = plan.chunk_size;
  a.count = static_cast<Acc>(p.count);
  a.training = p.training;
  return a;
}

// f(TypeTag<Acc>) for the two accumulation types.
template <typename F>
auto dispatch_acc(ConvDtype acc, F&& f) -> decltype(f(TypeTag<float>{})) {
  if (acc == ConvDtype::kFloat64) return f(TypeTag<double>{});
  return f(TypeTag<float>{});
}

}  // namespace

cudaError_t bn_finalize_cuda(const BnFinalizeParams& p, ConvDtype acc, ConvDtype running, cudaStream_t stream) {
  const int64_t tiles = reduce_plan(p.P, p.C).channel_tiles;
  return dispatch_acc(acc, [&](auto acc_tag) {
    using Acc = TagType<decltype(acc_tag)>;
    return dispatch_conv_dtype(running, [&](auto r_tag) {
      using R = TagType<decltype(r_tag)>;
      return launch_reduce<Finalize<Acc, R>>(finalize_args<Acc, R>(p), tiles, stream);
    });
  });
}

void bn_finalize_host(const BnFinalizeParams& p, ConvDtype acc, ConvDtype running) {
  const int64_t tiles = reduce_plan(p.P, p.C).channel_tiles;
  dispatch_acc(acc, [&](auto acc_tag) {
    using Acc = TagType<decltype(acc_tag)>;
    dispatch_conv_dtype(running, [&](auto r_tag) {
      using R = TagType<decltype(r_tag)>;
      run_reduce_host<Finalize<Acc, R>>(finalize_args<Acc, R>(p), tiles);
    });
  });
}

cudaError_t bn_backward_coef_cuda(const BnBackwardCoefParams& p, ConvDtype acc, cudaStream_t stream) {
  const int64_t tiles = reduce_plan(p.P, p.C).channel_tiles;
  return dispatch_acc(acc, [&](auto acc_tag) {
    using Acc = TagType<decltype(acc_tag)>;
    return launch_reduce<BackwardCoef<Acc>>(coef_args<Acc>(p), tiles, stream);
  });
}

void bn_backward_coef_host(const BnBackwardCoefParams& p, ConvDtype acc) {
  const int64_t tiles = reduce_plan(p.P, p.C).channel_tiles;
  dispatch_acc(acc, [&](auto acc_tag) {
    using Acc = TagType<decltype(acc_tag)>;
    run_reduce_host<BackwardCoef<Acc>>(coef_args<Acc>(p), tiles);
  });
}

}  // namespace resnet_fused
