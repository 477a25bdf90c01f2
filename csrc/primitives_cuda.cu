// CUDA kernels of the per-channel primitives: statistics, affine-ReLU, BN-ReLU backward and
// the batch-statistics gradient term, over a channel slice of an NCHW or channels_last buffer.
//
// The element arithmetic is bn_relu_math.h's, shared with the CPU kernels. Reductions are laid
// out the same way for both layouts: a block is (channels x values) threads, blockDim.x
// channels and blockDim.y values of each; the launcher picks (1 x 256) for NCHW, where a
// channel's pixels are adjacent, and (32 x 8) for channels_last, where neighbouring channels
// are, so loads coalesce in both. Each grid row (blockIdx.y) writes per-channel partial results
// that a second kernel merges in order: deterministic, no atomics.
//
// Index math. Every walk turns a flat index into (image, channel, pixel) and those into an
// element offset. With 64-bit integers each division is a call to a ~70-instruction routine per
// element; so when every offset and count of the op's tensors fits in 31 bits (all but huge
// activations) the kernels run on uint32_t with divisions by the fixed channel and pixel counts
// done by multiply-high and shift (ATen's IntDivider), and on int64_t otherwise (fits_32bit).
// c10's CUDA headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which a
// minimal CUDA toolkit (nvcc + runtime) doesn't ship.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <limits>

#include "dense_ops.h"

namespace densenet_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxSplits = 64;

int64_t multiprocessors() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

struct Launch {
  dim3 grid, block;
  int64_t splits;
};

// Block shape by layout and a grid of (channel groups x splits) that fills the GPU.
Launch reduction_launch(const ActivationLayout& l) {
  const dim3 block = l.channels_inner() ? dim3(32, kThreads / 32) : dim3(1, kThreads);
  const int64_t groups = (l.channels + block.x - 1) / block.x;
  const int64_t values = l.batch * l.pixels;
  const int64_t target_blocks = 4 * multiprocessors();
  int64_t splits = std::max<int64_t>(1, target_blocks / std::max<int64_t>(1, groups));
  splits = std::min<int64_t>({splits, kMaxSplits, std::max<int64_t>(1, (values + block.y - 1) / block.y)});
  return {dim3(static_cast<unsigned>(groups), static_cast<unsigned>(splits)), block, splits};
}

// Division by a count fixed for the launch: multiply-high and shift in 32 bits, plain in 64.
template <typename index_t>
struct Divider {
  index_t divisor;
  explicit Divider(index_t d) : divisor(d) {}
  __device__ index_t div(index_t n) const { return n / divisor; }
};

template <>
struct Divider<uint32_t> {
  at::cuda::detail::IntDivider<uint32_t> divider;
  explicit Divider(uint32_t d) : divider(d) {}
  __device__ uint32_t div(uint32_t n) const { return divider.div(n); }
};

// The device's view of an ActivationLayout in the walk's index type.
template <typename index_t>
struct Walk {
  index_t channels, pixels, batch_stride, channel_stride, pixel_stride;
  Divider<index_t> by_channels, by_pixels;

  explicit Walk(const ActivationLayout& l)
      : channels(static_cast<index_t>(l.channels)), pixels(static_cast<index_t>(l.pixels)),
        batch_stride(static_cast<index_t>(l.batch_stride)), channel_stride(static_cast<index_t>(l.channel_stride)),
        pixel_stride(static_cast<index_t>(l.pixel_stride)),
        by_channels(static_cast<index_t>(std::max<int64_t>(1, l.channels))),
        by_pixels(static_cast<index_t>(std::max<int64_t>(1, l.pixels))) {}

  __device__ index_t offset(index_t n, index_t c, index_t p) const {
    return n * batch_stride + c * channel_stride + p * pixel_stride;
  }
  // (image, pixel) of the i-th value of a channel, values ordered image-major.
  __device__ void value_index(index_t i, index_t& n, index_t& p) const {
    n = by_pixels.div(i);
    p = i - n * pixels;
  }
};

