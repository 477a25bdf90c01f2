// CPU kernels of the per-channel primitives: statistics, affine-ReLU, BN-ReLU backward and the
// batch-statistics gradient term. The fused layer ops (fused_cpu.cpp) call them on tiles and
// chunks; the cpp backend calls them directly on devices without fused layer ops.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "cpu_loops.h"
#include "dense_ops.h"

namespace densenet_fast {

using namespace cpu;

namespace {

// Rows of at least this many elements per parallel task.
constexpr int64_t kGrainElements = 1 << 15;

template <typename scalar_t>
std::vector<Moments<double>> channel_moments_impl(const Tensor& x) {
  const ActivationLayout l = activation_layout(x, "x");
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  std::vector<Moments<double>> result(l.channels, Moments<double>{0, 0, 0});
  if (l.batch == 0 || l.pixels == 0) return result;
  if (!l.channels_inner()) {
    // One task per channel: its N rows are contiguous, merged in image order.
    at::parallel_for(0, l.channels, std::max<int64_t>(1, kGrainElements / (l.batch * l.pixels)), [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        Moments<double> m{0, 0, 0};
        for (int64_t n = 0; n < l.batch; ++n) {
          m = moments_merge(m, row_moments(data + row_offset(l, false, n, c), l.pixels));
        }
        result[c] = m;
      }
    });
    return result;
  }
  // channels_last: slots of pixels; a chunk of pixels is reduced per channel in two passes,
  // merged into its slot, and the slots merged in order.
  const int64_t total = l.batch * l.pixels;
  const int64_t slots = slot_count(total * l.channels, kGrainElements);
  std::vector<Moments<double>> partial(slots * l.channels, Moments<double>{0, 0, 0});
  for_each_slot(total, slots, [&](int64_t s, int64_t begin, int64_t end) {
    std::vector<double> sum(l.channels), m2(l.channels);
    Moments<double>* out = partial.data() + s * l.channels;
    auto row = [&](int64_t q) { return data + row_offset(l, true, q / l.pixels, q % l.pixels); };
    add_pixel_rows_moments<scalar_t>(row, begin, end, l.channels, kStatsChunkPixels, out, sum, m2);
  });
  for (int64_t s = 0; s < slots; ++s) {
    for (int64_t c = 0; c < l.channels; ++c) result[c] = moments_merge(result[c], partial[s * l.channels + c]);
  }
  return result;
}

template <typename scalar_t>
void affine_relu_impl(const Tensor& x, const Tensor& scale, const Tensor& shift, const Tensor& y) {
  using opmath_t = at::opmath_type<scalar_t>;
  const ActivationLayout lx = activation_layout(x, "x"), ly = activation_layout(y, "y");
  const bool ci = lx.channels_inner();
  const int64_t outer = ci ? lx.pixels : lx.channels, len = ci ? lx.channels : lx.pixels;
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  scalar_t* yd = y.mutable_data_ptr<scalar_t>();
  const opmath_t* sc = scale.const_data_ptr<opmath_t>();
  const opmath_t* sh = shift.const_data_ptr<opmath_t>();
  at::parallel_for(0, lx.batch * outer, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, len)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / outer, o = r % outer;
      const scalar_t* xr = xd + row_offset(lx, ci, n, o);
      scalar_t* yr = yd + row_offset(ly, ci, n, o);
      if (ci) {
        affine_relu_row(xr, yr, len, PerElement<opmath_t>{sc}, PerElement<opmath_t>{sh});
      } else {
        affine_relu_row(xr, yr, len, Broadcast<opmath_t>{sc[o]}, Broadcast<opmath_t>{sh[o]});
      }
    }
  });
}

