// Neighbourhood attention of DAT++ (NATTEN semantics, dilation 1) and its gradient, for float32
// on CPU: every query visits exactly the k x k keys of its window, so nothing is computed for
// keys outside it (the tiled PyTorch path computes its tiles' whole key regions and masks them).
//
// Same contract as _neighborhood_attention_op in projects/dat/models/attention.py: q (already
// scaled), k and v are (BH, H, W, d) with BH = batch * heads (head = bh % heads); rpb is
// (heads, 2k - 1, 2k - 1). Query (i, j) attends to the keys of the window that starts at
// clamp(i - k / 2, 0, H - k) (and the same for j), key (i', j') with the bias
// rpb[head, i' - i + k - 1, j' - j + k - 1]. The forward pass returns the output and each
// query's log-sum-exp, from which the backward pass recomputes the probabilities.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "vector_math.h"

namespace {

// y += alpha * x
inline void axpy(float* y, float alpha, const float* x, int64_t d) {
  for (int64_t c = 0; c < d; ++c) y[c] += alpha * x[c];
}

inline int64_t window_start(int64_t index, int64_t length, int64_t kernel_size) {
  return std::min(std::max(index - kernel_size / 2, int64_t(0)), length - kernel_size);
}

void check_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& rpb,
                  int64_t kernel_size) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "expected q, k, v of one shape (BH, H, W, d), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(kernel_size > 0 && kernel_size % 2 == 1 && q.size(1) >= kernel_size && q.size(2) >= kernel_size,
              "expected an odd kernel_size > 0 no larger than H and W, got ", kernel_size, " for q ", q.sizes());
  TORCH_CHECK(rpb.dim() == 3 && rpb.size(0) > 0 && rpb.size(1) == 2 * kernel_size - 1 &&
                  rpb.size(2) == 2 * kernel_size - 1,
              "expected rpb (heads, 2k - 1, 2k - 1) = (heads, ", 2 * kernel_size - 1, ", ", 2 * kernel_size - 1,
              ") with heads > 0, got ", rpb.sizes());
  TORCH_CHECK(q.size(0) % rpb.size(0) == 0, "expected a number of heads dividing BH = ", q.size(0), ", got ",
              rpb.size(0), " heads");
  dat::check_contiguous_cpu({&q, &k, &v, &rpb}, torch::kFloat, "q, k, v and rpb");
}

// The logits of query (i, j) of head bh (k * k, row-major over the window); returns the window
// origin through si, sj.
inline void window_logits(const float* q, const float* keys, const float* head_rpb, int64_t i, int64_t j,
                          int64_t height, int64_t width, int64_t d, int64_t kernel_size, float* logits, int64_t& si,
                          int64_t& sj) {
  const int64_t table = 2 * kernel_size - 1;
  si = window_start(i, height, kernel_size);
  sj = window_start(j, width, kernel_size);
  for (int64_t a = 0; a < kernel_size; ++a) {
    const float* bias = head_rpb + (si + a - i + kernel_size - 1) * table + (sj - j + kernel_size - 1);
    const float* key = keys + ((si + a) * width + sj) * d;
    for (int64_t b = 0; b < kernel_size; ++b) logits[a * kernel_size + b] = dat::dot(q, key + b * d, d) + bias[b];
  }
}

}  // namespace

// Returns out (BH, H, W, d) and lse (BH, H * W).
std::vector<torch::Tensor> neighborhood_attention_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                          torch::Tensor rpb, int64_t kernel_size) {
  check_inputs(q, k, v, rpb, kernel_size);
  const int64_t bh_count = q.size(0), height = q.size(1), width = q.size(2), d = q.size(3), heads = rpb.size(0);
  const int64_t window = kernel_size * kernel_size, table_size = rpb.size(1) * rpb.size(2);
  auto out = torch::empty_like(q);
  auto lse = torch::empty({bh_count, height * width}, q.options());
  const float* q_p = q.data_ptr<float>();
  const float* k_p = k.data_ptr<float>();
  const float* v_p = v.data_ptr<float>();
  const float* rpb_p = rpb.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  // One work item per (bh, query row).
  at::parallel_for(0, bh_count * height, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits(window);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / height, i = item % height;
      const int64_t head_offset = bh * height * width * d;
      const float* head_rpb = rpb_p + (bh % heads) * table_size;
      for (int64_t j = 0; j < width; ++j) {
        const int64_t query = i * width + j;
        int64_t si, sj;
        window_logits(q_p + head_offset + query * d, k_p + head_offset, head_rpb, i, j, height, width, d,
                      kernel_size, logits.data(), si, sj);
        const float row_max = *std::max_element(logits.begin(), logits.end());
        const float sum = dat::exp_shifted_sum(logits.data(), window, row_max);
        float* o = out_p + head_offset + query * d;
        std::fill(o, o + d, 0.0f);
        for (int64_t a = 0; a < kernel_size; ++a) {
          const float* value = v_p + head_offset + ((si + a) * width + sj) * d;
          for (int64_t b = 0; b < kernel_size; ++b) axpy(o, logits[a * kernel_size + b], value + b * d, d);
        }
        for (int64_t c = 0; c < d; ++c) o[c] /= sum;  // unnormalised weights, then one division
        lse_p[bh * height * width + query] = std::log(sum) + row_max;
      }
    }
  });
  return {out, lse};
}

