// int8 weight rows times activation rows in register tiles: the inner loop of the int8 linear
// (linear_int8_cpu.cpp) and of the int8 sparse FFN's batched gate and up passes
// (sparse_ffn_cpu.cpp). Rows are given by pointer, so a tile may take any set of weight rows (the
// sparse FFN's candidate neurons) straight from the weight, with no gather copy.
//
// Activations enter on a per-row grid (XRows: x ~= xq * step, |xq| <= x_max(K, bits);
// kernels/activation_grid.py is the torch twin), so the dot products are exact integer sums:
// - 16 bits (`--quantization int8`): |xq| <= 8191 for K up to ~17k (14 bits); AVX-512 VNNI's
//   vpdpwssd does 32 int16 x int16 products per instruction into int32 lanes, twice the fp32
//   FMA's 16, and the weights need one sign extension instead of two conversions to fp32;
// - 8 bits (`--quantization w8a8`): |xq| <= 127, stored as u8 xq + 128 for vpdpbusd (64 u8 x s8
//   products per instruction, 4x fp32); the + 128 is taken back with 128 * sum(w) per row,
//   summed from the tile's rows while they are in L1. Builds without VNNI run 8-bit rows
//   through the 16-bit tiles (same integers, same results).
// NOTE: at 2+ rows the fp32 tiles were FMA-bound (the weights are shared by the rows). On
// SmolLM2 the 14-bit grid moves perplexity by under 0.02%; the 8-bit grid on q/k/v, o_proj and
// the FFN's gate/up costs +1.0% more dense (+2.7% with lm_head's too, which w8a8 therefore keeps
// on 14 bits), hence opt-in (docs/benchmarks/quantization.md).
//
// A tile: NR <= kTileN weight rows x MR <= kTileM activation rows (row stride ld, padded to a
// multiple of the step with xq = 0). 4 x 6 accumulators + 4 weight vectors + 1 x vector fill
// AVX-512's 32 registers; AVX2 has 16, so 4 x 2 there (a wider tile would spill).
//
// 4-bit rows (int4_rows.h) hold int8 values, so they run through the same tiles: decoded in the
// tiles' registers (I4Load), or first into a scratch (WeightRows::row), and row_dot16 takes one
// int8 or 4-bit row against one x row (the batch-1 FFN's gate and up dots).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "int4_rows.h"

namespace int8_rows {

constexpr int kTileN = 4;           // weight rows per tile

// 64 bytes of 1s: the u8 operand that turns a dot product into a row sum (row_sum).
alignas(64) inline constexpr uint8_t kOnesU8[64] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                                   1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                                   1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

// The activation grid: the largest |xq| for rows of length K. 8 bits: 127. 16 bits: every int32
// lane of the tiles below sums at most ceil(K / 8) products of |w| <= 127 and |xq| <= x_max (8
// lanes with AVX2, 16 with AVX-512; the scalar build sums in int64), so x_max keeps that sum
// under 2^31: 8191 (14 bits) up to K ~ 17k, less beyond.
inline int x_max(int64_t K, int bits) {
  if (bits == 8) return 127;
  const int64_t per_lane = (K + 7) / 8;
  const int64_t bound = per_lane > 0 ? (int64_t{2147483647} / 127) / per_lane : 8191;
  return static_cast<int>(bound < 8191 ? bound : 8191);
}

// A row's grid from its largest |value| (NaN if the row holds a NaN or an infinity): step =
// amax / qmax and inv = qmax / amax (values map to round(v * inv)); a zero row gets step 0 and a
// row with a NaN or an infinity step NaN (its outputs are NaN, as fp32 math would make them),
// both with inv 0.
struct Grid {
  float step, inv;
  Grid(float amax, int qmax) {
    const bool finite = std::isfinite(amax);   // false for NaN too
    step = !finite ? NAN : amax > 0.f ? amax / static_cast<float>(qmax) : 0.f;
    inv = finite && amax > 0.f ? static_cast<float>(qmax) / amax : 0.f;
  }
};

// max(amax, |v|), where a NaN sticks (std::fmax alone would drop it).
inline float max_abs(float amax, float v) {
  return std::isnan(v) || std::isnan(amax) ? NAN : std::fmax(amax, std::fabs(v));
}

#if defined(__AVX512F__)
// The lanes of a 16-wide step with `left` elements to go: all 16, or the first `left`.
inline __mmask16 lanes16(int64_t left) {
  return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
// max |x[0:K]| (NaN if x holds a NaN), 16 lanes at a time: max_abs's result. NOTE: the scalar
// loop called fmaxf per element; with the rounding below it cost ~2.5 ns a value, ~1.1M values
// (16 rows x 4 inputs x 30 layers) in a 16-row SmolLM2 decode step and ~13% of a prefill.
inline float max_abs16(const float* x, int64_t K) {
  __m512 m = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 live = lanes16(K - k);
    const __m512 v = _mm512_maskz_loadu_ps(live, x + k);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
  }
  return nan != 0 ? NAN : _mm512_reduce_max_ps(m);
}

// xq[0:K] = round(x[0:K] * inv) + offset as Q (int16 or uint8), 16 at a time: vcvtps2dq rounds
// to nearest even, as nearbyint does in the default rounding mode, so the integers are the scalar
// loop's; every |x * inv| <= qmax, so the narrowing stores keep them whole.
template <typename Q>
inline void round_row16(const float* x, int64_t K, float inv, int offset, Q* xq) {
  const __m512 vi = _mm512_set1_ps(inv);
  const __m512i off = _mm512_set1_epi32(offset);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 live = lanes16(K - k);
    const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(live, x + k), vi)), off);
    if constexpr (sizeof(Q) == 1)
      _mm512_mask_cvtepi32_storeu_epi8(xq + k, live, q);
    else
      _mm512_mask_cvtepi32_storeu_epi16(xq + k, live, q);
  }
}
#endif

