// Argument checks shared by every op, and the view of a 4-D activation the kernels walk.
//
// Each check names the argument and what was expected (device, dtype, shape, layout), so a
// misuse from Python fails with a message that says what to fix.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace densenet_fast {

// A 4-D activation N x C x H x W seen as N x C x P with P = H * W pixels, in elements.
// The kernels support the two layouts a block's feature buffer (or a channel slice of it) has:
// pixels contiguous per channel (NCHW, pixel_stride == 1) or channels contiguous per pixel
// (channels_last, channel_stride == 1).
struct ActivationLayout {
  int64_t batch, channels, pixels;
  int64_t batch_stride, channel_stride, pixel_stride;
  bool channels_inner() const { return pixel_stride != 1; }
};

inline void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "densenet_fast: expected a tensor for '", name, "', got None");
  TORCH_CHECK(t.dim() == 4, "densenet_fast: expected '", name, "' to be 4-D (N, C, H, W), got shape ", t.sizes());
  TORCH_CHECK(t.layout() == at::kStrided, "densenet_fast: expected '", name, "' to be a dense (strided) tensor, got layout ",
              t.layout());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "densenet_fast: expected '", name, "' on ", ref.device(), " (the device of '",
              ref_name, "'), got ", t.device());
}

// The dtype of statistics, scale, shift and center for activations of dtype `dtype`.
inline at::ScalarType stats_dtype(at::ScalarType dtype) {
  return (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
}

inline void check_float_activation(const at::Tensor& x, const char* name, bool allow_half) {
  auto dt = x.scalar_type();
  bool ok = dt == at::kFloat || dt == at::kDouble || (allow_half && (dt == at::kHalf || dt == at::kBFloat16));
  TORCH_CHECK(ok, "densenet_fast: expected '", name, "' of dtype float32 or float64",
              allow_half ? " (or float16/bfloat16)" : "", ", got ", dt);
}

// A per-channel vector (scale, shift, center, coefficients): 1-D, `channels` entries, the
// statistics dtype of `x`, on x's device.
inline void check_channel_vector(const at::Tensor& v, const char* name, const at::Tensor& x, int64_t channels) {
  TORCH_CHECK(v.defined(), "densenet_fast: expected a tensor for '", name, "', got None");
  check_same_device(v, x, name, "x");
  TORCH_CHECK(v.dim() == 1 && v.size(0) == channels, "densenet_fast: expected '", name, "' of shape (", channels,
              ",) (one entry per channel), got shape ", v.sizes());
  TORCH_CHECK(v.scalar_type() == stats_dtype(x.scalar_type()), "densenet_fast: expected '", name, "' of dtype ",
              stats_dtype(x.scalar_type()), " (the statistics dtype of ", x.scalar_type(), " activations), got ",
              v.scalar_type());
  TORCH_CHECK(v.is_contiguous(), "densenet_fast: expected '", name, "' to be contiguous");
}

// The N x C x P view of `t`; fails unless H and W collapse into one pixel axis and either the
// pixels or the channels are contiguous (NCHW or channels_last, or a channel slice of one).
inline ActivationLayout activation_layout(const at::Tensor& t, const char* name) {
  check_4d(t, name);
  const int64_t h = t.size(2), w = t.size(3);
  const int64_t pixels = h * w;
  TORCH_CHECK(h <= 1 || w <= 1 || t.stride(2) == w * t.stride(3), "densenet_fast: expected '", name,
              "' in NCHW or channels_last layout (H and W rows adjacent), got strides ", t.strides(), " for shape ",
              t.sizes());
  int64_t pixel_stride = w > 1 ? t.stride(3) : (h > 1 ? t.stride(2) : 1);
  int64_t channel_stride = t.size(1) > 1 ? t.stride(1) : (pixel_stride == 1 ? pixels : 1);
  TORCH_CHECK(pixel_stride == 1 || channel_stride == 1, "densenet_fast: expected '", name,
              "' in NCHW or channels_last layout (pixels or channels contiguous), got strides ", t.strides(),
              " for shape ", t.sizes());
  // One pixel per image with its channels contiguous: walk it as channels_last (rows of channels,
  // vectorized over them) rather than as rows of one pixel. The pixel stride is then never used.
  if (pixels == 1 && channel_stride == 1) pixel_stride = std::max<int64_t>(2, t.size(1));
  return {t.size(0), t.size(1), pixels, t.stride(0), channel_stride, pixel_stride};
}

// The memory format a new tensor laid out like `layout` gets.
inline at::MemoryFormat memory_format_of(const ActivationLayout& layout) {
  return layout.channels_inner() ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Whether `t` walks like `x_layout`: the same axis (pixels or channels) contiguous.
inline bool walks_like(const ActivationLayout& t, const ActivationLayout& x_layout) {
  return x_layout.channels_inner() ? t.channel_stride == 1 : t.pixel_stride == 1;
}

// An input `t` shaped like x, in x's layout family: `t` itself when it already is, else a copy.
inline at::Tensor conform_input(const at::Tensor& t, const ActivationLayout& x_layout, const char* name) {
  check_4d(t, name);
  if (t.stride(2) == t.size(3) * t.stride(3) || t.size(2) <= 1 || t.size(3) <= 1) {
    auto pixel_stride = t.size(3) > 1 ? t.stride(3) : (t.size(2) > 1 ? t.stride(2) : 1);
    auto channel_stride = t.size(1) > 1 ? t.stride(1) : (pixel_stride == 1 ? t.size(2) * t.size(3) : 1);
    if (x_layout.channels_inner() ? channel_stride == 1 : pixel_stride == 1) return t;
  }
  return t.contiguous(memory_format_of(x_layout));
}

// An output `t` written in place must already walk like x (it can't be copied).
inline ActivationLayout check_output_layout(const at::Tensor& t, const ActivationLayout& x_layout, const char* name) {
  ActivationLayout l = activation_layout(t, name);
  TORCH_CHECK(walks_like(l, x_layout), "densenet_fast: expected '", name, "' in the layout of 'x' (",
              x_layout.channels_inner() ? "channels_last" : "NCHW", "), got strides ", t.strides());
  return l;
}

inline void check_same_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape, const char* what) {
  TORCH_CHECK(t.sizes() == shape, "densenet_fast: expected '", name, "' of shape ", shape, " (", what, "), got ",
              t.sizes());
}

// A conv weight: 4-D (out, in, k, k), the activations' dtype and device, contiguous.
inline void check_conv_weight(const at::Tensor& weight, const at::Tensor& x, int64_t kernel) {
  // (torch's own pooling refuses channel-less inputs too; the fused loops divide by the count)
  TORCH_CHECK(x.size(1) > 0, "densenet_fast: expected 'x' with at least one channel, got shape ", x.sizes());
  check_4d(weight, "weight");
  check_same_device(weight, x, "weight", "x");
  TORCH_CHECK(weight.size(1) == x.size(1) && weight.size(2) == kernel && weight.size(3) == kernel,
              "densenet_fast: expected 'weight' of shape (out_channels, ", x.size(1), ", ", kernel, ", ", kernel,
              ") for an input with ", x.size(1), " channels, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "densenet_fast: expected 'weight' of dtype ", x.scalar_type(),
              " (the activations' dtype), got ", weight.scalar_type());
}

}  // namespace densenet_fast
