// Neighbourhood attention of DAT++ (NATTEN semantics, dilation 1) and its gradient, for float32
// on CPU: every query visits exactly the k x k keys of its window, so nothing is computed for
// keys outside it (the tiled PyTorch path computes its tiles' whole key regions and masks them).
//
// Same contract as _neighborhood_attention_op in projects/dat/ops/neighborhood.py: q, k and v are
// (B, H, W, heads, d) with contiguous channels and rows W pixels apart, in any other strides, so
// that the N block's one (B, H, W, 3, heads, d) buffer of the qkv projection is read in place;
// the output and every gradient are contiguous (B, H, W, heads, d), the layout of the projection
// that follows. Head bh = b * heads + head; rpb is (heads, 2k - 1, 2k - 1). Query (i, j) attends
// to the keys of the window that starts at clamp(i - k / 2, 0, H - k) (and the same for j), key
// (i', j') with the logit scale * q.k + rpb[head, i' - i + k - 1, j' - j + k - 1], the query
// scaled first, as (scale * q).k. The forward pass returns the output and each query's
// log-sum-exp, from which the backward pass recomputes the probabilities. Both passes take 8
// neighbouring queries of a row at a time where their windows are not clamped at the row's ends
// (forward_query_tile, backward_query_tile), with the same numbers as window by window.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

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

// One head's map in a (B, H, W, heads, d) tensor: pixel p = i * W + j at data + (p - first) *
// stride (first > 0: a buffer that holds the map's pixels from first on).
template <typename T>
struct Pixels {
  T* data;
  int64_t stride;  // floats from one pixel to the next
  int64_t first = 0;

  T* at(int64_t pixel) const { return data + (pixel - first) * stride; }
};

// Head bh's map in t (B, H, W, heads, d) with rows W pixels apart (checked by check_layout).
template <typename T>
Pixels<T> head_pixels(T* data, const at::Tensor& t, int64_t bh) {
  const int64_t heads = t.size(3);
  return {data + bh / heads * t.stride(0) + bh % heads * t.stride(3), t.stride(2)};
}

void check_layout(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "expected a float32 CPU tensor for ", name,
              ", got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.stride(4) == 1 && t.stride(1) == t.size(2) * t.stride(2), "expected ", name,
              " (B, H, W, heads, d) with contiguous channels and rows W pixels apart, got strides ", t.strides(),
              " for shape ", t.sizes());
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rpb,
                  int64_t kernel_size) {
  TORCH_CHECK(q.dim() == 5 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "expected q, k, v of one shape (B, H, W, heads, d), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(kernel_size > 0 && kernel_size % 2 == 1 && q.size(1) >= kernel_size && q.size(2) >= kernel_size,
              "expected an odd kernel_size > 0 no larger than H and W, got ", kernel_size, " for q ", q.sizes());
  TORCH_CHECK(rpb.dim() == 3 && rpb.size(0) == q.size(3) && rpb.size(1) == 2 * kernel_size - 1 &&
                  rpb.size(2) == 2 * kernel_size - 1,
              "expected rpb (heads, 2k - 1, 2k - 1) = (", q.size(3), ", ", 2 * kernel_size - 1, ", ",
              2 * kernel_size - 1, "), got ", rpb.sizes());
  check_layout(q, "q");
  check_layout(k, "k");
  check_layout(v, "v");
  dat::check_contiguous_cpu({&rpb}, at::kFloat, "rpb");
}

// q_scaled = scale * q (d floats): the query as the logits read it.
inline void scale_query(const float* q, float scale, int64_t d, float* q_scaled) {
  for (int64_t c = 0; c < d; ++c) q_scaled[c] = q[c] * scale;
}

// The logits of the (scaled) query q at (i, j) (k * k, row-major over the window); returns the
// window origin through si, sj.
inline void window_logits(const float* q, Pixels<const float> keys, const float* head_rpb, int64_t i, int64_t j,
                          int64_t height, int64_t width, int64_t d, int64_t kernel_size, float* logits, int64_t& si,
                          int64_t& sj) {
  const int64_t table = 2 * kernel_size - 1;
  si = window_start(i, height, kernel_size);
  sj = window_start(j, width, kernel_size);
  for (int64_t a = 0; a < kernel_size; ++a) {
    const float* bias = head_rpb + (si + a - i + kernel_size - 1) * table + (sj - j + kernel_size - 1);
    const int64_t row = (si + a) * width + sj;
    for (int64_t b = 0; b < kernel_size; ++b) logits[a * kernel_size + b] = dat::dot(q, keys.at(row + b), d) + bias[b];
  }
}

