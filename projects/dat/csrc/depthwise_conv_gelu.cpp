// The hidden layer of DAT++'s ConvFFN, GELU(depth-wise 'same' conv of y, with its bias), and its
// gradient, for float32 channels-last maps on CPU.
//
// Same contract as _depthwise_conv_gelu_op in projects/dat/ops/convffn.py: y is
// (B, H, W, C) contiguous (an NCHW map in channels-last memory), weight is (k * k, C) with the
// taps row-major (the caller has already folded ConvFFN's identity into the centre tap) and bias
// is (C). The output is
//   out[b, i, j, c] = GELU(bias[c] + sum_{a, e} weight[a * k + e, c] * y[b, i + a - k / 2, j + e - k / 2, c])
// with zeros outside the map. In PyTorch this is a conv and a GELU, each one pass over memory
// forward, and backward (with the recomputation of ConvFFN's recompute_hidden) two more passes
// to recompute them, one for GELU's gradient and one for the conv's; here the conv's output (the
// GELU's input) never goes to memory, nor does its gradient: one pass forward, one backward
// (which recomputes the GELU's input from y).
//
// Channels go kLanes (8, or 16 with AVX-512) at a time in explicit vectors (the last ones one by
// one) and columns up to 8 at a time (for_column_blocks): each tap's weights are loaded once per
// block of columns, and the sums stay in registers. Where C is a multiple of 512 the kernels read
// copies of y's rows and of the taps with padded columns (reads_copies). Every sum runs in the
// order of the plain loops (taps in row-major order for each output, columns in increasing order
// for the weight and bias gradients).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"

// Built for a CPU with AVX-512 (DAT_AVX512, cpu_kernels.simd_flags), this file's functions take
// vectors of 16 channels: on a Zen 4 EPYC 0.71-0.93x the time of 8 AVX2 lanes forward and
// 0.79-0.99x backward at DAT-T++'s and DAT-B++'s hidden maps, the same bits. The other kernels
// stay 8-lane AVX2 (with AVX-512 enabled the neighbourhood attention's forward took 1.06-1.09x
// its time). GCC's pragma: other compilers keep the 8 AVX2 lanes.
#if defined(DAT_AVX512) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq")
#define DAT_VECTOR_LANES 16
#endif
#include "vector_math.h"

