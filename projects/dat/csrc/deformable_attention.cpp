// DAT / DAT++'s deformable attention with the relative position bias read on the fly, and its
// gradient, for float32 on CPU: one pass per query row and head, forward and backward.
//
// Per block of a query row's queries (kQueryBlock of them), the logits q.k are a small matrix
// product into a per-thread buffer, the bias is added, the softmax taken and the product with v
// taken while the block's logits (kQueryBlock x Ns floats, 134 KB at Ns = 1050) are in the L2
// cache; only the output and each query's log-sum-exp go to memory. Backwards, the same block's
// probabilities are recomputed from the log-sum-exp, dP = dO.v, dS = P * (dP - D) with
// D = rowsum(P * dP) (equal to rowsum(dO * O); taken from the block's own P and dP, a query with
// a single key gets exactly dS = 0, as in the reference), and the gradients of q, k, v (matrix
// products again), of the bias table and of the keys' coordinates are taken in one pass. The
// matrix products go to torch's CPU BLAS (at::native::cpublas::brgemm: MKL or oneDNN) where
// torch's CPUBlas.h declares it (CPUBLAS_BRGEMM_F32F32F32); older torches get a plain loop that
// the compiler vectorises (the same numbers to float32 round-off, slower). This replaced a chain
// of a batched product, a bias-and-softmax kernel and a second product per chunk of a million
// logits, whose logits went through memory three times (docs/benchmarks.md has the timings).
//
// The PyTorch path (projects/dat/ops/deformable.py, _TableBiasSoftmax) computes the same
// arithmetic chunk by chunk and agrees to float32 round-off.
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
// then read at two adjacent columns per pair, instead of four table reads per pair. Over a few
// neighbouring queries a key's taps span a few columns only (at detection resolutions): 8 keys at
// a time, those columns are read once into vector registers and each pair picks its two from
// them (the gradient: the pairs' sums per column are taken in registers, transposed into the
// keys' rows and added to R's gradient once); elsewhere the pairs go one by one. The gradient
// runs the same way backwards: the pairs' gradients are gathered into R's gradient, which is then
// spread over the two table rows once per query row.
// The kernels take the table y-major (rows of Tw + 4 contiguous).
//
// q (and the output, grad_out and grad_q, laid out as q) may be any dense layout: the D block's
// queries are channels-last maps, (nb, hg, d, rows * W) views with a unit stride over d, which the
// matrix products read in place (and the output is written so, for the output projection to read
// in place); with a unit stride over the queries (contiguous q) a block of queries is gathered
// first.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "vector_math.h"

namespace {

// Queries per block: 32 and 64 measured alike (docs/benchmarks.md); 32 keeps the backward's two
// blocks of logits in a 1 MB L2 cache at Ns = 1050 (stage 1 of DAT-T++ at 1344x800).
constexpr int64_t kQueryBlock = 32;
// Queries per step of the bias passes (the bias added to the logits, its gradient): a key's taps
// move by about 0.15-1 table column per query along a row in DAT's D blocks (most at low
// resolution); where those of 8 queries spread over more than half a window, the pairs go one by
// one (bias_in_windows).
constexpr int64_t kBiasQueries = 8;

// The bias passes work on kVector keys at a time (dat::FloatVector) from a window of kBiasWindow
// table columns per key (one vector per key once transposed), wherever it holds both taps of all
// their pairs: where the block's taps of those keys spread over at most kBiasWindow - 2 columns
// above the lowest.
constexpr int64_t kVector = dat::kLanes;
constexpr int64_t kBiasWindow = 8;
static_assert(kBiasWindow == kVector, "a window's columns of the kVector keys transpose into one vector per key");
using dat::FloatVector;
using dat::IntVector;
using dat::load_vector;
using dat::store_vector;
static_assert(kVector == 8, "window_column reads 8 keys' rows");

// Column j of a window over 8 keys' rows of interpolated bias: lane l is rows[l][j]. Built as a whole
// vector (written lane by lane into memory, the forward pass measured 4-6 % slower). Past a key's
// last tap it holds whatever the rows' buffer holds there, which no pair uses.
DAT_ALWAYS_INLINE FloatVector window_column(const float* const* rows, int32_t j) {
  return FloatVector{rows[0][j], rows[1][j], rows[2][j], rows[3][j], rows[4][j], rows[5][j], rows[6][j], rows[7][j]};
}

// The lowest tap of keys n0 .. n0 + kVector - 1 over queries m < mb (rows of Ns of col_ix), how
// far each key's taps spread above it, and the widest spread.
inline int32_t tap_window(const int32_t* col_ix, int64_t mb, int64_t ns, int64_t n0, IntVector& base,
                          IntVector& reach) {
  base = load_vector<IntVector>(col_ix + n0);
  IntVector top = base;
  for (int64_t m = 1; m < mb; ++m) {
    const IntVector ix = load_vector<IntVector>(col_ix + m * ns + n0);
    base = ix < base ? ix : base;
    top = ix > top ? ix : top;
  }
  reach = top - base;
  int32_t widest = 0;
  for (int64_t l = 0; l < kVector; ++l) widest = std::max(widest, reach[l]);
  return widest;
}

// C (m x n) = A (m x k) B (k x n), plus C where accumulate; row-major with leading dimensions.
void matmul(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
            int64_t ldc, bool accumulate) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c);
