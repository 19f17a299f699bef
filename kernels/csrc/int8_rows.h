// int8 weight rows times activation rows in register tiles: the inner loop of the int8 linear
// (linear_int8_cpu.cpp) and of the int8 sparse FFN's batched gate and up passes
// (sparse_ffn_cpu.cpp). Rows are given by pointer, so a tile may take any set of weight rows (the
// sparse FFN's candidate neurons) straight from the weight, with no gather copy.
//
// Activations enter as int16 on a per-row grid (quantize_row: x ~= xq * scale, |xq| <= x_max(K),
// 8191 for any K up to ~17k, i.e. 14 bits; kernels/linear_int8_cpu.py quantize_rows is the torch
// twin). The dot products are then exact integer sums: AVX-512 VNNI's vpdpwssd does 32
// int16 x int16 products per instruction into int32 lanes, twice the fp32 FMA's 16, and the
// weights need one sign extension (int8 -> int16) instead of two conversions to fp32.
// NOTE: at 2+ rows the fp32 tiles were FMA-bound (the weights are shared by the rows); the
// 14-bit grid moves perplexity by under 0.02% on SmolLM2 (docs/benchmarks/quantization.md),
// where 8-bit activations (vpdpbusd, 4x) cost +1.3% dense / +1.9% served, so not by default.
//
// A tile: NR <= kTileN weight rows x MR <= kTileM activation rows (row stride ldx, zero padded to
// a multiple of the step). 4 x 6 accumulators + 4 weight vectors + 1 x vector fill AVX-512's 32
// registers; AVX2 has 16, so 4 x 2 there (a wider tile would spill).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace int8_rows {

constexpr int kTileN = 4;           // weight rows per tile

// The activation grid: the largest |xq| for rows of length K. Every int32 lane of the tiles
// below sums at most ceil(K / 8) products of |w| <= 127 and |xq| <= x_max (8 lanes with AVX2,
// 16 with AVX-512; the scalar build sums in int64), so x_max keeps that sum under 2^31.
inline int x_max(int64_t K) {
  const int64_t per_lane = (K + 7) / 8;
  const int64_t bound = per_lane > 0 ? (int64_t{2147483647} / 127) / per_lane : 8191;
  return static_cast<int>(bound < 8191 ? bound : 8191);
}

// xq[0:K] = round(x[0:K] / scale), xq[K:ldx] = 0; returns scale = amax / x_max (0 for a zero
// row; NaN where x holds a NaN or an infinity, so the outputs of that row are NaN as fp32 math
// would make them). `load` widens one element of x to fp32.
template <typename T, typename Load>
inline float quantize_row(const T* x, int64_t K, int64_t ldx, int qmax, int16_t* xq, Load load) {
  float amax = 0.f;
  bool nan = false;
  for (int64_t k = 0; k < K; ++k) {
    const float v = load(x[k]);
    nan |= std::isnan(v);
    amax = std::fmax(amax, std::fabs(v));
  }
  const bool finite = !nan && std::isfinite(amax);
  if (!finite || amax == 0.f) {
    std::memset(xq, 0, sizeof(int16_t) * ldx);
    return finite ? 0.f : NAN;
  }
  const float inv = static_cast<float>(qmax) / amax;
  for (int64_t k = 0; k < K; ++k) xq[k] = static_cast<int16_t>(std::nearbyint(load(x[k]) * inv));
  for (int64_t k = K; k < ldx; ++k) xq[k] = 0;
  return amax / static_cast<float>(qmax);
}

// One SIMD width of int16 dot products: W elements of k per step, int32 lanes.
#if defined(__AVX512F__) && defined(__AVX512BW__)
struct Vec16 {
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
};
#elif defined(__AVX2__)
struct Vec16 {
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
};
#else
struct Vec16 {
  static constexpr int W = 1;
  using R = int64_t;
  static R zero() { return 0; }
  static R load_w(const int8_t* p) { return *p; }
  static R load_w_tail(const int8_t* p, int) { return *p; }
  static R load_x(const int16_t* p) { return *p; }
  static R dot(R acc, R w, R x) { return acc + w * x; }
  static int64_t sum(R v) { return v; }
};
#endif

constexpr int kStep = Vec16::W;                        // x rows are padded to a multiple of this
constexpr int kTileM = Vec16::W == 32 ? 6 : 2;         // x rows per tile (see the top of the file)

inline int64_t padded(int64_t K) { return (K + kStep - 1) / kStep * kStep; }

// acc[n][m] = dot(w[n][0:K], xq[m * ldx : m * ldx + K]) exactly, for NR weight rows and MR x rows.
template <int NR, int MR>
void tile(const int8_t* const* w, const int16_t* x, int64_t K, int64_t ldx, int64_t acc[kTileN][kTileM]) {
  typename Vec16::R a[NR][MR];
  for (int n = 0; n < NR; ++n)
    for (int m = 0; m < MR; ++m) a[n][m] = Vec16::zero();
  auto step = [&](int64_t k, const typename Vec16::R (&wv)[NR]) {
    for (int m = 0; m < MR; ++m) {
      const typename Vec16::R xv = Vec16::load_x(x + m * ldx + k);
      for (int n = 0; n < NR; ++n) a[n][m] = Vec16::dot(a[n][m], wv[n], xv);
    }
  };
  int64_t k = 0;
  for (; k + Vec16::W <= K; k += Vec16::W) {
    typename Vec16::R wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = Vec16::load_w(w[n] + k);
    step(k, wv);
  }
  if (k < K) {   // the last partial step: weights past K load as 0 (and x is zero padded)
    typename Vec16::R wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = Vec16::load_w_tail(w[n] + k, static_cast<int>(K - k));
    step(k, wv);
  }
  for (int n = 0; n < NR; ++n)
    for (int m = 0; m < MR; ++m) acc[n][m] = Vec16::sum(a[n][m]);
}

using TileFn = void (*)(const int8_t* const*, const int16_t*, int64_t, int64_t, int64_t[kTileN][kTileM]);

template <int NR>
constexpr TileFn tile_for(int mr) {
  return mr == 1 ? tile<NR, 1> : mr == 2 ? tile<NR, 2> : mr == 3 ? tile<NR, 3> : mr == 4 ? tile<NR, 4>
         : mr == 5 ? tile<NR, 5> : tile<NR, 6>;
}

inline TileFn pick_tile(int nr, int mr) {
  switch (nr) {
    case 1: return tile_for<1>(mr);
    case 2: return tile_for<2>(mr);
    case 3: return tile_for<3>(mr);
    default: return tile_for<4>(mr);
  }
}

// Software prefetch of the next tile's weight rows (one hint per 64-byte line), issued before a
// tile is computed so their loads overlap its dot products.
// NOTE: at 16 rows the tiles compute for about as long as their rows take to arrive from
// memory; without the hints SmolLM2's gate and up passes ran 1.7x slower in a served step
// (weights streamed from DRAM) than on the same layer resident in cache.
inline void prefetch_rows(const int8_t* const* rows, int nr, int64_t K) {
  for (int n = 0; n < nr; ++n)
    for (int64_t k = 0; k < K; k += 64) __builtin_prefetch(rows[n] + k, 0, 3);
}

// fp32 widening of 16 int8 weights: the down pass's outer products (sparse_ffn_cpu.cpp), whose
// activations (the FFN's h) stay fp32.
#if defined(__AVX512F__)
inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

}  // namespace int8_rows