namespace {

constexpr int64_t kLineFloats = 64 / sizeof(float);  // floats per cache line

struct ConvShape {
  int64_t batch, height, width, channels, kernel_size;
};

ConvShape check_inputs(const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(y.dim() == 4, "expected y (B, H, W, C), got ", y.sizes());
  const int64_t channels = y.size(3), taps = weight.dim() == 2 ? weight.size(0) : 0;
  int64_t kernel_size = 1;
  while (kernel_size * kernel_size < taps) kernel_size += 2;
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == channels && kernel_size * kernel_size == taps,
              "expected weight (k * k, C) for an odd k and C = ", channels, ", got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == channels, "expected bias (", channels, "), got ", bias.sizes());
  dat::check_contiguous_cpu({&y, &weight, &bias}, at::kFloat, "y, weight and bias");
  return {y.size(0), y.size(1), y.size(2), channels, kernel_size};
}

// Calls step(block, j0) for the columns of a row in increasing order, block (a
// std::integral_constant) columns j0 .. j0 + block - 1 at a time: 8, 4 or 2 where every tap of
// those columns lies inside the row (each tap's weights are then loaded once for them), else one.
template <typename Step>
inline void for_column_blocks(const ConvShape& s, Step&& step) {
  const int64_t half = s.kernel_size / 2, inside_end = s.width - half;
  int64_t j = 0;
  for (; j < std::min(half, s.width); ++j) step(std::integral_constant<int, 1>{}, j);
  auto blocks_of = [&](auto block) {
    for (; j + block <= inside_end; j += block) step(block, j);
  };
  blocks_of(std::integral_constant<int, 8>{});
  blocks_of(std::integral_constant<int, 4>{});
  blocks_of(std::integral_constant<int, 2>{});
  for (; j < s.width; ++j) step(std::integral_constant<int, 1>{}, j);
}

// Whether tap column col lies inside the map; always, for blocks of for_column_blocks wider than one.
template <int Block>
inline bool inside_row(int64_t col, const ConvShape& s) {
  return Block > 1 || (col >= 0 && col < s.width);
}

// Prefetches row's lines for the Block columns after j0 (the next column block) at the 16
// channels from c, once per 16 channels (a cache line; where C is a multiple of 16, the lines
// exactly, torch's allocations being aligned to 64 bytes). The kernels walk a row column block by
// column block, all channels of a block before the next, so the loads of consecutive columns lie
// C floats apart, a pattern that the hardware prefetchers do not follow where a column is a few
// cache lines (256 channels); on maps larger than the last-level cache the rows that a conv reads
// for the first time then wait for memory (docs/benchmarks.md, "ConvFFN's hidden-layer kernel
// prefetches the next columns"). ForWrite = 1 for a row about to be written (the forward's output:
// its lines are read for ownership before the stores).
template <int Block, int ForWrite = 0>
inline void prefetch_next_columns(const float* row, int64_t j0, int64_t c, const ConvShape& s) {
  if (c % kLineFloats != 0) return;
  const int64_t end = std::min(s.width, j0 + 2 * Block);
  for (int64_t j = j0 + Block; j < end; ++j) __builtin_prefetch(row + j * s.channels + c, ForWrite, 3);
}

// Whether the kernels read y, and their taps, from copies with padded columns. In the map a column
// is C floats apart; where that is a multiple of 2 KB (C a multiple of 512) the same channel of
// consecutive columns falls into at most 2 of the L1 cache's 64 sets (one at 1024 channels:
// 4 KB), and a column block's 30 input lines, 9 tap lines and 8 output lines evict one another
// from their ways (at 1024 channels the kernel took twice as long per element as at 1032;
// docs/benchmarks.md, "ConvFFN's hidden-layer kernel on padded copies of its rows"). Elsewhere
// they spread over 4 sets or more, and a copy costs more than it saves.
inline bool reads_copies(const ConvShape& s) { return s.channels % 512 == 0; }

// The column stride of the rows and taps that the kernels read: C, or C and one cache line in the
// copies, where consecutive columns fall into consecutive sets.
inline int64_t row_stride(const ConvShape& s) { return reads_copies(s) ? s.channels + kLineFloats : s.channels; }

// The taps (k * k, C) at row_stride(s) floats per tap: weight itself, or a padded copy.
at::Tensor strided_taps(const at::Tensor& weight, const ConvShape& s) {
  if (!reads_copies(s)) return weight;
  auto taps = at::zeros({weight.size(0), row_stride(s)}, weight.options());
  taps.narrow(1, 0, s.channels).copy_(weight);
  return taps;
}

// A thread's ring of row buffers, each W columns row_stride(s) floats apart and holding one row
// of one image at a time: row r of image b in slot r % slots. The slots lie one cache line further
// apart than a row's size, so that the same column of two slots falls into different sets (without
// it, the backward pass at 512 channels took up to 1.5x as long in some processes as in others).
class RowRing {
 public:
  RowRing(int64_t slots, const ConvShape& s)
      : shape_(s),
        slot_floats_(s.width * row_stride(s) + kLineFloats),
        buffer_(at::empty({slots * slot_floats_}, at::kFloat)),
        items_(slots, -1) {}

  // The slot of row r of image b, and whether it holds that row already (if not, it is now the
  // row's, for the caller to fill).
  std::pair<float*, bool> slot(int64_t b, int64_t r) {
    const int64_t item = b * shape_.height + r, index = r % static_cast<int64_t>(items_.size());
    const bool filled = items_[index] == item;
    items_[index] = item;
    return {buffer_.data_ptr<float>() + index * slot_floats_, filled};
  }

 private:
  ConvShape shape_;
  int64_t slot_floats_;
  at::Tensor buffer_;
  std::vector<int64_t> items_;
};

// The rows of y (B, H, W, C) that a thread's convs read, row_stride(s) floats per column: y's own
// rows, or copies made at their first use in a ring of `slots` rows.
class InputRows {
 public:
  InputRows(const float* y, int64_t slots, const ConvShape& s) : y_(y), shape_(s) {
    if (reads_copies(s)) copies_.emplace(slots, s);
  }

