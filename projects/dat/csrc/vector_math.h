// Float32 helpers that the compiler vectorises (with -O3 -fno-trapping-math, and AVX2/FMA where built so).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef __AVX__
#include <immintrin.h>
#endif

// For the small helpers that hot loops call: GCC stops inlining into a function that has grown past
// its limits (the D op's backward, with its bias passes for every window width), and an
// out-of-line call makes the caller spill every live vector register around it.
#define DAT_ALWAYS_INLINE inline __attribute__((always_inline))

// The vectors' width: 8 floats (AVX2's 256 bits, or portable code where built without AVX2),
// or 16 in a file that defines DAT_VECTOR_LANES as 16 before including this header (one built for
// AVX-512). Each width has its own inline namespace, so that two files of different widths never
// share one definition of a helper.
#ifndef DAT_VECTOR_LANES
#define DAT_VECTOR_LANES 8
#endif
#if DAT_VECTOR_LANES == 16
#define DAT_VECTOR_NAMESPACE lanes16
#elif DAT_VECTOR_LANES == 8
#define DAT_VECTOR_NAMESPACE lanes8
#else
#error "DAT_VECTOR_LANES must be 8 or 16"
#endif

namespace dat {
inline namespace DAT_VECTOR_NAMESPACE {

constexpr int64_t kLanes = DAT_VECTOR_LANES;  // also the independent partial sums of the loops below

// Explicit vectors of kLanes floats / int32 (GCC and Clang vector types: AVX2 where built so), for
// loops the compiler does not vectorise as wanted by itself (partial sums kept in registers).
typedef float FloatVector __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IntVector __attribute__((vector_size(kLanes * sizeof(int32_t))));

namespace detail {
// The same vectors at any float / int32 address; may_alias: they read and write float / int32 memory.
typedef float UnalignedFloatVector __attribute__((vector_size(kLanes * sizeof(float)), aligned(4), may_alias));
typedef int32_t UnalignedIntVector __attribute__((vector_size(kLanes * sizeof(int32_t)), aligned(4), may_alias));
template <typename V>
struct Unaligned;
template <>
struct Unaligned<FloatVector> {
  typedef UnalignedFloatVector type;
};
template <>
struct Unaligned<IntVector> {
  typedef UnalignedIntVector type;
};
}  // namespace detail

// The vector at p (no alignment assumed). A plain load (a memcpy into a local vector is merged by
// the compiler with its neighbours into copies through the stack).
template <typename V, typename T>
inline V load_vector(const T* p) {
  return *reinterpret_cast<const typename detail::Unaligned<V>::type*>(p);
}

// Writes v to p (no alignment assumed).
template <typename V, typename T>
inline void store_vector(T* p, const V& v) {
  *reinterpret_cast<typename detail::Unaligned<V>::type*>(p) = v;
}

// a . b, in kLanes partial sums.
inline float dot(const float* a, const float* b, int64_t n) {
  float partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) partial[l] += a[i + l] * b[i + l];
  }
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += partial[l];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// The largest of x[i] for i < n (n > 0), in kLanes partial maxima (a NaN is passed over, as
// std::max passes it; the softmax's sum then turns NaN through it). Explicit vectors: GCC leaves
// the loop over an array of partial maxima scalar (one vmaxss per element).
inline float max_of(const float* x, int64_t n) {
  FloatVector partial;
  for (int64_t l = 0; l < kLanes; ++l) partial[l] = x[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const FloatVector v = load_vector<FloatVector>(x + i);
    partial = partial < v ? v : partial;  // std::max(partial, v) lane by lane
  }
  float largest = partial[0];
  for (int64_t l = 1; l < kLanes; ++l) largest = std::max(largest, partial[l]);
  for (; i < n; ++i) largest = std::max(largest, x[i]);
  return largest;
}

// Transposes the kLanes x kLanes matrix whose rows are rows[0 .. kLanes - 1]: rows[i][j] becomes rows[j][i].
DAT_ALWAYS_INLINE void transpose(FloatVector* rows) {
#if defined(__AVX__) && DAT_VECTOR_LANES == 8
  static_assert(sizeof(FloatVector) == sizeof(__m256));
  __m256 pairs[8], quads[8];
  for (int i = 0; i < 8; i += 2) {
    pairs[i] = _mm256_unpacklo_ps(rows[i], rows[i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
    pairs[i + 1] = _mm256_unpackhi_ps(rows[i], rows[i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int i = 0; i < 8; i += 4) {
    for (int h = 0; h < 2; ++h) {
      quads[i + 2 * h] = _mm256_shuffle_ps(pairs[i + h], pairs[i + 2 + h], 0x44);      // a b c d at 0 | 4
      quads[i + 2 * h + 1] = _mm256_shuffle_ps(pairs[i + h], pairs[i + 2 + h], 0xEE);  // at 1 | 5
    }
  }
  for (int i = 0; i < 4; ++i) {
    rows[i] = _mm256_permute2f128_ps(quads[i], quads[i + 4], 0x20);
    rows[i + 4] = _mm256_permute2f128_ps(quads[i], quads[i + 4], 0x31);
  }
#else
  for (int64_t i = 0; i < kLanes; ++i) {
    for (int64_t j = i + 1; j < kLanes; ++j) std::swap(rows[i][j], rows[j][i]);
  }
#endif
}

namespace detail {
// x clamped to [lo, hi] as std::min(std::max(x, lo), hi) (a NaN passes through), lane by lane for
// vectors. With AVX, the max / min instructions, whose second operand is returned where either
// is a NaN: the same selects (GCC turns the selects with constant bounds into compares and blends).
inline float clamp(float x, float lo, float hi) { return std::min(std::max(x, lo), hi); }
inline FloatVector clamp(FloatVector x, float lo, float hi) {
#if defined(__AVX__) && DAT_VECTOR_LANES == 8
  static_assert(sizeof(FloatVector) == sizeof(__m256));
  return _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), x));
#else
  FloatVector low, high;
  for (int64_t l = 0; l < kLanes; ++l) low[l] = lo, high[l] = hi;
  x = x < low ? low : x;
  return high < x ? high : x;
#endif
}

// 2^n from the bits of 1.5 * 2^23 + n (see exp_approx), lane by lane for vectors.
typedef uint32_t UnsignedVector __attribute__((vector_size(kLanes * sizeof(uint32_t))));
inline float power_of_two(float shifted) {
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  // The bits of 1.5 * 2^23 + n are 0x4B400000 + n for |n| < 2^22; 2^n has the exponent bits n + 127.
  bits = (bits - 0x4B400000u + 127u) << 23;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}
inline FloatVector power_of_two(FloatVector shifted) {
  return reinterpret_cast<FloatVector>((reinterpret_cast<UnsignedVector>(shifted) - 0x4B400000u + 127u) << 23);
}
}  // namespace detail

// exp(x), Cephes' expf: x = n ln 2 + r with n rounded to nearest (ln 2 in two parts), e^r by a
// degree-5 polynomial, 2^n from the exponent bits. At most 1.5 ulp from the exact value (std::exp
// and torch's exp: 1 ulp) on [-87, 88]; below -87 it returns exp(-87) (1.6e-38: what it adds to a
// sum of softmax weights, each <= 1 with one equal to 1, is below float32 round-off). NaN gives
// NaN. T: float (whose loops vectorise where compiled with -fno-trapping-math, so that the clamps
// may be branch-free), or FloatVector for kLanes values at once (the same operations lane by lane, so
// the same bits: GCC vectorises the float version's loops too, but makes its clamps compares and
// blends, 3 micro-ops each on Intel cores, where the vector version gets max / min).
template <typename T>
inline T exp_approx(T x) {
  x = detail::clamp(x, -87.0f, 88.0f);
  // Adding 1.5 * 2^23 rounds x / ln 2 to the nearest integer n and leaves n in the low bits of
  // the sum's mantissa: n is read from those bits, so that no float is converted to an integer
  // (undefined for the NaN that the clamp above passes on; its bits only reach 2^n, and p is NaN).
  const T shifted = x * 1.44269504088896341f + 12582912.0f;
  const T n = shifted - 12582912.0f;
  const T r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  T p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * detail::power_of_two(shifted);
}

// x[i] = exp(x[i] - shift) for i < n, and the new x's dot product with y (summed as dot sums) in
// the same pass.
inline float exp_shifted_dot(float* x, const float* y, int64_t n, float shift) {
  FloatVector partial = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const FloatVector e = exp_approx(load_vector<FloatVector>(x + i) - shift);
    store_vector(x + i, e);
    partial += e * load_vector<FloatVector>(y + i);
  }
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += partial[l];
  for (; i < n; ++i) {
    x[i] = exp_approx(x[i] - shift);
    total += x[i] * y[i];
  }
  return total;
}

// x[i] = exp(x[i] - shift) for i < n, and their sum (in kLanes partial sums) in the same pass.
inline float exp_shifted_sum(float* x, int64_t n, float shift) {
  FloatVector partial = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const FloatVector e = exp_approx(load_vector<FloatVector>(x + i) - shift);
    store_vector(x + i, e);
    partial += e;
  }
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += partial[l];
  for (; i < n; ++i) {
    x[i] = exp_approx(x[i] - shift);
    total += x[i];
  }
  return total;
}