// xq[0:K] = round(x[0:K] / step) + offset, xq[K:ld] = offset; returns the row's Grid step.
// `load` widens one element of x to fp32 (the identity for fp32 x, which takes the vector path).
template <typename Q, typename T, typename Load>
inline float quantize_row(const T* x, int64_t K, int64_t ld, int qmax, int offset, Q* xq, Load load) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<T, float>) {
    const Grid g(max_abs16(x, K), qmax);
    int64_t k = 0;
    if (g.inv != 0.f) {   // else a zero row or one with a NaN / inf (NaN * 0 must not reach the cast)
      round_row16(x, K, g.inv, offset, xq);
      k = K;
    }
    for (; k < ld; ++k) xq[k] = static_cast<Q>(offset);
    return g.step;
  }
#endif
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = max_abs(amax, load(x[k]));
  const Grid g(amax, qmax);
  int64_t k = 0;
  if (g.inv != 0.f)   // else a zero row or one with a NaN / inf (NaN * 0 must not reach the cast)
    for (; k < K; ++k) xq[k] = static_cast<Q>(static_cast<int>(std::nearbyint(load(x[k]) * g.inv)) + offset);
  for (; k < ld; ++k) xq[k] = static_cast<Q>(offset);
  return g.step;
}

#if defined(__AVX512F__)
// out[0:n] = the lane sums of v[0:n] (n <= 16): a transpose-and-add network, 30 shuffles and 15
// adds for 16 vectors where 16 separate reductions take ~130 instructions (16-bit tiles at
// K = 576: 38 -> 48 MAC/ns per thread).
inline void sum_lanes16(const __m512i* v, int n, int64_t* out) {
  __m512i a[16];
  for (int i = 0; i < 16; ++i) a[i] = i < n ? v[i] : _mm512_setzero_si512();
  __m512i b[8], c[4];
  for (int i = 0; i < 8; ++i)   // per 128-bit lane: [a0 0+2, a1 0+2, a0 1+3, a1 1+3] of the pair
    b[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)   // per 128-bit lane: that lane's sum of each of 4 vectors
    c[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_epi64(b[2 * i], b[2 * i + 1]));
  auto fold = [](__m512i x, __m512i y) {   // [x L0+L1, x L2+L3, y L0+L1, y L2+L3]
    return _mm512_add_epi32(_mm512_shuffle_i32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  const __m512i e = fold(fold(c[0], c[1]), fold(c[2], c[3]));   // the 16 sums, in order
  alignas(64) int32_t sums[16];
  _mm512_store_si512(sums, e);
  for (int i = 0; i < n; ++i) out[i] = sums[i];
}
#endif

// One SIMD width of int16 dot products: W elements of k per step, int32 lanes.
#if defined(__AVX512F__) && defined(__AVX512BW__)
struct Vec16 {
  using X = int16_t;
  static constexpr int kOffset = 0;
  static constexpr int W = 32;
  using R = __m512i;
  static R zero() { return _mm512_setzero_si512(); }
  static R load_w(const int8_t* p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static R load_w_tail(const int8_t* p, int n) {   // the first n < W weights, zeros after
    return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8((__mmask32)((1u << n) - 1u), p));
  }
  static R load_x(const int16_t* p) { return _mm512_loadu_si512(p); }
#if defined(__AVX512VNNI__)
  static R dot(R acc, R w, R x) { return _mm512_dpwssd_epi32(acc, w, x); }
#else
  static R dot(R acc, R w, R x) { return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x)); }
#endif
  static int64_t sum(R v) { return _mm512_reduce_add_epi32(v); }
  static void sum_all(const R* v, int n, int64_t* out) {
    for (int i = 0; i < n; i += 16) sum_lanes16(v + i, n - i < 16 ? n - i : 16, out + i);
  }
};
#elif defined(__AVX2__)
struct Vec16 {
  using X = int16_t;
  static constexpr int kOffset = 0;
  static constexpr int W = 16;
  using R = __m256i;
  static R zero() { return _mm256_setzero_si256(); }
  static R load_w(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static R load_w_tail(const int8_t* p, int n) {
    alignas(16) int8_t buf[16] = {};
    std::memcpy(buf, p, n);
    return load_w(buf);
  }
  static R load_x(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static R dot(R acc, R w, R x) { return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x)); }
  static int64_t sum(R v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
  }
  static void sum_all(const R* v, int n, int64_t* out) {
    for (int i = 0; i < n; ++i) out[i] = sum(v[i]);
  }
};
#else
struct Vec16 {
  using X = int16_t;
  static constexpr int kOffset = 0;
  static constexpr int W = 1;
  using R = int64_t;
  static R zero() { return 0; }
  static R load_w(const int8_t* p) { return *p; }
  static R load_w_tail(const int8_t* p, int) { return *p; }
  static R load_x(const int16_t* p) { return *p; }
  static R dot(R acc, R w, R x) { return acc + w * x; }
  static int64_t sum(R v) { return v; }
  static void sum_all(const R* v, int n, int64_t* out) {
    for (int i = 0; i < n; ++i) out[i] = v[i];
  }
};
#endif

