// The hidden layer of DAT++'s ConvFFN, GELU(depth-wise 'same' conv of y, with its bias), and its
// gradient, for float32 channels-last maps on CPU.
//
// Same contract as _depthwise_conv_gelu_op in projects/dat/models/layers.py: y is
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
// Every loop over channels runs over contiguous memory and is vectorised by the compiler.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "vector_math.h"

namespace {

struct ConvShape {
  int64_t batch, height, width, channels, kernel_size;
};

ConvShape check_inputs(const torch::Tensor& y, const torch::Tensor& weight, const torch::Tensor& bias) {
  TORCH_CHECK(y.dim() == 4, "expected y (B, H, W, C), got ", y.sizes());
  const int64_t channels = y.size(3), taps = weight.dim() == 2 ? weight.size(0) : 0;
  int64_t kernel_size = 1;
  while (kernel_size * kernel_size < taps) kernel_size += 2;
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == channels && kernel_size * kernel_size == taps,
              "expected weight (k * k, C) for an odd k and C = ", channels, ", got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == channels, "expected bias (", channels, "), got ", bias.sizes());
  dat::check_contiguous_cpu({&y, &weight, &bias}, torch::kFloat, "y, weight and bias");
  return {y.size(0), y.size(1), y.size(2), channels, kernel_size};
}

// z[c] = bias[c] + the conv's taps at position (i, j) of one image (y_image: (H, W, C)).
inline void conv_at(const float* __restrict__ y_image, const float* __restrict__ weight,
                    const float* __restrict__ bias, int64_t i, int64_t j, const ConvShape& s,
                    float* __restrict__ z) {
  const int64_t channels = s.channels, half = s.kernel_size / 2;
  std::copy(bias, bias + channels, z);
  for (int64_t a = 0; a < s.kernel_size; ++a) {
    const int64_t row = i + a - half;
    if (row < 0 || row >= s.height) continue;
    for (int64_t e = 0; e < s.kernel_size; ++e) {
      const int64_t col = j + e - half;
      if (col < 0 || col >= s.width) continue;
      const float* __restrict__ w = weight + (a * s.kernel_size + e) * channels;
      const float* __restrict__ x = y_image + (row * s.width + col) * channels;
      for (int64_t c = 0; c < channels; ++c) z[c] += w[c] * x[c];
    }
  }
}

}  // namespace

// Returns GELU(conv(y) + bias), (B, H, W, C).
torch::Tensor depthwise_conv_gelu_forward(torch::Tensor y, torch::Tensor weight, torch::Tensor bias) {
  const ConvShape s = check_inputs(y, weight, bias);
  auto out = torch::empty_like(y);
  const float* y_p = y.data_ptr<float>();
  const float* w_p = weight.data_ptr<float>();
  const float* b_p = bias.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  const int64_t channels = s.channels, image = s.height * s.width * channels;
  // One work item per (image, row).
  at::parallel_for(0, s.batch * s.height, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(channels);
    float slope;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.height, i = item % s.height;
      for (int64_t j = 0; j < s.width; ++j) {
        conv_at(y_p + b * image, w_p, b_p, i, j, s, z.data());
        float* __restrict__ o = out_p + item * s.width * channels + j * channels;
        for (int64_t c = 0; c < channels; ++c) dat::gelu_with_slope(z[c], o[c], slope);
      }
    }
  });
  return out;
}

