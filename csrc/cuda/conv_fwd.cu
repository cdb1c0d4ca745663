// Forward fused convolution (see conv_fused.h), the per-tap implicit GEMM: K = taps x
// C_in/groups, each K step loads one tap's shifted input rows with the BN-apply + ReLU prologue
// applied as they are loaded (so a 3x3 transforms every input element up to nine times), then
// the projection K-loop, statistics and post-BN epilogues (conv_fwd.cuh). The phases are run
// by conv_tile.cuh's kernel (GPU) and emulator (CPU).
//
// conv_fwd_cuda / conv_fwd_host are also the forward's one entry point: they hand the convs that
// conv_fwd_uses_halo() selects to the halo-staged kernel of conv_fwd_halo.cu.
#include "conv_fwd.cuh"

namespace resnet_fused {
namespace {

using namespace conv_tile;
using conv_fwd_detail::FwdProblem;
using conv_fwd_detail::make_fwd_args;

template <typename T>
cudaError_t launch_typed(const ConvFwdParams& p, cudaStream_t stream) {
  dim3 grid;
  const auto args = make_fwd_args<T>(p, grid);
  if (args.tiles_m > kMaxGridX || grid.y > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  return launch_blocks<FwdProblem<T>>(args, grid, stream);
}

template <typename T>
void host_typed(const ConvFwdParams& p) {
  dim3 grid;
  const auto args = make_fwd_args<T>(p, grid);
  run_blocks_host<FwdProblem<T>>(args, grid);
}

}  // namespace

cudaError_t conv_fwd_cuda(const ConvFwdParams& p, ConvDtype dtype, cudaStream_t stream) {
  if (conv_fwd_uses_halo(p)) return conv_fwd_halo_cuda(p, dtype, stream);
  return dispatch_conv_dtype(dtype, [&](auto tag) { return launch_typed<TagType<decltype(tag)>>(p, stream); });
}

void conv_fwd_host(const ConvFwdParams& p, ConvDtype dtype) {
  if (conv_fwd_uses_halo(p)) return conv_fwd_halo_host(p, dtype);
  dispatch_conv_dtype(dtype, [&](auto tag) { host_typed<TagType<decltype(tag)>>(p); });
}

}  // namespace resnet_fused
