// The deformable relative position bias of DAT / DAT++ and its gradient, for float32 on CPU.
//
// Same contract and arithmetic as projects/dat/models/attention.py (_DeformableBias): the bias
// of query (r, c) and key n is the bilinear read of a padded, transposed (x-major) table at the
// padded pixel coordinates (iy[r, n] + fy[r, n], ix[c, n] + fx[c, n]); the taps floor and
// floor + 1 always exist in the padded table. Rows are interpolated in y first, then in x, as
// the PyTorch path does (which may fuse multiply-adds: equal to float32 round-off).
#include <ATen/Parallel.h>
#include <torch/extension.h>

namespace {

void check_inputs(const torch::Tensor& bias, const torch::Tensor& table_t, const torch::Tensor& iy,
                  const torch::Tensor& fy, const torch::Tensor& ix, const torch::Tensor& fx) {
  TORCH_CHECK(bias.dim() == 5 && table_t.dim() == 4 && iy.dim() == 3 && ix.dim() == 3,
              "expected bias (nb, hg, rows, W, Ns), table (nb, hg, Tw + 3, Th + 3), iy/fy (nb, rows, Ns), "
              "ix/fx (nb, W, Ns)");
  const int64_t nb = bias.size(0), hg = bias.size(1), rows = bias.size(2), width = bias.size(3), ns = bias.size(4);
  TORCH_CHECK(table_t.size(0) == nb && table_t.size(1) == hg, "table does not match the bias's (nb, hg)");
  TORCH_CHECK(iy.sizes() == torch::IntArrayRef({nb, rows, ns}) && fy.sizes() == iy.sizes(), "iy/fy shape mismatch");
  TORCH_CHECK(ix.sizes() == torch::IntArrayRef({nb, width, ns}) && fx.sizes() == ix.sizes(), "ix/fx shape mismatch");
  for (const auto* t : {&bias, &table_t, &fy, &fx}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "expected contiguous float32 CPU tensors");
  }
  for (const auto* t : {&iy, &ix}) {
    TORCH_CHECK(t->scalar_type() == torch::kLong && t->is_contiguous() && t->device().is_cpu(),
                "expected contiguous int64 CPU index tensors");
  }
}

}  // namespace

// bias (nb, hg, rows, W, Ns) = the bilinear reads; overwritten.
void deformable_bias(torch::Tensor bias, torch::Tensor table_t, torch::Tensor iy, torch::Tensor fy,
                     torch::Tensor ix, torch::Tensor fx) {
  check_inputs(bias, table_t, iy, fy, ix, fx);
  const int64_t hg = bias.size(1), rows = bias.size(2), width = bias.size(3), ns = bias.size(4);
  const int64_t table_size = table_t.size(2) * table_t.size(3), column = table_t.size(3);
  float* out = bias.data_ptr<float>();
  const float* table = table_t.data_ptr<float>();
  const int64_t* iy_p = iy.data_ptr<int64_t>();
  const float* fy_p = fy.data_ptr<float>();
  const int64_t* ix_p = ix.data_ptr<int64_t>();
  const float* fx_p = fx.data_ptr<float>();
  // One work item per (batch-group, head, query row).
  at::parallel_for(0, bias.size(0) * hg * rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (hg * rows), bh = item / rows, r = item % rows;
      const float* head_table = table + bh * table_size;
      const int64_t* row_iy = iy_p + (b * rows + r) * ns;
      const float* row_fy = fy_p + (b * rows + r) * ns;
      for (int64_t c = 0; c < width; ++c) {
        const int64_t* col_ix = ix_p + (b * width + c) * ns;
        const float* col_fx = fx_p + (b * width + c) * ns;
        float* o = out + (item * width + c) * ns;
        for (int64_t n = 0; n < ns; ++n) {
          const float* x0 = head_table + col_ix[n] * column + row_iy[n];  // taps (y0, x0), (y0 + 1, x0)
          const float* x1 = x0 + column;                                  // taps (y0, x1), (y0 + 1, x1)
          const float r0 = x0[0] + (x0[1] - x0[0]) * row_fy[n];
          const float r1 = x1[0] + (x1[1] - x1[0]) * row_fy[n];
          o[n] = r0 + (r1 - r0) * col_fx[n];
        }
      }
    }
  });
}

