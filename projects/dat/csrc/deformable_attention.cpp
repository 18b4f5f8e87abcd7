// The softmax of DAT / DAT++'s deformable attention, with the relative position bias read on the
// fly, and its gradient, for float32 on CPU.
//
// The caller computes q.k of a chunk of queries (a matrix product); these kernels add the bias,
// take the softmax (or recompute it from the log-sum-exp) and, backwards, turn dP = dO.v into
// dS = P * (dP - D) and accumulate the gradients of the bias table and of the keys' coordinates
// from it, each in one pass while a query's Ns logits are in the L1 cache (in PyTorch these are
// 6 passes over the chunk forward and 10 backward; that path, projects/dat/models/attention.py
// _DeformableSoftmax, is kept beside them and agrees to float32 round-off).
//
// The bias of query (r, c) and key n is the bilinear read of a padded table at the padded pixel
// coordinates (iy[r, n] + fy[r, n], ix[c, n] + fx[c, n]); the taps floor and floor + 1 always
// exist in the padded table, and a coordinate with both taps in the zero padding gets no gradient
// (so the gradient of a key's coordinate is summed over all its queries as it is computed). Rows
// are interpolated in y first, then in x, as the PyTorch path does (which may fuse multiply-adds:
// equal to float32 round-off).
//
// Separably: for one query row r, key n's table row interpolated in y,
//   R[n][t] = T[iy][t] + fy * (T[iy + 1][t] - T[iy][t]),
// is needed only at the columns t that key's x taps reach (ix is monotonic in the query column
// c, so from ix[0, n] to ix[W - 1, n] + 1); it is computed once per row (contiguous in t) and
// then read with two adjacent loads per query column, instead of four table reads per pair.
// The gradient runs the same way backwards: the pairs' gradients are gathered into R's
// gradient, which is then spread over the two table rows once per query row.
// The kernels take the table y-major (rows of Tw + 4 contiguous).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "vector_math.h"