// Whether a layout's counts and element offsets all fit in 31 bits (so uint32_t math can't wrap,
// a grid-stride step included).
bool fits_32bit(const ActivationLayout& l) {
  constexpr int64_t limit = std::numeric_limits<int32_t>::max();
  const int64_t last = (l.batch - 1) * l.batch_stride + (l.channels - 1) * l.channel_stride +
                       (l.pixels - 1) * l.pixel_stride;
  return l.batch * l.channels * l.pixels < limit && last < limit;
}

// Runs f(index_t{}) with index_t = uint32_t when every layout fits in 31 bits, else int64_t.
template <typename F>
void with_index_type(std::initializer_list<ActivationLayout> layouts, F&& f) {
  bool small = true;
  for (const ActivationLayout& l : layouts) small = small && fits_32bit(l);
  if (small) {
    f(uint32_t{});
  } else {
    f(int64_t{});
  }
}

// Index of this thread's slot in a block's shared array: (threadIdx.y, threadIdx.x).
__device__ inline int shared_index(int y) { return y * blockDim.x + threadIdx.x; }

// Merges the blockDim.y partial moments of each channel into threadIdx.y == 0.
template <typename acc_t>
__device__ Moments<acc_t> merge_over_y(Moments<acc_t> m) {
  __shared__ Moments<acc_t> shared[kThreads];
  shared[shared_index(threadIdx.y)] = m;
  __syncthreads();
  for (int stride = blockDim.y / 2; stride > 0; stride /= 2) {
    if (threadIdx.y < stride) {
      shared[shared_index(threadIdx.y)] =
          moments_merge(shared[shared_index(threadIdx.y)], shared[shared_index(threadIdx.y + stride)]);
    }
    __syncthreads();
  }
  return shared[shared_index(0)];
}

// Sums the blockDim.y partial (a, b) pairs of each channel into threadIdx.y == 0.
template <typename acc_t>
__device__ BnReluGrad<acc_t> sum_over_y(BnReluGrad<acc_t> v) {
  __shared__ acc_t shared_a[kThreads];
  __shared__ acc_t shared_b[kThreads];
  shared_a[shared_index(threadIdx.y)] = v.dy;
  shared_b[shared_index(threadIdx.y)] = v.dy_xc;
  __syncthreads();
  for (int stride = blockDim.y / 2; stride > 0; stride /= 2) {
    if (threadIdx.y < stride) {
      shared_a[shared_index(threadIdx.y)] += shared_a[shared_index(threadIdx.y + stride)];
      shared_b[shared_index(threadIdx.y)] += shared_b[shared_index(threadIdx.y + stride)];
    }
    __syncthreads();
  }
  return {shared_a[shared_index(0)], shared_b[shared_index(0)]};
}

// Every value of channel c is taken relative to the channel's first value: float32 Welford
// then works on numbers of the size of the spread, not of the mean (x + 1e4 stays accurate).
template <typename scalar_t, typename acc_t>
__device__ inline acc_t channel_shift(const scalar_t* x, int64_t channel_offset) {
  return static_cast<acc_t>(x[channel_offset]);
}

// Welford over this thread's (shifted) values of channel c, merged per block: partial[split][c].
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void channel_moments_kernel(const scalar_t* __restrict__ x, Walk<index_t> l, index_t values,
                                       Moments<acc_t>* __restrict__ partial) {
  const index_t c = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  Moments<acc_t> m{0, 0, 0};
  if (c < l.channels) {
    const scalar_t* xc = x + c * l.channel_stride;
    const acc_t shift = channel_shift<scalar_t, acc_t>(xc, 0);
    const index_t step = static_cast<index_t>(gridDim.y) * blockDim.y;
    for (index_t i = static_cast<index_t>(blockIdx.y) * blockDim.y + threadIdx.y; i < values; i += step) {
      index_t n, p;
      l.value_index(i, n, p);
      m = moments_add(m, static_cast<acc_t>(xc[n * l.batch_stride + p * l.pixel_stride]) - shift);
    }
  }
  m = merge_over_y(m);
  if (threadIdx.y == 0 && c < l.channels) partial[blockIdx.y * l.channels + c] = m;
}