// Accumulates the gradients of the table (nb, hg, Tw + 3, Th + 3) and, per head, of the tap
// weights fy (nb, hg, rows, Ns) and fx (nb, hg, W, Ns) from grad_bias (nb, hg, rows, W, Ns).
// Work items are (batch-group, head) pairs, so that no two threads write the same entry.
void deformable_bias_backward(torch::Tensor grad_bias, torch::Tensor table_t, torch::Tensor iy, torch::Tensor fy,
                              torch::Tensor ix, torch::Tensor fx, torch::Tensor grad_table_t,
                              torch::Tensor grad_fy_heads, torch::Tensor grad_fx_heads) {
  check_inputs(grad_bias, table_t, iy, fy, ix, fx);
  const int64_t nb = grad_bias.size(0), hg = grad_bias.size(1), rows = grad_bias.size(2), width = grad_bias.size(3),
                ns = grad_bias.size(4);
  TORCH_CHECK(grad_table_t.sizes() == table_t.sizes() && grad_table_t.is_contiguous(), "grad_table shape mismatch");
  TORCH_CHECK(grad_fy_heads.sizes() == torch::IntArrayRef({nb, hg, rows, ns}) && grad_fy_heads.is_contiguous(),
              "grad_fy_heads must be (nb, hg, rows, Ns)");
  TORCH_CHECK(grad_fx_heads.sizes() == torch::IntArrayRef({nb, hg, width, ns}) && grad_fx_heads.is_contiguous(),
              "grad_fx_heads must be (nb, hg, W, Ns)");
  const int64_t table_size = table_t.size(2) * table_t.size(3), column = table_t.size(3);
  const float* grad = grad_bias.data_ptr<float>();
  const float* table = table_t.data_ptr<float>();
  const int64_t* iy_p = iy.data_ptr<int64_t>();
  const float* fy_p = fy.data_ptr<float>();
  const int64_t* ix_p = ix.data_ptr<int64_t>();
  const float* fx_p = fx.data_ptr<float>();
  float* grad_table = grad_table_t.data_ptr<float>();
  float* grad_fy = grad_fy_heads.data_ptr<float>();
  float* grad_fx = grad_fx_heads.data_ptr<float>();
  at::parallel_for(0, nb * hg, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / hg;
      const float* head_table = table + bh * table_size;
      float* head_grad_table = grad_table + bh * table_size;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t* row_iy = iy_p + (b * rows + r) * ns;
        const float* row_fy = fy_p + (b * rows + r) * ns;
        float* row_grad_fy = grad_fy + (bh * rows + r) * ns;
        for (int64_t c = 0; c < width; ++c) {
          const int64_t* col_ix = ix_p + (b * width + c) * ns;
          const float* col_fx = fx_p + (b * width + c) * ns;
          float* col_grad_fx = grad_fx + (bh * width + c) * ns;
          const float* g = grad + ((bh * rows + r) * width + c) * ns;
          for (int64_t n = 0; n < ns; ++n) {
            const int64_t offset = col_ix[n] * column + row_iy[n];
            const float* x0 = head_table + offset;
            const float* x1 = x0 + column;
            const float wy = row_fy[n], wx = col_fx[n];
            const float dy0 = x0[1] - x0[0], dy1 = x1[1] - x1[0];
            const float r0 = x0[0] + dy0 * wy, r1 = x1[0] + dy1 * wy;
            col_grad_fx[n] += g[n] * (r1 - r0);
            const float g1 = g[n] * wx, g0 = g[n] - g1;  // gradients of r0 and r1
            row_grad_fy[n] += g0 * dy0 + g1 * dy1;
            float* gx0 = head_grad_table + offset;
            float* gx1 = gx0 + column;
            const float g0_bottom = g0 * wy, g1_bottom = g1 * wy;
            gx0[0] += g0 - g0_bottom;
            gx0[1] += g0_bottom;
            gx1[0] += g1 - g1_bottom;
            gx1[1] += g1_bottom;
          }
        }
      }
    }
  });
}