  // Row r of image b.
  const float* row(int64_t b, int64_t r) {
    const float* source = y_ + (b * shape_.height + r) * shape_.width * shape_.channels;
    if (!copies_) return source;
    const auto [copy, filled] = copies_->slot(b, r);
    if (!filled) {
      const int64_t stride = row_stride(shape_);
      for (int64_t j = 0; j < shape_.width; ++j)
        std::memcpy(copy + j * stride, source + j * shape_.channels, shape_.channels * sizeof(float));
    }
    return copy;
  }

  // Fills rows[a] with row i + a - k / 2 of image b, or null outside the map.
  void conv_rows(int64_t b, int64_t i, const float** rows) {
    const int64_t half = shape_.kernel_size / 2;
    for (int64_t a = 0; a < shape_.kernel_size; ++a) {
      const int64_t r = i + a - half;
      rows[a] = r >= 0 && r < shape_.height ? row(b, r) : nullptr;
    }
  }

 private:
  const float* y_;
  ConvShape shape_;
  std::optional<RowRing> copies_;
};

// Calls tap(a * k + e, x) for the taps (a, e) of the conv at columns j0 .. j0 + Block - 1 whose
// inputs lie inside the map, in row-major order; rows are the conv's k input rows (null outside
// the map, columns `stride` floats apart) and x points at channel c of the first column's input.
template <int Block, typename Tap>
inline void for_taps_inside(const float* const* rows, int64_t stride, int64_t j0, int64_t c, const ConvShape& s,
                            Tap&& tap) {
  const int64_t k = s.kernel_size, half = k / 2;
  for (int64_t a = 0; a < k; ++a) {
    if (rows[a] == nullptr) continue;
    for (int64_t e = 0; e < k; ++e) {
      const int64_t col = j0 + e - half;
      if (inside_row<Block>(col, s)) tap(a * k + e, rows[a] + col * stride + c);
    }
  }
}

// Calls emit(n, GELU(z[n]), GELU'(z[n])) for z[n] = bias + the conv's taps at column j0 + n,
// n < Block, for the channels from c (T: one float or a FloatVector of them); rows and taps
// row_stride(s) floats per column and per tap. The taps are summed in row-major order, those
// outside the map left out.
template <int Block, typename T, typename Emit>
inline void conv_gelu_block(const float* const* rows, const float* __restrict__ taps, const float* __restrict__ bias,
                            int64_t j0, int64_t c, const ConvShape& s, Emit&& emit) {
  const int64_t stride = row_stride(s);
  T z[Block];
  const T b = dat::load_lanes<T>(bias + c);
  for (int n = 0; n < Block; ++n) z[n] = b;
  for_taps_inside<Block>(rows, stride, j0, c, s, [&](int64_t tap, const float* x) {
    const T w = dat::load_lanes<T>(taps + tap * stride + c);
    for (int n = 0; n < Block; ++n, x += stride) z[n] += w * dat::load_lanes<T>(x);
  });
  for (int n = 0; n < Block; ++n) {
    T value, slope;
    dat::gelu_with_slope(z[n], value, slope);
    emit(n, value, slope);
  }
}

}  // namespace