template <typename scalar_t, typename acc_t>
__global__ void merge_moments_kernel(const Moments<acc_t>* __restrict__ partial, int64_t splits,
                                     const scalar_t* __restrict__ x, ActivationLayout l, acc_t* __restrict__ mean,
                                     acc_t* __restrict__ var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t channels = l.channels;
  if (c >= channels) return;
  Moments<acc_t> m = partial[c];
  for (int64_t s = 1; s < splits; ++s) m = moments_merge(m, partial[s * channels + c]);
  mean[c] = channel_shift<scalar_t, acc_t>(x, c * l.channel_stride) + m.mean;
  var[c] = moments_variance(m);
}

// Mask, reductions and out (+)= scale * dy; partial[split][0 or 1][c].
template <bool kAccumulate, typename scalar_t, typename acc_t, typename index_t>
__global__ void bn_relu_backward_kernel(const scalar_t* grad_y, Walk<index_t> lgy, const scalar_t* __restrict__ x,
                                        Walk<index_t> lx, scalar_t* out, Walk<index_t> lo, index_t values,
                                        const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                                        const acc_t* __restrict__ center, acc_t* __restrict__ partial) {
  const index_t c = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  BnReluGrad<acc_t> sums{0, 0};
  if (c < lx.channels) {
    const acc_t s = scale[c], b = shift[c], m = center[c];
    const index_t step = static_cast<index_t>(gridDim.y) * blockDim.y;
    for (index_t i = static_cast<index_t>(blockIdx.y) * blockDim.y + threadIdx.y; i < values; i += step) {
      index_t n, p;
      lx.value_index(i, n, p);
      const acc_t xi = static_cast<acc_t>(x[lx.offset(n, c, p)]);
      const acc_t dy = bn_relu_dy<acc_t>(xi, static_cast<acc_t>(grad_y[lgy.offset(n, c, p)]), s, b);
      sums.dy += dy;
      sums.dy_xc += bn_relu_dy_xc<acc_t>(dy, xi, m);
      scalar_t* o = out + lo.offset(n, c, p);
      *o = static_cast<scalar_t>(kAccumulate ? static_cast<acc_t>(*o) + s * dy : s * dy);
    }
  }
  sums = sum_over_y(sums);
  if (threadIdx.y == 0 && c < lx.channels) {
    partial[(2 * blockIdx.y) * lx.channels + c] = sums.dy;
    partial[(2 * blockIdx.y + 1) * lx.channels + c] = sums.dy_xc;
  }
}

template <typename acc_t>
__global__ void merge_sums_kernel(const acc_t* __restrict__ partial, int64_t splits, int64_t channels,
                                  acc_t* __restrict__ sum_dy, acc_t* __restrict__ sum_dy_xc) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  acc_t a = 0, b = 0;
  for (int64_t s = 0; s < splits; ++s) {
    a += partial[(2 * s) * channels + c];
    b += partial[(2 * s + 1) * channels + c];
  }
  sum_dy[c] = a;
  sum_dy_xc[c] = b;
}

// (n, c, p) of the i-th element in the walk order of the layout (the contiguous axis fastest).
template <bool kChannelsInner, typename index_t>
__device__ inline void walk_index(const Walk<index_t>& l, index_t i, index_t& n, index_t& c, index_t& p) {
  if (kChannelsInner) {
    const index_t q = l.by_channels.div(i);
    c = i - q * l.channels;
    n = l.by_pixels.div(q);
    p = q - n * l.pixels;
  } else {
    const index_t q = l.by_pixels.div(i);
    p = i - q * l.pixels;
    n = l.by_channels.div(q);
    c = q - n * l.channels;
  }
}