#else
  for (int64_t i = 0; i < m; ++i) {
    float* row = c + i * ldc;
    if (!accumulate) std::fill(row, row + n, 0.0f);
    for (int64_t p = 0; p < k; ++p) {
      const float scale = a[i * lda + p];
      const float* b_row = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) row[j] += scale * b_row[j];
    }
  }
#endif
}

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

// The sizes of one call: q (nb, hg, d, rows * W), k and v (nb, hg, d, Ns).
struct AttentionShape {
  int64_t nb, hg, d, rows, width, ns;
  int64_t queries() const { return rows * width; }
};

// A (nb, hg, d, queries) tensor of any strides: one head's (d, queries) matrix at a time.
template <typename T>
struct QueryMaps {
  T* data;
  int64_t batch_stride, head_stride, channel_stride, query_stride;

  explicit QueryMaps(const at::Tensor& t)
      : data(t.data_ptr<float>()),
        batch_stride(t.stride(0)),
        head_stride(t.stride(1)),
        channel_stride(t.stride(2)),
        query_stride(t.stride(3)) {}

  // The matrix of batch-group b's head h.
  T* head(int64_t b, int64_t h) const { return data + b * batch_stride + h * head_stride; }
};

// Checks that every tap the kernels follow lies inside the padded table: rows iy and iy + 1, and
// for each key n of batch-group b the columns x_taps[b, n] = [lo, hi] that its interpolated row is
// computed at, which must hold the columns ix and ix + 1 of all its queries.
void check_taps(const at::Tensor& table, const at::Tensor& iy, const at::Tensor& ix,
                const at::Tensor& x_taps) {
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

// q, grad_out: float32 CPU tensors of any strides that fill their memory without gaps or overlaps
// (a permutation of a contiguous tensor), so that grad_q and the output can take their layout.
void check_queries(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_non_overlapping_and_dense(), "expected ",
              name, " as a float32 CPU tensor dense in memory (its axes in any order), got a ", t.scalar_type(),
              " tensor on ", t.device(), " of shape ", t.sizes(), " and strides ", t.strides());
}

// Checks the shapes, dtypes, layouts and tap indices of q, k, v and the bias inputs.
AttentionShape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& table, const at::Tensor& iy, const at::Tensor& fy,
                            const at::Tensor& ix, const at::Tensor& fx, const at::Tensor& x_taps,
                            BiasInputs& bias) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && table.dim() == 4 && iy.dim() == 3 && ix.dim() == 3,
              "expected q (nb, hg, d, rows * W), k and v (nb, hg, d, Ns), table (nb, hg, Th + 4, Tw + 4), iy/fy "
              "(nb, rows, Ns), ix/fx (nb, W, Ns), got q ", q.sizes(), ", k ", k.sizes(), ", table ", table.sizes(),
              ", iy ", iy.sizes(), ", ix ", ix.sizes());
  const AttentionShape s{q.size(0), q.size(1), q.size(2), iy.size(1), ix.size(1), k.size(3)};
  TORCH_CHECK(q.size(3) == s.queries(),
              "expected q (nb, hg, d, rows * W) with the rows of iy and the W of ix, rows * W = ", s.queries(),
              ", got q ", q.sizes(), ", iy ", iy.sizes(), ", ix ", ix.sizes());
  TORCH_CHECK(k.sizes() == at::IntArrayRef({s.nb, s.hg, s.d, s.ns}) && v.sizes() == k.sizes(),
              "expected k and v (", s.nb, ", ", s.hg, ", ", s.d, ", Ns) with the Ns of ix, got k ", k.sizes(), ", v ",
              v.sizes(), ", ix ", ix.sizes());
  TORCH_CHECK(table.size(0) == s.nb && table.size(1) == s.hg && table.size(2) >= 2 && table.size(3) >= 2,
              "expected a table (nb, hg, Th + 4, Tw + 4) for q's (nb, hg) = (", s.nb, ", ", s.hg, "), got ",
              table.sizes());
  TORCH_CHECK(iy.sizes() == at::IntArrayRef({s.nb, s.rows, s.ns}) && fy.sizes() == iy.sizes(),
              "expected iy and fy (", s.nb, ", rows, ", s.ns, "), got ", iy.sizes(), " and ", fy.sizes());
  TORCH_CHECK(ix.sizes() == at::IntArrayRef({s.nb, s.width, s.ns}) && fx.sizes() == ix.sizes(),
              "expected ix and fx (", s.nb, ", W, ", s.ns, "), got ", ix.sizes(), " and ", fx.sizes());
  TORCH_CHECK(x_taps.sizes() == at::IntArrayRef({s.nb, s.ns, 2}), "expected x_taps (", s.nb, ", ", s.ns,
              ", 2), got ", x_taps.sizes());
  dat::check_contiguous_cpu({&k, &v, &table, &fy, &fx}, at::kFloat, "k, v, the tables and tap weights");
  check_queries(q, "q");
  dat::check_contiguous_cpu({&iy, &ix, &x_taps}, at::kInt, "the tap indices");
  check_taps(table, iy, ix, x_taps);
  bias = {table.data_ptr<float>(), iy.data_ptr<int32_t>(), fy.data_ptr<float>(), ix.data_ptr<int32_t>(),
          fx.data_ptr<float>(), x_taps.data_ptr<int32_t>(), table.size(2) * table.size(3), table.size(3)};
  return s;
}

