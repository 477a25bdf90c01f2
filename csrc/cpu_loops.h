// Loop building blocks of the CPU kernels: rows of an activation, per-row element kernels
// (written over the functors of bn_relu_math.h) and deterministic parallel slots.
//
// An activation is walked as rows along its contiguous axis: (n, c) rows of P pixels for
// NCHW, (n, p) rows of C channels for channels_last. Per-channel parameters are then one
// value per row (Broadcast) or one per element (PerElement); the row kernels are templates
// over both so each loop compiles to straight, vectorizable code.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>

#include "bn_relu_math.h"
#include "checks.h"

namespace densenet_fast {
namespace cpu {

template <typename T>
struct Broadcast {
  T value;
  T operator[](int64_t) const { return value; }
};

template <typename T>
struct PerElement {
  const T* __restrict__ data;
  T operator[](int64_t i) const { return data[i]; }
};

// Offset of row `outer` of image n: a channel (NCHW walk) or a pixel (channels_last walk).
inline int64_t row_offset(const ActivationLayout& l, bool channels_inner, int64_t n, int64_t outer) {
  return n * l.batch_stride + outer * (channels_inner ? l.pixel_stride : l.channel_stride);
}

// Number of parallel slots for `work` items with at least `min_per_slot` each.
inline int64_t slot_count(int64_t work, int64_t min_per_slot) {
  int64_t by_work = std::max<int64_t>(1, work / std::max<int64_t>(1, min_per_slot));
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_work));
}

// body(slot, begin, end) over `num_slots` contiguous parts of [0, total), in parallel. Each
// slot keeps its own partial sums, merged afterwards in slot order, so results depend on the
// thread count only, never on scheduling.
template <typename F>
void for_each_slot(int64_t total, int64_t num_slots, const F& body) {
  at::parallel_for(0, num_slots, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) body(s, total * s / num_slots, total * (s + 1) / num_slots);
  });
}

// y[i] = relu(x[i] * scale[i] + shift[i]) along a row.
template <typename scalar_t, typename P>
inline void affine_relu_row(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t len, P scale, P shift) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < len; ++i) {
    y[i] = static_cast<scalar_t>(affine_relu<opmath_t>(static_cast<opmath_t>(x[i]), scale[i], shift[i]));
  }
}

// BN-ReLU backward along a row: out (+)= scale * dy, and the two reductions. `Acc` receives
// per-element terms (add(i, dy, dy_xc)). out may equal grad_y (in place, not accumulating).
template <bool kAccumulate, typename scalar_t, typename P, typename Acc>
inline void bn_relu_backward_row(const scalar_t* grad_y, const scalar_t* __restrict__ x, scalar_t* out, int64_t len,
                                 P scale, P shift, P center, Acc& acc) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < len; ++i) {
    auto g = bn_relu_grad<opmath_t>(static_cast<opmath_t>(x[i]), static_cast<opmath_t>(grad_y[i]), scale[i], shift[i],
                                    center[i]);
    acc.add(i, g.dy, g.dy_xc);
    opmath_t contribution = scale[i] * g.dy;
    out[i] = static_cast<scalar_t>(kAccumulate ? static_cast<opmath_t>(out[i]) + contribution : contribution);
  }
}

// Reductions of a row into one channel: four interleaved double lanes, so the additions don't
// wait on each other and a long row loses no float32 precision.
struct RowSums {
  double dy[4] = {0, 0, 0, 0};
  double dy_xc[4] = {0, 0, 0, 0};
  void add(int64_t i, double a, double b) {
    dy[i & 3] += a;
    dy_xc[i & 3] += b;
  }
  double total_dy() const { return (dy[0] + dy[1]) + (dy[2] + dy[3]); }
  double total_dy_xc() const { return (dy_xc[0] + dy_xc[1]) + (dy_xc[2] + dy_xc[3]); }
};

// Reductions of a row across channels: one accumulator per channel.
struct ChannelSums {
  double* __restrict__ dy;
  double* __restrict__ dy_xc;
  void add(int64_t i, double a, double b) {
    dy[i] += a;
    dy_xc[i] += b;
  }
};

// Count, mean and m2 of a contiguous row, in two passes over it (it is in cache).
template <typename scalar_t>
inline Moments<double> row_moments(const scalar_t* __restrict__ row, int64_t len) {
  double sum[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < len; ++i) sum[i & 3] += static_cast<double>(row[i]);
  const double mean = ((sum[0] + sum[1]) + (sum[2] + sum[3])) / static_cast<double>(len);
  double m2[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < len; ++i) {
    double d = static_cast<double>(row[i]) - mean;
    m2[i & 3] += d * d;
  }
  return {static_cast<double>(len), mean, (m2[0] + m2[1]) + (m2[2] + m2[3])};
}

}  // namespace cpu
}  // namespace densenet_fast