// Returns GELU(conv(y) + bias), (B, H, W, C).
at::Tensor depthwise_conv_gelu_forward(at::Tensor y, at::Tensor weight, at::Tensor bias) {
  const ConvShape s = check_inputs(y, weight, bias);
  auto out = at::empty_like(y);
  const auto taps = strided_taps(weight, s);
  const float* y_p = y.data_ptr<float>();
  const float* t_p = taps.data_ptr<float>();
  const float* b_p = bias.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  const int64_t channels = s.channels;
  // One work item per (image, row).
  at::parallel_for(0, s.batch * s.height, 1, [&](int64_t begin, int64_t end) {
    InputRows y_rows(y_p, s.kernel_size, s);
    std::vector<const float*> rows(s.kernel_size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.height, i = item % s.height;
      y_rows.conv_rows(b, i, rows.data());
      float* out_row = out_p + item * s.width * channels;
      // y's row that this output row reads first (the others were read for the rows above).
      const float* newest_row = !reads_copies(s) && i + s.kernel_size / 2 < s.height ? rows.back() : nullptr;
      for_column_blocks(s, [&](auto block, int64_t j0) {
        dat::for_channel_lanes(channels, [&](auto lanes, int64_t c) {
          using T = decltype(lanes);
          constexpr int kBlock = decltype(block)::value;
          if (newest_row != nullptr) prefetch_next_columns<kBlock>(newest_row, j0, c, s);
          prefetch_next_columns<kBlock, 1>(out_row, j0, c, s);
          conv_gelu_block<kBlock, T>(rows.data(), t_p, b_p, j0, c, s, [&](int n, T value, T) {
            dat::store_lanes(out_row + (j0 + n) * channels + c, value);
          });
        });
      });
    }
  });
  return out;
}