// One float32 per query: (nb, hg, rows * W) contiguous values.
void check_per_query(const at::Tensor& t, const AttentionShape& s, const char* name) {
  dat::check_contiguous_cpu({&t}, at::kFloat, name);
  TORCH_CHECK(t.sizes() == at::IntArrayRef({s.nb, s.hg, s.queries()}), "expected ", name, " (", s.nb, ", ", s.hg,
              ", ", s.queries(), "), got ", t.sizes());
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

// The (mb, d) block of queries first .. first + mb - 1 of a head's (d, queries) matrix, one query
// per row, as a matrix product's operand: in place where the vectors are contiguous (returns
// the pointer and sets ld to the row stride), else gathered into buffer (ld = d).
inline const float* query_rows(const float* head, int64_t channel_stride, int64_t query_stride, int64_t first,
                               int64_t mb, int64_t d, float* buffer, int64_t& ld) {
  if (channel_stride == 1) {
    ld = query_stride;
    return head + first * query_stride;
  }
  for (int64_t c = 0; c < d; ++c) {
    const float* row = head + c * channel_stride + first * query_stride;
    for (int64_t m = 0; m < mb; ++m) buffer[m * d + c] = row[m * query_stride];
  }
  ld = d;
  return buffer;
}

// The same block as a (d, mb) operand, one channel per row: in place where the queries are
// contiguous, else gathered (transposed) into buffer (ld = mb).
inline const float* query_columns(const float* head, int64_t channel_stride, int64_t query_stride, int64_t first,
                                  int64_t mb, int64_t d, float* buffer, int64_t& ld) {
  if (query_stride == 1) {
    ld = channel_stride;
    return head + first;
  }
  for (int64_t m = 0; m < mb; ++m) {
    const float* vector = head + (first + m) * query_stride;
    for (int64_t c = 0; c < d; ++c) buffer[c * mb + m] = vector[c * channel_stride];
  }
  ld = mb;
  return buffer;
}

// Queries first .. first + mb - 1 of a head's (d, queries) matrix = src (mb, d), each query's row
// times scale[m].
inline void store_query_rows(const float* src, const float* scale, int64_t first, int64_t mb, int64_t d,
                             int64_t channel_stride, int64_t query_stride, float* head) {
  if (channel_stride == 1) {
    for (int64_t m = 0; m < mb; ++m) {
      float* vector = head + (first + m) * query_stride;
      for (int64_t c = 0; c < d; ++c) vector[c] = src[m * d + c] * scale[m];
    }
    return;
  }
  for (int64_t c = 0; c < d; ++c) {
    float* row = head + c * channel_stride + first * query_stride;
    for (int64_t m = 0; m < mb; ++m) row[m * query_stride] = src[m * d + c] * scale[m];
  }
}

// s[m][n] = s[m][n] * alpha + bias(m, n) for queries m < mb of one query row, keys n0 <= n < n1, the
// bias read from the row's interpolated table rows at the queries' columns' taps col_ix / col_fx
// (rows of Ns): two reads at an index that depends on the pair, one pair at a time.
inline void add_bias_by_pair(float* s, int64_t mb, float alpha, const float* interpolated, int64_t row_length,
                             const int32_t* col_ix, const float* col_fx, int64_t ns, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < mb; ++m) {
    float* logits = s + m * ns;
    const int32_t* ix = col_ix + m * ns;
    const float* fx = col_fx + m * ns;
    for (int64_t n = n0; n < n1; ++n) {
      const float* taps = interpolated + n * row_length + ix[n];
      logits[n] = logits[n] * alpha + (taps[0] + (taps[1] - taps[0]) * fx[n]);
    }
  }
}

// Whether a window holds both taps of all pairs of a block of kVector keys whose taps spread over
// widest columns above the lowest (tap_window).
inline bool fits_window(int32_t widest) { return widest + 2 <= kBiasWindow; }

