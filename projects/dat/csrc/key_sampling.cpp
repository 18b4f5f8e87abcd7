// The key sampling of DAT's deformable attention: each group's keys read bilinearly from a
// channels-last map at their positions, and the gradients of the map and of the positions, for
// float32 on CPU.
//
// Same contract as _sample_keys_op in projects/dat/ops/key_sampling.py: x is (B, H, W, C)
// contiguous (an NCHW map in channels-last memory), pos is (B * G, N, 2) contiguous, key n of
// group g of sample b at pos[b * G + g, n] = (y, x), normalised so that -1 and 1 are the centres
// of the map's first and last pixels (F.grid_sample's align_corners=True, coordinates in (y, x)
// order). Group g owns channels [g * C / G, (g + 1) * C / G). The output is (B, N, C): the sum
// over the four pixels around the key's pixel coordinates ((y + 1) * (H - 1) / 2,
// (x + 1) * (W - 1) / 2) of their bilinear weights times the group's channels there, pixels
// outside the map reading zeros, as F.grid_sample's bilinear mode with zero padding computes (the
// same weights, the corners summed in the same order; equal to float32 round-off). A position
// that is not finite reads NaN, as there, and gets a NaN gradient in both coordinates
// (grid_sample's is NaN in one of them only).
//
// F.grid_sample takes a (B * G, C / G, H, W) map: a channels-last map of a batch above 1 is copied
// into it first, and its backward pass writes the input's gradient in the contiguous layout,
// which is then copied back. Here the reads and the gradient's writes are rows of C / G
// contiguous channels in the map's own layout. Backwards, the gradient of the map is zero but at
// the keys' pixels; each (sample, group) writes its own channels, so they go in parallel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "vector_math.h"

namespace {

struct SamplingShape {
  int64_t batch, height, width, channels, groups, keys;
  int64_t group_channels() const { return channels / groups; }
};

SamplingShape check_inputs(const at::Tensor& x, const at::Tensor& pos, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "expected x (B, H, W, C), got ", x.sizes());
  TORCH_CHECK(groups > 0 && x.size(3) % groups == 0, "expected a number of groups that divides the ", x.size(3),
              " channels, got ", groups);
  TORCH_CHECK(pos.dim() == 3 && pos.size(0) == x.size(0) * groups && pos.size(2) == 2,
              "expected pos (B * G, N, 2) = (", x.size(0) * groups, ", N, 2), got ", pos.sizes());
  dat::check_contiguous_cpu({&x, &pos}, at::kFloat, "x and pos");
  return {x.size(0), x.size(1), x.size(2), x.size(3), groups, pos.size(1)};
}

// One key's four pixels (north-west, north-east, south-west, south-east), their bilinear weights
// and whether each lies inside the map, and the pixel coordinates' fractional parts.
struct Taps {
  int64_t offset[4];  // of the pixel's first channel in the image, 0 for a pixel outside
  bool inside[4];
  float weight[4];
  float fy, fx;
  bool finite;
};

// Pixel coordinate of a normalised one along an axis of `size` pixels, as grid_sample's
// align_corners=True computes it.
inline float pixel_coordinate(float normalised, int64_t size) {
  return (normalised + 1.0f) * ((static_cast<float>(size) - 1.0f) * 0.5f);
}

inline Taps key_taps(const float* yx, const SamplingShape& s) {
  Taps t;
  const float iy = pixel_coordinate(yx[0], s.height), ix = pixel_coordinate(yx[1], s.width);
  t.finite = std::isfinite(iy) && std::isfinite(ix);
  if (!t.finite) return t;
  // Clamped so that the conversion to an integer is defined; where a coordinate is clamped both
  // of its pixels lie outside the map (they read zeros), so nothing else changes.
  const float y0 = std::floor(std::fmin(std::fmax(iy, -2.0f), static_cast<float>(s.height)));
  const float x0 = std::floor(std::fmin(std::fmax(ix, -2.0f), static_cast<float>(s.width)));
  const float y1 = y0 + 1.0f, x1 = x0 + 1.0f;
  t.fy = iy - y0;
  t.fx = ix - x0;
  // grid_sample's weights: each the area of the rectangle between the point and the opposite pixel.
  t.weight[0] = (x1 - ix) * (y1 - iy);
  t.weight[1] = (ix - x0) * (y1 - iy);
  t.weight[2] = (x1 - ix) * (iy - y0);
  t.weight[3] = (ix - x0) * (iy - y0);
  const int64_t row0 = static_cast<int64_t>(y0), col0 = static_cast<int64_t>(x0);
  for (int corner = 0; corner < 4; ++corner) {
    const int64_t row = row0 + corner / 2, col = col0 + corner % 2;
    t.inside[corner] = row >= 0 && row < s.height && col >= 0 && col < s.width;
    t.offset[corner] = t.inside[corner] ? (row * s.width + col) * s.channels : 0;
  }
  return t;
}

}  // namespace