// u8 x s8 dot products (8-bit rows stored as xq + 128): AVX-512 VNNI builds only.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define INT8_ROWS_U8_TILES 1
struct VecU8 {
  using X = uint8_t;
  static constexpr int kOffset = 128;
  static constexpr int W = 64;
  using R = __m512i;
  static R zero() { return _mm512_setzero_si512(); }
  static R load_w(const int8_t* p) { return _mm512_loadu_si512(p); }
  static R load_w_tail(const int8_t* p, int n) { return _mm512_maskz_loadu_epi8((__mmask64)((1ull << n) - 1ull), p); }
  static R load_x(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static R dot(R acc, R w, R x) { return _mm512_dpbusd_epi32(acc, x, w); }
  static int64_t sum(R v) { return _mm512_reduce_add_epi32(v); }
  static void sum_all(const R* v, int n, int64_t* out) {
    for (int i = 0; i < n; i += 16) sum_lanes16(v + i, n - i < 16 ? n - i : 16, out + i);
  }
};
#endif

constexpr int kTileM = Vec16::W == 32 ? 6 : 2;         // x rows per tile (see the top of the file)

// How a tile loads V::W weights of a row from k (the last step's past K as 0): int8 rows in place.
struct I8Load {
  template <class V>
  static typename V::R load(const int8_t* row, int64_t k, int64_t) { return V::load_w(row + k); }
  template <class V>
  static typename V::R tail(const int8_t* row, int64_t k, int64_t K) {
    return V::load_w_tail(row + k, static_cast<int>(K - k));
  }
};

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define INT8_ROWS_I4_TILES 1
// 4-bit rows (int4_rows.h; `row` points at the packed row) decoded in registers, one group of
// 32 per 32 values: no decoded copy written and read back. A group's pad decodes to 0, so the
// last step needs no mask but for the absent second group of a 64-wide step.
struct I4Load {
  template <class V>
  static typename V::R load(const int8_t* row, int64_t k, int64_t K) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(row);
    const int64_t G = int4_rows::num_groups(K), g = k / int4_rows::kGroup;
    const __m256i lo = int4_rows::decode_group(p + g * 16, p[G * 16 + g]);
    if constexpr (V::W == 32) {
      return _mm512_cvtepi8_epi16(lo);
    } else {
      static_assert(V::W == 64, "4-bit tiles: 32- or 64-wide steps");
      const __m256i hi = g + 1 < G ? int4_rows::decode_group(p + (g + 1) * 16, p[G * 16 + g + 1])
                                   : _mm256_setzero_si256();
      return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
  }
  template <class V>
  static typename V::R tail(const int8_t* row, int64_t k, int64_t K) { return load<V>(row, k, K); }
};
#endif

// sum(w[0:K]) with V's loads through L (what kOffset adds per unit of each dot product).
template <class V, class L = I8Load>
inline int64_t row_sum(const int8_t* w, int64_t K) {
  const typename V::R ones = V::load_x(reinterpret_cast<const typename V::X*>(kOnesU8));
  typename V::R c = V::zero();
  int64_t k = 0;
  for (; k + V::W <= K; k += V::W) c = V::dot(c, L::template load<V>(w, k, K), ones);
  if (k < K) c = V::dot(c, L::template tail<V>(w, k, K), ones);
  return V::sum(c);
}

// wsum[0] before the first tile of a set of weight rows: their sums are not known yet.
constexpr int64_t kNoSum = INT64_MIN;

// Keeps v in a register: GCC otherwise folds a vector's load into every instruction that reads
// it, and a tile step then issues one load per product instead of one per vector (28 loads per
// 24 products: load-bound).
template <class R>
inline void in_register(R& v) {
#if defined(__GNUC__) && (defined(__AVX512F__) || defined(__AVX2__))
  if constexpr (sizeof(R) >= 32) asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// One step of k of a tile: a[n][m] += dot(wv[n], x row m at k).
template <class V, int NR, int MR>
inline __attribute__((always_inline)) void tile_step(typename V::R (&a)[NR][MR], typename V::R (&wv)[NR],
                                                     const typename V::X* x, int64_t ld, int64_t k) {
#pragma GCC unroll 8
  for (int n = 0; n < NR; ++n) in_register(wv[n]);
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    typename V::R xv = V::load_x(x + m * ld + k);
    in_register(xv);
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) a[n][m] = V::dot(a[n][m], wv[n], xv);
  }
}