// Calls f(std::integral_constant<int32_t, widest>{}) for a widest that fits_window. The bias
// passes' windows and sums are arrays indexed by the tap offset, which the compiler keeps in
// vector registers only where their length is a compile-time constant: with a run-time length
// they live on the stack, zeroed with `rep stos` and read and written once per query.
template <typename F>
inline void with_constant_widest(int32_t widest, F&& f) {
  static_assert(kBiasWindow == 8, "one case per widest that fits a window");
  switch (widest) {
    case 0: return f(std::integral_constant<int32_t, 0>{});
    case 1: return f(std::integral_constant<int32_t, 1>{});
    case 2: return f(std::integral_constant<int32_t, 2>{});
    case 3: return f(std::integral_constant<int32_t, 3>{});
    case 4: return f(std::integral_constant<int32_t, 4>{});
    case 5: return f(std::integral_constant<int32_t, 5>{});
    default: return f(std::integral_constant<int32_t, 6>{});
  }
}

// add_bias_by_pair for keys n0 .. n0 + kVector - 1 over queries m < mb, whose first taps ix lie at
// most kWidest columns above base (tap_window): rows[l] points at key n0 + l's interpolated row
// at column base[l]. The kWidest + 2 columns that the taps reach are read once into vector
// registers and each pair picks its two taps from them.
template <int32_t kWidest>
inline void add_bias_window(float* s, int64_t mb, float alpha, const float* const* rows, const IntVector& base,
                            const int32_t* col_ix, const float* col_fx, int64_t ns, int64_t n0) {
  FloatVector window[kWidest + 2];
  for (int32_t j = 0; j <= kWidest + 1; ++j) window[j] = window_column(rows, j);
  for (int64_t m = 0; m < mb; ++m) {
    const IntVector offset = load_vector<IntVector>(col_ix + m * ns + n0) - base;
    FloatVector left = window[0], right = window[1];
    for (int32_t j = 1; j <= kWidest; ++j) {
      const IntVector here = offset == j;
      left = here ? window[j] : left;
      right = here ? window[j + 1] : right;
    }
    float* logits = s + m * ns + n0;
    FloatVector value = load_vector<FloatVector>(logits) * alpha;
    value += left + (right - left) * load_vector<FloatVector>(col_fx + m * ns + n0);
    store_vector(logits, value);
  }
}

// add_bias_by_pair for all keys, kVector keys at a time: add_bias_window where a window holds the
// block's taps of those keys.
inline void add_bias(float* s, int64_t mb, float alpha, const float* interpolated, int64_t row_length,
                     const int32_t* col_ix, const float* col_fx, int64_t ns) {
  int64_t n0 = 0;
  for (; n0 + kVector <= ns; n0 += kVector) {
    IntVector base, reach;
    const int32_t widest = tap_window(col_ix, mb, ns, n0, base, reach);
    if (!fits_window(widest)) {
      add_bias_by_pair(s, mb, alpha, interpolated, row_length, col_ix, col_fx, ns, n0, n0 + kVector);
      continue;
    }
    const float* rows[kVector];
    for (int64_t l = 0; l < kVector; ++l) rows[l] = interpolated + (n0 + l) * row_length + base[l];
    with_constant_widest(widest, [&](auto w) {
      add_bias_window<decltype(w)::value>(s, mb, alpha, rows, base, col_ix, col_fx, ns, n0);
    });
  }
  add_bias_by_pair(s, mb, alpha, interpolated, row_length, col_ix, col_fx, ns, n0, ns);
}

// add_bias_by_pair for one query and all keys, in the same pass as the largest logit (which it
// returns): where the pairs go one by one, a separate pass for the softmax's maximum measured
// 1-3 % slower in the forward pass (224x224).
inline float add_bias_to_query(float* s, float alpha, const float* interpolated, int64_t row_length,
                               const int32_t* col_ix, const float* col_fx, int64_t ns) {
  float row_max = -std::numeric_limits<float>::infinity();
  for (int64_t n = 0; n < ns; ++n) {
    const float* taps = interpolated + n * row_length + col_ix[n];
    s[n] = s[n] * alpha + (taps[0] + (taps[1] - taps[0]) * col_fx[n]);
    row_max = std::max(row_max, s[n]);
  }
  return row_max;
}

// Whether the bias passes over a block of mb queries of one query row (col_ix: rows of Ns) go
// kBiasQueries queries at a time in vector registers: where the first key's taps over that many
// queries spread over at most half a window (every key's taps move by the same table columns per
// query, up to rounding). Where they move faster (at 224x224 about one column per query, 7 over
// 8 queries), picking each pair's taps from a window measured slower than reading them one by one.
inline bool bias_in_windows(const int32_t* col_ix, int64_t mb, int64_t ns) {
  return mb >= kBiasQueries && std::abs(col_ix[(kBiasQueries - 1) * ns] - col_ix[0]) <= kBiasWindow / 2;
}

// add_bias for a block of mb queries of one query row (rows of Ns of s, col_ix and col_fx),
// kBiasQueries neighbouring queries at a time (their taps lie close together), where
// bias_in_windows says so.
inline void add_bias_in_windows(float* s, int64_t mb, float alpha, const float* interpolated, int64_t row_length,
                                const int32_t* col_ix, const float* col_fx, int64_t ns) {
  for (int64_t m0 = 0; m0 < mb; m0 += kBiasQueries) {
    add_bias(s + m0 * ns, std::min(kBiasQueries, mb - m0), alpha, interpolated, row_length, col_ix + m0 * ns,
             col_fx + m0 * ns, ns);
  }
}

