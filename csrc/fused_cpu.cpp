// The fused layer ops on CPU: BN-ReLU prologues recomputed tile by tile next to ATen's GEMMs.
//
// A tile is a run of pixels of one image, or several whole images where an image is smaller
// than a tile (the small maps of late blocks: one GEMM over 4 images of 2x2 pixels runs about 9x
// faster than four 4-column ones). Its normalized activations relu(x * scale + shift) are
// written into a per-thread buffer of about kTileElements and multiplied through at::mm (ATen's
// BLAS; why not oneDNN's 1x1 convolution: below bottleneck_format), so the only transient the
// size of the input is one tile per thread. Tiles are split into one contiguous slot per thread;
// each slot keeps its partial sums (and weight gradient) and the slots are merged in order, so
// results don't depend on scheduling. ATen's GEMM runs single-threaded inside the slots
// (MKL/OpenBLAS don't nest inside an OpenMP region), and on all threads where a whole small batch
// is one tile (one slot, run by the caller).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "cpu_loops.h"
#include "dense_ops.h"

namespace densenet_fast {

using namespace cpu;

namespace {

// Normalized activations per tile buffer (512 KiB of float32: stays in L2 next to the GEMM).
constexpr int64_t kTileElements = 1 << 17;
constexpr int64_t kMinTilePixels = 256;
// Normalized activations per chunk of images for the 3x3 conv, which ATen runs whole.
constexpr int64_t kChunkElements = 1 << 21;

// acc += a @ b, the first product allocating acc (a slot's weight gradient over its tiles).
void add_matmul(Tensor& acc, const Tensor& a, const Tensor& b) {
  if (!acc.defined()) {
    acc = at::mm(a, b);
  } else {
    acc.addmm_(a, b);
  }
}

// The input gradient of a tile of fewer pixels than this runs 3x faster in MKL computed
// transposed, as (b^T @ a^T)^T with the pixels as the product's rows: measured at 8 pixels for
// the late blocks' and transitions' shapes (from 32 pixels on, both orientations take the same
// time). The weight gradient gains too, but its transpose back costs what it gains.
constexpr int64_t kNarrowPixels = 32;

// out = a @ b, where b's columns are a tile's pixels.
void tile_mm_out(const Tensor& out, const Tensor& a, const Tensor& b) {
  Tensor out_t = out.t();
  if (b.size(1) >= kNarrowPixels) {
    Tensor target = out;
    at::mm_out(target, a, b);
  } else if (out_t.is_contiguous()) {
    at::mm_out(out_t, b.t(), a.t());
  } else {
    out.copy_(at::mm(b.t(), a.t()).t());
  }
}

// (C, P) matrix of image n of a 4-D activation: the operand/result the GEMMs see.
Tensor image_matrix(const Tensor& t, const ActivationLayout& l, int64_t n) {
  return t.as_strided({l.channels, l.pixels}, {l.channel_stride, l.pixel_stride}, t.storage_offset() + n * l.batch_stride);
}

// Split of a batch into tiles: runs of consecutive units (pixels, or output rows for the pooling
// transition) of one image, `per_image` equal parts per image; or, with `per_image` 1, `images`
// whole consecutive images per tile (the last tile may hold fewer).
struct Tiles {
  int64_t units, per_image, images, batch;
  int64_t count() const { return per_image > 1 ? batch * per_image : (batch + images - 1) / images; }
  int64_t first_image(int64_t t) const { return per_image > 1 ? t / per_image : t * images; }
  int64_t image_count(int64_t t) const { return per_image > 1 ? 1 : std::min(images, batch - t * images); }
  // Units [begin, end) of each image of tile t.
  int64_t begin(int64_t t) const { return units * (t % per_image) / per_image; }
  int64_t end(int64_t t) const { return units * (t % per_image + 1) / per_image; }
  // Units of the largest tile, its images together.
  int64_t max_length() const { return (units + per_image - 1) / per_image * images; }
};

// Tiles of about kTileElements, but at least kMinTilePixels pixels wide: narrower GEMMs (deep
// layers have ~1000 channels) lose more to packing than the smaller buffer saves. Images smaller
// than that are grouped: all of them into one tile where they fit, else a tile for each thread.
// An empty batch, or images of no unit, give no tile.
Tiles make_tiles(int64_t units, int64_t elements_per_unit, int64_t pixels_per_unit, int64_t batch) {
  if (units == 0 || batch == 0) return {units, 1, 1, 0};
  const int64_t min_units = (kMinTilePixels + pixels_per_unit - 1) / pixels_per_unit;
  const int64_t per_tile =
      std::max<int64_t>(min_units, kTileElements / std::max<int64_t>(1, elements_per_unit));
  const int64_t per_image = std::max<int64_t>(1, (units + per_tile - 1) / per_tile);
  int64_t images = 1;
  if (per_image == 1 && units * batch <= per_tile) {
    // The whole batch fits one tile: one GEMM, run on all threads (outside any slot). Split
    // into a tile per thread, each GEMM would read the whole weight for a few columns.
    images = batch;
  } else if (per_image == 1 && batch > 1) {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    images = std::max<int64_t>(1, std::min(per_tile / units, (batch + threads - 1) / threads));
  }
  return {units, per_image, images, batch};
}

// The (C, count * length) matrix of units' pixels [p0, p0 + length) of images [n, n + count) of a
// 4-D activation where that is one strided matrix (one image, or images whose pixels follow on,
// as channels_last ones do), else an undefined tensor (count > 1 implies whole images).
Tensor tile_matrix(const Tensor& t, const ActivationLayout& l, int64_t n, int64_t count, int64_t p0, int64_t length) {
  if (count == 1) return image_matrix(t, l, n).narrow(1, p0, length);
  if (l.batch_stride != l.pixels * l.pixel_stride) return Tensor();
  return t.as_strided({l.channels, count * l.pixels}, {l.channel_stride, l.pixel_stride},
                      t.storage_offset() + n * l.batch_stride);
}

// Images [n, n + count) of a 4-D activation as a (count, C, P) view: the images of a tile that
// is not one matrix, moved in one copy (a copy per image cost about 3 us each in the late blocks).
Tensor images_of(const Tensor& t, const ActivationLayout& l, int64_t n, int64_t count) {
  return t.as_strided({count, l.channels, l.pixels}, {l.batch_stride, l.channel_stride, l.pixel_stride},
                      t.storage_offset() + n * l.batch_stride);
}

// A tile of an operand: a view where it is one matrix, else its images side by side (a copy).
Tensor gather_tile(const Tensor& t, const ActivationLayout& l, int64_t n, int64_t count, int64_t p0, int64_t length) {
  Tensor m = tile_matrix(t, l, n, count, p0, length);
  if (m.defined()) return m;
  return images_of(t, l, n, count).permute({1, 0, 2}).reshape({l.channels, count * l.pixels});
}

// a @ b written into a tile of `t`, through a temporary where the tile is not one matrix.
void mm_into_tile(const Tensor& t, const ActivationLayout& l, int64_t n, int64_t count, int64_t p0, int64_t length,
                  const Tensor& a, const Tensor& b) {
  Tensor m = tile_matrix(t, l, n, count, p0, length);
  if (m.defined()) {
    at::mm_out(m, a, b);
    return;
  }
  Tensor product = at::mm(a, b);
  images_of(t, l, n, count).copy_(product.view({a.size(0), count, l.pixels}).permute({1, 0, 2}));
}

// The bottleneck's layout changes from this many output channels on (bottleneck_format).
constexpr int64_t kChannelsLastMinOutChannels = 64;

// The layout of a fused conv1x1's output, the bottleneck z: channels_last in float32 from
// kChannelsLastMinOutChannels outputs. The 3x3 convolution that reads z then runs channels_last in
// oneDNN (DenseNet-121's, forward and backward at batch 8: 1.1x and 1.4x faster at 56x56 than NCHW,
// 1.3x and 2.8x at 28x28); the tiles' GEMMs write it as the transposed product, and the conv1x1
// backward's tiles of grad_z come pixel-major. (DenseNet-BC k=12's 48-channel bottlenecks stay
// NCHW: the threshold dates from oneDNN's GEMMs and was not measured again with MKL's.) A rule
// of dtype and channels only, so the fake implementation (densenet_fast/ops/extension_ops.py)
// states the same strides whatever the thread count.
at::MemoryFormat bottleneck_format(at::ScalarType dtype, int64_t out_channels) {
  return dtype == at::kFloat && out_channels >= kChannelsLastMinOutChannels ? at::MemoryFormat::ChannelsLast
                                                                            : at::MemoryFormat::Contiguous;
}

// The tiles' GEMMs are MKL's (at::mm), also in float32 parallel slots. Until 2026-12-03 those ran
// through oneDNN's 1x1 convolution of a pixel-major tile (then measured 1.1-1.9x faster than MKL
// with NCHW bottlenecks). Once z was channels_last, MKL's transposed product lands in z with no
// copy and an NCHW tile needs no transposing fill: DenseNet-121 at 224x224, batch 8, steps ran
// 0.90x against oneDNN's 1.01x torchvision's (medians of 7 interleaved steps in one process; the
// blocks 4-20% faster, blocks 3 and 4 the most), and 0.90x to 1.00x per block at 32x32, batch 64.

// NCHW maps of at most this many pixels are walked pixel-major in the conv1x1 ops' tiles (the
// normalized activations and the input gradient's product): walked as NCHW, a tile of a batch of
// 2x2 maps is a row of 4 pixels per channel and image (8192 rows per call in DenseNet-121's block
// 3 at 32x32, batch 8), each paying a loop's set-up for a few elements.
constexpr int64_t kPixelMajorPixels = 16;
bool pixel_major_tiles(const ActivationLayout& l) { return !l.channels_inner() && l.pixels <= kPixelMajorPixels; }

// A thread's tile of normalized activations, C x length, laid out like the input walks
// (rows of pixels per channel for NCHW, rows of channels per pixel for channels_last), or
// pixel-major whatever the input (channels_inner; small NCHW maps, see pixel_major_tiles).
struct TileBuffer {
  Tensor storage;
  bool channels_inner;
  int64_t channels, capacity;
  // storage's data, taken once: the small maps' loops ask for a row per channel and image (8192
  // rows of 4 pixels per call in DenseNet-121's block 3 at 32x32), and each mutable_data_ptr()
  // call checks the tensor again.
  void* data;

