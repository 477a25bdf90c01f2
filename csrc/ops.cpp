// The densenet_fast operator library: schemas, argument checks and per-device dispatch.
//
// Schemas live in TORCH_LIBRARY(densenet_fast); every op's implementation first runs the checks
// below (each names the argument and what was expected), then calls the device kernel:
// *_cpu in primitives_cpu.cpp / fused_cpu.cpp, *_cuda in primitives_cuda.cu. Fake (meta)
// implementations for torch.compile are registered from Python (densenet_fast/ops/extension_ops.py).
//
// Two families of ops:
//  * primitives (CPU and CUDA): channel statistics, relu(x * scale + shift), the BN-ReLU
//    backward (mask, reductions, accumulation) and the batch-statistics gradient term;
//  * fused layer ops (CPU): BN-ReLU-conv1x1/conv3x3/pool-conv1x1 forward and backward, the
//    prologue recomputed tile by tile next to ATen's GEMMs;
//  * the per-BN numbers (CPU): a StatsOut's rows and a BN's coefficients in one loop each,
//    where the same few PyTorch ops per BN cost more than the small layers' GEMMs.
// Backward ops take the caller's accumulator `grad_x` (x's shape and layout family, mutated) and
// a flag: with `accumulate` they add scale * dy into it, without it they write scale * dy over
// every element (its previous contents are never read). Outputs not asked for come back as
// empty tensors.
#include <Python.h>
#include <torch/library.h>

#include "dense_ops.h"

namespace densenet_fast {
namespace {

// The kernels call ATen (GEMMs, convolutions) on tensors that may require grad; those calls
// are implementation details that autograd must not see (these ops have no autograd formula).
// Below Autograd only, not below ADInplaceOrView: tensors created with both excluded would be
// inference tensors, which callers outside torch.inference_mode() may not update in place.
using NestedAtenCalls = at::AutoDispatchBelowAutograd;

// What the fused kernels see of an argument: the same storage without autograd metadata, so
// their nested ATen calls never involve autograd whatever the caller's grad mode.
Tensor plain(const Tensor& t) { return t.detach(); }
std::optional<Tensor> plain(const std::optional<Tensor>& t) {
  return t.has_value() ? std::optional<Tensor>(t->detach()) : std::nullopt;
}

// Rows of per-channel numbers written in place (a StatsOut's stats or coefs): `rows` x C, each
// row contiguous, in the dtype of `mean` (the statistics dtype).
void check_rows(const Tensor& t, const char* name, int64_t rows, const Tensor& mean) {
  check_same_device(t, mean, name, "mean");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == mean.numel(), "densenet_fast: expected '", name,
              "' of shape (", rows, ", ", mean.numel(), "), got shape ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "densenet_fast: expected the rows of '", name,
              "' to be contiguous, got strides ", t.strides());
  TORCH_CHECK(t.scalar_type() == mean.scalar_type(), "densenet_fast: expected '", name, "' of dtype ",
              mean.scalar_type(), " (the dtype of 'mean'), got ", t.scalar_type());
}

// Per-channel inputs of the coefficient ops: `mean` float32/float64, the others shaped like it.
void check_stats_vectors(const Tensor& mean, std::initializer_list<std::pair<const Tensor*, const char*>> same,
                         const std::optional<Tensor>& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(mean.dim() == 1 && mean.is_contiguous(), "densenet_fast: expected 'mean' to be a contiguous vector, got shape ",
              mean.sizes());
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble,
              "densenet_fast: expected 'mean' of dtype float32 or float64, got ", mean.scalar_type());
  for (const auto& [t, name] : same) check_channel_vector(*t, name, mean, mean.numel());
  for (const auto& [t, name] : {std::pair(&weight, "weight"), std::pair(&bias, "bias")}) {
    if (!t->has_value()) continue;
    check_same_device(**t, mean, name, "mean");
    TORCH_CHECK((*t)->dim() == 1 && (*t)->numel() == mean.numel() && at::isFloatingType((*t)->scalar_type()),
                "densenet_fast: expected '", name, "' a floating vector of ", mean.numel(), " entries, got shape ",
                (*t)->sizes(), " and dtype ", (*t)->scalar_type());
  }
}

