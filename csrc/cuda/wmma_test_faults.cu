// TEST ONLY: copies of the forward's WMMA multiply phases with deliberate faults (wmma_host.h),
// run through the host emulator and the WMMA shim, so the tests can show that a wrong ldm in the
// tensor-core phase fails the 16-bit parity checks and that the shim refuses what the hardware
// forbids. Nothing here is reachable from the shipped ops; the only caller is the CPU-only op
// resnet_fused::_test_fault_wmma_conv_fwd_cuda (csrc/bindings.cpp). Each copy overrides only the
// step that loads the A operand; zero() and stash() are the shipped ones.
//
// Also defines wmma_host_counts() (the shim's counters, read by the bindings).
#include "conv_fwd_halo.cuh"
#include "wmma_host.h"

namespace resnet_fused {

WmmaHostCounts wmma_host_counts() {
  const auto* c = wmma_host::counters();
  WmmaHostCounts out;
  out.mma_sync = c[wmma_host::kMmaSync].load();
  out.load_matrix_sync = c[wmma_host::kLoadMatrixSync].load();
  out.store_matrix_sync = c[wmma_host::kStoreMatrixSync].load();
  out.fill_fragment = c[wmma_host::kFillFragment].load();
  return out;
}

namespace {

using namespace conv_tile;
using namespace conv_fwd_halo_detail;

// The fault's A pointer offset (elements) for the calling thread, and the A ldm, from the
// correct ones.
template <int kFault>
inline int fault_offset(int tid) {
  if (kFault == kWmmaFaultPointerNot32Bytes) return 8;
  if (kFault == kWmmaFaultLaneDivergent && tid % 32 == 1) return 16;
  return 0;
}

// Copy of WmmaMma::step (conv_tile.cuh) with the fault.
template <typename T, int kFault>
struct FaultyWmmaMmaForTest : WmmaMma<T, HostWmmaApi> {
  using W = HostWmmaApi;
  using Base = WmmaMma<T, W>;
  template <size_t R>
  void step(int tid, const TileSmem<T, float, R>& s) {
    const int warp = tid / 32;
    const int row0 = (warp / 2) * 16, col0 = (warp % 2) * 32;
    const unsigned lda = kFault == kWmmaFaultLdaIsWidth ? kBK : (kFault == kWmmaFaultLdmNot16Bytes ? kLdA - 4 : kLdA);
    for (int kk = 0; kk < kBK; kk += 16) {
      typename Base::FragA fa;
      W::load_matrix_sync(fa, s.a() + row0 * kLdA + kk + fault_offset<kFault>(tid), lda);
      for (int j = 0; j < 2; ++j) {
        typename Base::FragB fb;
        W::load_matrix_sync(fb, s.b() + kk * kLdB + col0 + 16 * j, kLdB);
        W::mma_sync(this->frag[j], fa, fb, this->frag[j]);
      }
    }
  }
};

// Copy of HaloWmma::halo_step (conv_fwd_halo.cuh) with the fault.
template <typename T, int kFault>
struct FaultyHaloWmmaForTest : HaloWmma<T, HostWmmaApi> {
  using W = HostWmmaApi;
  using Base = HaloWmma<T, W>;
  using Base::kK;
  using Base::kLd;
  void halo_step(int tid, const HaloSmem<T>& s, const T* b, int stride, int side, int tap_off) {
    const int warp = tid / 32;
    const T* a = patch_of(s) + (warp * stride * side + tap_off) * kLd;
    const int pitch = kFault == kWmmaFaultLdaIsWidth ? kK : (kFault == kWmmaFaultLdmNot16Bytes ? kLd - 4 : kLd);
    const unsigned lda = static_cast<unsigned>(stride * pitch);
    for (int kk = 0; kk < kK; kk += 16) {
      typename Base::FragA fa;
      W::load_matrix_sync(fa, a + kk + fault_offset<kFault>(tid), lda);
      for (int j = 0; j < 2; ++j) {
        typename Base::FragB fb;
        W::load_matrix_sync(fb, b + kk * kLdB + 32 * j, kLdB);
        W::mma_sync(this->frag[j], fa, fb, this->frag[j]);
      }
    }
  }
};

template <typename T, int kFault>
void run_faulty(const ConvFwdParams& p) {
  dim3 grid;
  if (conv_fwd_uses_halo(p)) {
    const HaloArgs<T> h = make_halo_args<T>(p, grid);
    run_halo_blocks_host<T, FaultyHaloWmmaForTest<T, kFault>>(h, grid);
  } else {
    const auto args = make_fwd_args<T>(p, grid);
    run_blocks_host<FwdProblem<T>, FaultyWmmaMmaForTest<T, kFault>>(args, grid);
  }
}

template <typename T>
void run_typed(const ConvFwdParams& p, int fault) {
  switch (fault) {
    case kWmmaFaultLdaIsWidth:
      return run_faulty<T, kWmmaFaultLdaIsWidth>(p);
    case kWmmaFaultLdmNot16Bytes:
      return run_faulty<T, kWmmaFaultLdmNot16Bytes>(p);
    case kWmmaFaultPointerNot32Bytes:
      return run_faulty<T, kWmmaFaultPointerNot32Bytes>(p);
    case kWmmaFaultLaneDivergent:
      return run_faulty<T, kWmmaFaultLaneDivergent>(p);
    default:
      return;
  }
}

}  // namespace

// The bindings check dtype (16-bit) and fault (1..kWmmaFaultLast) first.
void conv_fwd_host_wmma_test_fault(const ConvFwdParams& p, ConvDtype dtype, int fault) {
  if (dtype == ConvDtype::kFloat16) run_typed<__half>(p, fault);
  if (dtype == ConvDtype::kBFloat16) run_typed<__nv_bfloat16>(p, fault);
}

}  // namespace resnet_fused