// Returns the gradients of y (B, H, W, C), of weight (k * k, C) and of bias (C), and with
// with_output also the forward pass's output GELU(z) (B, H, W, C), which the pass recomputes on the
// way (for the gradient of a layer that reads it, without a forward pass to recompute it).
//
// One pass over the rows: row i's grad_y needs grad_z = grad_out * GELU'(z) (z recomputed from y)
// of rows i - k / 2 .. i + k / 2, so each thread keeps the last k rows of grad_z it computed in a
// ring (it moves down one row per row; a thread recomputes the rows it shares with its
// neighbours' at its first row) and grad_z never goes to memory. Those k rows of grad_z read the
// 2k - 1 rows of y around row i (where the kernels read copies, a second ring holds them).
std::vector<at::Tensor> depthwise_conv_gelu_backward(at::Tensor grad_out, at::Tensor y, at::Tensor weight,
                                                     at::Tensor bias, bool with_output) {
  const ConvShape s = check_inputs(y, weight, bias);
  dat::check_contiguous_cpu({&grad_out}, at::kFloat, "grad_out");
  TORCH_CHECK(grad_out.sizes() == y.sizes(), "expected grad_out of y's shape ", y.sizes(), ", got ", grad_out.sizes());
  const int64_t channels = s.channels, k = s.kernel_size, taps = k * k, half = k / 2;
  const int64_t row_size = s.width * channels, stride = row_stride(s);
  auto grad_y = at::empty_like(y);
  auto output = with_output ? at::empty_like(y) : at::Tensor();
  const auto strided_weight = strided_taps(weight, s);
  // The weight (taps) and bias (last) gradients of each thread's rows; each row's are summed
  // apart first (float32 sums of fewer terms).
  auto thread_grads = at::zeros({at::get_num_threads(), taps + 1, channels}, y.options());
  const float* go_p = grad_out.data_ptr<float>();
  const float* y_p = y.data_ptr<float>();
  const float* w_p = strided_weight.data_ptr<float>();
  const float* b_p = bias.data_ptr<float>();
  float* gy_p = grad_y.data_ptr<float>();
  float* out_p = with_output ? output.data_ptr<float>() : nullptr;
  float* tg_p = thread_grads.data_ptr<float>();

  at::parallel_for(0, s.batch * s.height, 1, [&](int64_t begin, int64_t end) {
    InputRows y_rows(y_p, 2 * k - 1, s);
    RowRing grad_z_rows(k, s);
    std::vector<float> row_sum((taps + 1) * stride);
    std::vector<const float*> conv_input(k), gz_rows(k);
    float* thread_sums = tg_p + at::get_thread_num() * (taps + 1) * channels;
    // grad_z of item (b, r), in the ring; the bias gradient (and the output) counts the rows of
    // [begin, end) only.
    auto grad_z_row = [&](int64_t b, int64_t r) -> const float* {
      const int64_t item = b * s.height + r;
      const auto [slot, filled] = grad_z_rows.slot(b, r);
      if (filled) return slot;
      float* gz_row = slot;
      float* grad_bias = row_sum.data() + taps * stride;
      const bool owned = item >= begin && item < end;
      const float* go_row = go_p + item * row_size;
      float* out_row = owned && out_p != nullptr ? out_p + item * row_size : nullptr;
      y_rows.conv_rows(b, r, conv_input.data());
      // y's row below r's taps: no other row of grad_z read it before.
      const float* newest_row = !reads_copies(s) && r + half < s.height ? conv_input.back() : nullptr;
      for_column_blocks(s, [&](auto block, int64_t j0) {
        dat::for_channel_lanes(channels, [&](auto lanes, int64_t c) {
          using T = decltype(lanes);
          constexpr int kBlock = decltype(block)::value;
          prefetch_next_columns<kBlock>(go_row, j0, c, s);
          if (newest_row != nullptr) prefetch_next_columns<kBlock>(newest_row, j0, c, s);
          T bias_sum = dat::load_lanes<T>(grad_bias + c);
          conv_gelu_block<kBlock, T>(conv_input.data(), w_p, b_p, j0, c, s, [&](int n, T value, T slope) {
            if (out_row != nullptr) dat::store_lanes(out_row + (j0 + n) * channels + c, value);
            const T gz = dat::load_lanes<T>(go_row + (j0 + n) * channels + c) * slope;
            dat::store_lanes(gz_row + (j0 + n) * stride + c, gz);
            bias_sum += gz;
          });
          if (owned) dat::store_lanes(grad_bias + c, bias_sum);
        });
      });
      return gz_row;
    };
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.height, i = item % s.height;
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      for (int64_t a = 0; a < k; ++a) {
        const int64_t r = i + a - half;
        gz_rows[a] = r >= 0 && r < s.height ? grad_z_row(b, r) : nullptr;
      }
      y_rows.conv_rows(b, i, conv_input.data());  // copied, where copies, for grad_z
      float* gy_row = gy_p + item * row_size;
      for_column_blocks(s, [&](auto block, int64_t j0) {
        dat::for_channel_lanes(channels, [&](auto lanes, int64_t c) {
          using T = decltype(lanes);
          constexpr int kBlock = decltype(block)::value;
          // grad_y[i, j] = sum over taps of weight[tap] * grad_z[(i, j) - tap offset] (the
          // transposed conv), taps in row-major order.
          T gy[kBlock] = {};
          for (int64_t a = 0; a < k; ++a) {
            const float* g_row = gz_rows[k - 1 - a];  // row i - (a - half)
            if (g_row == nullptr) continue;
            for (int64_t e = 0; e < k; ++e) {
              const int64_t col = j0 - (e - half);
              if (!inside_row<kBlock>(col, s)) continue;
              const T w = dat::load_lanes<T>(w_p + (a * k + e) * stride + c);
              const float* gz = g_row + col * stride + c;
              for (int n = 0; n < kBlock; ++n, gz += stride) gy[n] += w * dat::load_lanes<T>(gz);
            }
          }
          for (int n = 0; n < kBlock; ++n) dat::store_lanes(gy_row + (j0 + n) * channels + c, gy[n]);
          // The weight gradient sums grad_z[i, j] * y[(i, j) + tap offset], column after column.
          T g[kBlock];
          for (int n = 0; n < kBlock; ++n) g[n] = dat::load_lanes<T>(gz_rows[half] + (j0 + n) * stride + c);
          for_taps_inside<kBlock>(conv_input.data(), stride, j0, c, s, [&](int64_t tap, const float* x) {
            float* gw = row_sum.data() + tap * stride + c;
            T sum = dat::load_lanes<T>(gw);
            for (int n = 0; n < kBlock; ++n, x += stride) sum += g[n] * dat::load_lanes<T>(x);
            dat::store_lanes(gw, sum);
          });
        });
      });
      for (int64_t t = 0; t <= taps; ++t)
        for (int64_t c = 0; c < channels; ++c) thread_sums[t * channels + c] += row_sum[t * stride + c];
    }
  });
  auto sums = thread_grads.sum(0);
  // Copies: the outputs must not share memory (custom operators may not return aliases).
  std::vector<at::Tensor> grads{grad_y, sums.narrow(0, 0, taps).clone(), sums[taps].clone()};
  if (with_output) grads.push_back(output);
  return grads;
}