Tensor or_undefined(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

bool built_with_cuda() {
#ifdef DENSENET_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void check_x(const Tensor& x, bool allow_half) {
  activation_layout(x, "x");
  check_float_activation(x, "x", allow_half);
}

void check_bn(const Tensor& x, const Tensor& scale, const Tensor& shift, int64_t channels) {
  check_channel_vector(scale, "scale", x, channels);
  check_channel_vector(shift, "shift", x, channels);
}

// A tensor read alongside x: same device and dtype, the given shape, a supported layout.
void check_like(const Tensor& t, const char* name, const Tensor& x, at::IntArrayRef shape, const char* what) {
  check_4d(t, name);
  check_same_device(t, x, name, "x");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "densenet_fast: expected '", name, "' of dtype ", x.scalar_type(),
              " (the dtype of 'x'), got ", t.scalar_type());
  check_same_shape(t, name, shape, what);
}

// The accumulator of a backward: x's shape, dtype and device, and x's layout family.
void check_grad_x(const Tensor& grad_x, const Tensor& x) {
  check_like(grad_x, "grad_x", x, x.sizes(), "the shape of 'x'");
  check_output_layout(grad_x, activation_layout(x, "x"), "grad_x");
}

std::vector<int64_t> conv_output_shape(const Tensor& x, const Tensor& weight, bool pooled) {
  return {x.size(0), weight.size(0), pooled ? x.size(2) / 2 : x.size(2), pooled ? x.size(3) / 2 : x.size(3)};
}

// ---- Primitives ---------------------------------------------------------------------------

std::tuple<Tensor, Tensor> channel_stats_op(const Tensor& x) {
  NestedAtenCalls guard;
  check_x(x, true);
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 0, "densenet_fast: channel_stats expected values over N, H, W, got shape ",
              x.sizes());
#ifdef DENSENET_FAST_WITH_CUDA
  if (x.is_cuda()) return channel_stats_cuda(x);
#endif
  return channel_stats_cpu(x);
}

Tensor affine_relu_op(const Tensor& x, const Tensor& scale, const Tensor& shift) {
  NestedAtenCalls guard;
  check_x(x, true);
  check_bn(x, scale, shift, x.size(1));
  Tensor y = at::empty(x.sizes(), x.options().memory_format(memory_format_of(activation_layout(x, "x"))));
#ifdef DENSENET_FAST_WITH_CUDA
  if (x.is_cuda()) {
    affine_relu_cuda_out(x, scale, shift, y);
    return y;
  }
#endif
  affine_relu_cpu_out(x, scale, shift, y);
  return y;
}

std::tuple<Tensor, Tensor> bn_relu_backward_op(const Tensor& grad_y, const Tensor& x, const Tensor& scale,
                                               const Tensor& shift, const Tensor& center, const Tensor& grad_x,
                                               bool accumulate) {
  NestedAtenCalls guard;
  check_x(x, true);
  check_bn(x, scale, shift, x.size(1));
  check_channel_vector(center, "center", x, x.size(1));
  check_like(grad_y, "grad_y", x, x.sizes(), "the shape of 'x'");
  check_grad_x(grad_x, x);
  const ActivationLayout lx = activation_layout(x, "x");
  Tensor gy = conform_input(grad_y, lx, "grad_y");
#ifdef DENSENET_FAST_WITH_CUDA
  if (x.is_cuda()) return bn_relu_backward_cuda_out(gy, x, scale, shift, center, grad_x, accumulate);
#endif
  return bn_relu_backward_cpu_out(gy, x, scale, shift, center, grad_x, accumulate);
}

void bn_coefficients_op(const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& weight,
                        const std::optional<Tensor>& bias, const Tensor& coefs) {
  NestedAtenCalls guard;
  check_stats_vectors(mean, {{&invstd, "invstd"}}, weight, bias);
  check_rows(coefs, "coefs", 2, mean);
  bn_coefficients_cpu(mean, invstd, or_undefined(weight), or_undefined(bias), coefs);
}

void write_stats_op(const Tensor& stats, const Tensor& mean, const Tensor& var, int64_t count, double eps,
                    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                    const std::optional<Tensor>& coefs) {
  NestedAtenCalls guard;
  check_stats_vectors(mean, {{&var, "var"}}, weight, bias);
  check_rows(stats, "stats", 3, mean);
  if (coefs.has_value()) check_rows(*coefs, "coefs", 2, mean);
  write_stats_cpu(stats, mean, var, count, eps, or_undefined(weight), or_undefined(bias), or_undefined(coefs));
}