// Query (i, j)'s output (d values at out) and log-sum-exp, window by window: its logits are dot
// products, and the output sums the weighted values. Scratch: d floats.
void forward_one_query(Pixels<const float> q, Pixels<const float> k, Pixels<const float> v, const float* head_rpb,
                       float scale, int64_t i, int64_t j, int64_t height, int64_t width, int64_t d,
                       int64_t kernel_size, float* logits, float* scratch, float* out, float* lse) {
  const int64_t window = kernel_size * kernel_size;
  int64_t si, sj;
  scale_query(q.at(i * width + j), scale, d, scratch);
  window_logits(scratch, k, head_rpb, i, j, height, width, d, kernel_size, logits, si, sj);
  const float row_max = *std::max_element(logits, logits + window);
  const float sum = dat::exp_shifted_sum(logits, window, row_max);
  std::fill(out, out + d, 0.0f);
  for (int64_t a = 0; a < kernel_size; ++a) {
    const int64_t row = (si + a) * width + sj;
    for (int64_t b = 0; b < kernel_size; ++b) axpy(out, logits[a * kernel_size + b], v.at(row + b), d);
  }
  for (int64_t c = 0; c < d; ++c) out[c] /= sum;  // unnormalised weights, then one division
  *lse = std::log(sum) + row_max;
}

// What one head's queries read and write in the backward pass, from a pixel on: the output's
// gradient, the output and the queries' gradient (B, H, W, heads, d), and the log-sum-exps (H * W).
struct QueryGradients {
  Pixels<const float> grad_out, out;
  const float* lse;
  Pixels<float> grad_q;

  // The same from pixel p on (e.g. a row's first query).
  QueryGradients from(int64_t p) const {
    return {{grad_out.at(p), grad_out.stride}, {out.at(p), out.stride}, lse + p, {grad_q.at(p), grad_q.stride}};
  }
};

// One head's gradients: its queries' (QueryGradients) and its keys' and values'.
struct HeadGradients {
  QueryGradients queries;
  Pixels<float> grad_k, grad_v;
};

// Query (i, j)'s terms of the gradients, window by window: its grad_q, and its terms of grad_k,
// grad_v (added to the window's keys) and of the bias's gradient (head_grad_rpb). Scratch: d
// floats.
void backward_one_query(Pixels<const float> q, Pixels<const float> k, Pixels<const float> v, const HeadGradients& g,
                        const float* head_rpb, float scale, int64_t i, int64_t j, int64_t height, int64_t width,
                        int64_t d, int64_t kernel_size, float* logits, float* scratch, float* head_grad_rpb) {
  const int64_t table = 2 * kernel_size - 1, query = i * width + j;
  const float* qv = scratch;
  const QueryGradients& query_maps = g.queries;
  const float* dout = query_maps.grad_out.at(query);
  int64_t si, sj;
  scale_query(q.at(query), scale, d, scratch);
  window_logits(qv, k, head_rpb, i, j, height, width, d, kernel_size, logits, si, sj);
  const float query_lse = query_maps.lse[query];
  const float delta = dat::dot(dout, query_maps.out.at(query), d);  // D = rowsum(dO * O)
  float* gq = query_maps.grad_q.at(query);
  std::fill(gq, gq + d, 0.0f);
  for (int64_t a = 0; a < kernel_size; ++a) {
    const int64_t row = (si + a) * width + sj;
    float* bias_grad = head_grad_rpb + (si + a - i + kernel_size - 1) * table + (sj - j + kernel_size - 1);
    for (int64_t b = 0; b < kernel_size; ++b) {
      const int64_t key = row + b;
      const float p = dat::exp_approx(logits[a * kernel_size + b] - query_lse);
      const float ds = p * (dat::dot(dout, v.at(key), d) - delta);  // dS = P * (dP - D)
      axpy(g.grad_v.at(key), p, dout, d);
      axpy(g.grad_k.at(key), ds, qv, d);
      axpy(gq, ds, k.at(key), d);
      bias_grad[b] += ds;
    }
  }
  for (int64_t c = 0; c < d; ++c) gq[c] *= scale;  // the gradient of the scaled query, then of q
}

// out[c * out_stride + l] = scale * pixels[l * stride + c] for kLanes pixels l (stride floats
// apart) and d channels c (a multiple of kLanes): kLanes x kLanes blocks transposed in vector
// registers.
inline void transpose_pixels(const float* pixels, int64_t stride, float scale, int64_t d, float* out,
                             int64_t out_stride) {
  dat::FloatVector block[dat::kLanes];
  for (int64_t c0 = 0; c0 < d; c0 += dat::kLanes) {
    for (int64_t l = 0; l < dat::kLanes; ++l) {
      block[l] = scale * dat::load_vector<dat::FloatVector>(pixels + l * stride + c0);
    }
    dat::transpose(block);  // block[j]: channel c0 + j of the kLanes pixels
    for (int64_t j = 0; j < dat::kLanes; ++j) dat::store_vector(out + (c0 + j) * out_stride, block[j]);
  }
}