// out (B, N, C): each group's keys sampled from x at pos.
at::Tensor sample_keys_forward(at::Tensor x, at::Tensor pos, int64_t groups) {
  const SamplingShape s = check_inputs(x, pos, groups);
  auto out = at::empty({s.batch, s.keys, s.channels}, x.options());
  const float* x_p = x.data_ptr<float>();
  const float* pos_p = pos.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  const int64_t cg = s.group_channels(), image = s.height * s.width * s.channels;
  // Items: (sample, key), all groups of a key at a time (one row of the output).
  at::parallel_for(0, s.batch * s.keys, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.keys, n = item % s.keys;
      float* out_row = out_p + item * s.channels;
      for (int64_t g = 0; g < s.groups; ++g) {
        const Taps t = key_taps(pos_p + ((b * s.groups + g) * s.keys + n) * 2, s);
        float* o = out_row + g * cg;
        if (!t.finite) {
          std::fill(o, o + cg, NAN);
          continue;
        }
        const float* src = x_p + b * image + g * cg;
        std::fill(o, o + cg, 0.0f);
        for (int corner = 0; corner < 4; ++corner) {
          if (!t.inside[corner]) continue;
          const float w = t.weight[corner];
          const float* v = src + t.offset[corner];
          for (int64_t c = 0; c < cg; ++c) o[c] += w * v[c];
        }
      }
    }
  });
  return out;
}

// The gradients of x (B, H, W, C) and of pos (B * G, N, 2), from the output's gradient (B, N, C).
std::vector<at::Tensor> sample_keys_backward(at::Tensor grad_out, at::Tensor x, at::Tensor pos,
                                             int64_t groups) {
  const SamplingShape s = check_inputs(x, pos, groups);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == s.batch && grad_out.size(1) == s.keys &&
                  grad_out.size(2) == s.channels,
              "expected grad_out (B, N, C) = (", s.batch, ", ", s.keys, ", ", s.channels, "), got ",
              grad_out.sizes());
  dat::check_contiguous_cpu({&grad_out}, at::kFloat, "grad_out");
  auto grad_x = at::zeros_like(x);
  auto grad_pos = at::empty_like(pos);
  const float* go_p = grad_out.data_ptr<float>();
  const float* x_p = x.data_ptr<float>();
  const float* pos_p = pos.data_ptr<float>();
  float* gx_p = grad_x.data_ptr<float>();
  float* gp_p = grad_pos.data_ptr<float>();
  const int64_t cg = s.group_channels(), image = s.height * s.width * s.channels;
  const float y_scale = (static_cast<float>(s.height) - 1.0f) * 0.5f;
  const float x_scale = (static_cast<float>(s.width) - 1.0f) * 0.5f;
  // Items: (sample, group), which write disjoint channels of grad_x; keys in order within each.
  at::parallel_for(0, s.batch * s.groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.groups, g = item % s.groups;
      const float* src = x_p + b * image + g * cg;
      float* dst = gx_p + b * image + g * cg;
      for (int64_t n = 0; n < s.keys; ++n) {
        const Taps t = key_taps(pos_p + (item * s.keys + n) * 2, s);
        float* gp = gp_p + (item * s.keys + n) * 2;
        if (!t.finite) {
          gp[0] = gp[1] = NAN;
          continue;
        }
        const float* go = go_p + (b * s.keys + n) * s.channels + g * cg;
        // dot[corner]: the output's gradient dotted with the pixel's channels (0 outside).
        float dot[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int corner = 0; corner < 4; ++corner) {
          if (!t.inside[corner]) continue;
          const float w = t.weight[corner];
          const float* v = src + t.offset[corner];
          float* d = dst + t.offset[corner];
          for (int64_t c = 0; c < cg; ++c) d[c] += w * go[c];
          dot[corner] = dat::dot(go, v, cg);
        }
        // d weight / d (iy, ix) of the four corners, as in grid_sample's backward.
        const float gy = (1.0f - t.fx) * (dot[2] - dot[0]) + t.fx * (dot[3] - dot[1]);
        const float gx = (1.0f - t.fy) * (dot[1] - dot[0]) + t.fy * (dot[3] - dot[2]);
        gp[0] = gy * y_scale;
        gp[1] = gx * x_scale;
      }
    }
  });
  return {grad_x, grad_pos};
}