// NOTE: GCC's partial redundancy elimination (-ftree-pre) turned the accumulators' updates into
// register copies and stack spills at every step of k; off here, with the sums reading a copy of
// the accumulators (below) and every vector pinned in a register (in_register), the loop holds
// the tile in registers: a 16-row w8a8 decode step of SmolLM2 33.2 -> 26.9 ms, lm_head's share
// 7.1 -> 4.7 ms (docs/benchmarks/quantization.md).
#if defined(__GNUC__) && !defined(__clang__)
#define INT8_ROWS_TILE_CODEGEN __attribute__((optimize("no-tree-pre")))
#else
#define INT8_ROWS_TILE_CODEGEN
#endif

// acc[n][m] = dot(w[n][0:K], xq[m]) exactly (xq[m] = x[m * ld : m * ld + K] - V::kOffset), for
// NR weight rows (loaded through L) and MR x rows. wsum [NR]: the rows' sums (offset tiles
// only), filled by the first tile that needs them (wsum[0] == kNoSum) and reused by the next
// groups of x rows.
template <class V, class L, int NR, int MR>
INT8_ROWS_TILE_CODEGEN void tile(const int8_t* const* w, const typename V::X* x, int64_t K, int64_t ld,
                                 int64_t acc[kTileN][kTileM], int64_t* wsum) {
  typename V::R a[NR][MR];
#pragma GCC unroll 8
  for (int n = 0; n < NR; ++n)
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) a[n][m] = V::zero();
  int64_t k = 0;
  for (; k + V::W <= K; k += V::W) {
    typename V::R wv[NR];
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) wv[n] = L::template load<V>(w[n], k, K);
    tile_step<V, NR, MR>(a, wv, x, ld, k);
  }
  if (k < K) {   // the last partial step: weights past K load as 0 (x past K is the offset)
    typename V::R wv[NR];
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) wv[n] = L::template tail<V>(w[n], k, K);
    tile_step<V, NR, MR>(a, wv, x, ld, k);
  }
  // NOTE: the sums read a copy: taking the accumulators' address kept them in memory (GCC
  // stored and reloaded every accumulator on every step of k)
  typename V::R fin[NR * MR];