// Rows of one head's keys or values transposed to (d, W), kept for the last K rows asked for: a
// thread's query rows move down one row at a time, so each row is transposed about once.
class TransposedRows {
 public:
  // d: a multiple of kLanes (the tiled passes' condition) where kernel_size > 0.
  TransposedRows(int64_t kernel_size, int64_t width, int64_t d)
      : width_(width), d_(d), rows_(kernel_size * width * d), tags_(kernel_size, -1) {
    TORCH_INTERNAL_ASSERT(kernel_size == 0 || d % dat::kLanes == 0);
  }

  // Row r of head bh's map, transposed, kLanes pixels at a time in vector registers (one float at a
  // time, stores W floats apart would take about a sixth of the forward pass at 1344x800); the
  // last W mod kLanes pixels one by one.
  const float* row(Pixels<const float> head, int64_t bh, int64_t height, int64_t r) {
    const int64_t slot = r % static_cast<int64_t>(tags_.size()), tag = bh * height + r;
    float* out = rows_.data() + slot * width_ * d_;
    if (tags_[slot] != tag) {
      const float* in = head.at(r * width_);
      int64_t j = 0;
      for (; j + dat::kLanes <= width_; j += dat::kLanes) {
        transpose_pixels(in + j * head.stride, head.stride, 1.0f, d_, out + j, width_);
      }
      for (; j < width_; ++j) {
        for (int64_t c = 0; c < d_; ++c) out[c * width_ + j] = in[j * head.stride + c];
      }
      tags_[slot] = tag;
    }
    return out;
  }

 private:
  int64_t width_, d_;
  std::vector<float> rows_;
  std::vector<int64_t> tags_;
};

// Queries per tile of the tiled passes (forward_query_tile, backward_query_tile): one per lane.
constexpr int64_t kTile = dat::kLanes;

// sums[l] = the sum over the window positions (a, b), in order, of weight (a, b) of query l times
// the vector of channels c0 .. c0 + kLanes - 1 that query reads there, for the kTile queries of a
// tile: kTile independent sums (one sum alone would wait on each of its additions). rows[a] is
// the window's row a of the values (or keys), its pixels stride floats apart; the vector at
// column base + m is read by the queries l <= m with b = m - l < K.
template <int64_t K>
inline void weighted_rows(const float* weights, const float* const* rows, int64_t stride, int64_t base, int64_t c0,
                          dat::FloatVector* sums) {
  std::fill(sums, sums + kTile, dat::FloatVector{});
  for (int64_t a = 0; a < K; ++a) {
    for (int64_t b = 0; b < K; ++b) {
      const float* weight = weights + (a * K + b) * kTile;
      for (int64_t l = 0; l < kTile; ++l) {
        sums[l] += weight[l] * dat::load_vector<dat::FloatVector>(rows[a] + (base + b + l) * stride + c0);
      }
    }
  }
}

// The logits (or dP) of a tile's queries: out[(a * K + b) * kTile + l] = bias[a][b] (0 where bias
// is null) + the dot product of query l's vector (column l of vectors_t, (d, kTile)) with the key
// (or value) at window position (a, b), summed as dat::dot sums (kLanes partial sums over the
// channels, then added in order). rows_t[a]: the window's row a, channel-major (d, W).
template <int64_t K>
inline void tile_dots(const float* vectors_t, const float* const* rows_t, const float* bias, int64_t bias_stride,
                      int64_t base, int64_t width, int64_t d, float* out) {
  using dat::FloatVector;
  for (int64_t a = 0; a < K; ++a) {
    const float* keys = rows_t[a] + base;
    FloatVector dots[K] = {};
    for (int64_t lane = 0; lane < dat::kLanes; ++lane) {
      FloatVector partial[K] = {};
      for (int64_t c = lane; c < d; c += dat::kLanes) {
        const FloatVector vector = dat::load_vector<FloatVector>(vectors_t + c * kTile);
        for (int64_t b = 0; b < K; ++b) partial[b] += vector * dat::load_vector<FloatVector>(keys + c * width + b);
      }
      for (int64_t b = 0; b < K; ++b) dots[b] += partial[b];
    }
    for (int64_t b = 0; b < K; ++b) {
      dat::store_vector(out + (a * K + b) * kTile, bias == nullptr ? dots[b] : dots[b] + bias[a * bias_stride + b]);
    }
  }
}