// The bias's gradient of pairs (m, n) for queries m < mb of one query row, whose columns' taps are
// col_ix / col_fx (rows of Ns) and whose dS are grad_s (mb rows of Ns): each pair adds dS * (1 -
// fx) to its key's interpolated row R at tap ix and dS * fx at ix + 1 (grad_interpolated), and
// dS * (R[ix + 1] - R[ix]) to its key's x coordinate (row_grad_x). One pair at a time: a read
// and a write at an index that depends on the pair.
inline void bias_gradient_by_pair(const float* grad_s, int64_t mb, const int32_t* col_ix, const float* col_fx,
                                  int64_t ns, int64_t n0, int64_t n1, const float* interpolated,
                                  int64_t row_length, float* grad_interpolated, float* row_grad_x) {
  for (int64_t m = 0; m < mb; ++m) {
    const float* g = grad_s + m * ns;
    const int32_t* ix = col_ix + m * ns;
    const float* fx = col_fx + m * ns;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t tap = n * row_length + ix[n];
      const float* taps = interpolated + tap;
      float* grad_taps = grad_interpolated + tap;
      row_grad_x[n] += g[n] * (taps[1] - taps[0]);
      const float g1 = g[n] * fx[n];  // gradients of the taps: g - g1 and g1
      grad_taps[0] += g[n] - g1;
      grad_taps[1] += g1;
    }
  }
}

// The same sums for keys n0 .. n0 + kVector - 1, whose first taps ix lie at most kWidest columns
// above base (rows[l] and grad_rows[l]: key n0 + l's interpolated row and its gradient at column
// base[l]). Along a query row a key's tap ix moves with the query's x, by a few columns
// over a few queries: per key and tap offset j = ix - base, the sums of dS (S_j) and of dS * fx
// (F_j) are taken in vector registers, and R's gradient at that offset, S_j - F_j + F_(j-1), is
// added once per block instead of once per pair, for the kVector keys at once (transposed into
// their rows; a lane past a key's last tap adds a zero).
template <int32_t kWidest>
inline void bias_gradient_window(const float* grad_s, int64_t mb, const float* const* rows,
                                 float* const* grad_rows, const IntVector& base, const IntVector& reach,
                                 const int32_t* col_ix, const float* col_fx, int64_t ns, int64_t n0,
                                 float* row_grad_x) {
  const FloatVector zero = {};
  FloatVector sums[kWidest + 2] = {}, weighted[kWidest + 2] = {};
  for (int64_t m = 0; m < mb; ++m) {
    const FloatVector g = load_vector<FloatVector>(grad_s + m * ns + n0);
    const FloatVector g1 = g * load_vector<FloatVector>(col_fx + m * ns + n0);
    const IntVector offset = load_vector<IntVector>(col_ix + m * ns + n0) - base;
    for (int32_t j = 0; j <= kWidest; ++j) {
      const IntVector here = offset == j;
      sums[j] += here ? g : zero;
      weighted[j] += here ? g1 : zero;
    }
  }
  // The x gradient, the sum of S_j * (R[j + 1] - R[j]) over a key's offsets (masked past its last
  // tap, where the rows' buffer holds other values).
  FloatVector column = window_column(rows, 0), grad_x = zero;
  for (int32_t j = 0; j <= kWidest; ++j) {
    const FloatVector next = window_column(rows, j + 1);
    grad_x = j <= reach ? grad_x + sums[j] * (next - column) : grad_x;
    column = next;
  }
  store_vector(row_grad_x + n0, load_vector<FloatVector>(row_grad_x + n0) + grad_x);
  static_assert(kWidest + 2 <= kBiasWindow);
  FloatVector by_offset[kBiasWindow];
  FloatVector carried = zero;
  for (int32_t j = 0; j <= kWidest + 1; ++j) {
    by_offset[j] = sums[j] - weighted[j] + carried;
    carried = weighted[j];
  }
  for (int32_t j = kWidest + 2; j < kBiasWindow; ++j) by_offset[j] = zero;
  dat::transpose(by_offset);  // by_offset[l]: key n0 + l's gradient at offsets 0 .. kBiasWindow - 1
  for (int64_t l = 0; l < kVector; ++l) {
    store_vector(grad_rows[l], load_vector<FloatVector>(grad_rows[l]) + by_offset[l]);
  }
}