#pragma GCC unroll 8
  for (int n = 0; n < NR; ++n)
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) fin[n * MR + m] = a[n][m];
  int64_t sums[NR * MR];
  V::sum_all(fin, NR * MR, sums);
  if constexpr (V::kOffset != 0) {
    // NOTE: a second pass over the tile's rows, from L1 (inline sums would spill the 4 x 6
    // tile), once per set of weight rows
    if (wsum[0] == kNoSum)
      for (int n = 0; n < NR; ++n) wsum[n] = row_sum<V, L>(w[n], K);
  }
  for (int n = 0; n < NR; ++n) {
    const int64_t back = V::kOffset != 0 ? V::kOffset * wsum[n] : 0;
    for (int m = 0; m < MR; ++m) acc[n][m] = sums[n * MR + m] - back;
  }
}

template <class V>
using TileFn = void (*)(const int8_t* const*, const typename V::X*, int64_t, int64_t, int64_t[kTileN][kTileM],
                        int64_t*);

template <class V, class L, int NR>
constexpr TileFn<V> tile_for(int mr) {
  return mr == 1 ? tile<V, L, NR, 1> : mr == 2 ? tile<V, L, NR, 2> : mr == 3 ? tile<V, L, NR, 3>
         : mr == 4 ? tile<V, L, NR, 4> : mr == 5 ? tile<V, L, NR, 5> : tile<V, L, NR, 6>;
}

template <class V, class L = I8Load>
inline TileFn<V> pick_tile(int nr, int mr) {
  switch (nr) {
    case 1: return tile_for<V, L, 1>(mr);
    case 2: return tile_for<V, L, 2>(mr);
    case 3: return tile_for<V, L, 3>(mr);
    default: return tile_for<V, L, 4>(mr);
  }
}

// Rows of x on their grid, as the tiles read them. Usage: reset() once, then quantize() each row
// (rows are independent: threads may split them), then dot() tiles of weight rows against them.
class XRows {
 public:
  void reset(int64_t rows, int64_t K, int bits) {
    K_ = K;
    qmax_ = x_max(K, bits);
    u8_ = false;
    int64_t step = Vec16::W;
#if defined(INT8_ROWS_U8_TILES)
    u8_ = bits == 8;
    if (u8_) step = VecU8::W;
#endif
    ld_ = (K + step - 1) / step * step;
    if (u8_)
      q8_.resize(rows * ld_);
    else
      q16_.resize(rows * ld_);
    step_.resize(rows);
  }

  template <typename T, typename Load>
  void quantize(int64_t r, const T* x, Load load) {
#if defined(INT8_ROWS_U8_TILES)
    if (u8_) {
      step_[r] = quantize_row(x, K_, ld_, qmax_, VecU8::kOffset, q8_.data() + r * ld_, load);
      return;
    }
#endif
    step_[r] = quantize_row(x, K_, ld_, qmax_, 0, q16_.data() + r * ld_, load);
  }

  float step(int64_t r) const { return step_[r]; }

  // acc[n][j] = dot(w[n], xq[m + j]) for n < nr, j < mr (<= kTileM), exactly. wsum [kTileN]:
  // scratch the caller sets to {kNoSum} before the first group of rows m of the same w. int4:
  // w are packed 4-bit rows (int4_rows.h), decoded in registers (builds with I4 tiles only).
  void dot(const int8_t* const* w, int nr, int64_t m, int mr, int64_t acc[kTileN][kTileM], int64_t* wsum,
           bool int4 = false) const {
#if defined(INT8_ROWS_I4_TILES)
    if (int4) {
#if defined(INT8_ROWS_U8_TILES)
      if (u8_) {
        pick_tile<VecU8, I4Load>(nr, mr)(w, q8_.data() + m * ld_, K_, ld_, acc, wsum);
        return;
      }
#endif
      pick_tile<Vec16, I4Load>(nr, mr)(w, q16_.data() + m * ld_, K_, ld_, acc, wsum);
      return;
    }
#else
    (void)int4;
#endif
#if defined(INT8_ROWS_U8_TILES)
    if (u8_) {
      pick_tile<VecU8>(nr, mr)(w, q8_.data() + m * ld_, K_, ld_, acc, wsum);
      return;
    }
#endif
    pick_tile<Vec16>(nr, mr)(w, q16_.data() + m * ld_, K_, ld_, acc, wsum);
  }
  // Whether 4-bit rows go to dot() as they are (decoded in registers) rather than decoded first.
  static constexpr bool decodes_int4() {
#if defined(INT8_ROWS_I4_TILES)
    return true;
#else
    return false;
#endif
  }

