// Loop building blocks of the CPU kernels: rows of an activation, per-row element kernels
// (written over the functors of bn_relu_math.h) and deterministic parallel slots.
//
// An activation is walked as rows along its contiguous axis: (n, c) rows of P pixels for
// NCHW, (n, p) rows of C channels for channels_last. Per-channel parameters are then one
// value per row (Broadcast) or one per element (PerElement); the row kernels are templates
// over both so each loop compiles to straight, vectorizable code.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <vector>

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
// The slots call ATen (GEMMs) on OpenMP worker threads, so they run under the caller's
// thread-local state (grad and inference mode, dispatch-key guards), which OpenMP doesn't carry.
// One slot runs on the calling thread outside any parallel region, so that the GEMMs in it
// run on all threads (inside at::parallel_for, even inline, they run on one).
template <typename F>
void for_each_slot(int64_t total, int64_t num_slots, const F& body) {
  if (num_slots == 1) {
    body(0, 0, total);
    return;
  }
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, num_slots, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t s = begin; s < end; ++s) body(s, total * s / num_slots, total * (s + 1) / num_slots);
  });
}

// The row kernels below carry `#pragma omp simd` (the extension is built with -fopenmp): it
// lets the compiler vectorize the reductions, which it otherwise must keep in source order.

// y[i] = relu(x[i] * scale[i] + shift[i]) along a row.
template <typename scalar_t, typename P>
inline void affine_relu_row(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t len, P scale, P shift) {
  using opmath_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    y[i] = static_cast<scalar_t>(affine_relu<opmath_t>(static_cast<opmath_t>(x[i]), scale[i], shift[i]));
  }
}

// Sums of one channel's (dy, dy * (x - center)), in double.
struct RowSums {
  double dy = 0;
  double dy_xc = 0;
};

// Per-channel sums, one accumulator pair per channel of a channels_last row.
struct ChannelSums {
  double* __restrict__ dy;
  double* __restrict__ dy_xc;
};

// BN-ReLU backward along a row of one channel (NCHW): out (+)= scale * dy and the channel's
// two reductions. out may equal grad_y (in place, not accumulating): element i is read before
// it is written and no other element is touched.
template <bool kAccumulate, typename scalar_t>
inline void bn_relu_backward_row(const scalar_t* grad_y, const scalar_t* __restrict__ x, scalar_t* out, int64_t len,
                                 Broadcast<at::opmath_type<scalar_t>> scale, Broadcast<at::opmath_type<scalar_t>> shift,
                                 Broadcast<at::opmath_type<scalar_t>> center, RowSums& sums) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t s = scale.value, b = shift.value, m = center.value;
  double sum_dy = 0, sum_dy_xc = 0;
#pragma omp simd reduction(+ : sum_dy, sum_dy_xc)
  for (int64_t i = 0; i < len; ++i) {
    const opmath_t xi = static_cast<opmath_t>(x[i]);
    const opmath_t dy = bn_relu_dy<opmath_t>(xi, static_cast<opmath_t>(grad_y[i]), s, b);
    sum_dy += dy;
    sum_dy_xc += bn_relu_dy_xc<opmath_t>(dy, xi, m);
    const opmath_t contribution = s * dy;
    out[i] = static_cast<scalar_t>(kAccumulate ? static_cast<opmath_t>(out[i]) + contribution : contribution);
  }
  sums.dy += sum_dy;
  sums.dy_xc += sum_dy_xc;
}

// The same along a row of one pixel's channels (channels_last), into per-channel sums.
template <bool kAccumulate, typename scalar_t>
inline void bn_relu_backward_row(const scalar_t* grad_y, const scalar_t* __restrict__ x, scalar_t* out, int64_t len,
                                 PerElement<at::opmath_type<scalar_t>> scale, PerElement<at::opmath_type<scalar_t>> shift,
                                 PerElement<at::opmath_type<scalar_t>> center, ChannelSums& sums) {
  using opmath_t = at::opmath_type<scalar_t>;
  double* __restrict__ sum_dy = sums.dy;
  double* __restrict__ sum_dy_xc = sums.dy_xc;
  const opmath_t* __restrict__ s = scale.data;
  const opmath_t* __restrict__ b = shift.data;
  const opmath_t* __restrict__ m = center.data;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const opmath_t xi = static_cast<opmath_t>(x[i]);
    const opmath_t dy = bn_relu_dy<opmath_t>(xi, static_cast<opmath_t>(grad_y[i]), s[i], b[i]);
    sum_dy[i] += dy;
    sum_dy_xc[i] += bn_relu_dy_xc<opmath_t>(dy, xi, m[i]);
    const opmath_t contribution = s[i] * dy;
    out[i] = static_cast<scalar_t>(kAccumulate ? static_cast<opmath_t>(out[i]) + contribution : contribution);
  }
}