  TileBuffer(const Tensor& like, bool ci, int64_t c, int64_t cap)
      : storage(ci ? at::empty({cap, c}, like.options()) : at::empty({c, cap}, like.options())),
        channels_inner(ci), channels(c), capacity(cap), data(storage.mutable_data_ptr()) {}
  // The C x length matrix of the first `length` pixels.
  Tensor matrix(int64_t length) const {
    return channels_inner ? storage.narrow(0, 0, length).t() : storage.narrow(1, 0, length);
  }
  template <typename scalar_t>
  scalar_t* row(int64_t r) const {
    return static_cast<scalar_t*>(data) + r * (channels_inner ? channels : capacity);
  }
};

// Per-slot channel sums of a backward, merged in slot order at the end.
struct SlotSums {
  int64_t channels;
  std::vector<double> data;
  SlotSums(int64_t slots, int64_t c) : channels(c), data(2 * slots * c, 0.0) {}
  ChannelSums slot(int64_t s) { return {data.data() + 2 * s * channels, data.data() + (2 * s + 1) * channels}; }
  // The sums over slots (in slot order, in double), as tensors of the statistics dtype.
  std::tuple<Tensor, Tensor> totals(const Tensor& x) const {
    const int64_t slots = static_cast<int64_t>(data.size()) / (2 * channels);
    auto options = x.options().dtype(stats_dtype(x.scalar_type()));
    Tensor dy = at::empty({channels}, options), dy_xc = at::empty({channels}, options);
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "slot_sums_totals", [&] {
      scalar_t* a = dy.mutable_data_ptr<scalar_t>();
      scalar_t* b = dy_xc.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < channels; ++c) {
        double sum_a = 0, sum_b = 0;
        for (int64_t s = 0; s < slots; ++s) {
          sum_a += data[2 * s * channels + c];
          sum_b += data[(2 * s + 1) * channels + c];
        }
        a[c] = static_cast<scalar_t>(sum_a);
        b[c] = static_cast<scalar_t>(sum_b);
      }
    });
    return {dy, dy_xc};
  }
};