template <bool kAccumulate, typename scalar_t>
void bn_relu_backward_impl(const Tensor& grad_y, const Tensor& x, const Tensor& scale, const Tensor& shift,
                           const Tensor& center, const Tensor& grad_x, double* sum_dy, double* sum_dy_xc) {
  using opmath_t = at::opmath_type<scalar_t>;
  const ActivationLayout lx = activation_layout(x, "x"), lg = activation_layout(grad_y, "grad_y"),
                         lo = activation_layout(grad_x, "grad_x");
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* gd = grad_y.const_data_ptr<scalar_t>();
  // grad_x may be grad_y itself (in place): one mutable pointer, read before written per element.
  scalar_t* od = grad_x.data_ptr<scalar_t>();
  const opmath_t* sc = scale.const_data_ptr<opmath_t>();
  const opmath_t* sh = shift.const_data_ptr<opmath_t>();
  const opmath_t* ce = center.const_data_ptr<opmath_t>();
  if (!lx.channels_inner()) {
    // One task per channel; its rows summed in image order.
    at::parallel_for(0, lx.channels, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, lx.batch * lx.pixels)),
                     [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        RowSums sums;
        for (int64_t n = 0; n < lx.batch; ++n) {
          bn_relu_backward_row<kAccumulate>(gd + row_offset(lg, false, n, c), xd + row_offset(lx, false, n, c),
                                            od + row_offset(lo, false, n, c), lx.pixels, Broadcast<opmath_t>{sc[c]},
                                            Broadcast<opmath_t>{sh[c]}, Broadcast<opmath_t>{ce[c]}, sums);
        }
        sum_dy[c] = sums.dy;
        sum_dy_xc[c] = sums.dy_xc;
      }
    });
    return;
  }
  const int64_t total = lx.batch * lx.pixels, channels = lx.channels;
  const int64_t slots = slot_count(total * channels, kGrainElements);
  std::vector<double> partial(2 * slots * channels, 0.0);
  for_each_slot(total, slots, [&](int64_t s, int64_t begin, int64_t end) {
    ChannelSums sums{partial.data() + 2 * s * channels, partial.data() + (2 * s + 1) * channels};
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / lx.pixels, p = q % lx.pixels;
      bn_relu_backward_row<kAccumulate>(gd + row_offset(lg, true, n, p), xd + row_offset(lx, true, n, p),
                                        od + row_offset(lo, true, n, p), channels, PerElement<opmath_t>{sc},
                                        PerElement<opmath_t>{sh}, PerElement<opmath_t>{ce}, sums);
    }
  });
  for (int64_t c = 0; c < channels; ++c) {
    double a = 0, b = 0;
    for (int64_t s = 0; s < slots; ++s) {
      a += partial[2 * s * channels + c];
      b += partial[(2 * s + 1) * channels + c];
    }
    sum_dy[c] = a;
    sum_dy_xc[c] = b;
  }
}

template <typename scalar_t>
void bn_grad_finalize_impl(const Tensor& grad_x, const Tensor& x, const Tensor& center, const Tensor& coef_x,
                           const Tensor& coef_c) {
  using opmath_t = at::opmath_type<scalar_t>;
  const ActivationLayout lx = activation_layout(x, "x"), lo = activation_layout(grad_x, "grad_x");
  const bool ci = lx.channels_inner();
  const int64_t outer = ci ? lx.pixels : lx.channels, len = ci ? lx.channels : lx.pixels;
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  scalar_t* od = grad_x.mutable_data_ptr<scalar_t>();
  const opmath_t* ce = center.const_data_ptr<opmath_t>();
  const opmath_t* cx = coef_x.const_data_ptr<opmath_t>();
  const opmath_t* cc = coef_c.const_data_ptr<opmath_t>();
  at::parallel_for(0, lx.batch * outer, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, len)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / outer, o = r % outer;
      const scalar_t* __restrict__ xr = xd + row_offset(lx, ci, n, o);
      scalar_t* __restrict__ gr = od + row_offset(lo, ci, n, o);
      if (ci) {
        for (int64_t i = 0; i < len; ++i) {
          gr[i] = static_cast<scalar_t>(static_cast<opmath_t>(gr[i]) +
                                        batch_stats_grad<opmath_t>(static_cast<opmath_t>(xr[i]), ce[i], cx[i], cc[i]));
        }
      } else {
        const opmath_t m = ce[o], a = cx[o], k = cc[o];
        for (int64_t i = 0; i < len; ++i) {
          gr[i] = static_cast<scalar_t>(static_cast<opmath_t>(gr[i]) +
                                        batch_stats_grad<opmath_t>(static_cast<opmath_t>(xr[i]), m, a, k));
        }
      }
    }
  });
}

}  // namespace

std::vector<Moments<double>> channel_moments_cpu(const Tensor& x) {
  std::vector<Moments<double>> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_cpu",
                                  [&] { result = channel_moments_impl<scalar_t>(x); });
  return result;
}

std::tuple<Tensor, Tensor> moments_to_stats(const std::vector<Moments<double>>& moments, const Tensor& like) {
  const int64_t channels = static_cast<int64_t>(moments.size());
  auto options = like.options().dtype(stats_dtype(like.scalar_type())).device(at::kCPU);
  Tensor mean = at::empty({channels}, options), var = at::empty({channels}, options);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "moments_to_stats", [&] {
    scalar_t* m = mean.mutable_data_ptr<scalar_t>();
    scalar_t* v = var.mutable_data_ptr<scalar_t>();
    // No value (a fused op on an empty batch): NaN, the mean and variance torch gives of nothing.
    const scalar_t none = std::numeric_limits<scalar_t>::quiet_NaN();
    for (int64_t c = 0; c < channels; ++c) {
      const bool empty = moments[c].count <= 0;
      m[c] = empty ? none : static_cast<scalar_t>(moments[c].mean);
      v[c] = empty ? none : static_cast<scalar_t>(moments_variance(moments[c]));
    }
  });
  return {mean, var};
}

std::tuple<Tensor, Tensor> channel_stats_cpu(const Tensor& x) { return moments_to_stats(channel_moments_cpu(x), x); }

void affine_relu_cpu_out(const Tensor& x, const Tensor& scale, const Tensor& shift, const Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_relu_cpu",
                                  [&] { affine_relu_impl<scalar_t>(x, scale, shift, y); });
}

