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

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/bn_elementwise.h"
#include "cuda/bn_reduce.h"
#include "cuda/bn_stats.h"
#include "cuda/conv_fused.h"
#include "cuda/wmma_host.h"

namespace resnet_fused {
namespace {

// The kernels' code for a torch dtype: Code is BnStatsDtype or ConvDtype (the same four names).
template <class Code>
Code dtype_code(const char* op, const char* name, at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return Code::kFloat32;
    case at::kHalf:
      return Code::kFloat16;
    case at::kBFloat16:
      return Code::kBFloat16;
    case at::kDouble:
      return Code::kFloat64;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": ", name, " must be float32, float16, bfloat16 or float64, got ", dtype);
  return Code::kFloat32;  // unreachable: TORCH_CHECK(false) throws
}

BnStatsDtype to_bn_stats_dtype(at::ScalarType dtype) {
  return dtype_code<BnStatsDtype>("resnet_fused.bn_stats", "x", dtype);
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


// ---- fused convolution GEMMs (csrc/cuda/conv_fused.h) ---------------------------------------
//
// Shared rules of the three ops: activations are 4-D logical NCHW tensors in any memory format
// (copied to channels_last when they are not already), outputs are channels_last; weights are in
// PyTorch's (C_out, C_in/groups, k, k) layout; data tensors share one floating dtype; per-channel
// vectors may be float32 or float64 and are used in the accumulation type (float64 for float64
// data, float32 otherwise); everything lives on one device.

using OptTensor = std::optional<at::Tensor>;

ConvDtype to_conv_dtype(const char* op, const char* name, at::ScalarType dtype) {
  return dtype_code<ConvDtype>(op, name, dtype);
}

at::ScalarType acc_dtype_of(at::ScalarType data) { return data == at::kDouble ? at::kDouble : at::kFloat; }

int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Checks a 4-D activation against the reference tensor's dtype and device; returns it in
// channels_last memory.
at::Tensor activation(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got a ", t.dim(),
              "-D tensor of shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but the other data tensors have ", ref.scalar_type(), "; all must have one dtype");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the other tensors are on ",
              ref.device(), "; all must be on one device");
  return t.contiguous(at::MemoryFormat::ChannelsLast);
}

// Checks a weight (C_out, C_in/groups, k, k) (or (C_out, C_in) for a 1x1, when allow_2d);
// returns it contiguous in that layout.
at::Tensor weight(const char* op, const char* name, const at::Tensor& w, const at::Tensor& ref, bool allow_2d) {
  TORCH_CHECK(w.dim() == 4 || (allow_2d && w.dim() == 2), op, ": ", name,
              " must be a 4-D weight (C_out, C_in/groups, k, k)", allow_2d ? " or 2-D (C_out, C_in)" : "",
              ", got a ", w.dim(), "-D tensor of shape ", w.sizes());
  TORCH_CHECK(w.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", w.scalar_type(),
              " but the data tensors have ", ref.scalar_type(), "; all must have one dtype");
  TORCH_CHECK(w.device() == ref.device(), op, ": ", name, " is on ", w.device(), " but the other tensors are on ",
              ref.device(), "; all must be on one device");
  return w.contiguous();
}

// Checks a per-channel vector of `channels` values (float32 or float64); returns it contiguous
// in the accumulation type of `ref`'s dtype.
at::Tensor channel_vector(const char* op, const char* name, const at::Tensor& t, int64_t channels,
                          const at::Tensor& ref) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must be a 1-D tensor of ", channels,
              " values (one per channel), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64 (per-channel statistics are kept in fp32 whatever the data "
              "dtype), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the data is on ",
              ref.device(), "; all must be on one device");
  return t.to(acc_dtype_of(ref.scalar_type())).contiguous();
}

// Both tensors of an optional pair (scale/shift), or neither.
void check_pair(const char* op, const char* a_name, const OptTensor& a, const char* b_name, const OptTensor& b) {
  TORCH_CHECK(a.has_value() == b.has_value(), op, ": pass both ", a_name, " and ", b_name, " or neither");
}

void check_conv_geometry(const char* op, int64_t stride, int64_t groups, int64_t ksize, int64_t c_in,
                         int64_t c_out) {
  TORCH_CHECK(ksize == 1 || ksize == 3, op, ": only 1x1 and 3x3 kernels are supported, got ksize ", ksize);
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  TORCH_CHECK(c_in % groups == 0 && c_out % groups == 0, op, ": groups=", groups,
              " must divide both the input channels (", c_in, ") and the output channels (", c_out, ")");
}

// The forward/dgrad weight w (C_out, C_in/groups, k, k) against the conv input (`in_name`, C_in
// channels): a square kernel, check_conv_geometry, and C_in/groups input channels per group.
void check_conv_weight(const char* op, const at::Tensor& w, int64_t stride, int64_t groups, int64_t c_in,
                       const char* in_name) {
  TORCH_CHECK(w.size(2) == w.size(3), op, ": the kernel must be square, got w of shape ", w.sizes());
  check_conv_geometry(op, stride, groups, w.size(2), c_in, w.size(0));
  TORCH_CHECK(w.size(1) * groups == c_in, op, ": w of shape ", w.sizes(), " with groups=", groups, " expects ",
              w.size(1) * groups, " input channels, but ", in_name, " has ", c_in);
}