// Adds one row's RowSums into a slot's per-channel sums.
inline void add_row_sums(ChannelSums& slot, int64_t c, const RowSums& row) {
  slot.dy[c] += row.dy;
  slot.dy_xc[c] += row.dy_xc;
}

// Normalizes pixels [p0, p0 + length) of image n of x into `buf`, from its pixel `at` on.
template <typename scalar_t>
void fill_tile(const TileBuffer& buf, const Tensor& x, const ActivationLayout& l, int64_t n, int64_t p0, int64_t length,
               const Tensor& scale, const Tensor& shift, int64_t at) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const opmath_t* sc = scale.const_data_ptr<opmath_t>();
  const opmath_t* sh = shift.const_data_ptr<opmath_t>();
  if (buf.channels_inner && l.channels_inner()) {
    for (int64_t j = 0; j < length; ++j) {
      affine_relu_row(xd + row_offset(l, true, n, p0 + j), buf.row<scalar_t>(at + j), l.channels,
                      PerElement<opmath_t>{sc}, PerElement<opmath_t>{sh});
    }
  } else if (buf.channels_inner) {
    // NCHW into a pixel-major tile: blocks of channels read side by side, so that each pixel's
    // writes fill whole cache lines.
    constexpr int64_t kBlock = 16;
    scalar_t* out = buf.row<scalar_t>(at);
    for (int64_t c0 = 0; c0 < l.channels; c0 += kBlock) {
      const int64_t c1 = std::min(l.channels, c0 + kBlock);
      for (int64_t j = 0; j < length; ++j) {
        scalar_t* y = out + j * buf.channels;
        for (int64_t c = c0; c < c1; ++c) {
          y[c] = static_cast<scalar_t>(
              affine_relu<opmath_t>(static_cast<opmath_t>(xd[row_offset(l, false, n, c) + p0 + j]), sc[c], sh[c]));
        }
      }
    }
  } else {
    for (int64_t c = 0; c < l.channels; ++c) {
      affine_relu_row(xd + row_offset(l, false, n, c) + p0, buf.row<scalar_t>(c) + at, length,
                      Broadcast<opmath_t>{sc[c]}, Broadcast<opmath_t>{sh[c]});
    }
  }
}

// Mask, reductions and grad_x (+)= scale * dy for pixels [p0, p0 + length) of image n, where
// `dy_buf` holds the ReLU output's gradient of those pixels from its pixel `at` on.
template <bool kAccumulate, typename scalar_t>
void backward_tile(const TileBuffer& dy_buf, const Tensor& x, const ActivationLayout& lx, const Tensor& grad_x,
                   const ActivationLayout& lg, int64_t n, int64_t p0, int64_t length, const Tensor& scale,
                   const Tensor& shift, const Tensor& center, ChannelSums& sums, int64_t at) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  scalar_t* gd = grad_x.mutable_data_ptr<scalar_t>();
  const opmath_t* sc = scale.const_data_ptr<opmath_t>();
  const opmath_t* sh = shift.const_data_ptr<opmath_t>();
  const opmath_t* ce = center.const_data_ptr<opmath_t>();
  if (dy_buf.channels_inner && lx.channels_inner()) {
    for (int64_t j = 0; j < length; ++j) {
      bn_relu_backward_row<kAccumulate>(dy_buf.row<scalar_t>(at + j), xd + row_offset(lx, true, n, p0 + j),
                                        gd + row_offset(lg, true, n, p0 + j), lx.channels, PerElement<opmath_t>{sc},
                                        PerElement<opmath_t>{sh}, PerElement<opmath_t>{ce}, sums);
    }
  } else if (dy_buf.channels_inner) {  // a pixel-major tile of NCHW x (pixel_major_tiles)
    for (int64_t j = 0; j < length; ++j) {
      bn_relu_backward_strided_row<kAccumulate>(
          dy_buf.row<scalar_t>(at + j), xd + row_offset(lx, true, n, p0 + j), lx.channel_stride,
          gd + row_offset(lg, true, n, p0 + j), lg.channel_stride, lx.channels, PerElement<opmath_t>{sc},
          PerElement<opmath_t>{sh}, PerElement<opmath_t>{ce}, sums);
    }
  } else {
    for (int64_t c = 0; c < lx.channels; ++c) {
      RowSums row;
      bn_relu_backward_row<kAccumulate>(dy_buf.row<scalar_t>(c) + at, xd + row_offset(lx, false, n, c) + p0,
                                        gd + row_offset(lg, false, n, c) + p0, length, Broadcast<opmath_t>{sc[c]},
                                        Broadcast<opmath_t>{sh[c]}, Broadcast<opmath_t>{ce[c]}, row);
      add_row_sums(sums, c, row);
    }
  }
}