// Queries j0 .. j0 + kTile - 1 of row i side by side (one per lane), where their windows are not
// clamped at the left or right edge: query j0 + l's window starts at column j0 + l - K / 2, so
// for a window position (a, b) the kTile queries read kTile neighbouring keys, contiguous in the
// channel-major key rows (d, W) (TransposedRows), and share one bias. Their logits are then
// multiply-adds of whole vectors (forward_one_query takes a dot product per pair, with a
// horizontal sum), and so are their outputs (weighted_rows). Every sum runs in
// forward_one_query's order (the dot products' and the exponentials' kLanes partial sums, then
// the rest), so that the results are the same to the bit and the backward pass, which recomputes
// the logits pair by pair, finds the logits the log-sum-exp was taken of. d is a multiple of
// kLanes. q_row, out_row: row i's pixels; value_rows[a]: the window's row a of the values, its
// pixels value_stride floats apart. Scratch (floats): qt d * kTile, weights K * K * kTile.
template <int64_t K>
void forward_query_tile(Pixels<const float> q_row, const float* const* key_rows_t, const float* const* value_rows,
                        int64_t value_stride, const float* head_rpb, float scale, int64_t i, int64_t si, int64_t j0,
                        int64_t width, int64_t d, float* scratch, Pixels<float> out_row, float* lse_row) {
  using dat::FloatVector;
  using dat::load_vector;
  constexpr int64_t half = K / 2, table = 2 * K - 1, window = K * K;
  float* qt = scratch;
  float* weights = scratch + d * kTile;
  transpose_pixels(q_row.at(j0), q_row.stride, scale, d, qt, kTile);
  tile_dots<K>(qt, key_rows_t, head_rpb + (si - i + K - 1) * table + K - 1 - half, table, j0 - half, width, d,
               weights);
  FloatVector row_max = load_vector<FloatVector>(weights);
  for (int64_t n = 1; n < window; ++n) {
    const FloatVector logit = load_vector<FloatVector>(weights + n * kTile);
    row_max = logit > row_max ? logit : row_max;  // std::max_element's choice: the first of equals, past NaNs
  }
  // dat::exp_shifted_sum per lane: kLanes partial sums over the window, then the rest.
  for (int64_t n = 0; n < window; ++n) {
    float* weight = weights + n * kTile;
    dat::store_vector(weight, dat::exp_approx(load_vector<FloatVector>(weight) - row_max));
  }
  constexpr int64_t whole_window = window - window % dat::kLanes;
  FloatVector partial[dat::kLanes] = {}, total{};
  for (int64_t n = 0; n < whole_window; ++n) partial[n % dat::kLanes] += load_vector<FloatVector>(weights + n * kTile);
  for (int64_t lane = 0; lane < dat::kLanes; ++lane) total += partial[lane];
  for (int64_t n = whole_window; n < window; ++n) total += load_vector<FloatVector>(weights + n * kTile);
  FloatVector sums[kTile];
  for (int64_t c0 = 0; c0 < d; c0 += dat::kLanes) {
    weighted_rows<K>(weights, value_rows, value_stride, j0 - half, c0, sums);
    for (int64_t l = 0; l < kTile; ++l) dat::store_vector(out_row.at(j0 + l) + c0, sums[l] / total[l]);
  }
  for (int64_t l = 0; l < kTile; ++l) lse_row[j0 + l] = std::log(total[l]) + row_max[l];
}

// The window rows of the backward pass's tiles (the rows si .. si + K - 1 of a head): keys and
// values channel-major (d, W), the keys' pixels (key_stride floats apart) and the keys' and
// values' gradients (B, H, W, heads, d).
struct WindowRows {
  std::vector<const float*> keys_t, values_t, keys;
  std::vector<float*> grad_keys, grad_values;
  int64_t key_stride = 0, grad_stride = 0;

  explicit WindowRows(int64_t kernel_size)
      : keys_t(kernel_size), values_t(kernel_size), keys(kernel_size), grad_keys(kernel_size),
        grad_values(kernel_size) {}
};

// Vectors of channels whose sums add_query_terms keeps in registers at once: 2 x 4 sums and a
// register per weight fit AVX2's 16.
constexpr int64_t kSumVectors = 4;

// What a backward tile's queries give the keys of their windows: probs and grad_logits, each
// query's P and dS per window position ((K * K, kTile), query l's term of window position n at
// n * kTile + l); grad_out, the tile's first query's pixel of dO, its pixels stride floats apart;
// q_tile, the scaled queries (kTile, d).
struct TileTerms {
  const float* probs;
  const float* grad_logits;
  const float* grad_out;
  int64_t stride;
  const float* q_tile;
  int64_t d;
};