// Returns the gradients of y (B, H, W, C), of weight (k * k, C) and of bias (C).
//
// One pass over the rows: row i's grad_y needs grad_z = grad_out * GELU'(z) (z recomputed from y)
// of rows i - k / 2 .. i + k / 2, so each thread keeps the last k rows of grad_z it computed in a
// ring (it moves down one row per row; a thread recomputes the rows it shares with its
// neighbours' at its first row) and grad_z never goes to memory.
std::vector<torch::Tensor> depthwise_conv_gelu_backward(torch::Tensor grad_out, torch::Tensor y, torch::Tensor weight,
                                                        torch::Tensor bias) {
  const ConvShape s = check_inputs(y, weight, bias);
  dat::check_contiguous_cpu({&grad_out}, torch::kFloat, "grad_out");
  TORCH_CHECK(grad_out.sizes() == y.sizes(), "expected grad_out of y's shape ", y.sizes(), ", got ", grad_out.sizes());
  const int64_t channels = s.channels, k = s.kernel_size, taps = k * k, half = k / 2;
  const int64_t row_size = s.width * channels, image = s.height * row_size;
  auto grad_y = torch::empty_like(y);
  // The weight (taps) and bias (last) gradients of each thread's rows; each row's are summed
  // apart first (float32 sums of fewer terms).
  auto thread_grads = torch::zeros({at::get_num_threads(), taps + 1, channels}, y.options());
  const float* go_p = grad_out.data_ptr<float>();
  const float* y_p = y.data_ptr<float>();
  const float* w_p = weight.data_ptr<float>();
  const float* b_p = bias.data_ptr<float>();
  float* gy_p = grad_y.data_ptr<float>();
  float* tg_p = thread_grads.data_ptr<float>();

  at::parallel_for(0, s.batch * s.height, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ring(k * row_size), z(channels), row_sum((taps + 1) * channels);
    std::vector<int64_t> ring_item(k, -1);  // the (image, row) item each ring slot holds
    float* thread_sums = tg_p + at::get_thread_num() * (taps + 1) * channels;
    float value, slope;
    // grad_z of item (b, r), in the ring; the bias gradient counts the rows of [begin, end) only.
    auto grad_z_row = [&](int64_t b, int64_t r) -> const float* {
      const int64_t item = b * s.height + r;
      float* gz_row = ring.data() + (r % k) * row_size;
      if (ring_item[r % k] == item) return gz_row;
      ring_item[r % k] = item;
      float* __restrict__ grad_bias = row_sum.data() + taps * channels;
      const bool owned = item >= begin && item < end;
      for (int64_t j = 0; j < s.width; ++j) {
        conv_at(y_p + b * image, w_p, b_p, r, j, s, z.data());
        const float* __restrict__ go = go_p + item * row_size + j * channels;
        float* __restrict__ gz = gz_row + j * channels;
        for (int64_t c = 0; c < channels; ++c) {
          dat::gelu_with_slope(z[c], value, slope);
          gz[c] = go[c] * slope;
        }
        if (owned) {
          for (int64_t c = 0; c < channels; ++c) grad_bias[c] += gz[c];
        }
      }
      return gz_row;
    };
    std::vector<const float*> gz_rows(k);  // grad_z rows i - half .. i + half (null outside)
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.height, i = item % s.height;
      const float* y_image = y_p + b * image;
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      for (int64_t a = 0; a < k; ++a) {
        const int64_t r = i + a - half;
        gz_rows[a] = r >= 0 && r < s.height ? grad_z_row(b, r) : nullptr;
      }
      const float* gz_here = gz_rows[half];
      for (int64_t j = 0; j < s.width; ++j) {
        // grad_y[i, j] = sum over taps of weight[tap] * grad_z[(i, j) - tap offset] (the
        // transposed conv); the weight gradient sums grad_z[i, j] * y[(i, j) + tap offset].
        float* __restrict__ gy = gy_p + item * row_size + j * channels;
        const float* __restrict__ g_here = gz_here + j * channels;
        std::fill(gy, gy + channels, 0.0f);
        for (int64_t a = 0; a < k; ++a) {
          const float* g_row = gz_rows[k - 1 - a];  // row i - (a - half)
          const int64_t row_in = i + a - half;
          for (int64_t e = 0; e < k; ++e) {
            const int64_t col_out = j - (e - half), col_in = j + (e - half);
            const int64_t tap = a * k + e;
            if (g_row != nullptr && col_out >= 0 && col_out < s.width) {
              const float* __restrict__ w = w_p + tap * channels;
              const float* __restrict__ g = g_row + col_out * channels;
              for (int64_t c = 0; c < channels; ++c) gy[c] += w[c] * g[c];
            }
            if (row_in >= 0 && row_in < s.height && col_in >= 0 && col_in < s.width) {
              float* __restrict__ gw = row_sum.data() + tap * channels;
              const float* __restrict__ x = y_image + row_in * row_size + col_in * channels;
              for (int64_t c = 0; c < channels; ++c) gw[c] += g_here[c] * x[c];
            }
          }
        }
      }
      for (int64_t n = 0; n < (taps + 1) * channels; ++n) thread_sums[n] += row_sum[n];
    }
  });
  auto sums = thread_grads.sum(0);
  // Copies: the outputs must not share memory (custom operators may not return aliases).
  return {grad_y, sums.narrow(0, 0, taps).clone(), sums[taps].clone()};
}