at::Tensor empty_nhwc(int64_t n, int64_t c, int64_t h, int64_t w, const at::Tensor& like) {
  return at::empty({n, c, h, w}, like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

template <typename T>
const void* ptr_or_null(const std::optional<T>& t) {
  return t.has_value() ? t->const_data_ptr() : nullptr;
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Runs `launch_cuda(stream)` under a device guard on t's device, or `run_host()`.
template <class Cuda, class Host>
void run_on(const char* op, bool on_cuda, const at::Tensor& t, Cuda launch_cuda, Host run_host) {
  if (on_cuda) {
    TORCH_CHECK(t.is_cuda(), op, ": the CUDA kernel got a tensor on ", t.device());
    const c10::cuda::CUDAGuard device_guard(t.device());
    check_launch(op, launch_cuda(c10::cuda::getCurrentCUDAStream(t.device().index()).stream()));
  } else {
    run_host();
  }
}

// The BN-backward prologue dy = a*g + b*y + c on a gradient operand: all four or none.
struct GradPrologueTensors {
  OptTensor y, a, b, c;
};

GradPrologueTensors grad_prologue(const char* op, const at::Tensor& grad, const OptTensor& y, const OptTensor& a,
                                  const OptTensor& b, const OptTensor& c) {
  GradPrologueTensors out;
  const bool any = y.has_value() || a.has_value() || b.has_value() || c.has_value();
  if (!any) return out;
  TORCH_CHECK(y.has_value() && a.has_value() && b.has_value() && c.has_value(), op,
              ": the gradient prologue dy = pro_a*grad + pro_b*pro_y + pro_c needs all of pro_y, pro_a, pro_b "
              "and pro_c (or none of them)");
  TORCH_CHECK(y->sizes() == grad.sizes(), op, ": pro_y must have grad's shape ", grad.sizes(), ", got ",
              y->sizes());
  out.y = activation(op, "pro_y", *y, grad);
  const int64_t k = grad.size(1);
  out.a = channel_vector(op, "pro_a", *a, k, grad);
  out.b = channel_vector(op, "pro_b", *b, k, grad);
  out.c = channel_vector(op, "pro_c", *c, k, grad);
  return out;
}

// Eval-mode BatchNorms of the forward read from their buffers (ConvFwdParams): per affine, the
// running mean and variance and eps; the matching scale/shift arguments are the norm's weight and
// bias (or None).
struct FwdEvalNorms {
  OptTensor pro_mean, pro_var, proj_mean, proj_var, post_mean, post_var;
  double pro_eps = 0.0, proj_eps = 0.0, post_eps = 0.0;
  // ConvFwdParams::postact_close: the proj_* norm is then the projection output's (C_out).
  bool postact_close = false;
};

// mean and var of one eval-mode norm: both or neither, `channels` values each.
void eval_norm(const char* op, const char* prefix, const OptTensor& mean, const OptTensor& var, int64_t channels,
               const at::Tensor& ref, OptTensor& mean_out, OptTensor& var_out) {
  TORCH_CHECK(mean.has_value() == var.has_value(), op, ": pass both ", prefix, "_mean and ", prefix,
              "_var (an eval-mode norm's running statistics) or neither");
  if (!mean) return;
  const std::string m = std::string(prefix) + "_mean", v = std::string(prefix) + "_var";
  mean_out = channel_vector(op, m.c_str(), *mean, channels, ref);
  var_out = channel_vector(op, v.c_str(), *var, channels, ref);
}

std::tuple<at::Tensor, at::Tensor> conv_fwd_impl(bool on_cuda, const at::Tensor& x_in, const at::Tensor& w_in,
                                                 const OptTensor& scale, const OptTensor& shift, int64_t stride,
                                                 int64_t groups, const OptTensor& shortcut, int64_t shortcut_kind,
                                                 int64_t shortcut_stride, const OptTensor& proj_w,
                                                 const OptTensor& proj_scale, const OptTensor& proj_shift,
                                                 bool emit_stats, const OptTensor& post_scale,
                                                 const OptTensor& post_shift, int64_t algo,
                                                 const FwdEvalNorms& norms = {},
                                                 int64_t test_fault = kWmmaFaultNone) {
  const char* op = test_fault != kWmmaFaultNone ? "resnet_fused._test_fault_wmma_conv_fwd" : "resnet_fused.conv_fwd";
  const ConvDtype dtype = to_conv_dtype(op, "x", x_in.scalar_type());
  const at::Tensor x = activation(op, "x", x_in, x_in);
  const at::Tensor w = weight(op, "w", w_in, x_in, false);
  const int64_t N = x.size(0), C_in = x.size(1), H_in = x.size(2), W_in = x.size(3);
  const int64_t C_out = w.size(0), ksize = w.size(2);
  check_conv_weight(op, w, stride, groups, C_in, "x");
  const int64_t H_out = conv_out_size(H_in, static_cast<int>(ksize), static_cast<int>(stride));
  const int64_t W_out = conv_out_size(W_in, static_cast<int>(ksize), static_cast<int>(stride));
  TORCH_CHECK(H_out >= 1 && W_out >= 1, op, ": the output would be empty for input ", x.sizes());
  TORCH_CHECK(algo == kConvFwdAuto || algo == kConvFwdPerTap || algo == kConvFwdHalo, op,
              ": algo must be 0 (auto), 1 (per-tap) or 2 (halo-staged 3x3), got ", algo);
  TORCH_CHECK(algo != kConvFwdHalo || conv_fwd_halo_applies(static_cast<int>(ksize), static_cast<int>(stride)), op,
              ": algo=2 (the halo-staged kernel) runs 3x3 convs with stride 1 or 2 only, got ksize ", ksize,
              " and stride ", stride);

  check_pair(op, "scale", scale, "shift", shift);
  check_pair(op, "proj_scale", proj_scale, "proj_shift", proj_shift);
  check_pair(op, "post_scale", post_scale, "post_shift", post_shift);
  OptTensor sc, s_scale, s_shift, p_scale, p_shift, pw, post_s, post_b;
  if (scale) {
    s_scale = channel_vector(op, "scale", *scale, C_in, x_in);
    s_shift = channel_vector(op, "shift", *shift, C_in, x_in);
  }
  if (post_scale) {
    post_s = channel_vector(op, "post_scale", *post_scale, C_out, x_in);
    post_b = channel_vector(op, "post_shift", *post_shift, C_out, x_in);
  }
  TORCH_CHECK(shortcut_kind >= 0 && shortcut_kind <= 2, op,
              ": shortcut_kind must be 0 (none), 1 (add) or 2 (projection), got ", shortcut_kind);
  TORCH_CHECK(shortcut_kind != 0 || !shortcut.has_value(), op,
              ": a shortcut tensor was given with shortcut_kind=0 (none); pass 1 (add) or 2 (projection)");
  TORCH_CHECK(shortcut_kind == 2 || !(proj_w || proj_scale || norms.proj_mean), op,
              ": proj_w / proj_scale / proj_shift / proj_mean are only used with shortcut_kind=2 (projection)");
  if (norms.postact_close) {
    TORCH_CHECK(shortcut_kind != 0, op, ": postact_close (the post-activation closing epilogue) needs a shortcut "
                "(shortcut_kind 1, add, or 2, projection)");
    TORCH_CHECK(post_scale.has_value() || norms.post_mean.has_value(), op,
                ": postact_close needs the last norm: post_scale/post_shift, or post_mean/post_var");
    TORCH_CHECK(shortcut_kind != 2 || proj_scale.has_value() || norms.proj_mean.has_value(), op,
                ": postact_close with a projection needs the projection's norm: proj_scale/proj_shift, or "
                "proj_mean/proj_var");
    TORCH_CHECK(!emit_stats, op, ": postact_close stores the block output: emit_stats must be False");
  }
  OptTensor pro_m, pro_v, proj_m, proj_v, post_m, post_v;
  eval_norm(op, "pro", norms.pro_mean, norms.pro_var, C_in, x_in, pro_m, pro_v);
  eval_norm(op, "post", norms.post_mean, norms.post_var, C_out, x_in, post_m, post_v);
  int64_t H_sc = 1, W_sc = 1, C_sc = 0;
  if (shortcut_kind != 0) {
    TORCH_CHECK(shortcut.has_value(), op, ": shortcut_kind=", shortcut_kind, " needs a shortcut tensor");
    TORCH_CHECK(shortcut_stride >= 1, op, ": shortcut_stride must be >= 1, got ", shortcut_stride);
    sc = activation(op, "shortcut", *shortcut, x_in);
    H_sc = sc->size(2);
    W_sc = sc->size(3);
    C_sc = sc->size(1);
    TORCH_CHECK(sc->size(0) == N && ceil_div64(H_sc, shortcut_stride) == H_out &&
                    ceil_div64(W_sc, shortcut_stride) == W_out,
                op, ": shortcut of shape ", sc->sizes(), " subsampled by shortcut_stride=", shortcut_stride,
                " must match the output's batch and spatial size (", N, ", ", H_out, ", ", W_out, ")");
    if (shortcut_kind == 1) {
      TORCH_CHECK(C_sc == C_out, op, ": an added shortcut needs ", C_out, " channels (the output's), got ",
                  C_sc);
    } else {
      TORCH_CHECK(proj_w.has_value(), op, ": shortcut_kind=2 (projection) needs proj_w");
      pw = weight(op, "proj_w", *proj_w, x_in, true);
      TORCH_CHECK(pw->size(0) == C_out && pw->size(1) == C_sc && (pw->dim() == 2 || (pw->size(2) == 1 && pw->size(3) == 1)),
                  op, ": proj_w must be (", C_out, ", ", C_sc, ", 1, 1) for ", C_out,
                  " output channels and a shortcut of ", C_sc, " channels, got ", pw->sizes());
      // The projection's norm: of its input (C_sc, a pre-activation prologue) or, closing a
      // post-activation block, of its output (C_out).
      const int64_t proj_channels = norms.postact_close ? C_out : C_sc;
      if (proj_scale) {
        p_scale = channel_vector(op, "proj_scale", *proj_scale, proj_channels, x_in);
        p_shift = channel_vector(op, "proj_shift", *proj_shift, proj_channels, x_in);
      }
      eval_norm(op, "proj", norms.proj_mean, norms.proj_var, proj_channels, x_in, proj_m, proj_v);
    }
  }

  at::Tensor out = empty_nhwc(N, C_out, H_out, W_out, x);
  const auto acc_options = x.options().dtype(acc_dtype_of(x.scalar_type()));
  // One partial per forward M tile (conv_fwd_tiles_m: spatial 8x8 tiles for a 3x3), whichever
  // kernel runs; the fake in resnet_fused/_extension.py computes the same P.
  at::Tensor partials =
      emit_stats ? at::empty({3, conv_fwd_tiles_m(N, H_out, W_out, static_cast<int>(ksize)), C_out}, acc_options)
                 : at::empty({0}, acc_options);

  ConvFwdParams p{};
  p.x = x.const_data_ptr();
  p.scale = ptr_or_null(s_scale);
  p.shift = ptr_or_null(s_shift);
  p.w = w.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.N = N;
  p.H_in = H_in;
  p.W_in = W_in;
  p.C_in = C_in;
  p.H_out = H_out;
  p.W_out = W_out;
  p.C_out = C_out;
  p.ksize = static_cast<int>(ksize);
  p.stride = static_cast<int>(stride);
  p.groups = static_cast<int>(groups);
  p.shortcut_kind = static_cast<int>(shortcut_kind);
  p.shortcut_stride = static_cast<int>(shortcut_stride);
  p.shortcut = ptr_or_null(sc);
  p.H_sc = H_sc;
  p.W_sc = W_sc;
  p.C_sc = C_sc;
  p.proj_w = ptr_or_null(pw);
  p.proj_scale = ptr_or_null(p_scale);
  p.proj_shift = ptr_or_null(p_shift);
  p.partials = emit_stats ? partials.mutable_data_ptr() : nullptr;
  p.post_scale = ptr_or_null(post_s);
  p.post_shift = ptr_or_null(post_b);
  p.pro_mean = ptr_or_null(pro_m);
  p.pro_var = ptr_or_null(pro_v);
  p.pro_eps = norms.pro_eps;
  p.proj_mean = ptr_or_null(proj_m);
  p.proj_var = ptr_or_null(proj_v);
  p.proj_eps = norms.proj_eps;
  p.post_mean = ptr_or_null(post_m);
  p.post_var = ptr_or_null(post_v);
  p.post_eps = norms.post_eps;
  p.algo = static_cast<int>(algo);
  p.postact_close = norms.postact_close ? 1 : 0;

  run_on(op, on_cuda, x, [&](cudaStream_t st) { return conv_fwd_cuda(p, dtype, st); }, [&] {
    if (test_fault != kWmmaFaultNone) {
      conv_fwd_host_wmma_test_fault(p, dtype, static_cast<int>(test_fault));
    } else {
      conv_fwd_host(p, dtype);
    }
  });
  return {out, partials};
}

// Fields ConvDgradParams and ConvWgradParams share (same names in both).
// The gradient operand and its optional prologue dy = pro_a*grad + pro_b*pro_y + pro_c.
template <class Params>
void set_grad_operand(Params& p, const at::Tensor& grad, const GradPrologueTensors& pro) {
  p.g = grad.const_data_ptr();
  p.pro_y = ptr_or_null(pro.y);
  p.pro_a = ptr_or_null(pro.a);
  p.pro_b = ptr_or_null(pro.b);
  p.pro_c = ptr_or_null(pro.c);
}

// The conv geometry; N, C_in, H, W are the sizes of the conv input v (N, C_in, H, W).
template <class Params>
void set_backward_geometry(Params& p, const at::Tensor& v, int64_t H_out, int64_t W_out, int64_t C_out, int64_t ksize,
                           int64_t stride, int64_t groups) {
  p.N = v.size(0);
  p.H = v.size(2);
  p.W = v.size(3);
  p.C_in = v.size(1);
  p.H_out = H_out;
  p.W_out = W_out;
  p.C_out = C_out;
  p.ksize = static_cast<int>(ksize);
  p.stride = static_cast<int>(stride);
  p.groups = static_cast<int>(groups);
}

std::tuple<at::Tensor, at::Tensor> conv_dgrad_impl(bool on_cuda, const at::Tensor& grad_in, const at::Tensor& w_in,
                                                   const at::Tensor& v_in, const at::Tensor& scale,
                                                   const at::Tensor& shift, const at::Tensor& mean,
                                                   const at::Tensor& invstd, int64_t stride, int64_t groups,
                                                   const OptTensor& pro_y, const OptTensor& pro_a,
                                                   const OptTensor& pro_b, const OptTensor& pro_c,
                                                   const OptTensor& second_grad, const OptTensor& second_w,
                                                   int64_t second_stride) {
  const char* op = "resnet_fused.conv_dgrad";
  const ConvDtype dtype = to_conv_dtype(op, "grad", grad_in.scalar_type());
  const at::Tensor grad = activation(op, "grad", grad_in, grad_in);
  const at::Tensor v = activation(op, "v", v_in, grad_in);
  const at::Tensor w = weight(op, "w", w_in, grad_in, false);
  const int64_t N = v.size(0), C_in = v.size(1), H = v.size(2), W = v.size(3);
  const int64_t C_out = w.size(0), ksize = w.size(2);
  check_conv_weight(op, w, stride, groups, C_in, "v");
  const int64_t H_out = conv_out_size(H, static_cast<int>(ksize), static_cast<int>(stride));
  const int64_t W_out = conv_out_size(W, static_cast<int>(ksize), static_cast<int>(stride));
  TORCH_CHECK(grad.size(0) == N && grad.size(1) == C_out && grad.size(2) == H_out && grad.size(3) == W_out, op,
              ": grad must be the conv output's gradient, shape (", N, ", ", C_out, ", ", H_out, ", ", W_out,
              ") for an input v of shape ", v.sizes(), ", ksize ", ksize, " and stride ", stride, "; got ",
              grad.sizes());
  const at::Tensor scale_a = channel_vector(op, "scale", scale, C_in, grad_in);
  const at::Tensor shift_a = channel_vector(op, "shift", shift, C_in, grad_in);
  const at::Tensor mean_a = channel_vector(op, "mean", mean, C_in, grad_in);
  const at::Tensor invstd_a = channel_vector(op, "invstd", invstd, C_in, grad_in);
  const GradPrologueTensors pro = grad_prologue(op, grad, pro_y, pro_a, pro_b, pro_c);

  TORCH_CHECK(second_grad.has_value() == second_w.has_value(), op,
              ": pass both second_grad and second_w (the projection's dgrad) or neither");
  OptTensor g2, w2;
  int64_t K2 = 0, H2 = 1, W2 = 1;
  if (second_grad) {
    TORCH_CHECK(second_stride >= 1, op, ": second_stride must be >= 1, got ", second_stride);
    g2 = activation(op, "second_grad", *second_grad, grad_in);
    K2 = g2->size(1);
    H2 = g2->size(2);
    W2 = g2->size(3);
    TORCH_CHECK(g2->size(0) == N && H2 == ceil_div64(H, second_stride) && W2 == ceil_div64(W, second_stride), op,
                ": second_grad of shape ", g2->sizes(), " must be the gradient of a 1x1 conv with stride ",
                second_stride, " over v of shape ", v.sizes());
    w2 = weight(op, "second_w", *second_w, grad_in, true);
    TORCH_CHECK(w2->size(0) == K2 && w2->size(1) == C_in && (w2->dim() == 2 || (w2->size(2) == 1 && w2->size(3) == 1)),
                op, ": second_w must be (", K2, ", ", C_in, ", 1, 1), got ", w2->sizes());
  }

  const int64_t M = N * H * W;
  at::Tensor out = empty_nhwc(N, C_in, H, W, grad);
  at::Tensor sums = at::empty({2, conv_tiles_m(M), C_in}, grad.options().dtype(acc_dtype_of(grad.scalar_type())));

  ConvDgradParams p{};
  set_grad_operand(p, grad, pro);
  p.w = w.const_data_ptr();
  p.second_grad = ptr_or_null(g2);
  p.second_w = ptr_or_null(w2);
  p.K2 = K2;
  p.H2 = H2;
  p.W2 = W2;
  p.second_stride = static_cast<int>(second_stride);
  p.v = v.const_data_ptr();
  p.scale = scale_a.const_data_ptr();
  p.shift = shift_a.const_data_ptr();
  p.mean = mean_a.const_data_ptr();
  p.invstd = invstd_a.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.sums = sums.mutable_data_ptr();
  set_backward_geometry(p, v, H_out, W_out, C_out, ksize, stride, groups);

  run_on(op, on_cuda, grad, [&](cudaStream_t st) { return conv_dgrad_cuda(p, dtype, st); },
         [&] { conv_dgrad_host(p, dtype); });
  return {out, sums};
}

at::Tensor conv_wgrad_impl(bool on_cuda, const at::Tensor& grad_in, const at::Tensor& v_in, const OptTensor& scale,
                           const OptTensor& shift, int64_t ksize, int64_t stride, int64_t groups,
                           const OptTensor& pro_y, const OptTensor& pro_a, const OptTensor& pro_b,
                           const OptTensor& pro_c, int64_t splits, bool channels_last) {
  const char* op = "resnet_fused.conv_wgrad";
  const ConvDtype dtype = to_conv_dtype(op, "grad", grad_in.scalar_type());
  const at::Tensor grad = activation(op, "grad", grad_in, grad_in);
  const at::Tensor v = activation(op, "v", v_in, grad_in);
  const int64_t N = v.size(0), C_in = v.size(1), H = v.size(2), W = v.size(3);
  const int64_t C_out = grad.size(1);
  check_conv_geometry(op, stride, groups, ksize, C_in, C_out);
  const int64_t H_out = conv_out_size(H, static_cast<int>(ksize), static_cast<int>(stride));
  const int64_t W_out = conv_out_size(W, static_cast<int>(ksize), static_cast<int>(stride));
  TORCH_CHECK(grad.size(0) == N && grad.size(2) == H_out && grad.size(3) == W_out, op,
              ": grad of shape ", grad.sizes(), " is not the output gradient of a ", ksize, "x", ksize,
              " conv with stride ", stride, " over v of shape ", v.sizes(), " (expected N=", N, ", H_out=", H_out,
              ", W_out=", W_out, ")");
  TORCH_CHECK(splits >= 0, op, ": splits must be >= 0 (0 picks a value), got ", splits);
  // scale/shift None: the input is read as it is (a conv over the raw input, no BN+ReLU).
  check_pair(op, "scale", scale, "shift", shift);
  OptTensor scale_a, shift_a;
  if (scale) {
    scale_a = channel_vector(op, "scale", *scale, C_in, grad_in);
    shift_a = channel_vector(op, "shift", *shift, C_in, grad_in);
  }
  const GradPrologueTensors pro = grad_prologue(op, grad, pro_y, pro_a, pro_b, pro_c);

  const int64_t M = N * H_out * W_out;
  const ConvWgradPlan plan = conv_wgrad_plan(M, splits);
  const int64_t cin_pg = C_in / groups;
  at::Tensor dw = at::empty({C_out, cin_pg, ksize, ksize},
                            grad.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                       : at::MemoryFormat::Contiguous));
  at::Tensor workspace = at::empty({plan.splits, C_out, cin_pg, ksize * ksize},
                                   grad.options().dtype(acc_dtype_of(grad.scalar_type())));

  ConvWgradParams p{};
  set_grad_operand(p, grad, pro);
  p.v = v.const_data_ptr();
  p.scale = ptr_or_null(scale_a);
  p.shift = ptr_or_null(shift_a);
  p.workspace = workspace.mutable_data_ptr();
  p.dw = dw.mutable_data_ptr();
  set_backward_geometry(p, v, H_out, W_out, C_out, ksize, stride, groups);
  p.rows_per_split = plan.rows_per_split;
  p.splits = plan.splits;
  p.dw_channels_last = channels_last ? 1 : 0;

  run_on(op, on_cuda, grad, [&](cudaStream_t st) { return conv_wgrad_cuda(p, dtype, st); },
         [&] { conv_wgrad_host(p, dtype); });
  return dw;
}

// The dispatcher wants one function per (op, key): thin wrappers selecting the path.
template <bool kCuda>
std::tuple<at::Tensor, at::Tensor> conv_fwd_entry(const at::Tensor& x, const at::Tensor& w, const OptTensor& scale,
                                                  const OptTensor& shift, int64_t stride, int64_t groups,
                                                  const OptTensor& shortcut, int64_t shortcut_kind,
                                                  int64_t shortcut_stride, const OptTensor& proj_w,
                                                  const OptTensor& proj_scale, const OptTensor& proj_shift,
                                                  bool emit_stats, const OptTensor& post_scale,
                                                  const OptTensor& post_shift, int64_t algo,
                                                  const OptTensor& pro_mean, const OptTensor& pro_var,
                                                  double pro_eps, const OptTensor& proj_mean,
                                                  const OptTensor& proj_var, double proj_eps,
                                                  const OptTensor& post_mean, const OptTensor& post_var,
                                                  double post_eps, bool postact_close) {
  FwdEvalNorms norms;
  norms.pro_mean = pro_mean;
  norms.pro_var = pro_var;
  norms.pro_eps = pro_eps;
  norms.proj_mean = proj_mean;
  norms.proj_var = proj_var;
  norms.proj_eps = proj_eps;
  norms.post_mean = post_mean;
  norms.post_var = post_var;
  norms.post_eps = post_eps;
  norms.postact_close = postact_close;
  return conv_fwd_impl(kCuda, x, w, scale, shift, stride, groups, shortcut, shortcut_kind, shortcut_stride, proj_w,
                       proj_scale, proj_shift, emit_stats, post_scale, post_shift, algo, norms);
}

// TEST ONLY, CPU only: conv_fwd through a copy of the forward's WMMA multiply phase with a
// deliberate fault (wmma_host.h), for the tests that prove the 16-bit parity checks catch it.
std::tuple<at::Tensor, at::Tensor> test_fault_wmma_conv_fwd_entry(
    const at::Tensor& x, const at::Tensor& w, const OptTensor& scale, const OptTensor& shift, int64_t stride,
    int64_t groups, const OptTensor& shortcut, int64_t shortcut_kind, int64_t shortcut_stride, const OptTensor& proj_w,
    const OptTensor& proj_scale, const OptTensor& proj_shift, bool emit_stats, const OptTensor& post_scale,
    const OptTensor& post_shift, int64_t algo, int64_t fault) {
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "resnet_fused._test_fault_wmma_conv_fwd: the WMMA phases run for float16 and bfloat16 only, got ",
              x.scalar_type());
  TORCH_CHECK(fault >= 1 && fault <= kWmmaFaultLast, "resnet_fused._test_fault_wmma_conv_fwd: fault must be 1..",
              kWmmaFaultLast, ", got ", fault);
  return conv_fwd_impl(false, x, w, scale, shift, stride, groups, shortcut, shortcut_kind, shortcut_stride, proj_w,
                       proj_scale, proj_shift, emit_stats, post_scale, post_shift, algo, FwdEvalNorms{}, fault);
}

// (mma_sync, load_matrix_sync, store_matrix_sync, fill_fragment) performed by the host WMMA shim.
std::vector<int64_t> wmma_host_counts_op() {
  const WmmaHostCounts c = wmma_host_counts();
  return {c.mma_sync, c.load_matrix_sync, c.store_matrix_sync, c.fill_fragment};
}

template <bool kCuda>
std::tuple<at::Tensor, at::Tensor> conv_dgrad_entry(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& v,
                                                    const at::Tensor& scale, const at::Tensor& shift,
                                                    const at::Tensor& mean, const at::Tensor& invstd, int64_t stride,
                                                    int64_t groups, const OptTensor& pro_y, const OptTensor& pro_a,
                                                    const OptTensor& pro_b, const OptTensor& pro_c,
                                                    const OptTensor& second_grad, const OptTensor& second_w,
                                                    int64_t second_stride) {
  return conv_dgrad_impl(kCuda, grad, w, v, scale, shift, mean, invstd, stride, groups, pro_y, pro_a, pro_b, pro_c,
                         second_grad, second_w, second_stride);
}

template <bool kCuda>
at::Tensor conv_wgrad_entry(const at::Tensor& grad, const at::Tensor& v, const OptTensor& scale,
                            const OptTensor& shift, int64_t ksize, int64_t stride, int64_t groups,
                            const OptTensor& pro_y, const OptTensor& pro_a, const OptTensor& pro_b,
                            const OptTensor& pro_c, int64_t splits, bool channels_last) {
  return conv_wgrad_impl(kCuda, grad, v, scale, shift, ksize, stride, groups, pro_y, pro_a, pro_b, pro_c, splits,
                         channels_last);
}


// ---- elementwise BN/ReLU passes (csrc/cuda/bn_elementwise.h) ---------------------------------

template <bool kCuda>
at::Tensor bn_relu_apply_entry(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift) {
  const char* op = "resnet_fused.bn_relu_apply";
  const ConvDtype dtype = to_conv_dtype(op, "x", x_in.scalar_type());
  const at::Tensor x = activation(op, "x", x_in, x_in);
  const int64_t C = x.size(1);
  const at::Tensor s = channel_vector(op, "scale", scale, C, x_in);
  const at::Tensor b = channel_vector(op, "shift", shift, C, x_in);
  at::Tensor out = empty_nhwc(x.size(0), C, x.size(2), x.size(3), x);
  BnReluApplyParams p{x.const_data_ptr(), s.const_data_ptr(), b.const_data_ptr(), out.mutable_data_ptr(),
                      x.size(0) * x.size(2) * x.size(3), C};
  run_on(op, kCuda, x, [&](cudaStream_t st) { return bn_relu_apply_cuda(p, dtype, st); },
         [&] { bn_relu_apply_host(p, dtype); });
  return out;
}

template <bool kCuda>
std::tuple<at::Tensor, at::Tensor> relu_grad_sums_entry(const at::Tensor& grad_in, const OptTensor& extra,
                                                        const at::Tensor& v_in, const at::Tensor& scale,
                                                        const at::Tensor& shift, const at::Tensor& mean,
                                                        const at::Tensor& invstd) {
  const char* op = "resnet_fused.relu_grad_sums";
  const ConvDtype dtype = to_conv_dtype(op, "grad", grad_in.scalar_type());
  const at::Tensor grad = activation(op, "grad", grad_in, grad_in);
  const at::Tensor v = activation(op, "v", v_in, grad_in);
  TORCH_CHECK(grad.sizes() == v.sizes(), op, ": grad and v must have one shape, got ", grad.sizes(), " and ",
              v.sizes());
  OptTensor e;
  if (extra) {
    e = activation(op, "extra", *extra, grad_in);
    TORCH_CHECK(e->sizes() == v.sizes(), op, ": extra must have v's shape ", v.sizes(), ", got ", e->sizes());
  }
  const int64_t C = v.size(1), M = v.size(0) * v.size(2) * v.size(3);
  const at::Tensor s = channel_vector(op, "scale", scale, C, grad_in);
  const at::Tensor b = channel_vector(op, "shift", shift, C, grad_in);
  const at::Tensor mu = channel_vector(op, "mean", mean, C, grad_in);
  const at::Tensor is = channel_vector(op, "invstd", invstd, C, grad_in);
  at::Tensor out = empty_nhwc(v.size(0), C, v.size(2), v.size(3), grad);
  at::Tensor sums = at::empty({2, conv_tiles_m(M), C}, grad.options().dtype(acc_dtype_of(grad.scalar_type())));
  ReluGradSumsParams p{grad.const_data_ptr(), ptr_or_null(e), v.const_data_ptr(), s.const_data_ptr(),
                       b.const_data_ptr(), mu.const_data_ptr(), is.const_data_ptr(), out.mutable_data_ptr(),
                       sums.mutable_data_ptr(), M, C};
  run_on(op, kCuda, grad, [&](cudaStream_t st) { return relu_grad_sums_cuda(p, dtype, st); },
         [&] { relu_grad_sums_host(p, dtype); });
  return {out, sums};
}

template <bool kCuda>
at::Tensor bn_backward_apply_entry(const at::Tensor& g_in, const at::Tensor& v_in, const at::Tensor& a,
                                   const at::Tensor& b, const at::Tensor& c, const OptTensor& shortcut_grad,
                                   int64_t shortcut_stride) {
  const char* op = "resnet_fused.bn_backward_apply";
  const ConvDtype dtype = to_conv_dtype(op, "v", v_in.scalar_type());
  const at::Tensor v = activation(op, "v", v_in, v_in);
  const at::Tensor g = activation(op, "g", g_in, v_in);
  TORCH_CHECK(g.sizes() == v.sizes(), op, ": g and v must have one shape, got ", g.sizes(), " and ", v.sizes());
  const int64_t N = v.size(0), C = v.size(1), H = v.size(2), W = v.size(3);
  const at::Tensor a_ = channel_vector(op, "a", a, C, v_in);
  const at::Tensor b_ = channel_vector(op, "b", b, C, v_in);
  const at::Tensor c_ = channel_vector(op, "c", c, C, v_in);
  OptTensor sc;
  int64_t H_sc = 1, W_sc = 1;
  if (shortcut_grad) {
    TORCH_CHECK(shortcut_stride >= 1, op, ": shortcut_stride must be >= 1, got ", shortcut_stride);
    sc = activation(op, "shortcut_grad", *shortcut_grad, v_in);
    H_sc = sc->size(2);
    W_sc = sc->size(3);
    TORCH_CHECK(sc->size(0) == N && sc->size(1) == C && H_sc == ceil_div64(H, shortcut_stride) &&
                    W_sc == ceil_div64(W, shortcut_stride),
                op, ": shortcut_grad of shape ", sc->sizes(), " must be (", N, ", ", C, ", ",
                ceil_div64(H, shortcut_stride), ", ", ceil_div64(W, shortcut_stride), "): v subsampled by ",
                "shortcut_stride=", shortcut_stride);
  }
  at::Tensor out = empty_nhwc(N, C, H, W, v);
  BnBackwardApplyParams p{g.const_data_ptr(), v.const_data_ptr(), a_.const_data_ptr(), b_.const_data_ptr(),
                          c_.const_data_ptr(), ptr_or_null(sc), out.mutable_data_ptr(), N, H, W, C, H_sc, W_sc,
                          static_cast<int>(shortcut_stride)};
  run_on(op, kCuda, v, [&](cudaStream_t st) { return bn_backward_apply_cuda(p, dtype, st); },
         [&] { bn_backward_apply_host(p, dtype); });
  return out;
}

template <bool kCuda>
at::Tensor stats_partials_entry(const at::Tensor& x_in) {
  const char* op = "resnet_fused.stats_partials";
  const ConvDtype dtype = to_conv_dtype(op, "x", x_in.scalar_type());
  const at::Tensor x = activation(op, "x", x_in, x_in);
  const int64_t C = x.size(1), M = x.size(0) * x.size(2) * x.size(3);
  at::Tensor partials = at::empty({3, conv_tiles_m(M), C}, x.options().dtype(acc_dtype_of(x.scalar_type())));
  StatsPartialsParams p{x.const_data_ptr(), partials.mutable_data_ptr(), M, C};
  run_on(op, kCuda, x, [&](cudaStream_t st) { return stats_partials_cuda(p, dtype, st); },
         [&] { stats_partials_host(p, dtype); });
  return partials;
}



// ---- the post-activation closing pass (csrc/cuda/bn_elementwise.h) ---------------------------

// y and the shortcut sc: 4-D, one shape, one dtype; returned channels_last.
std::pair<at::Tensor, at::Tensor> postact_operands(const char* op, const at::Tensor& y_in, const at::Tensor& sc_in,
                                                   const at::Tensor& ref) {
  at::Tensor y = activation(op, "y", y_in, ref);
  at::Tensor sc = activation(op, "sc", sc_in, ref);
  TORCH_CHECK(y.sizes() == sc.sizes(), op, ": the conv output y ", y.sizes(), " and the shortcut sc ", sc.sizes(),
              " must have one shape");
  return {y, sc};
}

template <bool kCuda>
at::Tensor postact_out_entry(const at::Tensor& y_in, const at::Tensor& scale, const at::Tensor& shift,
                             const at::Tensor& sc_in, const OptTensor& sc_scale, const OptTensor& sc_shift) {
  const char* op = "resnet_fused.postact_out";
  const ConvDtype dtype = to_conv_dtype(op, "y", y_in.scalar_type());
  auto [y, sc] = postact_operands(op, y_in, sc_in, y_in);
  check_pair(op, "sc_scale", sc_scale, "sc_shift", sc_shift);
  const int64_t C = y.size(1);
  const at::Tensor s = channel_vector(op, "scale", scale, C, y_in);
  const at::Tensor b = channel_vector(op, "shift", shift, C, y_in);
  OptTensor ss, sb;
  if (sc_scale) {
    ss = channel_vector(op, "sc_scale", *sc_scale, C, y_in);
    sb = channel_vector(op, "sc_shift", *sc_shift, C, y_in);
  }
  at::Tensor out = empty_nhwc(y.size(0), C, y.size(2), y.size(3), y);
  PostactOutParams p{y.const_data_ptr(), sc.const_data_ptr(), s.const_data_ptr(), b.const_data_ptr(),
                     ptr_or_null(ss), ptr_or_null(sb), out.mutable_data_ptr(), y.size(0) * y.size(2) * y.size(3), C};
  run_on(op, kCuda, y, [&](cudaStream_t st) { return postact_out_cuda(p, dtype, st); },
         [&] { postact_out_host(p, dtype); });
  return out;
}

template <bool kCuda>
std::tuple<at::Tensor, at::Tensor, at::Tensor> postact_out_backward_entry(
    const at::Tensor& grad_in, const at::Tensor& y_in, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sc_in, const OptTensor& sc_scale,
    const OptTensor& sc_shift, const OptTensor& sc_mean, const OptTensor& sc_invstd) {
  const char* op = "resnet_fused.postact_out_backward";
  const ConvDtype dtype = to_conv_dtype(op, "grad", grad_in.scalar_type());
  const at::Tensor grad = activation(op, "grad", grad_in, grad_in);
  auto [y, sc] = postact_operands(op, y_in, sc_in, grad_in);
  TORCH_CHECK(grad.sizes() == y.sizes(), op, ": grad ", grad.sizes(), " must have y's shape ", y.sizes());
  const bool proj = sc_scale.has_value() || sc_shift.has_value() || sc_mean.has_value() || sc_invstd.has_value();
  TORCH_CHECK(!proj || (sc_scale && sc_shift && sc_mean && sc_invstd), op,
              ": a projection shortcut needs all of sc_scale, sc_shift, sc_mean and sc_invstd (or none of them)");
  const int64_t C = y.size(1), M = y.size(0) * y.size(2) * y.size(3);
  const at::Tensor s = channel_vector(op, "scale", scale, C, grad_in);
  const at::Tensor b = channel_vector(op, "shift", shift, C, grad_in);
  const at::Tensor mu = channel_vector(op, "mean", mean, C, grad_in);
  const at::Tensor is = channel_vector(op, "invstd", invstd, C, grad_in);
  OptTensor ss, sb, smu, sis;
  if (proj) {
    ss = channel_vector(op, "sc_scale", *sc_scale, C, grad_in);
    sb = channel_vector(op, "sc_shift", *sc_shift, C, grad_in);
    smu = channel_vector(op, "sc_mean", *sc_mean, C, grad_in);
    sis = channel_vector(op, "sc_invstd", *sc_invstd, C, grad_in);
  }
  at::Tensor out = empty_nhwc(y.size(0), C, y.size(2), y.size(3), grad);
  const auto acc_options = grad.options().dtype(acc_dtype_of(grad.scalar_type()));
  at::Tensor sums = at::empty({2, conv_tiles_m(M), C}, acc_options);
  at::Tensor sc_sums = proj ? at::empty({2, conv_tiles_m(M), C}, acc_options) : at::empty({0}, acc_options);
  PostactOutBackwardParams p{grad.const_data_ptr(), y.const_data_ptr(), sc.const_data_ptr(), s.const_data_ptr(),
                             b.const_data_ptr(), ptr_or_null(ss), ptr_or_null(sb), mu.const_data_ptr(),
                             is.const_data_ptr(), ptr_or_null(smu), ptr_or_null(sis), out.mutable_data_ptr(),
                             sums.mutable_data_ptr(), proj ? sc_sums.mutable_data_ptr() : nullptr, M, C};
  run_on(op, kCuda, grad, [&](cudaStream_t st) { return postact_out_backward_cuda(p, dtype, st); },
         [&] { postact_out_backward_host(p, dtype); });
  return {out, sums, sc_sums};
}

// ---- per-channel reductions of tile partials (csrc/cuda/bn_reduce.h) -------------------------

// Checks partials [planes, P, C] in float32/float64 (the accumulation types); returns them contiguous.
at::Tensor reduce_partials(const char* op, const char* name, const at::Tensor& part, int64_t planes) {
  TORCH_CHECK(part.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
              part.layout());
  TORCH_CHECK(part.dim() == 3 && part.size(0) == planes, op, ": ", name, " must be [", planes,
              ", P, C] (per-tile partials), got shape ", part.sizes());
  TORCH_CHECK(part.scalar_type() == at::kFloat || part.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64 (the statistics' accumulation type), got ", part.scalar_type());
  return part.contiguous();
}

// An optional or required per-channel vector of any floating dtype, on `device`, converted to
// the accumulation type `acc` (a copy only when the dtype differs).
at::Tensor acc_vector(const char* op, const char* name, const at::Tensor& t, int64_t channels, at::ScalarType acc,
                      const at::Device& device) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must be a 1-D tensor of ", channels,
              " values (one per channel), got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the statistics are on ", device,
              "; all must be on one device");
  return t.to(acc).contiguous();
}

// A running buffer, updated in place: 1-D, `channels` values, contiguous, one of the four dtypes.
void check_running(const char* op, const char* name, const at::Tensor& t, int64_t channels, const at::Device& device) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must be a 1-D tensor of ", channels,
              " values, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (it is updated in place)");
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the statistics are on ", device,
              "; all must be on one device");
  to_conv_dtype(op, name, t.scalar_type());
}