// Returns grad_q, grad_k, grad_v (BH, H, W, d) and grad_rpb per bh (BH, 2k - 1, 2k - 1) (the
// caller sums it over the batch). Work items are whole bh slices, so that the scatter into the
// keys' and values' gradients never races.
std::vector<torch::Tensor> neighborhood_attention_backward(torch::Tensor grad_out, torch::Tensor q, torch::Tensor k,
                                                           torch::Tensor v, torch::Tensor rpb, torch::Tensor out,
                                                           torch::Tensor lse, int64_t kernel_size) {
  check_inputs(q, k, v, rpb, kernel_size);
  dat::check_contiguous_cpu({&grad_out, &out, &lse}, torch::kFloat, "grad_out, out and lse");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "expected grad_out and out of q's shape ",
              q.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  const int64_t bh_count = q.size(0), height = q.size(1), width = q.size(2), d = q.size(3), heads = rpb.size(0);
  TORCH_CHECK(lse.sizes() == torch::IntArrayRef({bh_count, height * width}), "expected lse (BH, H * W) = (", bh_count,
              ", ", height * width, "), got ", lse.sizes());
  const int64_t window = kernel_size * kernel_size, table = rpb.size(1), table_size = table * table;
  auto grad_q = torch::empty_like(q);
  auto grad_k = torch::zeros_like(k);
  auto grad_v = torch::zeros_like(v);
  auto grad_rpb = torch::zeros({bh_count, table, table}, q.options());
  const float* go_p = grad_out.data_ptr<float>();
  const float* q_p = q.data_ptr<float>();
  const float* k_p = k.data_ptr<float>();
  const float* v_p = v.data_ptr<float>();
  const float* rpb_p = rpb.data_ptr<float>();
  const float* out_p = out.data_ptr<float>();
  const float* lse_p = lse.data_ptr<float>();
  float* gq_p = grad_q.data_ptr<float>();
  float* gk_p = grad_k.data_ptr<float>();
  float* gv_p = grad_v.data_ptr<float>();
  float* grpb_p = grad_rpb.data_ptr<float>();
  at::parallel_for(0, bh_count, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits(window);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t head_offset = bh * height * width * d;
      const float* head_rpb = rpb_p + (bh % heads) * table_size;
      float* head_grad_rpb = grpb_p + bh * table_size;
      for (int64_t i = 0; i < height; ++i) {
        for (int64_t j = 0; j < width; ++j) {
          const int64_t query = i * width + j, offset = head_offset + query * d;
          const float* qv = q_p + offset;
          const float* dout = go_p + offset;
          int64_t si, sj;
          window_logits(qv, k_p + head_offset, head_rpb, i, j, height, width, d, kernel_size, logits.data(), si, sj);
          const float query_lse = lse_p[bh * height * width + query];
          const float delta = dat::dot(dout, out_p + offset, d);  // D = rowsum(dO * O)
          float* gq = gq_p + offset;
          std::fill(gq, gq + d, 0.0f);
          for (int64_t a = 0; a < kernel_size; ++a) {
            const int64_t key_offset = head_offset + ((si + a) * width + sj) * d;
            float* bias_grad = head_grad_rpb + (si + a - i + kernel_size - 1) * table + (sj - j + kernel_size - 1);
            for (int64_t b = 0; b < kernel_size; ++b) {
              const int64_t key = key_offset + b * d;
              const float p = dat::exp_approx(logits[a * kernel_size + b] - query_lse);
              const float ds = p * (dat::dot(dout, v_p + key, d) - delta);  // dS = P * (dP - D)
              axpy(gv_p + key, p, dout, d);
              axpy(gk_p + key, ds, qv, d);
              axpy(gq, ds, k_p + key, d);
              bias_grad[b] += ds;
            }
          }
        }
      }
    }
  });
  return {grad_q, grad_k, grad_v, grad_rpb};
}