// The same sums as bias_gradient_by_pair for all keys, kVector keys at a time:
// bias_gradient_window where a window holds the block's taps of those keys.
inline void bias_gradient(const float* grad_s, int64_t mb, const int32_t* col_ix, const float* col_fx, int64_t ns,
                          const float* interpolated, int64_t row_length, float* grad_interpolated,
                          float* row_grad_x) {
  int64_t n0 = 0;
  for (; n0 + kVector <= ns; n0 += kVector) {
    IntVector base, reach;
    const int32_t widest = tap_window(col_ix, mb, ns, n0, base, reach);
    if (!fits_window(widest)) {
      bias_gradient_by_pair(grad_s, mb, col_ix, col_fx, ns, n0, n0 + kVector, interpolated, row_length,
                            grad_interpolated, row_grad_x);
      continue;
    }
    const float* rows[kVector];
    float* grad_rows[kVector];
    for (int64_t l = 0; l < kVector; ++l) {
      rows[l] = interpolated + (n0 + l) * row_length + base[l];
      grad_rows[l] = grad_interpolated + (n0 + l) * row_length + base[l];
    }
    with_constant_widest(widest, [&](auto w) {
      bias_gradient_window<decltype(w)::value>(grad_s, mb, rows, grad_rows, base, reach, col_ix, col_fx, ns, n0,
                                               row_grad_x);
    });
  }
  bias_gradient_by_pair(grad_s, mb, col_ix, col_fx, ns, n0, ns, interpolated, row_length, grad_interpolated,
                        row_grad_x);
}

// bias_gradient for a block of mb queries of one query row (rows of Ns of grad_s, col_ix and
// col_fx), kBiasQueries queries at a time, where bias_in_windows says so.
inline void bias_gradient_in_windows(const float* grad_s, int64_t mb, const int32_t* col_ix, const float* col_fx,
                                     int64_t ns, const float* interpolated, int64_t row_length,
                                     float* grad_interpolated, float* row_grad_x) {
  for (int64_t m0 = 0; m0 < mb; m0 += kBiasQueries) {
    bias_gradient(grad_s + m0 * ns, std::min(kBiasQueries, mb - m0), col_ix + m0 * ns, col_fx + m0 * ns, ns,
                  interpolated, row_length, grad_interpolated, row_grad_x);
  }
}

}  // namespace

// q (nb, hg, d, rows * W), k and v (nb, hg, d, Ns); the bias inputs as check_inputs describes.
// Returns the output softmax(scale * q.k + bias) v (nb, hg, d, rows * W), laid out as q, and each
// query's log-sum-exp (nb, hg, rows * W). One work item per (batch-group, head, query row).
std::vector<at::Tensor> deformable_attention_forward(at::Tensor q, at::Tensor k, at::Tensor v,
                                                     double scale, at::Tensor table, at::Tensor iy,
                                                     at::Tensor fy, at::Tensor ix, at::Tensor fx,
                                                     at::Tensor x_taps) {
  BiasInputs bias;
  const AttentionShape s = check_inputs(q, k, v, table, iy, fy, ix, fx, x_taps, bias);
  const int64_t d = s.d, ns = s.ns, width = s.width, rows = s.rows, queries = s.queries();
  const int64_t row_length = bias.row_length;
  auto out = at::empty_like(q);
  auto lse = at::empty({s.nb, s.hg, queries}, q.options());
  auto v_t = v.transpose(2, 3).contiguous();  // (nb, hg, Ns, d): the right operand of P.v^T
  const QueryMaps<const float> q_maps(q);
  const QueryMaps<float> out_maps(out);
  const float* k_p = k.data_ptr<float>();
  const float* v_t_p = v_t.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  const float alpha = static_cast<float>(scale);
  const int64_t block = std::min(kQueryBlock, width);
  at::parallel_for(0, s.nb * s.hg * rows, 1, [&](int64_t begin, int64_t end) {
    // Padded: the bias passes read a key's row (and add zeros to its gradient, backwards) up to
    // kBiasWindow - 1 columns past a block's lowest tap.
    std::vector<float> interpolated(ns * row_length + kBiasWindow), q_block(block * d), logits(block * ns),
        out_block(block * d), inverse(block);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (s.hg * rows), bh = item / rows, r = item % rows;
      interpolate_rows(bias.table + bh * bias.table_size, row_length, bias.iy + (b * rows + r) * ns,
                       bias.fy + (b * rows + r) * ns, bias.x_taps + b * ns * 2, ns, interpolated.data());
      const float* head_q = q_maps.head(b, bh % s.hg);
      float* head_out = out_maps.head(b, bh % s.hg);
      for (int64_t c0 = 0; c0 < width; c0 += block) {
        const int64_t mb = std::min(block, width - c0), first = r * width + c0;
        int64_t ld_q;
        const float* q_rows =
            query_rows(head_q, q_maps.channel_stride, q_maps.query_stride, first, mb, d, q_block.data(), ld_q);
        matmul(mb, ns, d, q_rows, ld_q, k_p + bh * d * ns, ns, logits.data(), ns, false);
        const int32_t* block_ix = bias.ix + (b * width + c0) * ns;
        const float* block_fx = bias.fx + (b * width + c0) * ns;
        const bool in_windows = bias_in_windows(block_ix, mb, ns);
        if (in_windows) {
          add_bias_in_windows(logits.data(), mb, alpha, interpolated.data(), row_length, block_ix, block_fx, ns);
        }
        for (int64_t m = 0; m < mb; ++m) {
          float* query_logits = logits.data() + m * ns;
          const float row_max = in_windows ? dat::max_of(query_logits, ns)
                                           : add_bias_to_query(query_logits, alpha, interpolated.data(), row_length,
                                                               block_ix + m * ns, block_fx + m * ns, ns);
          // The weights stay unnormalised; the output's d values are divided by their sum instead.
          const float total = dat::exp_shifted_sum(query_logits, ns, row_max);
          inverse[m] = 1.0f / total;
          lse_p[bh * queries + first + m] = std::log(total) + row_max;
        }
        matmul(mb, d, ns, logits.data(), ns, v_t_p + bh * ns * d, d, out_block.data(), d, false);
        store_query_rows(out_block.data(), inverse.data(), first, mb, d, out_maps.channel_stride,
                         out_maps.query_stride, head_out);
      }
    }
  });
  return {out, lse};
}