// add_query_terms for channels c0 .. c0 + V * kLanes - 1, each query's two weights read once for
// all V vectors.
template <int64_t V>
inline void add_query_terms_to(const TileTerms& t, int64_t n0, int64_t first, int64_t last, int64_t c0, float* grad_v,
                               float* grad_k) {
  using dat::FloatVector;
  const float *probs = t.probs, *grad_logits = t.grad_logits, *grad_out = t.grad_out, *q_tile = t.q_tile;
  const int64_t stride = t.stride, d = t.d;
  FloatVector value_sums[V], key_sums[V];
  for (int64_t v = 0; v < V; ++v) {
    value_sums[v] = dat::load_vector<FloatVector>(grad_v + c0 + v * dat::kLanes);
    key_sums[v] = dat::load_vector<FloatVector>(grad_k + c0 + v * dat::kLanes);
  }
  for (int64_t l = first; l <= last; ++l) {
    const int64_t n = n0 - l * (kTile - 1);
    const float p = probs[n], ds = grad_logits[n];
    const float* dout = grad_out + l * stride + c0;
    const float* query = q_tile + l * d + c0;
    for (int64_t v = 0; v < V; ++v) {
      value_sums[v] += p * dat::load_vector<FloatVector>(dout + v * dat::kLanes);
      key_sums[v] += ds * dat::load_vector<FloatVector>(query + v * dat::kLanes);
    }
  }
  for (int64_t v = 0; v < V; ++v) {
    dat::store_vector(grad_v + c0 + v * dat::kLanes, value_sums[v]);
    dat::store_vector(grad_k + c0 + v * dat::kLanes, key_sums[v]);
  }
}

// Adds the terms of a tile's queries first .. last (ascending) to one key's gradients grad_v
// (query l's P times its dO) and grad_k (its dS times its scaled q), d channels: P and dS of query
// l at n0 - l * (kTile - 1), the window position whose key this is.
inline void add_query_terms(const TileTerms& t, int64_t n0, int64_t first, int64_t last, float* grad_v, float* grad_k) {
  int64_t c0 = 0;
  for (; c0 + kSumVectors * dat::kLanes <= t.d; c0 += kSumVectors * dat::kLanes) {
    add_query_terms_to<kSumVectors>(t, n0, first, last, c0, grad_v, grad_k);
  }
  for (; c0 < t.d; c0 += dat::kLanes) add_query_terms_to<1>(t, n0, first, last, c0, grad_v, grad_k);
}

// The gradients of a tile of queries (as forward_query_tile's) of row i, in the order
// backward_one_query takes them query after query, so with the same bits: grad_q of the tile's
// queries; grad_v and grad_k of the keys their windows read (each key's terms added in the order
// of the queries); the bias's. q_row and g_row: row i's pixels of q, and what its queries read
// and write. Scratch: (3 * d + 2 * K * K) * kTile floats.
template <int64_t K>
void backward_query_tile(Pixels<const float> q_row, const QueryGradients& g_row, const WindowRows& rows,
                         const float* head_rpb, float* head_grad_rpb, float scale, int64_t i, int64_t si, int64_t j0,
                         int64_t width, int64_t d, float* scratch) {
  using dat::FloatVector;
  constexpr int64_t half = K / 2, table = 2 * K - 1, window = K * K, base_offset = K - 1 - half;
  float* qt = scratch;
  float* grad_out_t = qt + d * kTile;
  float* q_tile = grad_out_t + d * kTile;  // the scaled queries, (kTile, d)
  float* probs = q_tile + d * kTile;
  float* grad_logits = probs + window * kTile;
  const int64_t base = j0 - half;
  for (int64_t l = 0; l < kTile; ++l) scale_query(q_row.at(j0 + l), scale, d, q_tile + l * d);
  transpose_pixels(q_tile, d, 1.0f, d, qt, kTile);
  transpose_pixels(g_row.grad_out.at(j0), g_row.grad_out.stride, 1.0f, d, grad_out_t, kTile);
  tile_dots<K>(qt, rows.keys_t.data(), head_rpb + (si - i + K - 1) * table + base_offset, table, base, width, d,
               probs);
  tile_dots<K>(grad_out_t, rows.values_t.data(), nullptr, 0, base, width, d, grad_logits);  // dP
  FloatVector query_lse, delta;
  for (int64_t l = 0; l < kTile; ++l) {
    query_lse[l] = g_row.lse[j0 + l];
    delta[l] = dat::dot(g_row.grad_out.at(j0 + l), g_row.out.at(j0 + l), d);  // D = rowsum(dO * O)
  }
  for (int64_t n = 0; n < window; ++n) {
    const FloatVector p = dat::exp_approx(dat::load_vector<FloatVector>(probs + n * kTile) - query_lse);
    dat::store_vector(probs + n * kTile, p);
    float* grad = grad_logits + n * kTile;
    dat::store_vector(grad, p * (dat::load_vector<FloatVector>(grad) - delta));  // dS = P * (dP - D)
  }
  FloatVector sums[kTile];
  for (int64_t c0 = 0; c0 < d; c0 += dat::kLanes) {
    weighted_rows<K>(grad_logits, rows.keys.data(), rows.key_stride, base, c0, sums);
    for (int64_t l = 0; l < kTile; ++l) dat::store_vector(g_row.grad_q.at(j0 + l) + c0, scale * sums[l]);
  }
  // Key column base + m of window row a gets query l's terms for b = m - l in [0, K), l ascending.
  const TileTerms terms{probs, grad_logits, g_row.grad_out.at(j0), g_row.grad_out.stride, q_tile, d};
  for (int64_t a = 0; a < K; ++a) {
    for (int64_t m = 0; m < K + kTile - 1; ++m) {
      const int64_t first = std::max<int64_t>(0, m - (K - 1)), last = std::min<int64_t>(kTile - 1, m);
      float* grad_v = rows.grad_values[a] + (base + m) * rows.grad_stride;
      float* grad_k = rows.grad_keys[a] + (base + m) * rows.grad_stride;
      add_query_terms(terms, (a * K + m) * kTile, first, last, grad_v, grad_k);
    }
    float* bias_grad = head_grad_rpb + (si + a - i + K - 1) * table + base_offset;
    for (int64_t b = 0; b < K; ++b) {
      for (int64_t l = 0; l < kTile; ++l) bias_grad[b] += grad_logits[(a * K + b) * kTile + l];
    }
  }
}