// Normalizes and 2x2-average-pools output rows [r0, r1) of image n of x into `buf` from its
// output pixel `at` on, with the terms summed in avg_pool2d's order ((0,0), (0,1), (1,0), (1,1)).
template <typename scalar_t>
void fill_pooled_tile(const TileBuffer& buf, const Tensor& x, const ActivationLayout& l, int64_t n, int64_t r0,
                      int64_t r1, const Tensor& scale, const Tensor& shift, int64_t at) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t width = x.size(3), out_width = width / 2;
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const opmath_t* sc = scale.const_data_ptr<opmath_t>();
  const opmath_t* sh = shift.const_data_ptr<opmath_t>();
  const opmath_t quarter = opmath_t(0.25);
  if (buf.channels_inner) {
    const int64_t sw = l.pixel_stride, sh_row = width * l.pixel_stride;
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t wo = 0; wo < out_width; ++wo) {
        const scalar_t* __restrict__ a = xd + row_offset(l, true, n, 2 * r * width + 2 * wo);
        scalar_t* __restrict__ y = buf.row<scalar_t>(at + (r - r0) * out_width + wo);
        for (int64_t c = 0; c < l.channels; ++c) {
          opmath_t sum = affine_relu<opmath_t>(static_cast<opmath_t>(a[c]), sc[c], sh[c]) +
                         affine_relu<opmath_t>(static_cast<opmath_t>(a[c + sw]), sc[c], sh[c]) +
                         affine_relu<opmath_t>(static_cast<opmath_t>(a[c + sh_row]), sc[c], sh[c]) +
                         affine_relu<opmath_t>(static_cast<opmath_t>(a[c + sh_row + sw]), sc[c], sh[c]);
          y[c] = static_cast<scalar_t>(sum * quarter);
        }
      }
    }
  } else {
    for (int64_t c = 0; c < l.channels; ++c) {
      const opmath_t s = sc[c], b = sh[c];
      const scalar_t* base = xd + row_offset(l, false, n, c);
      scalar_t* __restrict__ y = buf.row<scalar_t>(c) + at;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* __restrict__ top = base + 2 * r * width;
        const scalar_t* __restrict__ bottom = top + width;
        scalar_t* __restrict__ yr = y + (r - r0) * out_width;
        for (int64_t wo = 0; wo < out_width; ++wo) {
          opmath_t sum = affine_relu<opmath_t>(static_cast<opmath_t>(top[2 * wo]), s, b) +
                         affine_relu<opmath_t>(static_cast<opmath_t>(top[2 * wo + 1]), s, b) +
                         affine_relu<opmath_t>(static_cast<opmath_t>(bottom[2 * wo]), s, b) +
                         affine_relu<opmath_t>(static_cast<opmath_t>(bottom[2 * wo + 1]), s, b);
          yr[wo] = static_cast<scalar_t>(sum * quarter);
        }
      }
    }
  }
}

// BN-ReLU backward of the input rows under output rows [r0, r1) of image n (plus the unpooled
// last row of an odd height when r1 is the last output row). `dpool_buf` holds the pooled
// gradient already divided by 4 from its output pixel `at` on; pixels outside the 2x2 windows get dy = 0.
template <bool kAccumulate, typename scalar_t>
void pooled_backward_tile(const TileBuffer& dpool_buf, std::vector<scalar_t>& scratch, const Tensor& x,
                          const ActivationLayout& lx, const Tensor& grad_x, const ActivationLayout& lg, int64_t n,
                          int64_t r0, int64_t r1, const Tensor& scale, const Tensor& shift, const Tensor& center,
                          ChannelSums& sums, int64_t at) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t height = x.size(2), width = x.size(3), out_height = height / 2, out_width = width / 2;
  const int64_t h0 = 2 * r0, h1 = r1 == out_height ? height : 2 * r1;
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  scalar_t* gd = grad_x.mutable_data_ptr<scalar_t>();
  const opmath_t* sc = scale.const_data_ptr<opmath_t>();
  const opmath_t* sh = shift.const_data_ptr<opmath_t>();
  const opmath_t* ce = center.const_data_ptr<opmath_t>();
  if (dpool_buf.channels_inner) {
    std::fill(scratch.begin(), scratch.end(), scalar_t(0));  // the gradient of unpooled pixels
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t w = 0; w < width; ++w) {
        const bool pooled = h < 2 * out_height && w < 2 * out_width;
        const scalar_t* dy = pooled ? dpool_buf.row<scalar_t>(at + (h / 2 - r0) * out_width + w / 2) : scratch.data();
        const int64_t p = h * width + w;
        bn_relu_backward_row<kAccumulate>(dy, xd + row_offset(lx, true, n, p), gd + row_offset(lg, true, n, p),
                                          lx.channels, PerElement<opmath_t>{sc}, PerElement<opmath_t>{sh},
                                          PerElement<opmath_t>{ce}, sums);
      }
    }
    return;
  }
  for (int64_t c = 0; c < lx.channels; ++c) {
    const scalar_t* dpool = dpool_buf.row<scalar_t>(c) + at;
    RowSums row;
    for (int64_t h = h0; h < h1; ++h) {
      // This input row's dy: each pooled value spread over its two columns.
      if (h < 2 * out_height) {
        const scalar_t* src = dpool + (h / 2 - r0) * out_width;
        for (int64_t w = 0; w < 2 * out_width; ++w) scratch[w] = src[w / 2];
        for (int64_t w = 2 * out_width; w < width; ++w) scratch[w] = scalar_t(0);
      } else {
        std::fill(scratch.begin(), scratch.begin() + width, scalar_t(0));
      }
      const int64_t offset = h * width;
      bn_relu_backward_row<kAccumulate>(scratch.data(), xd + row_offset(lx, false, n, c) + offset,
                                        gd + row_offset(lg, false, n, c) + offset, width, Broadcast<opmath_t>{sc[c]},
                                        Broadcast<opmath_t>{sh[c]}, Broadcast<opmath_t>{ce[c]}, row);
    }
    add_row_sums(sums, c, row);
  }
}