// The gradients of deformable_attention_forward from grad_out (q's shape, any dense layout) and
// its lse. Returns grad_q (laid out as q), grad_k, grad_v, the gradient of the padded tables
// (nb, hg, Th + 4, Tw + 4) and of each key's (y, x) pixel coordinate in the table (nb, Ns, 2),
// summed over heads (a key's coordinate sum runs per query row in float32, over the rows in
// float64).
//
// Work items are (head, segment of query rows): each accumulates its own gradients of k, v, the
// table and the coordinates, which are summed after. There are just enough segments per head to
// give every thread work (one, where the batch-group heads are at least as many as the threads).
std::vector<at::Tensor> deformable_attention_backward(at::Tensor grad_out, at::Tensor q, at::Tensor k,
                                                      at::Tensor v, at::Tensor lse, double scale,
                                                      at::Tensor table, at::Tensor iy,
                                                      at::Tensor fy, at::Tensor ix, at::Tensor fx,
                                                      at::Tensor x_taps) {
  BiasInputs bias;
  const AttentionShape s = check_inputs(q, k, v, table, iy, fy, ix, fx, x_taps, bias);
  check_queries(grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "expected grad_out of q's shape ", q.sizes(), ", got ", grad_out.sizes());
  check_per_query(lse, s, "lse");
  const int64_t d = s.d, ns = s.ns, width = s.width, rows = s.rows, queries = s.queries();
  const int64_t row_length = bias.row_length, heads = s.nb * s.hg;
  const int64_t threads = at::get_num_threads();
  const int64_t segments = std::max<int64_t>(1, std::min(rows, (threads + heads - 1) / heads));
  auto grad_q = at::empty_like(q);
  auto grad_k = at::zeros({segments, s.nb, s.hg, d, ns}, q.options());
  auto grad_v = at::zeros({segments, s.nb, s.hg, d, ns}, q.options());
  auto grad_table = at::zeros({segments, s.nb, s.hg, table.size(2), table.size(3)}, q.options());
  auto grad_coords = at::empty({segments, s.nb, s.hg, ns, 2}, q.options());
  auto k_t = k.transpose(2, 3).contiguous();  // (nb, hg, Ns, d): the right operand of dS.k^T
  const QueryMaps<const float> grad_out_maps(grad_out), q_maps(q);
  const QueryMaps<float> grad_q_maps(grad_q);
  const float* k_p = k.data_ptr<float>();
  const float* k_t_p = k_t.data_ptr<float>();
  const float* v_p = v.data_ptr<float>();
  const float* lse_p = lse.data_ptr<float>();
  float* grad_k_p = grad_k.data_ptr<float>();
  float* grad_v_p = grad_v.data_ptr<float>();
  float* grad_table_p = grad_table.data_ptr<float>();
  float* grad_coords_p = grad_coords.data_ptr<float>();
  const float alpha = static_cast<float>(scale);
  const int64_t block = std::min(kQueryBlock, width);
  at::parallel_for(0, segments * heads, 1, [&](int64_t begin, int64_t end) {
    // Padded as in the forward pass.
    std::vector<float> interpolated(ns * row_length + kBiasWindow), grad_interpolated(ns * row_length + kBiasWindow),
        q_block(block * d), grad_out_block(block * d), q_columns_block(block * d), grad_out_columns_block(block * d),
        probs(block * ns), grad_logits(block * ns), grad_q_block(block * d), alphas(block, alpha), row_grad_x(ns);
    std::vector<double> grad_y(ns), grad_x(ns);
    for (int64_t item = begin; item < end; ++item) {
      // item = (segment, batch-group, head), the layout of the accumulators.
      const int64_t segment = item / heads, bh = item % heads, b = bh / s.hg;
      const int64_t r0 = rows * segment / segments, r1 = rows * (segment + 1) / segments;
      std::fill(grad_y.begin(), grad_y.end(), 0.0);
      std::fill(grad_x.begin(), grad_x.end(), 0.0);
      const float* head_table = bias.table + bh * bias.table_size;
      float* item_grad_table = grad_table_p + item * bias.table_size;
      const int32_t* key_taps = bias.x_taps + b * ns * 2;
      const float* head_q = q_maps.head(b, bh % s.hg);
      const float* head_grad_out = grad_out_maps.head(b, bh % s.hg);
      float* head_grad_q = grad_q_maps.head(b, bh % s.hg);
      float* item_grad_k = grad_k_p + item * d * ns;
      float* item_grad_v = grad_v_p + item * d * ns;
      for (int64_t r = r0; r < r1; ++r) {
        const int32_t* row_iy = bias.iy + (b * rows + r) * ns;
        const float* row_fy = bias.fy + (b * rows + r) * ns;
        interpolate_rows(head_table, row_length, row_iy, row_fy, key_taps, ns, interpolated.data());
        for (int64_t n = 0; n < ns; ++n) {
          float* grad_row = grad_interpolated.data() + n * row_length;
          std::fill(grad_row + key_taps[2 * n], grad_row + key_taps[2 * n + 1] + 1, 0.0f);
        }
        std::fill(row_grad_x.begin(), row_grad_x.end(), 0.0f);
        for (int64_t c0 = 0; c0 < width; c0 += block) {
          const int64_t mb = std::min(block, width - c0), first = r * width + c0;
          int64_t ld_q, ld_grad_out;
          const float* q_rows =
              query_rows(head_q, q_maps.channel_stride, q_maps.query_stride, first, mb, d, q_block.data(), ld_q);
          const float* grad_out_rows = query_rows(head_grad_out, grad_out_maps.channel_stride,
                                                  grad_out_maps.query_stride, first, mb, d, grad_out_block.data(),
                                                  ld_grad_out);
          matmul(mb, ns, d, q_rows, ld_q, k_p + bh * d * ns, ns, probs.data(), ns, false);
          matmul(mb, ns, d, grad_out_rows, ld_grad_out, v_p + bh * d * ns, ns, grad_logits.data(), ns, false);
          const int32_t* block_ix = bias.ix + (b * width + c0) * ns;
          const float* block_fx = bias.fx + (b * width + c0) * ns;
          const bool in_windows = bias_in_windows(block_ix, mb, ns);
          if (in_windows) {
            add_bias_in_windows(probs.data(), mb, alpha, interpolated.data(), row_length, block_ix, block_fx, ns);
          } else {
            add_bias_by_pair(probs.data(), mb, alpha, interpolated.data(), row_length, block_ix, block_fx, ns, 0, ns);
          }
          for (int64_t m = 0; m < mb; ++m) {
            float* p = probs.data() + m * ns;
            float* g = grad_logits.data() + m * ns;
            const float query_delta = dat::exp_shifted_dot(p, g, ns, lse_p[bh * queries + first + m]);
            for (int64_t n = 0; n < ns; ++n) g[n] = p[n] * (g[n] - query_delta);  // dS = P * (dP - D)
          }
          if (in_windows) {
            bias_gradient_in_windows(grad_logits.data(), mb, block_ix, block_fx, ns, interpolated.data(), row_length,
                                     grad_interpolated.data(), row_grad_x.data());
          } else {
            bias_gradient_by_pair(grad_logits.data(), mb, block_ix, block_fx, ns, 0, ns, interpolated.data(),
                                  row_length, grad_interpolated.data(), row_grad_x.data());
          }
          // dV += dO.P and dK += Q.dS (times scale, after the sum) take the block's (d, mb)
          // columns of grad_out and q; dQ = scale * dS.K.
          const float* grad_out_columns =
              query_columns(head_grad_out, grad_out_maps.channel_stride, grad_out_maps.query_stride, first, mb, d,
                            grad_out_columns_block.data(), ld_grad_out);
          matmul(d, ns, mb, grad_out_columns, ld_grad_out, probs.data(), ns, item_grad_v, ns, true);
          const float* q_columns = query_columns(head_q, q_maps.channel_stride, q_maps.query_stride, first, mb, d,
                                                 q_columns_block.data(), ld_q);
          matmul(d, ns, mb, q_columns, ld_q, grad_logits.data(), ns, item_grad_k, ns, true);
          matmul(mb, d, ns, grad_logits.data(), ns, k_t_p + bh * ns * d, d, grad_q_block.data(), d, false);
          store_query_rows(grad_q_block.data(), alphas.data(), first, mb, d, grad_q_maps.channel_stride,
                           grad_q_maps.query_stride, head_grad_q);
        }
        // R[n][t] = top[t] + fy * (bottom[t] - top[t]) backwards.
        for (int64_t n = 0; n < ns; ++n) {
          const float* top = head_table + row_iy[n] * row_length;
          const float* bottom = top + row_length;
          float* grad_top = item_grad_table + row_iy[n] * row_length;
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
      float* item_grad_coords = grad_coords_p + item * ns * 2;
      for (int64_t n = 0; n < ns; ++n) {
        item_grad_coords[2 * n] = static_cast<float>(grad_y[n]);
        item_grad_coords[2 * n + 1] = static_cast<float>(grad_x[n]);
      }
    }
  });
  return {grad_q, grad_k.sum(0).mul_(alpha), grad_v.sum(0), grad_table.sum(0), grad_coords.sum(at::IntArrayRef{0, 2})};
}