template <bool kCuda>
at::Tensor bn_finalize_entry(const OptTensor& part_in, const OptTensor& weight_in, const OptTensor& bias_in,
                             const OptTensor& running_mean, const OptTensor& running_var,
                             const OptTensor& num_batches_tracked, double eps, std::optional<double> momentum,
                             bool update, bool from_running, std::optional<at::ScalarType> dtype) {
  const char* op = "resnet_fused.bn_finalize";
  at::Tensor part;
  at::ScalarType acc;
  int64_t P = 0, C = 0;
  at::Device device = at::kCPU;
  if (from_running) {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(), op,
                ": from_running=True needs running_mean and running_var");
    TORCH_CHECK(!update, op, ": update=True moves the running statistics from a batch; it cannot be combined "
                "with from_running=True");
    C = running_mean->numel();
    device = running_mean->device();
    acc = dtype.has_value() ? *dtype : (running_mean->scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, op, ": dtype must be float32 or float64, got ", acc);
  } else {
    TORCH_CHECK(part_in.has_value(), op, ": part (the [3, P, C] statistics partials) is required unless "
                "from_running=True");
    part = reduce_partials(op, "part", *part_in, 3);
    acc = part.scalar_type();
    P = part.size(1);
    C = part.size(2);
    device = part.device();
  }
  const bool has_running = running_mean.has_value() || running_var.has_value();
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op,
              ": pass both running_mean and running_var or neither");
  TORCH_CHECK(!update || has_running, op, ": update=True needs running_mean and running_var");
  if (has_running) {
    check_running(op, "running_mean", *running_mean, C, device);
    check_running(op, "running_var", *running_var, C, device);
    TORCH_CHECK(running_mean->scalar_type() == running_var->scalar_type(), op,
                ": running_mean and running_var must have one dtype, got ", running_mean->scalar_type(), " and ",
                running_var->scalar_type());
  }
  const bool count_batch = update && num_batches_tracked.has_value();
  const bool cumulative = update && !momentum.has_value();
  TORCH_CHECK(!cumulative || num_batches_tracked.has_value(), op,
              ": momentum=None (the cumulative average) needs num_batches_tracked");
  if (num_batches_tracked.has_value()) {
    TORCH_CHECK(num_batches_tracked->scalar_type() == at::kLong && num_batches_tracked->numel() == 1, op,
                ": num_batches_tracked must be an int64 tensor of one element, got ",
                num_batches_tracked->scalar_type(), " of shape ", num_batches_tracked->sizes());
    TORCH_CHECK(num_batches_tracked->device() == device, op, ": num_batches_tracked is on ",
                num_batches_tracked->device(), " but the statistics are on ", device);
  }
  OptTensor weight, bias;
  if (weight_in) weight = acc_vector(op, "weight", *weight_in, C, acc, device);
  if (bias_in) bias = acc_vector(op, "bias", *bias_in, C, acc, device);

  const auto acc_options = at::TensorOptions().dtype(acc).device(device);
  at::Tensor out = at::empty({5, C}, acc_options);
  const ReducePlan plan = reduce_plan(P, C);
  at::Tensor workspace = at::empty({from_running ? 0 : 3 * plan.chunks * C}, acc_options.dtype(at::kDouble));
  OptTensor snapshot;
  if (update && num_batches_tracked.has_value()) snapshot = at::empty({1}, acc_options.dtype(at::kLong));
  BnFinalizeParams p{};
  p.part = from_running ? nullptr : part.const_data_ptr();
  p.weight = ptr_or_null(weight);
  p.bias = ptr_or_null(bias);
  p.out = out.mutable_data_ptr();
  p.running_mean = has_running ? running_mean->data_ptr() : nullptr;
  p.running_var = has_running ? running_var->data_ptr() : nullptr;
  p.num_batches_tracked = snapshot ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
  p.workspace = workspace.mutable_data_ptr();
  p.count_snapshot = snapshot ? snapshot->data_ptr<int64_t>() : nullptr;
  p.P = P;
  p.C = C;
  p.eps = eps;
  p.momentum = momentum.value_or(0.0);
  p.update = update;
  p.cumulative = cumulative;
  p.count_batch = count_batch;
  p.from_running = from_running;
  const ConvDtype acc_code = to_conv_dtype(op, "part", acc);
  // Without running buffers the running type is irrelevant: the accumulation type stands in.
  const ConvDtype run_code = has_running ? to_conv_dtype(op, "running_mean", running_mean->scalar_type()) : acc_code;
  run_on(op, kCuda, out, [&](cudaStream_t st) { return bn_finalize_cuda(p, acc_code, run_code, st); },
         [&] { bn_finalize_host(p, acc_code, run_code); });
  return out;
}