void bn_grad_finalize_op(const Tensor& grad_x, const Tensor& x, const Tensor& center, const Tensor& coef_x,
                      const Tensor& coef_c) {
  NestedAtenCalls guard;
  check_x(x, true);
  check_channel_vector(center, "center", x, x.size(1));
  check_channel_vector(coef_x, "coef_x", x, x.size(1));
  check_channel_vector(coef_c, "coef_c", x, x.size(1));
  check_grad_x(grad_x, x);
#ifdef DENSENET_FAST_WITH_CUDA
  if (x.is_cuda()) return bn_grad_finalize_cuda(grad_x, x, center, coef_x, coef_c);
#endif
  bn_grad_finalize_cpu(grad_x, x, center, coef_x, coef_c);
}

// ---- Fused layer ops (CPU) ----------------------------------------------------------------

void check_layer_args(const Tensor& x, const Tensor& scale, const Tensor& shift, const Tensor& weight, int64_t kernel) {
  check_x(x, false);
  check_bn(x, scale, shift, x.size(1));
  check_conv_weight(weight, x, kernel);
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_conv1x1_op(const Tensor& x, const Tensor& scale, const Tensor& shift,
                                                   const Tensor& weight, bool with_stats) {
  NestedAtenCalls guard;
  check_layer_args(x, scale, shift, weight, 1);
  return bn_relu_conv1x1_cpu(plain(x), plain(scale), plain(shift), plain(weight), with_stats);
}

std::tuple<Tensor, Tensor> bn_relu_conv3x3_op(const Tensor& z, const Tensor& scale, const Tensor& shift,
                                           const Tensor& weight, const Tensor& out, const std::optional<Tensor>& noise,
                                           bool with_stats) {
  NestedAtenCalls guard;
  check_layer_args(z, scale, shift, weight, 3);
  const auto shape = conv_output_shape(z, weight, false);
  check_like(out, "out", z, shape, "(N, out_channels, H, W)");
  if (noise.has_value()) check_like(*noise, "noise", z, shape, "the shape of 'out'");
  return bn_relu_conv3x3_cpu(plain(z), plain(scale), plain(shift), plain(weight), plain(out), plain(noise), with_stats);
}

void check_backward_args(const Tensor& grad_out, const Tensor& x, const Tensor& scale, const Tensor& shift,
                         const Tensor& weight, const Tensor& center, const Tensor& grad_x, int64_t kernel,
                         bool pooled) {
  check_layer_args(x, scale, shift, weight, kernel);
  check_channel_vector(center, "center", x, x.size(1));
  check_like(grad_out, "grad_out", x, conv_output_shape(x, weight, pooled), "the forward output's shape");
  activation_layout(grad_out, "grad_out");
  check_grad_x(grad_x, x);
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_conv1x1_backward_op(
    const Tensor& grad_out, const Tensor& x, const Tensor& scale, const Tensor& shift, const Tensor& weight,
    const Tensor& center, const Tensor& grad_x, bool accumulate, bool need_weight_grad) {
  NestedAtenCalls guard;
  check_backward_args(grad_out, x, scale, shift, weight, center, grad_x, 1, false);
  return bn_relu_conv1x1_backward_cpu(plain(grad_out), plain(x), plain(scale), plain(shift), plain(weight), plain(center),
                                      plain(grad_x), accumulate, need_weight_grad);
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_conv3x3_backward_op(
    const Tensor& grad_out, const Tensor& z, const Tensor& scale, const Tensor& shift, const Tensor& weight,
    const Tensor& center, const Tensor& grad_x, bool accumulate, bool need_weight_grad) {
  NestedAtenCalls guard;
  check_backward_args(grad_out, z, scale, shift, weight, center, grad_x, 3, false);
  return bn_relu_conv3x3_backward_cpu(plain(grad_out), plain(z), plain(scale), plain(shift), plain(weight), plain(center),
                                      plain(grad_x), accumulate, need_weight_grad);
}

// A 2x2 average pool needs a 2x2 window (torch's avg_pool2d refuses smaller maps too).
void check_pooled_map(const Tensor& x) {
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, "densenet_fast: expected 'x' of at least 2x2 pixels for the ",
              "transition's 2x2 average pooling, got ", x.size(2), "x", x.size(3));
}

Tensor bn_relu_pool_conv1x1_op(const Tensor& x, const Tensor& scale, const Tensor& shift, const Tensor& weight) {
  NestedAtenCalls guard;
  check_layer_args(x, scale, shift, weight, 1);
  check_pooled_map(x);
  return bn_relu_pool_conv1x1_cpu(plain(x), plain(scale), plain(shift), plain(weight));
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_pool_conv1x1_backward_op(
    const Tensor& grad_out, const Tensor& x, const Tensor& scale, const Tensor& shift, const Tensor& weight,
    const Tensor& center, const Tensor& grad_x, bool accumulate, bool need_weight_grad) {
  NestedAtenCalls guard;
  check_backward_args(grad_out, x, scale, shift, weight, center, grad_x, 1, true);
  check_pooled_map(x);
  return bn_relu_pool_conv1x1_backward_cpu(plain(grad_out), plain(x), plain(scale), plain(shift), plain(weight),
                                           plain(center), plain(grad_x), accumulate, need_weight_grad);
}

}  // namespace

TORCH_LIBRARY(densenet_fast, m) {
  // Where the fake (meta) implementations are, for torch.compile.
  m.set_python_module("densenet_fast.ops.extension_ops");
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("channel_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("affine_relu(Tensor x, Tensor scale, Tensor shift) -> Tensor");
  m.def("bn_relu_backward(Tensor grad_y, Tensor x, Tensor scale, Tensor shift, Tensor center, Tensor(a!) grad_x,"
        " bool accumulate) -> (Tensor sum_dy, Tensor sum_dy_xc)");
  m.def("bn_grad_finalize(Tensor(a!) grad_x, Tensor x, Tensor center, Tensor coef_x, Tensor coef_c) -> ()");
  m.def("bn_coefficients(Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor(a!) coefs) -> ()");
  m.def("write_stats(Tensor(a!) stats, Tensor mean, Tensor var, int count, float eps, Tensor? weight, Tensor? bias,"
        " Tensor(b!)? coefs) -> ()");
  m.def("bn_relu_conv1x1(Tensor x, Tensor scale, Tensor shift, Tensor weight, bool with_stats)"
        " -> (Tensor z, Tensor mean, Tensor var)");
  m.def("bn_relu_conv3x3(Tensor z, Tensor scale, Tensor shift, Tensor weight, Tensor(a!) out, Tensor? noise,"
        " bool with_stats) -> (Tensor mean, Tensor var)");
  m.def("bn_relu_conv1x1_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor shift, Tensor weight, Tensor center,"
        " Tensor(a!) grad_x, bool accumulate, bool need_weight_grad)"
        " -> (Tensor grad_weight, Tensor sum_dy, Tensor sum_dy_xc)");
  m.def("bn_relu_conv3x3_backward(Tensor grad_out, Tensor z, Tensor scale, Tensor shift, Tensor weight, Tensor center,"
        " Tensor(a!) grad_x, bool accumulate, bool need_weight_grad)"
        " -> (Tensor grad_weight, Tensor sum_dy, Tensor sum_dy_xc)");
  m.def("bn_relu_pool_conv1x1(Tensor x, Tensor scale, Tensor shift, Tensor weight) -> Tensor");
  m.def("bn_relu_pool_conv1x1_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor shift, Tensor weight,"
        " Tensor center, Tensor(a!) grad_x, bool accumulate, bool need_weight_grad)"
        " -> (Tensor grad_weight, Tensor sum_dy, Tensor sum_dy_xc)");
}

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("channel_stats", &channel_stats_op);
  m.impl("affine_relu", &affine_relu_op);
  m.impl("bn_relu_backward", &bn_relu_backward_op);
  m.impl("bn_grad_finalize", &bn_grad_finalize_op);
  m.impl("bn_coefficients", &bn_coefficients_op);
  m.impl("write_stats", &write_stats_op);
  m.impl("bn_relu_conv1x1", &bn_relu_conv1x1_op);
  m.impl("bn_relu_conv3x3", &bn_relu_conv3x3_op);
  m.impl("bn_relu_conv1x1_backward", &bn_relu_conv1x1_backward_op);
  m.impl("bn_relu_conv3x3_backward", &bn_relu_conv3x3_backward_op);
  m.impl("bn_relu_pool_conv1x1", &bn_relu_pool_conv1x1_op);
  m.impl("bn_relu_pool_conv1x1_backward", &bn_relu_pool_conv1x1_backward_op);
}

#ifdef DENSENET_FAST_WITH_CUDA
// On CUDA the primitives run as kernels; the composite backend composes them with ATen's convolutions.
TORCH_LIBRARY_IMPL(densenet_fast, CUDA, m) {
  m.impl("channel_stats", &channel_stats_op);
  m.impl("affine_relu", &affine_relu_op);
  m.impl("bn_relu_backward", &bn_relu_backward_op);
  m.impl("bn_grad_finalize", &bn_grad_finalize_op);
}
#endif

}  // namespace densenet_fast

// `import densenet_fast._C` loads this library, which registers the ops above with torch.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "densenet_fast compiled ops (torch.ops.densenet_fast)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
