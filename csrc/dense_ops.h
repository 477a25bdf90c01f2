// Declarations shared by the op registration (ops.cpp) and the device implementations.
//
// The *_cpu / *_cuda functions assume their arguments passed the checks in ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "bn_relu_math.h"
#include "checks.h"

namespace densenet_fast {

using at::Tensor;

// ---- Primitives, CPU (primitives_cpu.cpp) -------------------------------------------------
// Per-channel count/mean/m2 of x over N, H, W, accumulated in double.
std::vector<Moments<double>> channel_moments_cpu(const Tensor& x);
// Mean and biased variance as tensors of the statistics dtype, from per-channel moments.
std::tuple<Tensor, Tensor> moments_to_stats(const std::vector<Moments<double>>& moments, const Tensor& like);
std::tuple<Tensor, Tensor> channel_stats_cpu(const Tensor& x);
// y = relu(x * scale + shift); y has x's shape and walks like x.
void affine_relu_cpu_out(const Tensor& x, const Tensor& scale, const Tensor& shift, const Tensor& y);
// grad_x (+)= scale * dy with dy = mask * grad_y; returns (sum dy, sum dy * (x - center)).
// grad_x may be grad_y itself when not accumulating (the op then works in place).
std::tuple<Tensor, Tensor> bn_relu_backward_cpu_out(const Tensor& grad_y, const Tensor& x, const Tensor& scale,
                                                    const Tensor& shift, const Tensor& center, const Tensor& grad_x,
                                                    bool accumulate);
// The same, with the two sums in double (to add up over chunks of images before one cast).
std::tuple<Tensor, Tensor> bn_relu_backward_cpu_sums(const Tensor& grad_y, const Tensor& x, const Tensor& scale,
                                                     const Tensor& shift, const Tensor& center, const Tensor& grad_x,
                                                     bool accumulate);
void bn_grad_finalize_cpu(const Tensor& grad_x, const Tensor& x, const Tensor& center, const Tensor& coef_x,
                          const Tensor& coef_c);
// A BN's (2, C) coefficients, scale = weight * invstd and shift = bias - mean * scale (weight,
// bias undefined: 1 and 0); and the (3, C) statistics rows of a StatsOut (interface.py): mean,
// unbiased variance of `count` values, rsqrt(biased var + eps), then the coefficients if asked.
void bn_coefficients_cpu(const Tensor& mean, const Tensor& invstd, const Tensor& weight, const Tensor& bias,
                         const Tensor& coefs);
void write_stats_cpu(const Tensor& stats, const Tensor& mean, const Tensor& var, int64_t count, double eps,
                     const Tensor& weight, const Tensor& bias, const Tensor& coefs);

// ---- Fused layer ops, CPU (fused_cpu.cpp) -------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> bn_relu_conv1x1_cpu(const Tensor& x, const Tensor& scale, const Tensor& shift,
                                                       const Tensor& weight, bool with_stats);
std::tuple<Tensor, Tensor> bn_relu_conv3x3_cpu(const Tensor& z, const Tensor& scale, const Tensor& shift,
                                               const Tensor& weight, const Tensor& out,
                                               const std::optional<Tensor>& noise, bool with_stats);
// Backward ops write (accumulate: add) scale * dy into every element of grad_x and return
// (grad_weight or empty, sum_dy, sum_dy_xc).
std::tuple<Tensor, Tensor, Tensor> bn_relu_conv1x1_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& scale, const Tensor& shift, const Tensor& weight,
    const Tensor& center, const Tensor& grad_x, bool accumulate, bool need_weight_grad);
std::tuple<Tensor, Tensor, Tensor> bn_relu_conv3x3_backward_cpu(
    const Tensor& grad_out, const Tensor& z, const Tensor& scale, const Tensor& shift, const Tensor& weight,
    const Tensor& center, const Tensor& grad_x, bool accumulate, bool need_weight_grad);
Tensor bn_relu_pool_conv1x1_cpu(const Tensor& x, const Tensor& scale, const Tensor& shift, const Tensor& weight);
std::tuple<Tensor, Tensor, Tensor> bn_relu_pool_conv1x1_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& scale, const Tensor& shift, const Tensor& weight,
    const Tensor& center, const Tensor& grad_x, bool accumulate, bool need_weight_grad);

#ifdef DENSENET_FAST_WITH_CUDA
// ---- Primitives, CUDA (primitives_cuda.cu) ------------------------------------------------
std::tuple<Tensor, Tensor> channel_stats_cuda(const Tensor& x);
void affine_relu_cuda_out(const Tensor& x, const Tensor& scale, const Tensor& shift, const Tensor& y);
std::tuple<Tensor, Tensor> bn_relu_backward_cuda_out(const Tensor& grad_y, const Tensor& x, const Tensor& scale,
                                                     const Tensor& shift, const Tensor& center, const Tensor& grad_x,
                                                     bool accumulate);
void bn_grad_finalize_cuda(const Tensor& grad_x, const Tensor& x, const Tensor& center, const Tensor& coef_x,
                           const Tensor& coef_c);
#endif

}  // namespace densenet_fast