template <bool kCuda>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_coefficients_entry(
    const at::Tensor& part_in, const OptTensor& weight_in, const at::Tensor& mean_in, const at::Tensor& invstd_in,
    double count, bool training) {
  const char* op = "resnet_fused.bn_backward_coefficients";
  const at::Tensor part = reduce_partials(op, "part", part_in, 2);
  const at::ScalarType acc = part.scalar_type();
  const int64_t P = part.size(1), C = part.size(2);
  const at::Device device = part.device();
  TORCH_CHECK(count >= 0, op, ": count (values per channel) must be >= 0, got ", count);
  OptTensor weight;
  if (weight_in) weight = acc_vector(op, "weight", *weight_in, C, acc, device);
  const at::Tensor mean = acc_vector(op, "mean", mean_in, C, acc, device);
  const at::Tensor invstd = acc_vector(op, "invstd", invstd_in, C, acc, device);
  const auto acc_options = part.options();
  // Separate tensors: dgamma and dbeta are returned as gradients and must not alias.
  at::Tensor dgamma = at::empty({C}, acc_options), dbeta = at::empty({C}, acc_options);
  at::Tensor a = at::empty({C}, acc_options), b = at::empty({C}, acc_options), c = at::empty({C}, acc_options);
  const ReducePlan plan = reduce_plan(P, C);
  at::Tensor workspace = at::empty({2 * plan.chunks * C}, acc_options.dtype(at::kDouble));
  BnBackwardCoefParams p{part.const_data_ptr(), ptr_or_null(weight), mean.const_data_ptr(), invstd.const_data_ptr(),
                         dgamma.mutable_data_ptr(), dbeta.mutable_data_ptr(), a.mutable_data_ptr(),
                         b.mutable_data_ptr(), c.mutable_data_ptr(), workspace.mutable_data_ptr(), P, C, count,
                         training};
  const ConvDtype acc_code = to_conv_dtype(op, "part", acc);
  run_on(op, kCuda, part, [&](cudaStream_t st) { return bn_backward_coef_cuda(p, acc_code, st); },
         [&] { bn_backward_coef_host(p, acc_code); });
  return {dgamma, dbeta, a, b, c};
}

