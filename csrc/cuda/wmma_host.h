// What the bindings see of the host WMMA shim (wmma_host.cuh) and of its test-only fault copies
// (wmma_test_faults.cu). Host compiler, no torch and no device headers.
#pragma once

#include <cstdint>

#include "conv_fused.h"

namespace resnet_fused {

// Warp-level WMMA operations the host shim has performed since the library was loaded (each
// once per warp: see wmma_host.cuh). The parity tests read them to prove that a 16-bit run went
// through the kernels' tensor-core phases rather than the register tile.
struct WmmaHostCounts {
  int64_t mma_sync;
  int64_t load_matrix_sync;
  int64_t store_matrix_sync;
  int64_t fill_fragment;
};
WmmaHostCounts wmma_host_counts();

// TEST ONLY (tests/test_cuda_wmma_faults.py): faults injected into COPIES of the forward's WMMA
// multiply phases (the per-tap kernel's WmmaMma::step and the halo kernel's HaloWmma::halo_step),
// run by the host emulator only, for fp16/bf16. The shipped phases are untouched; the copies are
// reachable only through the CPU-only op resnet_fused::_test_fault_wmma_conv_fwd_cuda.
enum WmmaTestFault : int {
  kWmmaFaultNone = 0,
  // A's ldm is the tile's K width (per-tap: kConvTileK = 32, not the pitch 40; halo: stride x
  // the chunk's 32 channels, not stride x the pixel pitch 48): legal for the hardware, wrong rows.
  kWmmaFaultLdaIsWidth = 1,
  // A's ldm 4 elements short of the pitch (8 bytes off a 16-byte multiple): the shim must refuse it.
  kWmmaFaultLdmNot16Bytes = 2,
  // A's pointer 8 elements (16 bytes) past the tile start: not 32-byte aligned, refused.
  kWmmaFaultPointerNot32Bytes = 3,
  // Lane 1 of every warp passes A's pointer one k16 step further (aligned, in bounds): the lanes
  // of a warp disagree, which the collective forbids.
  kWmmaFaultLaneDivergent = 4,
};
constexpr int kWmmaFaultLast = kWmmaFaultLaneDivergent;

// conv_fwd_host with the fault in whichever forward kernel runs (conv_fwd_uses_halo(p)).
void conv_fwd_host_wmma_test_fault(const ConvFwdParams& p, ConvDtype dtype, int fault);

}  // namespace resnet_fused