namespace {

// What the kernels read of the bias: the padded tables and the tap indices and weights.
struct BiasInputs {
  const float* table;     // (nb, hg, Th + 4, Tw + 4)
  const int32_t* iy;      // (nb, rows, Ns)
  const float* fy;        // (nb, rows, Ns)
  const int32_t* ix;      // (nb, W, Ns)
  const float* fx;        // (nb, W, Ns)
  const int32_t* x_taps;  // (nb, Ns, 2)
  int64_t table_size;     // (Th + 4) * (Tw + 4)
  int64_t row_length;     // Tw + 4
};

// Checks that every tap the kernels follow lies inside the padded table: rows iy and iy + 1, and
// for each key n of batch-group b the columns x_taps[b, n] = [lo, hi] that its interpolated row is
// computed at, which must hold the columns ix and ix + 1 of all its queries.
void check_taps(const torch::Tensor& table, const torch::Tensor& iy, const torch::Tensor& ix,
                const torch::Tensor& x_taps) {
  const int64_t table_rows = table.size(2), row_length = table.size(3);
  dat::check_index_range(iy, 0, table_rows - 2, "the y tap indices iy (rows of the padded table, up to Th + 2)");
  dat::check_index_range(x_taps, 0, row_length - 1, "the x tap ranges x_taps (columns of the padded table)");
  const int64_t nb = ix.size(0), width = ix.size(1), ns = ix.size(2);
  const int32_t* ix_p = ix.data_ptr<int32_t>();
  const int32_t* taps_p = x_taps.data_ptr<int32_t>();
  for (int64_t b = 0; b < nb; ++b) {
    const int32_t* key_taps = taps_p + b * ns * 2;
    for (int64_t c = 0; c < width; ++c) {
      const int32_t* col_ix = ix_p + (b * width + c) * ns;
      for (int64_t n = 0; n < ns; ++n) {
        TORCH_CHECK(col_ix[n] >= key_taps[2 * n] && int64_t(col_ix[n]) + 1 <= key_taps[2 * n + 1],
                    "expected the x tap indices ix[", b, ", ", c, ", ", n, "] and ix + 1 inside x_taps[", b, ", ", n,
                    "] = [", key_taps[2 * n], ", ", key_taps[2 * n + 1], "], got ix = ", col_ix[n]);
      }
    }
  }
}

// Checks the shapes, dtypes, layouts and tap indices against the logits' (nb, hg, rows, W, Ns).
BiasInputs bias_inputs(const torch::Tensor& logits, const torch::Tensor& table, const torch::Tensor& iy,
                       const torch::Tensor& fy, const torch::Tensor& ix, const torch::Tensor& fx,
                       const torch::Tensor& x_taps) {
  TORCH_CHECK(logits.dim() == 5 && table.dim() == 4 && iy.dim() == 3 && ix.dim() == 3,
              "expected logits (nb, hg, rows, W, Ns), table (nb, hg, Th + 4, Tw + 4), iy/fy (nb, rows, Ns), "
              "ix/fx (nb, W, Ns), got logits ", logits.sizes(), ", table ", table.sizes(), ", iy ", iy.sizes(),
              ", ix ", ix.sizes());
  const int64_t nb = logits.size(0), hg = logits.size(1), rows = logits.size(2), width = logits.size(3),
                ns = logits.size(4);
  TORCH_CHECK(table.size(0) == nb && table.size(1) == hg, "expected a table (nb, hg, Th + 4, Tw + 4) for the logits' ",
              "(nb, hg) = (", nb, ", ", hg, "), got ", table.sizes());
  TORCH_CHECK(iy.sizes() == torch::IntArrayRef({nb, rows, ns}) && fy.sizes() == iy.sizes(), "expected iy and fy (",
              nb, ", ", rows, ", ", ns, ") for the logits ", logits.sizes(), ", got ", iy.sizes(), " and ", fy.sizes());
  TORCH_CHECK(ix.sizes() == torch::IntArrayRef({nb, width, ns}) && fx.sizes() == ix.sizes(), "expected ix and fx (",
              nb, ", ", width, ", ", ns, ") for the logits ", logits.sizes(), ", got ", ix.sizes(), " and ",
              fx.sizes());
  TORCH_CHECK(x_taps.sizes() == torch::IntArrayRef({nb, ns, 2}), "expected x_taps (", nb, ", ", ns, ", 2), got ",
              x_taps.sizes());
  dat::check_contiguous_cpu({&logits, &table, &fy, &fx}, torch::kFloat, "the logits, tables and tap weights");
  dat::check_contiguous_cpu({&iy, &ix, &x_taps}, torch::kInt, "the tap indices");
  check_taps(table, iy, ix, x_taps);
  return {table.data_ptr<float>(), iy.data_ptr<int32_t>(), fy.data_ptr<float>(), ix.data_ptr<int32_t>(),
          fx.data_ptr<float>(), x_taps.data_ptr<int32_t>(), table.size(2) * table.size(3), table.size(3)};
}

// One float32 per query: nb * hg * rows * W contiguous values.
void check_per_query(const torch::Tensor& t, const torch::Tensor& logits, const char* name) {
  dat::check_contiguous_cpu({&t}, torch::kFloat, name);
  const int64_t queries = logits.size(0) * logits.size(1) * logits.size(2) * logits.size(3);
  TORCH_CHECK(t.numel() == queries, "expected ", name, " with one value per query (", queries,
              " for the logits ", logits.sizes(), "), got ", t.sizes());
}

// R[n][t] for t in taps[n] = [lo, hi]: the head's table rows iy[n], iy[n] + 1 interpolated at fy[n].
inline void interpolate_rows(const float* head_table, int64_t row_length, const int32_t* row_iy, const float* row_fy,
                             const int32_t* taps, int64_t ns, float* rows) {
  for (int64_t n = 0; n < ns; ++n) {
    const float* top = head_table + row_iy[n] * row_length;
    const float* bottom = top + row_length;
    const float w = row_fy[n];
    float* out = rows + n * row_length;
    for (int64_t t = taps[2 * n]; t <= taps[2 * n + 1]; ++t) out[t] = top[t] + (bottom[t] - top[t]) * w;
  }
}

// The forward softmax (recompute = false: writes the probabilities and lse) or its recomputation
// from lse (recompute = true: writes exp(s - lse)), for logits holding q.k.
void softmax_pass(torch::Tensor logits, double scale, const torch::Tensor& table, const torch::Tensor& iy,
                  const torch::Tensor& fy, const torch::Tensor& ix, const torch::Tensor& fx,
                  const torch::Tensor& x_taps, torch::Tensor lse, bool recompute) {
  const BiasInputs bias = bias_inputs(logits, table, iy, fy, ix, fx, x_taps);
  check_per_query(lse, logits, "lse");
  const int64_t hg = logits.size(1), rows = logits.size(2), width = logits.size(3), ns = logits.size(4);
  const int64_t row_length = bias.row_length;
  const float alpha = static_cast<float>(scale);
  float* logits_p = logits.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  // One work item per (batch-group, head, query row).
  at::parallel_for(0, logits.size(0) * hg * rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> interpolated(ns * row_length);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (hg * rows), bh = item / rows, r = item % rows;
      interpolate_rows(bias.table + bh * bias.table_size, row_length, bias.iy + (b * rows + r) * ns,
                       bias.fy + (b * rows + r) * ns, bias.x_taps + b * ns * 2, ns, interpolated.data());
      for (int64_t c = 0; c < width; ++c) {
        const int32_t* col_ix = bias.ix + (b * width + c) * ns;
        const float* col_fx = bias.fx + (b * width + c) * ns;
        float* s = logits_p + (item * width + c) * ns;
        float* query_lse = lse_p + item * width + c;
        float row_max = -std::numeric_limits<float>::infinity();
        for (int64_t n = 0; n < ns; ++n) {
          const float* taps = interpolated.data() + n * row_length + col_ix[n];
          s[n] = s[n] * alpha + (taps[0] + (taps[1] - taps[0]) * col_fx[n]);
          row_max = std::max(row_max, s[n]);
        }
        if (recompute) {
          dat::exp_shifted(s, ns, *query_lse);
        } else {
          const float total = dat::exp_shifted_sum(s, ns, row_max);
          const float inverse = 1.0f / total;
          for (int64_t n = 0; n < ns; ++n) s[n] *= inverse;
          *query_lse = std::log(total) + row_max;
        }
      }
    }
  });
}

}  // namespace