// The chunk kernel's grid of both reductions for P partials of C channels:
// [channel tiles (grid.x), chunks (grid.y), partials per chunk].
std::vector<int64_t> bn_reduce_grid_op(int64_t P, int64_t C) {
  TORCH_CHECK(P >= 0 && C >= 0, "resnet_fused.bn_reduce_grid: P and C must be >= 0, got ", P, " and ", C);
  const ReducePlan plan = reduce_plan(P, C);
  return {plan.channel_tiles, plan.chunks, plan.chunk_size};
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
  // Fused convolution GEMMs (csrc/cuda/conv_fused.h). Activations NCHW-logical, any memory
  // format in, channels_last out; weights (C_out, C_in/groups, k, k); vectors fp32/fp64.
  m.def(
      "conv_fwd_cuda(Tensor x, Tensor w, Tensor? scale, Tensor? shift, int stride, int groups, "
      "Tensor? shortcut, int shortcut_kind, int shortcut_stride, Tensor? proj_w, Tensor? proj_scale, "
      "Tensor? proj_shift, bool emit_stats, Tensor? post_scale, Tensor? post_shift, int algo=0, "
      "Tensor? pro_mean=None, Tensor? pro_var=None, float pro_eps=0., Tensor? proj_mean=None, "
      "Tensor? proj_var=None, float proj_eps=0., Tensor? post_mean=None, Tensor? post_var=None, "
      "float post_eps=0., bool postact_close=False) -> (Tensor out, Tensor partials)");
  m.def(
      "conv_dgrad_cuda(Tensor grad, Tensor w, Tensor v, Tensor scale, Tensor shift, Tensor mean, "
      "Tensor invstd, int stride, int groups, Tensor? pro_y, Tensor? pro_a, Tensor? pro_b, Tensor? pro_c, "
      "Tensor? second_grad, Tensor? second_w, int second_stride) -> (Tensor g_masked, Tensor sums)");
  m.def(
      "conv_wgrad_cuda(Tensor grad, Tensor v, Tensor? scale, Tensor? shift, int ksize, int stride, int groups, "
      "Tensor? pro_y, Tensor? pro_a, Tensor? pro_b, Tensor? pro_c, int splits=0, bool channels_last=False) "
      "-> Tensor");
  // Elementwise BN/ReLU passes (csrc/cuda/bn_elementwise.h), same tile and partial layouts.
  m.def("bn_relu_apply_cuda(Tensor x, Tensor scale, Tensor shift) -> Tensor");
  m.def(
      "relu_grad_sums_cuda(Tensor grad, Tensor? extra, Tensor v, Tensor scale, Tensor shift, Tensor mean, "
      "Tensor invstd) -> (Tensor g_masked, Tensor sums)");
  m.def(
      "bn_backward_apply_cuda(Tensor g, Tensor v, Tensor a, Tensor b, Tensor c, Tensor? shortcut_grad, "
      "int shortcut_stride) -> Tensor");
  m.def("stats_partials_cuda(Tensor x) -> Tensor");
  // Per-channel reductions of tile partials (csrc/cuda/bn_reduce.h). momentum=None: the
  // cumulative average. The running buffers are updated in place when update=True.
  m.def(
      "bn_finalize_cuda(Tensor? part, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float eps, float? momentum, bool update, "
      "bool from_running, ScalarType? dtype=None) -> Tensor");
  m.def(
      "bn_backward_coefficients_cuda(Tensor part, Tensor? weight, Tensor mean, Tensor invstd, float count, "
      "bool training) -> (Tensor dgamma, Tensor dbeta, Tensor a, Tensor b, Tensor c)");
  // The post-activation closing pass relu(bn(y) + shortcut) and its backward (bn_elementwise.h);
  // sc_sums is empty (shape [0]) without a projection.
  m.def(
      "postact_out_cuda(Tensor y, Tensor scale, Tensor shift, Tensor sc, Tensor? sc_scale, Tensor? sc_shift) "
      "-> Tensor");
  m.def(
      "postact_out_backward_cuda(Tensor grad, Tensor y, Tensor scale, Tensor shift, Tensor mean, Tensor invstd, "
      "Tensor sc, Tensor? sc_scale, Tensor? sc_shift, Tensor? sc_mean, Tensor? sc_invstd) "
      "-> (Tensor g_masked, Tensor sums, Tensor sc_sums)");
  // The reductions' chunk-kernel grid [channel tiles, chunks, partials per chunk] (no tensors).
  m.def("bn_reduce_grid_cuda(int P, int C) -> int[]", &resnet_fused::bn_reduce_grid_op);
  // The host emulator's WMMA shim (csrc/cuda/wmma_host.cuh): warp-level operations performed so
  // far, [mma_sync, load_matrix_sync, store_matrix_sync, fill_fragment]. No tensor arguments,
  // one kernel for every backend.
  m.def("wmma_host_counts_cuda() -> int[]", &resnet_fused::wmma_host_counts_op);
  // TEST ONLY (CPU kernel only): conv_fwd_cuda through a faulty COPY of the WMMA multiply phase.
  m.def(
      "_test_fault_wmma_conv_fwd_cuda(Tensor x, Tensor w, Tensor? scale, Tensor? shift, int stride, int groups, "
      "Tensor? shortcut, int shortcut_kind, int shortcut_stride, Tensor? proj_w, Tensor? proj_scale, "
      "Tensor? proj_shift, bool emit_stats, Tensor? post_scale, Tensor? post_shift, int algo, int fault) "
      "-> (Tensor out, Tensor partials)");
}

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("bn_stats_cuda", &resnet_fused::bn_stats_cuda_impl);
  m.impl("conv_fwd_cuda", &resnet_fused::conv_fwd_entry<true>);
  m.impl("conv_dgrad_cuda", &resnet_fused::conv_dgrad_entry<true>);
  m.impl("conv_wgrad_cuda", &resnet_fused::conv_wgrad_entry<true>);
  m.impl("bn_relu_apply_cuda", &resnet_fused::bn_relu_apply_entry<true>);
  m.impl("relu_grad_sums_cuda", &resnet_fused::relu_grad_sums_entry<true>);
  m.impl("bn_backward_apply_cuda", &resnet_fused::bn_backward_apply_entry<true>);
  m.impl("stats_partials_cuda", &resnet_fused::stats_partials_entry<true>);
  m.impl("bn_finalize_cuda", &resnet_fused::bn_finalize_entry<true>);
  m.impl("postact_out_cuda", &resnet_fused::postact_out_entry<true>);
  m.impl("postact_out_backward_cuda", &resnet_fused::postact_out_backward_entry<true>);
  m.impl("bn_backward_coefficients_cuda", &resnet_fused::bn_backward_coefficients_entry<true>);
}