// The tiled passes of a call: forward_query_tile and backward_query_tile for its kernel size, and
// the query columns [begin, end) of each row that go in tiles (none where begin == end).
struct QueryTiles {
  decltype(&forward_query_tile<7>) forward = nullptr;
  decltype(&backward_query_tile<7>) backward = nullptr;
  int64_t begin = 0, end = 0;

  bool any() const { return begin < end; }
};

template <int64_t K>
QueryTiles query_tiles() {
  return {forward_query_tile<K>, backward_query_tile<K>};
}

// The tiled passes for kernel_size and d, built for K = 3, 5 and 7 (DAT++: 7) and d a multiple of
// kLanes (DAT++: 32; where it is not, the dot products sum their last channels one by one, in an
// order the tiles do not reproduce to the bit), and the columns of a row of width W that they
// take: as many whole tiles as fit where their windows are unclamped along the row, j0 >= K / 2
// and j0 + kTile - 1 <= W - 1 - K / 2.
QueryTiles query_tiles_for(int64_t kernel_size, int64_t d, int64_t width) {
  QueryTiles fns;
  if (d % dat::kLanes == 0) {
    switch (kernel_size) {
      case 3:
        fns = query_tiles<3>();
        break;
      case 5:
        fns = query_tiles<5>();
        break;
      case 7:
        fns = query_tiles<7>();
        break;
      default:
        break;
    }
  }
  if (fns.forward != nullptr) {
    const int64_t half = kernel_size / 2;
    fns.begin = half;
    fns.end = half + std::max<int64_t>(0, width - 2 * half) / kTile * kTile;
  }
  return fns;
}

// A backward work item's query rows [begin, end) of a head, the key rows [key_begin, key_end) that
// their windows read, and where its buffer of those rows' gradients starts (buffer_row).
struct RowSegment {
  int64_t begin, end, key_begin, key_end, buffer_row;

  int64_t key_rows() const { return key_end - key_begin; }
};

// Segment s of n of a head's height query rows, its key rows' buffer from buffer_row on.
RowSegment row_segment(int64_t s, int64_t n, int64_t height, int64_t kernel_size, int64_t buffer_row) {
  const int64_t begin = height * s / n, end = height * (s + 1) / n;
  return {begin, end, window_start(begin, height, kernel_size),
          window_start(end - 1, height, kernel_size) + kernel_size, buffer_row};
}

// Adds the segments' gradients of key row r (in head_buffers: (key row, W, d) per segment, from
// each one's buffer_row on) to the head's, segment after segment.
void add_segment_rows(const std::vector<RowSegment>& segments, int64_t r, int64_t width, int64_t d,
                      const float* head_buffers, Pixels<float> head) {
  float* row = head.at(r * width);
  for (const RowSegment& segment : segments) {
    if (r < segment.key_begin || r >= segment.key_end) continue;
    const float* buffer = head_buffers + (segment.buffer_row + r - segment.key_begin) * width * d;
    for (int64_t j = 0; j < width; ++j) {
      for (int64_t c = 0; c < d; ++c) row[j * head.stride + c] += buffer[j * d + c];
    }
  }
}

}  // namespace