// The same along one pixel's channels of an NCHW activation, whose channels lie `x_stride` and
// `out_stride` apart in x and out: the pixel-major tiles of small NCHW maps (pixel_major_tiles).
template <bool kAccumulate, typename scalar_t>
inline void bn_relu_backward_strided_row(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ x,
                                         int64_t x_stride, scalar_t* __restrict__ out, int64_t out_stride, int64_t len,
                                         PerElement<at::opmath_type<scalar_t>> scale,
                                         PerElement<at::opmath_type<scalar_t>> shift,
                                         PerElement<at::opmath_type<scalar_t>> center, ChannelSums& sums) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < len; ++i) {
    const opmath_t xi = static_cast<opmath_t>(x[i * x_stride]);
    const opmath_t dy = bn_relu_dy<opmath_t>(xi, static_cast<opmath_t>(grad_y[i]), scale[i], shift[i]);
    sums.dy[i] += dy;
    sums.dy_xc[i] += bn_relu_dy_xc<opmath_t>(dy, xi, center[i]);
    const opmath_t contribution = scale[i] * dy;
    scalar_t& target = out[i * out_stride];
    target = static_cast<scalar_t>(kAccumulate ? static_cast<opmath_t>(target) + contribution : contribution);
  }
}

// Count, mean and m2 of a contiguous row, in two passes over it (it is in cache).
template <typename scalar_t>
inline Moments<double> row_moments(const scalar_t* __restrict__ row, int64_t len) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < len; ++i) sum += static_cast<double>(row[i]);
  const double mean = sum / static_cast<double>(len);
  double m2 = 0;
#pragma omp simd reduction(+ : m2)
  for (int64_t i = 0; i < len; ++i) {
    double d = static_cast<double>(row[i]) - mean;
    m2 += d * d;
  }
  return {static_cast<double>(len), mean, m2};
}

// Pixels per chunk of a channels_last statistics pass (a chunk's rows stay in cache).
constexpr int64_t kStatsChunkPixels = 64;

// Merges into out[c] the moments of channel c over rows [q0, q1) of a channels_last walk (row q's
// `channels` values at row(q)), `chunk` rows at a time: a chunk's means, then its squared
// deviations (the chunk is in cache), merged with Chan's formula. `sum` and `m2` are the caller's
// scratch, `channels` doubles each.
template <typename scalar_t, typename RowOf>
void add_pixel_rows_moments(const RowOf& row, int64_t q0, int64_t q1, int64_t channels, int64_t chunk,
                            Moments<double>* out, std::vector<double>& sum, std::vector<double>& m2) {
  for (int64_t c0 = q0; c0 < q1; c0 += chunk) {
    const int64_t c1 = std::min(q1, c0 + chunk);
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(m2.begin(), m2.end(), 0.0);
    for (int64_t q = c0; q < c1; ++q) {
      const scalar_t* __restrict__ r = row(q);
      for (int64_t c = 0; c < channels; ++c) sum[c] += static_cast<double>(r[c]);
    }
    const double count = static_cast<double>(c1 - c0);
    for (int64_t c = 0; c < channels; ++c) sum[c] /= count;  // now the chunk's mean
    for (int64_t q = c0; q < c1; ++q) {
      const scalar_t* __restrict__ r = row(q);
      for (int64_t c = 0; c < channels; ++c) {
        double d = static_cast<double>(r[c]) - sum[c];
        m2[c] += d * d;
      }
    }
    for (int64_t c = 0; c < channels; ++c) out[c] = moments_merge(out[c], Moments<double>{count, sum[c], m2[c]});
  }
}

}  // namespace cpu
}  // namespace densenet_fast