// A 3x3 convolution (padding 1) of maps of at most 2x2 pixels is one dense GEMM: every output
// pixel meets every input pixel, each through its own tap (1x1 maps: only the center tap), so
// the convolution of an image is its C_in*P values (P pixels) times a (C_in*P) x (C_out*P)
// matrix made of the 3x3 weight (`small_map_matrix`). oneDNN runs the whole 3x3 convolution with
// its padding. In DenseNet-121 at 32x32, batch 8: block 3's 2x2 maps (C_in 128, C_out 32) took
// about 275 us a forward convolution in oneDNN and 46 us as this GEMM, 750 us a backward (both
// gradients) and about 130 us as GEMMs; block 4's 1x1 maps went from about 105 to 62 us forward
// and 223 to 70 us backward.
bool small_map(const Tensor& t) { return t.size(2) <= 2 && t.size(3) <= 2; }

// Where (channel c, pixel p) of an image sits in its row of C*P values, in memory order.
inline int64_t map_index(int64_t c, int64_t p, int64_t channels, int64_t pixels, bool channels_inner) {
  return channels_inner ? p * channels + c : c * pixels + p;
}

// Calls f(row, column, k) for every entry of the small-map matrix: row (input channel ci, pixel
// p) and column (output channel co, pixel q) hold weight[co][ci] at tap (p - q + (1, 1)), entry k
// of the weight transposed to (C_in, 3, 3, C_out). Rows outer and output channels inner, so that
// both the matrix and the transposed weight are walked in memory order (walked in the weight's
// order, a 2x2 block-3 matrix took about 300 us to build).
template <typename F>
void for_each_small_map_entry(int64_t in_channels, int64_t out_channels, int64_t height, int64_t width,
                              bool channels_inner, const F& f) {
  const int64_t pixels = height * width;
  for (int64_t ci = 0; ci < in_channels; ++ci) {
    for (int64_t p = 0; p < pixels; ++p) {
      const int64_t row = map_index(ci, p, in_channels, pixels, channels_inner);
      for (int64_t q = 0; q < pixels; ++q) {
        const int64_t tap = (p / width - q / width + 1) * 3 + (p % width - q % width + 1);
        const int64_t k0 = (ci * 9 + tap) * out_channels;
        for (int64_t co = 0; co < out_channels; ++co) f(row, map_index(co, q, out_channels, pixels, channels_inner), k0 + co);
      }
    }
  }
}

// The (C_in*P) x (C_out*P) matrix of a 3x3 convolution of height x width maps (both <= 2).
Tensor small_map_matrix(const Tensor& weight, int64_t height, int64_t width, bool channels_inner) {
  const Tensor w = weight.permute({1, 2, 3, 0}).contiguous();  // (C_in, 3, 3, C_out)
  const int64_t in_channels = w.size(0), out_channels = w.size(3), pixels = height * width;
  Tensor matrix = at::empty({in_channels * pixels, out_channels * pixels}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "small_map_matrix", [&] {
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    scalar_t* dst = matrix.mutable_data_ptr<scalar_t>();
    const int64_t columns = out_channels * pixels;
    for_each_small_map_entry(in_channels, out_channels, height, width, channels_inner,
                             [&](int64_t r, int64_t c, int64_t k) { dst[r * columns + c] = src[k]; });
  });
  return matrix;
}

// grad_weight += the 3x3 weight gradient of a small-map matrix gradient.
void add_small_map_grad(Tensor& grad_weight, const Tensor& matrix_grad, int64_t height, int64_t width,
                        bool channels_inner) {
  const Tensor g = matrix_grad.contiguous();
  const int64_t out_channels = grad_weight.size(0), in_channels = grad_weight.size(1);
  Tensor folded = at::zeros({in_channels, 3, 3, out_channels}, grad_weight.options());  // transposed, as walked
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "add_small_map_grad", [&] {
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    scalar_t* dst = folded.mutable_data_ptr<scalar_t>();
    const int64_t columns = g.size(1);
    for_each_small_map_entry(in_channels, out_channels, height, width, channels_inner,
                             [&](int64_t r, int64_t c, int64_t k) { dst[k] += src[r * columns + c]; });
  });
  grad_weight.add_(folded.permute({3, 0, 1, 2}));
}

// An activation as one row of C*P values per image, in memory order (a view where it can be).
Tensor map_rows(const Tensor& t, bool channels_inner) {
  return (channels_inner ? t.permute({0, 2, 3, 1}) : t).reshape({t.size(0), -1});
}

// Rows of C*P values back as (N, C, H, W) maps.
Tensor rows_as_map(const Tensor& rows, int64_t channels, int64_t height, int64_t width, bool channels_inner) {
  if (channels_inner) return rows.view({rows.size(0), height, width, channels}).permute({0, 3, 1, 2});
  return rows.view({rows.size(0), channels, height, width});
}

// The 3x3 convolution's forward of activations y; `matrix` is y's small-map matrix, or undefined.
Tensor conv3x3(const Tensor& y, const Tensor& weight, const Tensor& matrix, bool channels_inner) {
  if (!matrix.defined()) return at::conv2d(y, weight, {}, 1, 1);
  return rows_as_map(at::mm(map_rows(y, channels_inner), matrix), weight.size(0), y.size(2), y.size(3),
                     channels_inner);
}