// The host version of the same algorithm: lets CPU-only CI check the
// chunking and merge math the GPU runs.
TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_stats_cuda", &resnet_fused::bn_stats_cpu_impl);
  m.impl("conv_fwd_cuda", &resnet_fused::conv_fwd_entry<false>);
  m.impl("conv_dgrad_cuda", &resnet_fused::conv_dgrad_entry<false>);
  m.impl("conv_wgrad_cuda", &resnet_fused::conv_wgrad_entry<false>);
  m.impl("bn_relu_apply_cuda", &resnet_fused::bn_relu_apply_entry<false>);
  m.impl("relu_grad_sums_cuda", &resnet_fused::relu_grad_sums_entry<false>);
  m.impl("bn_backward_apply_cuda", &resnet_fused::bn_backward_apply_entry<false>);
  m.impl("stats_partials_cuda", &resnet_fused::stats_partials_entry<false>);
  m.impl("bn_finalize_cuda", &resnet_fused::bn_finalize_entry<false>);
  m.impl("postact_out_cuda", &resnet_fused::postact_out_entry<false>);
  m.impl("postact_out_backward_cuda", &resnet_fused::postact_out_backward_entry<false>);
  m.impl("bn_backward_coefficients_cuda", &resnet_fused::bn_backward_coefficients_entry<false>);
  m.impl("_test_fault_wmma_conv_fwd_cuda", &resnet_fused::test_fault_wmma_conv_fwd_entry);
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
