// The halo-staged 3x3 forward (stride 1 or 2, any groups; docs/design.md section 7, way (a)).
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
// The multiply reads the A operand straight from the staged patch: fp16/bf16 use WMMA m8n32k16
// (warp w owns output row w of the tile: its 8 pixels are 8 patch rows s pixels apart, a constant
// stride, which is what load_matrix_sync needs), on the device through nvcuda::wmma and in the
// emulator through the host WMMA shim (wmma_host.cuh); fp32/fp64 the portable 4x4 register tile.
// The phases live in conv_fwd_halo.cuh.
#include "conv_fwd_halo.cuh"

namespace resnet_fused {
namespace {

using namespace conv_tile;
using namespace conv_fwd_halo_detail;

#if defined(__CUDACC__)
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
  HaloMmaFor<T, DeviceWmmaApi> mma;
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