// Sum of per-slot weight gradients, in slot order.
Tensor merge_weight_grads(const std::vector<Tensor>& parts, const Tensor& weight) {
  if (parts.size() == 1 && parts[0].defined() && parts[0].is_contiguous()) return parts[0].view(weight.sizes());
  Tensor total = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  Tensor flat = total.view({weight.size(0), -1});
  for (const Tensor& part : parts) {
    if (part.defined()) flat.add_(part);
  }
  return total;
}

// Stands for an output the caller didn't ask for (ops return tensors, never None).
Tensor nothing(const Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace

std::tuple<Tensor, Tensor, Tensor> bn_relu_conv1x1_cpu(const Tensor& x, const Tensor& scale, const Tensor& shift,
                                                       const Tensor& weight, bool with_stats) {
  const ActivationLayout lx = activation_layout(x, "x");
  const int64_t out_channels = weight.size(0);
  Tensor z = at::empty({lx.batch, out_channels, x.size(2), x.size(3)},
                       x.options().memory_format(bottleneck_format(x.scalar_type(), out_channels)));
  const ActivationLayout lz = activation_layout(z, "z");
  const Tensor w2d = weight.reshape({out_channels, lx.channels});
  const Tiles tiles = make_tiles(lx.pixels, lx.channels, 1, lx.batch);
  const int64_t num_tiles = tiles.count();
  // Per-tile moments of the output channels, merged in tile order.
  std::vector<Moments<double>> tile_moments(with_stats ? num_tiles * out_channels : 0, Moments<double>{0, 0, 0});
  const int64_t slots = slot_count(num_tiles, 1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_conv1x1_cpu", [&] {
    for_each_slot(num_tiles, slots, [&](int64_t, int64_t begin, int64_t end) {
      TileBuffer buf(x, lx.channels_inner() || pixel_major_tiles(lx), lx.channels, tiles.max_length());
      std::vector<double> sum(with_stats ? out_channels : 0), m2(with_stats ? out_channels : 0);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = tiles.first_image(t), images = tiles.image_count(t);
        const int64_t p0 = tiles.begin(t), length = tiles.end(t) - p0;
        for (int64_t i = 0; i < images; ++i) fill_tile<scalar_t>(buf, x, lx, n + i, p0, length, scale, shift, i * length);
        mm_into_tile(z, lz, n, images, p0, length, w2d, buf.matrix(images * length));
        if (with_stats && lz.channels_inner()) {
          const scalar_t* zd = z.const_data_ptr<scalar_t>();
          auto row = [&](int64_t q) { return zd + row_offset(lz, true, n + q / length, p0 + q % length); };
          add_pixel_rows_moments<scalar_t>(row, 0, images * length, out_channels, kStatsChunkPixels,
                                           tile_moments.data() + t * out_channels, sum, m2);
        } else if (with_stats) {
          const scalar_t* zd = z.const_data_ptr<scalar_t>();
          for (int64_t c = 0; c < out_channels; ++c) {
            Moments<double> m = row_moments(zd + row_offset(lz, false, n, c) + p0, length);
            for (int64_t i = 1; i < images; ++i) {
              m = moments_merge(m, row_moments(zd + row_offset(lz, false, n + i, c) + p0, length));
            }
            tile_moments[t * out_channels + c] = m;
          }
        }
      }
    });
  });
  if (!with_stats) return {z, nothing(x), nothing(x)};
  std::vector<Moments<double>> moments(out_channels, Moments<double>{0, 0, 0});
  for (int64_t t = 0; t < num_tiles; ++t) {
    for (int64_t c = 0; c < out_channels; ++c) moments[c] = moments_merge(moments[c], tile_moments[t * out_channels + c]);
  }
  auto [mean, var] = moments_to_stats(moments, x);
  return {z, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_conv1x1_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& scale, const Tensor& shift, const Tensor& weight,
    const Tensor& center, const Tensor& grad_x, bool accumulate, bool need_weight_grad) {
  const ActivationLayout lx = activation_layout(x, "x"), lo = activation_layout(grad_out, "grad_out");
  const Tensor& gx = grad_x;
  const ActivationLayout lg = activation_layout(gx, "grad_x");
  const int64_t out_channels = weight.size(0);
  const Tensor w2d = weight.reshape({out_channels, lx.channels});
  const Tensor w2d_t = w2d.t();
  const Tiles tiles = make_tiles(lx.pixels, lx.channels, 1, lx.batch);
  const int64_t num_tiles = tiles.count();
  const int64_t slots = slot_count(num_tiles, 1);
  SlotSums sums(slots, lx.channels);
  std::vector<Tensor> weight_grads(slots);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_conv1x1_backward_cpu", [&] {
    for_each_slot(num_tiles, slots, [&](int64_t s, int64_t begin, int64_t end) {
      const bool pixel_major = lx.channels_inner() || pixel_major_tiles(lx);
      TileBuffer dy(x, pixel_major, lx.channels, tiles.max_length());
      std::optional<TileBuffer> act;
      if (need_weight_grad) act.emplace(x, pixel_major, lx.channels, tiles.max_length());
      ChannelSums slot_sums = sums.slot(s);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = tiles.first_image(t), images = tiles.image_count(t);
        const int64_t p0 = tiles.begin(t), length = tiles.end(t) - p0;
        Tensor go = gather_tile(grad_out, lo, n, images, p0, length);
        if (need_weight_grad) {
          for (int64_t i = 0; i < images; ++i) {
            fill_tile<scalar_t>(*act, x, lx, n + i, p0, length, scale, shift, i * length);
          }
          add_matmul(weight_grads[s], go, act->matrix(images * length).t());
        }
        tile_mm_out(dy.matrix(images * length), w2d_t, go);
        for (int64_t i = 0; i < images; ++i) {
          if (accumulate) {
            backward_tile<true, scalar_t>(dy, x, lx, gx, lg, n + i, p0, length, scale, shift, center, slot_sums,
                                          i * length);
          } else {
            backward_tile<false, scalar_t>(dy, x, lx, gx, lg, n + i, p0, length, scale, shift, center, slot_sums,
                                           i * length);
          }
        }
      }
    });
  });
  auto [sum_dy, sum_dy_xc] = sums.totals(x);
  Tensor grad_weight = need_weight_grad ? merge_weight_grads(weight_grads, weight) : nothing(x);
  return {grad_weight, sum_dy, sum_dy_xc};
}