 private:
  int64_t K_ = 0, ld_ = 0;
  int qmax_ = 0;
  bool u8_ = false;
  std::vector<int16_t> q16_;
  std::vector<uint8_t> q8_;
  std::vector<float> step_;
};

// Weight rows as the int8 tiles read them: int8 rows of K in place, or 4-bit rows (int4_rows.h)
// decoded into a caller's scratch of int4_rows::padded(K) bytes per row.
struct WeightRows {
  const void* base = nullptr;
  int64_t K = 0;
  int bits = 8;   // 8 or 4

  WeightRows(const void* base_, int64_t K_, int bits_) : base(base_), K(K_), bits(bits_) {}

  int64_t stride() const { return bits == 4 ? int4_rows::row_bytes(K) : K; }
  // Where row i is stored (for prefetches).
  const uint8_t* raw(int64_t i) const { return static_cast<const uint8_t*>(base) + i * stride(); }
  // Row i's int8 values: in place, or decoded into scratch.
  const int8_t* row(int64_t i, int8_t* scratch) const {
    if (bits != 4) return reinterpret_cast<const int8_t*>(raw(i));
    int4_rows::decode_row(raw(i), K, scratch);
    return scratch;
  }
  // The int8 value of weight k of row i.
  int value(int64_t i, int64_t k) const {
    return bits == 4 ? int4_rows::value_at(raw(i), K, k) : reinterpret_cast<const int8_t*>(raw(i))[k];
  }
};

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define INT8_ROWS_ROW_DOT 1
// dot(row i, xq) exactly, xq being one row of x on its 16-bit grid (as XRows makes it; K values,
// then zeros up to a multiple of 32): 32 int8 values of the row per step (4-bit rows decoded in
// registers, a group per step), widened to int16 for vpdpwssd. The batch-1 FFN's gate and up
// dots (sparse_ffn_cpu.cpp's row path), where fp32 FMAs on widened weights did 8 products per
// instruction. `next` (may be null): a row to prefetch, `next_bytes` long, its lines spread
// over the steps.
inline int64_t row_dot16(const WeightRows& w, int64_t i, const int16_t* xq, const uint8_t* next,
                         int64_t next_bytes) {
  const int64_t K = w.K, steps = int4_rows::num_groups(K);
  const uint8_t* row = w.raw(i);
  const uint8_t* mult = row + steps * 16;   // 4-bit rows' multipliers
  __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
  int64_t fetched = 0;
  for (int64_t g = 0; g < steps; ++g) {
    if (next != nullptr)
      for (; fetched < next_bytes && fetched < (g + 1) * next_bytes / steps + 64; fetched += 64)
        __builtin_prefetch(next + fetched, 0, 3);
    __m256i v;
    if (w.bits == 4) {
      v = int4_rows::decode_group(row + g * 16, mult[g]);
    } else {
      const int64_t k = g * 32, n = K - k < 32 ? K - k : 32;
      v = _mm256_maskz_loadu_epi8(n == 32 ? ~0u : (__mmask32)((1u << n) - 1u), row + k);
    }
    __m512i& acc = g & 1 ? a1 : a0;   // two chains of dot products
    acc = Vec16::dot(acc, _mm512_cvtepi8_epi16(v), Vec16::load_x(xq + g * 32));
  }
  for (; next != nullptr && fetched < next_bytes; fetched += 64) __builtin_prefetch(next + fetched, 0, 3);
  return _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
}
#endif

// Software prefetch of the next tile's weight rows row_of(first .. first + kTileN), of `end`
// rows in all, `bytes` each (one hint per 64-byte line), issued before a tile is computed so their loads
// overlap its dot products.
// NOTE: in a served step SmolLM2's gate and up passes ran 1.7x slower (weights from DRAM) than
// on the same layer resident in cache; what the hints win back was within this host's noise.
template <typename RowOf>
inline void prefetch_tile(RowOf row_of, int64_t first, int64_t end, int64_t bytes) {
  for (int64_t i = first; i < first + kTileN && i < end; ++i)
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(row_of(i)) + b, 0, 3);
}

}  // namespace int8_rows