// Returns out (B, H, W, heads, d) and lse (B * heads, H * W).
std::vector<at::Tensor> neighborhood_attention_forward(at::Tensor q, at::Tensor k, at::Tensor v,
                                                       at::Tensor rpb, int64_t kernel_size, double scale) {
  check_inputs(q, k, v, rpb, kernel_size);
  const int64_t height = q.size(1), width = q.size(2), heads = q.size(3), d = q.size(4);
  const int64_t bh_count = q.size(0) * heads;
  const int64_t window = kernel_size * kernel_size, table_size = rpb.size(1) * rpb.size(2);
  const float alpha = static_cast<float>(scale);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({bh_count, height * width}, q.options());
  const QueryTiles query_tiles = query_tiles_for(kernel_size, d, width);
  const float* q_p = q.data_ptr<float>();
  const float* k_p = k.data_ptr<float>();
  const float* v_p = v.data_ptr<float>();
  const float* rpb_p = rpb.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  // One work item per (bh, query row).
  at::parallel_for(0, bh_count * height, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits(window), scratch((d + window) * kTile);
    std::vector<const float*> key_rows_t(kernel_size), value_rows(kernel_size);
    TransposedRows transposed_keys(query_tiles.any() ? kernel_size : 0, width, d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / height, i = item % height;
      const auto q_h = head_pixels(q_p, q, bh), k_h = head_pixels(k_p, k, bh), v_h = head_pixels(v_p, v, bh);
      const auto out_h = head_pixels(out_p, out, bh);
      const float* head_rpb = rpb_p + (bh % heads) * table_size;
      float* lse_row = lse_p + item * width;
      if (query_tiles.any()) {
        const int64_t si = window_start(i, height, kernel_size);
        for (int64_t a = 0; a < kernel_size; ++a) {
          key_rows_t[a] = transposed_keys.row(k_h, bh, height, si + a);
          value_rows[a] = v_h.at((si + a) * width);
        }
        const Pixels<const float> q_row{q_h.at(i * width), q_h.stride};
        const Pixels<float> out_row{out_h.at(i * width), out_h.stride};
        for (int64_t j0 = query_tiles.begin; j0 < query_tiles.end; j0 += kTile) {
          query_tiles.forward(q_row, key_rows_t.data(), value_rows.data(), v_h.stride, head_rpb, alpha, i, si, j0,
                              width, d, scratch.data(), out_row, lse_row);
        }
      }
      for (int64_t j = 0; j < width; ++j) {
        if (j >= query_tiles.begin && j < query_tiles.end) continue;
        forward_one_query(q_h, k_h, v_h, head_rpb, alpha, i, j, height, width, d, kernel_size, logits.data(),
                          scratch.data(), out_h.at(i * width + j), lse_row + j);
      }
    }
  });
  return {out, lse};
}