std::tuple<Tensor, Tensor> bn_relu_conv3x3_cpu(const Tensor& z, const Tensor& scale, const Tensor& shift,
                                               const Tensor& weight, const Tensor& out,
                                               const std::optional<Tensor>& noise, bool with_stats) {
  const ActivationLayout lz = activation_layout(z, "z");
  const int64_t per_image = std::max<int64_t>(1, lz.channels * lz.pixels);
  const int64_t chunk = std::max<int64_t>(1, kChunkElements / per_image);
  const bool inner = lz.channels_inner();
  const Tensor matrix = small_map(z) ? small_map_matrix(weight, z.size(2), z.size(3), inner) : Tensor();
  std::vector<Moments<double>> moments(with_stats ? weight.size(0) : 0, Moments<double>{0, 0, 0});
  for (int64_t n0 = 0; n0 < lz.batch; n0 += chunk) {
    const int64_t count = std::min(chunk, lz.batch - n0);
    Tensor z_chunk = z.narrow(0, n0, count);
    Tensor y = at::empty(z_chunk.sizes(), z.options().memory_format(memory_format_of(lz)));
    affine_relu_cpu_out(z_chunk, scale, shift, y);
    Tensor f = conv3x3(y, weight, matrix, inner);
    y.reset();
    if (noise.has_value()) f.mul_(noise->narrow(0, n0, count));
    out.narrow(0, n0, count).copy_(f);
    if (with_stats) {
      // Statistics of the new channels while they are contiguous, before they sit in the buffer.
      std::vector<Moments<double>> part = channel_moments_cpu(f);
      for (size_t c = 0; c < moments.size(); ++c) moments[c] = moments_merge(moments[c], part[c]);
    }
  }
  if (!with_stats) return {nothing(z), nothing(z)};
  return moments_to_stats(moments, z);
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_conv3x3_backward_cpu(
    const Tensor& grad_out, const Tensor& z, const Tensor& scale, const Tensor& shift, const Tensor& weight,
    const Tensor& center, const Tensor& grad_x, bool accumulate, bool need_weight_grad) {
  const ActivationLayout lz = activation_layout(z, "z");
  // A chunk's input gradient and normalized activations exist together beside the caller's
  // grad_x: half of kChunkElements each, so that they hold no more than the one chunk of
  // activations did beside the whole-batch input gradient when that became the result
  // (DenseNet-BC-100 at batch 64: 163 MiB then, 171 with two kChunkElements chunks, 158 so).
  const int64_t per_image = std::max<int64_t>(1, lz.channels * lz.pixels);
  const int64_t chunk = std::max<int64_t>(1, kChunkElements / 2 / per_image);
  const bool inner = lz.channels_inner();
  auto normalized = [&](int64_t n0, int64_t count) {
    Tensor z_chunk = z.narrow(0, n0, count);
    Tensor y = at::empty(z_chunk.sizes(), z.options().memory_format(memory_format_of(lz)));
    affine_relu_cpu_out(z_chunk, scale, shift, y);
    return y;
  };
  // Both gradients a chunk of images at a time: the conv's input gradient exists for one chunk
  // beside grad_x, not for the whole batch. The sums over the chunks stay in double, cast once.
  Tensor grad_weight;
  auto add_weight_grad = [&](const Tensor& part) {
    if (grad_weight.defined()) {
      grad_weight.add_(part);
    } else {
      grad_weight = part.contiguous();
    }
  };
  auto sum_options = z.options().dtype(at::kDouble);
  Tensor sum_dy = at::zeros({lz.channels}, sum_options), sum_dy_xc = at::zeros({lz.channels}, sum_options);
  auto finish = [&](const Tensor& dy, int64_t n0, int64_t count) {
    auto [a, b] = bn_relu_backward_cpu_sums(conform_input(dy, lz, "grad_y"), z.narrow(0, n0, count), scale, shift,
                                            center, grad_x.narrow(0, n0, count), accumulate);
    sum_dy.add_(a);
    sum_dy_xc.add_(b);
  };
  const Tensor matrix = small_map(z) ? small_map_matrix(weight, z.size(2), z.size(3), inner) : Tensor();
  if (matrix.defined() && need_weight_grad) grad_weight = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  for (int64_t n0 = 0; n0 < lz.batch; n0 += chunk) {
    const int64_t count = std::min(chunk, lz.batch - n0);
    const Tensor go = grad_out.narrow(0, n0, count);
    if (matrix.defined()) {
      // Both gradients as GEMMs with the small-map matrix (see conv3x3).
      const Tensor go_rows = map_rows(go, inner);
      if (need_weight_grad) {
        add_small_map_grad(grad_weight, at::mm(map_rows(normalized(n0, count), inner).t(), go_rows), z.size(2),
                           z.size(3), inner);
      }
      finish(rows_as_map(at::mm(go_rows, matrix.t()), lz.channels, z.size(2), z.size(3), inner), n0, count);
    } else {
      // Both gradients from one call: 10-20% faster than two at DenseNet-121's 8x8 to 2x2 maps at
      // batch 8 (the weight and activations are reordered for oneDNN once). The input gradient
      // alone needs no activations.
      auto grads = at::convolution_backward(go, need_weight_grad ? normalized(n0, count) : z.narrow(0, n0, count),
                                            weight, std::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1,
                                            {true, need_weight_grad, false});
      if (need_weight_grad) add_weight_grad(std::get<1>(grads));
      finish(std::get<0>(grads), n0, count);
    }
  }
  if (!need_weight_grad) {
    grad_weight = nothing(z);
  } else if (!grad_weight.defined()) {  // an empty batch
    grad_weight = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  }
  const auto dtype = stats_dtype(z.scalar_type());
  return {grad_weight, sum_dy.to(dtype), sum_dy_xc.to(dtype)};
}

Tensor bn_relu_pool_conv1x1_cpu(const Tensor& x, const Tensor& scale, const Tensor& shift, const Tensor& weight) {
  const ActivationLayout lx = activation_layout(x, "x");
  const int64_t out_height = x.size(2) / 2, out_width = x.size(3) / 2, out_channels = weight.size(0);
  Tensor out = at::empty({lx.batch, out_channels, out_height, out_width}, x.options().memory_format(memory_format_of(lx)));
  if (out.numel() == 0) return out;
  const ActivationLayout lo = activation_layout(out, "out");
  const Tensor w2d = weight.reshape({out_channels, lx.channels});
  // Tiles of output rows; each reads the two input rows above it.
  const Tiles tiles = make_tiles(out_height, lx.channels * out_width, out_width, lx.batch);
  const int64_t num_tiles = tiles.count();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_pool_conv1x1_cpu", [&] {
    for_each_slot(num_tiles, slot_count(num_tiles, 1), [&](int64_t, int64_t begin, int64_t end) {
      TileBuffer buf(x, lx.channels_inner(), lx.channels, tiles.max_length() * out_width);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = tiles.first_image(t), images = tiles.image_count(t);
        const int64_t r0 = tiles.begin(t), r1 = tiles.end(t);
        const int64_t length = (r1 - r0) * out_width;
        for (int64_t i = 0; i < images; ++i) {
          fill_pooled_tile<scalar_t>(buf, x, lx, n + i, r0, r1, scale, shift, i * length);
        }
        mm_into_tile(out, lo, n, images, r0 * out_width, length, w2d, buf.matrix(images * length));
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_pool_conv1x1_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& scale, const Tensor& shift, const Tensor& weight,
    const Tensor& center, const Tensor& grad_x, bool accumulate, bool need_weight_grad) {
  const ActivationLayout lx = activation_layout(x, "x"), lo = activation_layout(grad_out, "grad_out");
  const Tensor& gx = grad_x;
  const ActivationLayout lg = activation_layout(gx, "grad_x");
  const int64_t out_height = x.size(2) / 2, out_width = x.size(3) / 2, out_channels = weight.size(0);
  const Tensor w2d = weight.reshape({out_channels, lx.channels});
  // avg_pool2d's backward divides by 4: folded into the weight (exact, a power of two).
  const Tensor w_quarter_t = w2d.t().contiguous().mul_(0.25);
  const Tiles tiles = make_tiles(out_height, lx.channels * out_width, out_width, lx.batch);
  const int64_t num_tiles = tiles.count();
  const int64_t slots = slot_count(num_tiles, 1);
  SlotSums sums(slots, lx.channels);
  std::vector<Tensor> weight_grads(slots);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_pool_conv1x1_backward_cpu", [&] {
    for_each_slot(num_tiles, slots, [&](int64_t s, int64_t begin, int64_t end) {
      const int64_t capacity = tiles.max_length() * out_width;
      TileBuffer dpool(x, lx.channels_inner(), lx.channels, capacity);
      std::optional<TileBuffer> act;
      if (need_weight_grad) act.emplace(x, lx.channels_inner(), lx.channels, capacity);
      std::vector<scalar_t> scratch(std::max<int64_t>(lx.channels, x.size(3)));
      ChannelSums slot_sums = sums.slot(s);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = tiles.first_image(t), images = tiles.image_count(t);
        const int64_t r0 = tiles.begin(t), r1 = tiles.end(t);
        const int64_t length = (r1 - r0) * out_width;
        Tensor go = gather_tile(grad_out, lo, n, images, r0 * out_width, length);
        if (need_weight_grad) {
          for (int64_t i = 0; i < images; ++i) {
            fill_pooled_tile<scalar_t>(*act, x, lx, n + i, r0, r1, scale, shift, i * length);
          }
          add_matmul(weight_grads[s], go, act->matrix(images * length).t());
        }
        tile_mm_out(dpool.matrix(images * length), w_quarter_t, go);
        for (int64_t i = 0; i < images; ++i) {
          if (accumulate) {
            pooled_backward_tile<true, scalar_t>(dpool, scratch, x, lx, gx, lg, n + i, r0, r1, scale, shift, center,
                                                 slot_sums, i * length);
          } else {
            pooled_backward_tile<false, scalar_t>(dpool, scratch, x, lx, gx, lg, n + i, r0, r1, scale, shift, center,
                                                  slot_sums, i * length);
          }
        }
      }
    });
  });
  auto [sum_dy, sum_dy_xc] = sums.totals(x);
  Tensor grad_weight = need_weight_grad ? merge_weight_grads(weight_grads, weight) : nothing(x);
  return {grad_weight, sum_dy, sum_dy_xc};
}

}  // namespace densenet_fast
