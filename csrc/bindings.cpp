// The one translation unit of resnet_fused._C that sees torch headers.
//
// It registers the C++ ops with the dispatcher (schema + CPU and CUDA
// kernels), checks inputs, allocates outputs and workspaces through torch's
// allocators, and calls the raw-pointer launchers in csrc/cuda/*.cu. The .cu
// files include only CUDA headers, so they compile in seconds; everything that
// costs torch-header compile time is kept here.
//
// Python.h comes first, as Python's docs require.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/bn_stats.h"

namespace resnet_fused {
namespace {

BnStatsDtype to_bn_stats_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return BnStatsDtype::kFloat32;
    case at::kHalf:
      return BnStatsDtype::kFloat16;
    case at::kBFloat16:
      return BnStatsDtype::kBFloat16;
    case at::kDouble:
      return BnStatsDtype::kFloat64;
    default:
      break;
  }
  TORCH_CHECK(false, "resnet_fused.bn_stats: x must be float32, float16, bfloat16 or float64, got ",
              dtype);
  return BnStatsDtype::kFloat32;  // unreachable: TORCH_CHECK(false) throws
}

// Checks x and describes it as [N, C, HW] with element strides.
BnStatsInput describe_bn_stats_input(const at::Tensor& x) {
  TORCH_CHECK(x.layout() == at::kStrided, "resnet_fused.bn_stats: x must be a dense (strided) tensor, got layout ",
              x.layout());
  TORCH_CHECK(x.dim() == 4, "resnet_fused.bn_stats: x must be 4-D (N, C, H, W), got a ", x.dim(),
              "-D tensor of shape ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(C >= 1 && N * H * W >= 1,
              "resnet_fused.bn_stats: x needs at least one channel and N*H*W >= 1 values per channel, "
              "got shape ",
              x.sizes());
  to_bn_stats_dtype(x.scalar_type());  // dtype check, message above
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "resnet_fused.bn_stats: x must be in NCHW-contiguous or channels_last (NHWC) memory "
              "format; got strides ",
              x.strides(), " for shape ", x.sizes(),
              ". Call x.contiguous() or x.contiguous(memory_format=torch.channels_last) first.");

  // In both accepted formats the H and W axes merge into one HW axis whose
  // step is W's stride (or H's when W == 1; torch lets size-1 axes carry any
  // stride, so those are never read).
  BnStatsInput in;
  in.N = N;
  in.C = C;
  in.HW = H * W;
  in.stride_n = x.stride(0);
  in.stride_c = x.stride(1);
  in.stride_hw = W > 1 ? x.stride(3) : (H > 1 ? x.stride(2) : 1);
  return in;
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda_impl(const at::Tensor& x) {
  const BnStatsInput in = describe_bn_stats_input(x);
  const BnStatsDtype dtype = to_bn_stats_dtype(x.scalar_type());
  TORCH_CHECK(x.is_cuda(), "resnet_fused.bn_stats: the CUDA kernel got a tensor on ", x.device());

  // Launch on x's device and the caller's current stream on that device.
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();

  const auto stats_options = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({in.C}, stats_options);
  at::Tensor var = at::empty({in.C}, stats_options);
  // Scratch from the caching allocator: no cudaMalloc, no sync in the hot path.
  at::Tensor workspace = at::empty({static_cast<int64_t>(bn_stats_workspace_bytes(in, dtype))},
                                   x.options().dtype(at::kByte));

  const cudaError_t err = bn_stats_cuda(x.const_data_ptr(), in, dtype, workspace.mutable_data_ptr(),
                                        mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>(),
                                        stream);
  TORCH_CHECK(err == cudaSuccess, "resnet_fused.bn_stats: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu_impl(const at::Tensor& x) {
  const BnStatsInput in = describe_bn_stats_input(x);
  const BnStatsDtype dtype = to_bn_stats_dtype(x.scalar_type());
  const auto stats_options = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({in.C}, stats_options);
  at::Tensor var = at::empty({in.C}, stats_options);
  bn_stats_host(x.const_data_ptr(), in, dtype, mean.mutable_data_ptr<float>(),
                var.mutable_data_ptr<float>());
  return {mean, var};
}

}  // namespace
}  // namespace resnet_fused

// FRAGMENT, not TORCH_LIBRARY: the Python side defines more ops in the same
// namespace with torch.library.custom_op, and two defining blocks for one
// namespace abort at import. C++ ops carry a `_cuda` suffix so their names
// never collide with the Python ones.
TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  // torch requires C++-defined ops with a Python fake impl to name the module
  // that registers it (resnet_fused._extension, on first load()).
  m.set_python_module("resnet_fused._extension");
  m.def("bn_stats_cuda(Tensor x) -> (Tensor mean, Tensor var)");
}

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("bn_stats_cuda", &resnet_fused::bn_stats_cuda_impl);
}

// The host version of the same algorithm: lets CPU-only CI check the
// chunking and merge math the GPU runs.
TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_stats_cuda", &resnet_fused::bn_stats_cpu_impl);
}

// A plain Python extension module with no functions: importing
// resnet_fused._C dlopens this library, which runs the static registrations
// above. No pybind11 and no torch/extension.h (both cost compile time).
static PyModuleDef resnet_fused_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "resnet_fused compiled ops; they register themselves under torch.ops.resnet_fused.",
    0,        // m_size: no per-module state
    nullptr,  // m_methods: none, the ops live in torch.ops.resnet_fused
    nullptr,  // m_slots
    nullptr,  // m_traverse
    nullptr,  // m_clear
    nullptr,  // m_free
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&resnet_fused_c_module); }