// Returns grad_q, grad_k, grad_v (B, H, W, heads, d) and grad_rpb per bh (B * heads, 2k - 1,
// 2k - 1) (the caller sums it over the batch).
//
// Work items are (segment of query rows, bh): each adds its queries' terms, query after query, to
// its own gradients of the bias and of the key and value rows that its windows read, which are
// summed after, segment after segment. There are just enough segments per head to give every
// thread work, each at least K rows high; where there is one (the bh slices are at least as many
// as the threads), the items add to grad_k and grad_v in place. The bits depend on the number of
// segments, hence on the threads where there are fewer bh slices than threads.
std::vector<at::Tensor> neighborhood_attention_backward(at::Tensor grad_out, at::Tensor q, at::Tensor k,
                                                        at::Tensor v, at::Tensor rpb, at::Tensor out,
                                                        at::Tensor lse, int64_t kernel_size, double scale) {
  check_inputs(q, k, v, rpb, kernel_size);
  dat::check_contiguous_cpu({&grad_out, &out, &lse}, at::kFloat, "grad_out, out and lse");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "expected grad_out and out of q's shape ",
              q.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  const int64_t height = q.size(1), width = q.size(2), heads = q.size(3), d = q.size(4);
  const int64_t bh_count = q.size(0) * heads;
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({bh_count, height * width}), "expected lse (B * heads, H * W) = (",
              bh_count, ", ", height * width, "), got ", lse.sizes());
  const int64_t window = kernel_size * kernel_size, table = rpb.size(1), table_size = table * table;
  const float alpha = static_cast<float>(scale);
  const int64_t threads = at::get_num_threads();
  const int64_t segments =
      std::max<int64_t>(1, std::min(height / kernel_size, (threads + bh_count - 1) / bh_count));
  std::vector<RowSegment> row_segments;
  int64_t buffered_rows = 0;  // the segments' key rows together
  for (int64_t segment = 0; segment < segments; ++segment) {
    row_segments.push_back(row_segment(segment, segments, height, kernel_size, buffered_rows));
    buffered_rows += row_segments.back().key_rows();
  }
  auto grad_q = at::empty(q.sizes(), q.options());
  auto grad_k = at::zeros(q.sizes(), q.options());
  auto grad_v = at::zeros(q.sizes(), q.options());
  // Each segment's gradients of its key rows (bh, key row, W, d), where there are several.
  auto segment_grad_k = at::zeros({segments > 1 ? bh_count : 0, buffered_rows, width, d}, q.options());
  auto segment_grad_v = at::zeros_like(segment_grad_k);
  auto grad_rpb = at::zeros({segments, bh_count, table, table}, q.options());
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
  float* segment_gk_p = segment_grad_k.data_ptr<float>();
  float* segment_gv_p = segment_grad_v.data_ptr<float>();
  float* grpb_p = grad_rpb.data_ptr<float>();
  const QueryTiles query_tiles = query_tiles_for(kernel_size, d, width);
  at::parallel_for(0, segments * bh_count, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits(window), scratch((3 * d + 2 * window) * kTile);
    WindowRows rows(kernel_size);
    TransposedRows transposed_keys(query_tiles.any() ? kernel_size : 0, width, d);
    TransposedRows transposed_values(query_tiles.any() ? kernel_size : 0, width, d);
    for (int64_t item = begin; item < end; ++item) {
      // item = (segment, bh), the layout of grad_rpb.
      const RowSegment& segment = row_segments[item / bh_count];
      const int64_t bh = item % bh_count;
      const auto q_h = head_pixels(q_p, q, bh), k_h = head_pixels(k_p, k, bh), v_h = head_pixels(v_p, v, bh);
      auto grad_k_h = head_pixels(gk_p, grad_k, bh), grad_v_h = head_pixels(gv_p, grad_v, bh);
      if (segments > 1) {
        const int64_t offset = (bh * buffered_rows + segment.buffer_row) * width * d;
        grad_k_h = Pixels<float>{segment_gk_p + offset, d, segment.key_begin * width};
        grad_v_h = Pixels<float>{segment_gv_p + offset, d, segment.key_begin * width};
      }
      const HeadGradients g{{head_pixels(go_p, grad_out, bh), head_pixels(out_p, out, bh), lse_p + bh * height * width,
                             head_pixels(gq_p, grad_q, bh)},
                            grad_k_h,
                            grad_v_h};
      const float* head_rpb = rpb_p + (bh % heads) * table_size;
      float* head_grad_rpb = grpb_p + item * table_size;
      rows.key_stride = k_h.stride;
      rows.grad_stride = g.grad_k.stride;
      for (int64_t i = segment.begin; i < segment.end; ++i) {
        const int64_t si = window_start(i, height, kernel_size), row = i * width;
        if (query_tiles.any()) {
          for (int64_t a = 0; a < kernel_size; ++a) {
            rows.keys_t[a] = transposed_keys.row(k_h, bh, height, si + a);
            rows.values_t[a] = transposed_values.row(v_h, bh, height, si + a);
            rows.keys[a] = k_h.at((si + a) * width);
            rows.grad_keys[a] = g.grad_k.at((si + a) * width);
            rows.grad_values[a] = g.grad_v.at((si + a) * width);
          }
        }
        const Pixels<const float> q_row{q_h.at(row), q_h.stride};
        const QueryGradients g_row = g.queries.from(row);
        // Queries in order along the row (each key's terms are added query after query).
        for (int64_t j = 0; j < width;) {
          if (j >= query_tiles.begin && j < query_tiles.end) {
            query_tiles.backward(q_row, g_row, rows, head_rpb, head_grad_rpb, alpha, i, si, j, width, d,
                                 scratch.data());
            j += kTile;
          } else {
            backward_one_query(q_h, k_h, v_h, g, head_rpb, alpha, i, j, height, width, d, kernel_size, logits.data(),
                               scratch.data(), head_grad_rpb);
            ++j;
          }
        }
      }
    }
  });
  if (segments > 1) {
    at::parallel_for(0, bh_count * height, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / height, r = item % height;
        const int64_t offset = bh * buffered_rows * width * d;
        add_segment_rows(row_segments, r, width, d, segment_gk_p + offset, head_pixels(gk_p, grad_k, bh));
        add_segment_rows(row_segments, r, width, d, segment_gv_p + offset, head_pixels(gv_p, grad_v, bh));
      }
    });
  }
  return {grad_q, grad_k, grad_v, grad_rpb.sum(0)};
}
