// The arithmetic of the ops, written once for the CPU loops and the CUDA kernels.
//
// Every function here is C10_HOST_DEVICE and works on one element (or one pair of partial
// results), so the CPU build exercises exactly the formulas the GPU runs; only the loops and
// the reduction trees around them differ between devices.
#pragma once

#include <c10/macros/Macros.h>

namespace densenet_fast {

// The normalized activation relu(x * scale + shift). NaN propagates like torch.relu's.
template <typename T>
C10_HOST_DEVICE inline T affine_relu(T x, T scale, T shift) {
  T v = x * scale + shift;
  return v < T(0) ? T(0) : v;
}

// Whether the ReLU let x through: the mask of threshold_backward(dy, relu(v), 0).
template <typename T>
C10_HOST_DEVICE inline bool relu_passes(T x, T scale, T shift) {
  return !(x * scale + shift <= T(0));
}

// One element's share of BN-ReLU's backward: dy is the gradient w.r.t. the BN output (the
// ReLU's input), the ReLU output's gradient masked; dy * (x - center) feeds the second
// reduction. Scalar functions rather than a returned struct: the CPU vectorizer keeps loops
// over plain scalars in registers.
template <typename T>
C10_HOST_DEVICE inline T bn_relu_dy(T x, T grad_relu_out, T scale, T shift) {
  return relu_passes(x, scale, shift) ? grad_relu_out : T(0);
}

template <typename T>
C10_HOST_DEVICE inline T bn_relu_dy_xc(T dy, T x, T center) {
  return dy * (x - center);
}

// A pair of per-channel sums (sum dy, sum dy * (x - center)).
template <typename T>
struct BnReluGrad {
  T dy;
  T dy_xc;
};

// What BN's backward through the batch statistics adds to one element's gradient.
template <typename T>
C10_HOST_DEVICE inline T batch_stats_grad(T x, T center, T coef_x, T coef_c) {
  return coef_x * (x - center) + coef_c;
}

// Count, mean and sum of squared deviations (m2) of a set of values. Merging partial results
// with Chan et al.'s formula keeps the variance accurate when |mean| >> std, where the
// textbook sum(x^2) - sum(x)^2 / n cancels catastrophically.
template <typename T>
struct Moments {
  T count;
  T mean;
  T m2;
};

// Welford's update: one more value.
template <typename T>
C10_HOST_DEVICE inline Moments<T> moments_add(Moments<T> m, T x) {
  T count = m.count + T(1);
  T delta = x - m.mean;
  T mean = m.mean + delta / count;
  return {count, mean, m.m2 + delta * (x - mean)};
}

// Chan's merge of two partial results.
template <typename T>
C10_HOST_DEVICE inline Moments<T> moments_merge(Moments<T> a, Moments<T> b) {
  T count = a.count + b.count;
  if (b.count == T(0)) return a;
  if (a.count == T(0)) return b;
  T delta = b.mean - a.mean;
  T weight_b = b.count / count;
  return {count, a.mean + delta * weight_b, a.m2 + b.m2 + delta * delta * a.count * weight_b};
}

// Biased variance (what BN normalizes with); never negative.
template <typename T>
C10_HOST_DEVICE inline T moments_variance(Moments<T> m) {
  if (m.count <= T(0)) return T(0);
  T var = m.m2 / m.count;
  return var < T(0) ? T(0) : var;
}

}  // namespace densenet_fast