namespace detail {
// |x|, lane by lane for vectors.
inline float magnitude(float x) { return std::fabs(x); }
inline FloatVector magnitude(FloatVector x) {
  return reinterpret_cast<FloatVector>(reinterpret_cast<IntVector>(x) & 0x7FFFFFFF);
}
// below_zero where x < 0, else otherwise, lane by lane for vectors.
inline float where_negative(float x, float below_zero, float otherwise) { return x < 0.0f ? below_zero : otherwise; }
inline FloatVector where_negative(FloatVector x, FloatVector below_zero, FloatVector otherwise) {
  return x < FloatVector{} ? below_zero : otherwise;
}
}  // namespace detail

// GELU(z) = z * Phi(z) and its derivative Phi(z) + z * phi(z) (Phi, phi: the standard normal
// distribution and density), with erf by Abramowitz and Stegun 7.1.26 (|error| <= 1.5e-7, the
// formula of torch's vectorised CPU erf). The tail Phi(-|z|) = erfc(|z| / sqrt 2) / 2 is taken
// directly, not as 1 - Phi(|z|): no cancellation for negative z. Branch-free. T: float, or
// FloatVector for kLanes values at once (the same operations lane by lane, so the same bits).
template <typename T>
inline void gelu_with_slope(T z, T& value, T& slope) {
  const T x = detail::magnitude(z) * 0.70710678118654752f;
  const T t = 1.0f / (1.0f + 0.3275911f * x);
  const T gauss = exp_approx(-x * x);  // exp(-z^2 / 2)
  T poly = 1.061405429f * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  const T tail = 0.5f * poly * t * gauss;  // Phi(-|z|)
  const T cdf = detail::where_negative(z, tail, 1.0f - tail);
  value = z * cdf;
  slope = cdf + z * gauss * 0.39894228040143268f;  // 1 / sqrt(2 pi)
}

// One float, or a FloatVector of kLanes floats, at p: for code written once for both (a loop's
// full vectors and its tail).
template <typename T>
inline T load_lanes(const float* p) {
  if constexpr (std::is_same_v<T, float>) {
    return *p;
  } else {
    return load_vector<T>(p);
  }
}
inline void store_lanes(float* p, float v) { *p = v; }
inline void store_lanes(float* p, const FloatVector& v) { store_vector(p, v); }

// Calls body(lanes, c) for the channels c of [0, channels): a FloatVector lanes for kLanes
// channels from c while they fill one, then a float lanes for each channel left.
template <typename Body>
inline void for_channel_lanes(int64_t channels, Body&& body) {
  int64_t c = 0;
  for (; c + kLanes <= channels; c += kLanes) body(FloatVector{}, c);
  for (; c < channels; ++c) body(0.0f, c);
}

}  // inline namespace DAT_VECTOR_NAMESPACE
}  // namespace dat