// logits (nb, hg, rows, W, Ns) holds scale-free q.k on entry and the softmax probabilities of
// scale * q.k + bias on return; lse (nb, hg, rows, W) receives each query's log-sum-exp.
void deformable_softmax(torch::Tensor logits, double scale, torch::Tensor table, torch::Tensor iy, torch::Tensor fy,
                        torch::Tensor ix, torch::Tensor fx, torch::Tensor x_taps, torch::Tensor lse) {
  softmax_pass(logits, scale, table, iy, fy, ix, fx, x_taps, lse, false);
}

// The same probabilities recomputed from lse (as deformable_softmax returned it): exp(scale * q.k + bias - lse).
void deformable_probabilities(torch::Tensor logits, double scale, torch::Tensor table, torch::Tensor iy,
                              torch::Tensor fy, torch::Tensor ix, torch::Tensor fx, torch::Tensor x_taps,
                              torch::Tensor lse) {
  softmax_pass(logits, scale, table, iy, fy, ix, fx, x_taps, lse, true);
}

// grad (nb, hg, rows, W, Ns) holds dP = dO.v on entry and dS = P * (dP - D) on return (the
// gradient of the logits and of the bias), from probs P and delta D = rowsum(dO * O) (nb, hg,
// rows, W). Accumulates the gradients of the table (nb, hg, Th + 4, Tw + 4) and, per head, of
// each key's (y, x) pixel coordinate in the table, grad_coords_heads (nb, hg, Ns, 2): the sums
// over the chunk's queries of dS times the slope of the bias (summed per query row in float32,
// over the rows in float64: a key's sum runs over every query of the chunk). Work items are
// (batch-group, head) pairs, so that no two threads write the same entry.
void deformable_softmax_backward(torch::Tensor grad, torch::Tensor probs, torch::Tensor delta, torch::Tensor table,
                                 torch::Tensor iy, torch::Tensor fy, torch::Tensor ix, torch::Tensor fx,
                                 torch::Tensor x_taps, torch::Tensor grad_table, torch::Tensor grad_coords_heads) {
  const BiasInputs bias = bias_inputs(grad, table, iy, fy, ix, fx, x_taps);
  dat::check_contiguous_cpu({&probs, &grad_table, &grad_coords_heads}, torch::kFloat,
                            "probs and the gradient accumulators");
  TORCH_CHECK(probs.sizes() == grad.sizes(), "expected probs of grad's shape ", grad.sizes(), ", got ", probs.sizes());
  check_per_query(delta, grad, "delta");
  const int64_t nb = grad.size(0), hg = grad.size(1), rows = grad.size(2), width = grad.size(3), ns = grad.size(4);
  TORCH_CHECK(grad_table.sizes() == table.sizes(), "expected grad_table of the table's shape ", table.sizes(),
              ", got ", grad_table.sizes());
  TORCH_CHECK(grad_coords_heads.sizes() == torch::IntArrayRef({nb, hg, ns, 2}), "expected grad_coords_heads (", nb,
              ", ", hg, ", ", ns, ", 2), got ", grad_coords_heads.sizes());
  const int64_t row_length = bias.row_length;
  float* grad_p = grad.data_ptr<float>();
  const float* probs_p = probs.data_ptr<float>();
  const float* delta_p = delta.data_ptr<float>();
  float* grad_table_p = grad_table.data_ptr<float>();
  float* grad_coords = grad_coords_heads.data_ptr<float>();
  at::parallel_for(0, nb * hg, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> interpolated(ns * row_length), grad_interpolated(ns * row_length);
    std::vector<double> grad_y(ns), grad_x(ns);
    std::vector<float> row_grad_x(ns);  // one query row's sums, added to grad_x in float64
    for (int64_t bh = begin; bh < end; ++bh) {
      std::fill(grad_y.begin(), grad_y.end(), 0.0);
      std::fill(grad_x.begin(), grad_x.end(), 0.0);
      const int64_t b = bh / hg;
      const float* head_table = bias.table + bh * bias.table_size;
      float* head_grad_table = grad_table_p + bh * bias.table_size;
      const int32_t* key_taps = bias.x_taps + b * ns * 2;
      for (int64_t r = 0; r < rows; ++r) {
        const int32_t* row_iy = bias.iy + (b * rows + r) * ns;
        const float* row_fy = bias.fy + (b * rows + r) * ns;
        interpolate_rows(head_table, row_length, row_iy, row_fy, key_taps, ns, interpolated.data());
        for (int64_t n = 0; n < ns; ++n) {
          float* grad_row = grad_interpolated.data() + n * row_length;
          std::fill(grad_row + key_taps[2 * n], grad_row + key_taps[2 * n + 1] + 1, 0.0f);
        }
        std::fill(row_grad_x.begin(), row_grad_x.end(), 0.0f);
        for (int64_t c = 0; c < width; ++c) {
          const int64_t query = (bh * rows + r) * width + c;
          const int32_t* col_ix = bias.ix + (b * width + c) * ns;
          const float* col_fx = bias.fx + (b * width + c) * ns;
          float* g = grad_p + query * ns;
          const float* p = probs_p + query * ns;
          const float query_delta = delta_p[query];
          for (int64_t n = 0; n < ns; ++n) g[n] = p[n] * (g[n] - query_delta);
          for (int64_t n = 0; n < ns; ++n) {
            const int64_t tap = n * row_length + col_ix[n];
            const float* taps = interpolated.data() + tap;
            float* grad_taps = grad_interpolated.data() + tap;
            row_grad_x[n] += g[n] * (taps[1] - taps[0]);
            const float g1 = g[n] * col_fx[n];  // gradients of the taps: g - g1 and g1
            grad_taps[0] += g[n] - g1;
            grad_taps[1] += g1;
          }
        }
        // R[n][t] = top[t] + fy * (bottom[t] - top[t]) backwards.
        for (int64_t n = 0; n < ns; ++n) {
          const float* top = head_table + row_iy[n] * row_length;
          const float* bottom = top + row_length;
          float* grad_top = head_grad_table + row_iy[n] * row_length;
          float* grad_bottom = grad_top + row_length;
          const float w = row_fy[n];
          const float* grad_row = grad_interpolated.data() + n * row_length;
          float grad_w = 0.0f;
          for (int64_t t = key_taps[2 * n]; t <= key_taps[2 * n + 1]; ++t) {
            grad_w += grad_row[t] * (bottom[t] - top[t]);
            const float to_bottom = grad_row[t] * w;
            grad_top[t] += grad_row[t] - to_bottom;
            grad_bottom[t] += to_bottom;
          }
          grad_y[n] += grad_w;
          grad_x[n] += row_grad_x[n];
        }
      }
      float* head_grad_coords = grad_coords + bh * ns * 2;
      for (int64_t n = 0; n < ns; ++n) {
        head_grad_coords[2 * n] += static_cast<float>(grad_y[n]);
        head_grad_coords[2 * n + 1] += static_cast<float>(grad_x[n]);
      }
    }
  });
}