template <bool kChannelsInner, typename scalar_t, typename acc_t, typename index_t>
__global__ void affine_relu_kernel(const scalar_t* __restrict__ x, Walk<index_t> lx, scalar_t* __restrict__ y,
                                   Walk<index_t> ly, const acc_t* __restrict__ scale,
                                   const acc_t* __restrict__ shift, index_t total) {
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    index_t n, c, p;
    walk_index<kChannelsInner>(lx, i, n, c, p);
    y[ly.offset(n, c, p)] =
        static_cast<scalar_t>(affine_relu<acc_t>(static_cast<acc_t>(x[lx.offset(n, c, p)]), scale[c], shift[c]));
  }
}

template <bool kChannelsInner, typename scalar_t, typename acc_t, typename index_t>
__global__ void bn_grad_finalize_kernel(scalar_t* __restrict__ grad_x, Walk<index_t> lg,
                                        const scalar_t* __restrict__ x, Walk<index_t> lx,
                                        const acc_t* __restrict__ center, const acc_t* __restrict__ coef_x,
                                        const acc_t* __restrict__ coef_c, index_t total) {
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    index_t n, c, p;
    walk_index<kChannelsInner>(lx, i, n, c, p);
    scalar_t* g = grad_x + lg.offset(n, c, p);
    *g = static_cast<scalar_t>(static_cast<acc_t>(*g) + batch_stats_grad<acc_t>(static_cast<acc_t>(x[lx.offset(n, c, p)]),
                                                                             center[c], coef_x[c], coef_c[c]));
  }
}

unsigned elementwise_blocks(int64_t total) {
  const int64_t max_blocks = 32 * multiprocessors();
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(max_blocks, (total + kThreads - 1) / kThreads)));
}

unsigned vector_blocks(int64_t channels) { return static_cast<unsigned>((channels + kThreads - 1) / kThreads); }

}  // namespace