std::tuple<Tensor, Tensor> bn_relu_backward_cpu_sums(const Tensor& grad_y, const Tensor& x, const Tensor& scale,
                                                     const Tensor& shift, const Tensor& center, const Tensor& grad_x,
                                                     bool accumulate) {
  const int64_t channels = x.size(1);
  auto options = x.options().dtype(at::kDouble);
  Tensor sum_dy = at::zeros({channels}, options), sum_dy_xc = at::zeros({channels}, options);
  double* dy = sum_dy.mutable_data_ptr<double>();
  double* dy_xc = sum_dy_xc.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward_cpu", [&] {
    if (accumulate) {
      bn_relu_backward_impl<true, scalar_t>(grad_y, x, scale, shift, center, grad_x, dy, dy_xc);
    } else {
      bn_relu_backward_impl<false, scalar_t>(grad_y, x, scale, shift, center, grad_x, dy, dy_xc);
    }
  });
  return {sum_dy, sum_dy_xc};
}

std::tuple<Tensor, Tensor> bn_relu_backward_cpu_out(const Tensor& grad_y, const Tensor& x, const Tensor& scale,
                                                    const Tensor& shift, const Tensor& center, const Tensor& grad_x,
                                                    bool accumulate) {
  auto [sum_dy, sum_dy_xc] = bn_relu_backward_cpu_sums(grad_y, x, scale, shift, center, grad_x, accumulate);
  const auto dtype = stats_dtype(x.scalar_type());
  return {sum_dy.to(dtype), sum_dy_xc.to(dtype)};
}

void bn_grad_finalize_cpu(const Tensor& grad_x, const Tensor& x, const Tensor& center, const Tensor& coef_x,
                          const Tensor& coef_c) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_grad_finalize_cpu",
                                  [&] { bn_grad_finalize_impl<scalar_t>(grad_x, x, center, coef_x, coef_c); });
}

// Row r of a (R, C) tensor whose rows are each contiguous.
template <typename scalar_t>
scalar_t* row_of(const Tensor& rows, int64_t r) {
  return rows.mutable_data_ptr<scalar_t>() + r * rows.stride(0);
}

// A channel vector in the statistics dtype `like` has (the parameters may be another float type).
Tensor as_stats_vector(const Tensor& v, const Tensor& like) {
  return v.defined() ? v.to(like.scalar_type()).contiguous() : v;
}

// The same arithmetic, in the same order, as interface.write_coefficients' PyTorch ops.
template <typename scalar_t>
void coefficients_loop(const scalar_t* mean, const scalar_t* invstd, const Tensor& weight, const Tensor& bias,
                       const Tensor& coefs, int64_t channels) {
  const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* scale = row_of<scalar_t>(coefs, 0);
  scalar_t* shift = row_of<scalar_t>(coefs, 1);
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t s = w ? w[c] * invstd[c] : invstd[c];
    scale[c] = s;
    shift[c] = b ? b[c] + scalar_t(-1) * mean[c] * s : -(mean[c] * s);
  }
}

void bn_coefficients_cpu(const Tensor& mean, const Tensor& invstd, const Tensor& weight, const Tensor& bias,
                         const Tensor& coefs) {
  const Tensor w = as_stats_vector(weight, mean), b = as_stats_vector(bias, mean);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_coefficients_cpu", [&] {
    coefficients_loop<scalar_t>(mean.const_data_ptr<scalar_t>(), invstd.const_data_ptr<scalar_t>(), w, b, coefs,
                                mean.numel());
  });
}

void write_stats_cpu(const Tensor& stats, const Tensor& mean, const Tensor& var, int64_t count, double eps,
                     const Tensor& weight, const Tensor& bias, const Tensor& coefs) {
  const int64_t channels = mean.numel();
  const Tensor w = as_stats_vector(weight, mean), b = as_stats_vector(bias, mean);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "write_stats_cpu", [&] {
    const scalar_t* m = mean.const_data_ptr<scalar_t>();
    const scalar_t* v = var.const_data_ptr<scalar_t>();
    scalar_t* out_mean = row_of<scalar_t>(stats, 0);
    scalar_t* out_var = row_of<scalar_t>(stats, 1);
    scalar_t* invstd = row_of<scalar_t>(stats, 2);
    const scalar_t unbiased = count > 1 ? static_cast<scalar_t>(static_cast<double>(count) / (count - 1))
                                        : std::numeric_limits<scalar_t>::quiet_NaN();
    const scalar_t e = static_cast<scalar_t>(eps);
    for (int64_t c = 0; c < channels; ++c) {
      out_mean[c] = m[c];
      out_var[c] = v[c] * unbiased;
      invstd[c] = scalar_t(1) / std::sqrt(v[c] + e);
    }
    if (coefs.defined()) coefficients_loop<scalar_t>(out_mean, invstd, w, b, coefs, channels);
  });
}

}  // namespace densenet_fast