std::tuple<Tensor, Tensor> channel_stats_cuda(const Tensor& x) {
  c10::cuda::CUDAGuard guard(x.device());
  const ActivationLayout l = activation_layout(x, "x");
  auto stats_options = x.options().dtype(stats_dtype(x.scalar_type()));
  Tensor mean = at::empty({l.channels}, stats_options), var = at::empty({l.channels}, stats_options);
  if (l.channels == 0) return {mean, var};
  const Launch launch = reduction_launch(l);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    // Partial moments as raw bytes: three acc_t per (split, channel).
    Tensor partial = at::empty({launch.splits * l.channels * 3}, stats_options);
    auto* partial_ptr = reinterpret_cast<Moments<acc_t>*>(partial.mutable_data_ptr<acc_t>());
    with_index_type({l}, [&](auto index) {
      using index_t = decltype(index);
      channel_moments_kernel<scalar_t, acc_t, index_t><<<launch.grid, launch.block, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), Walk<index_t>(l), static_cast<index_t>(l.batch * l.pixels), partial_ptr);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    merge_moments_kernel<scalar_t, acc_t><<<vector_blocks(l.channels), kThreads, 0, stream>>>(
        partial_ptr, launch.splits, x.const_data_ptr<scalar_t>(), l, mean.mutable_data_ptr<acc_t>(),
        var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

void affine_relu_cuda_out(const Tensor& x, const Tensor& scale, const Tensor& shift, const Tensor& y) {
  c10::cuda::CUDAGuard guard(x.device());
  const ActivationLayout lx = activation_layout(x, "x"), ly = activation_layout(y, "y");
  const int64_t total = x.numel();
  if (total == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_relu_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const acc_t* sc = scale.const_data_ptr<acc_t>();
    const acc_t* sh = shift.const_data_ptr<acc_t>();
    with_index_type({lx, ly}, [&](auto index) {
      using index_t = decltype(index);
      const Walk<index_t> wx(lx), wy(ly);
      const auto n = static_cast<index_t>(total);
      if (lx.channels_inner()) {
        affine_relu_kernel<true, scalar_t, acc_t, index_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
            xp, wx, yp, wy, sc, sh, n);
      } else {
        affine_relu_kernel<false, scalar_t, acc_t, index_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
            xp, wx, yp, wy, sc, sh, n);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<Tensor, Tensor> bn_relu_backward_cuda_out(const Tensor& grad_y, const Tensor& x, const Tensor& scale,
                                                     const Tensor& shift, const Tensor& center, const Tensor& grad_x,
                                                     bool accumulate) {
  c10::cuda::CUDAGuard guard(x.device());
  const ActivationLayout lx = activation_layout(x, "x"), lgy = activation_layout(grad_y, "grad_y"),
                         lo = activation_layout(grad_x, "grad_x");
  auto stats_options = x.options().dtype(stats_dtype(x.scalar_type()));
  Tensor sum_dy = at::zeros({lx.channels}, stats_options), sum_dy_xc = at::zeros({lx.channels}, stats_options);
  if (lx.channels == 0 || lx.batch * lx.pixels == 0) return {sum_dy, sum_dy_xc};
  const Launch launch = reduction_launch(lx);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    Tensor partial = at::empty({2 * launch.splits * lx.channels}, stats_options);
    acc_t* partial_ptr = partial.mutable_data_ptr<acc_t>();
    // grad_x may be grad_y itself (in place): each element is read before it is written.
    const scalar_t* gy = grad_y.const_data_ptr<scalar_t>();
    scalar_t* out = grad_x.data_ptr<scalar_t>();
    with_index_type({lx, lgy, lo}, [&](auto index) {
      using index_t = decltype(index);
      const Walk<index_t> wx(lx), wgy(lgy), wo(lo);
      const auto values = static_cast<index_t>(lx.batch * lx.pixels);
      if (accumulate) {
        bn_relu_backward_kernel<true, scalar_t, acc_t, index_t><<<launch.grid, launch.block, 0, stream>>>(
            gy, wgy, x.const_data_ptr<scalar_t>(), wx, out, wo, values, scale.const_data_ptr<acc_t>(),
            shift.const_data_ptr<acc_t>(), center.const_data_ptr<acc_t>(), partial_ptr);
      } else {
        bn_relu_backward_kernel<false, scalar_t, acc_t, index_t><<<launch.grid, launch.block, 0, stream>>>(
            gy, wgy, x.const_data_ptr<scalar_t>(), wx, out, wo, values, scale.const_data_ptr<acc_t>(),
            shift.const_data_ptr<acc_t>(), center.const_data_ptr<acc_t>(), partial_ptr);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    merge_sums_kernel<acc_t><<<vector_blocks(lx.channels), kThreads, 0, stream>>>(
        partial_ptr, launch.splits, lx.channels, sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xc.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_dy, sum_dy_xc};
}

void bn_grad_finalize_cuda(const Tensor& grad_x, const Tensor& x, const Tensor& center, const Tensor& coef_x,
                           const Tensor& coef_c) {
  c10::cuda::CUDAGuard guard(x.device());
  const ActivationLayout lx = activation_layout(x, "x"), lg = activation_layout(grad_x, "grad_x");
  const int64_t total = x.numel();
  if (total == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_grad_finalize_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    scalar_t* gp = grad_x.mutable_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t *m = center.const_data_ptr<acc_t>(), *a = coef_x.const_data_ptr<acc_t>(), *b = coef_c.const_data_ptr<acc_t>();
    with_index_type({lx, lg}, [&](auto index) {
      using index_t = decltype(index);
      const Walk<index_t> wx(lx), wg(lg);
      const auto n = static_cast<index_t>(total);
      if (lx.channels_inner()) {
        bn_grad_finalize_kernel<true, scalar_t, acc_t, index_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
            gp, wg, xp, wx, m, a, b, n);
      } else {
        bn_grad_finalize_kernel<false, scalar_t, acc_t, index_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
            gp, wg, xp, wx, m, a, b, n);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace densenet_fast
