// int8 weight rows times fp32 activation rows in register tiles: the inner loop of the
// weight-only int8 linear (linear_int8_cpu.cpp) and of the int8 sparse FFN's batched gate and up
// passes (sparse_ffn_cpu.cpp). Rows are given by pointer, so a tile may take any set of weight
// rows (the sparse FFN's candidate neurons) straight from the weight, with no gather copy.
//
// A tile: NR <= kTileN weight rows x MR <= kTileM activation rows (stride K). Each widened
// weight vector feeds MR FMAs and each x vector NR; 4 x 6 accumulators + 4 weight vectors + 1 x
// vector fill AVX-512's 32 registers; AVX2 has 16, so 4 x 2 there (a wider tile would spill).
#pragma once
#include <cstdint>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace int8_rows {

constexpr int kTileN = 4;           // weight rows per tile

// One SIMD width's worth of operations: widen int8 weights, load fp32 x, FMA, horizontal sum.
#if defined(__AVX512F__)
struct Vec {
  static constexpr int W = 16;
  using R = __m512;
  static R zero() { return _mm512_setzero_ps(); }
  static R load_w(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static R load_x(const float* p) { return _mm512_loadu_ps(p); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(R v) { return _mm512_reduce_add_ps(v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
  static constexpr int W = 8;
  using R = __m256;
  static R zero() { return _mm256_setzero_ps(); }
  static R load_w(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static R load_x(const float* p) { return _mm256_loadu_ps(p); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(R v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
};
#else
struct Vec {
  static constexpr int W = 1;
  using R = float;
  static R zero() { return 0.f; }
  static R load_w(const int8_t* p) { return static_cast<float>(*p); }
  static R load_x(const float* p) { return *p; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static float sum(R v) { return v; }
};
#endif

constexpr int kTileM = Vec::W == 16 ? 6 : 2;   // x rows per tile (see the top of the file)

// acc[n][m] = dot(w[n][0:K], x[m * K : m * K + K]) for NR weight rows and MR x rows.
template <int NR, int MR>
void tile(const int8_t* const* w, const float* x, int64_t K, float acc[kTileN][kTileM]) {
  typename Vec::R a[NR][MR];
  for (int n = 0; n < NR; ++n)
    for (int m = 0; m < MR; ++m) a[n][m] = Vec::zero();
  int64_t k = 0;
  for (; k + Vec::W <= K; k += Vec::W) {
    typename Vec::R wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = Vec::load_w(w[n] + k);
    for (int m = 0; m < MR; ++m) {
      const typename Vec::R xv = Vec::load_x(x + m * K + k);
      for (int n = 0; n < NR; ++n) a[n][m] = Vec::fma(wv[n], xv, a[n][m]);
    }
  }
  for (int n = 0; n < NR; ++n)
    for (int m = 0; m < MR; ++m) acc[n][m] = Vec::sum(a[n][m]);
  for (; k < K; ++k)   // K not a multiple of the vector width
    for (int n = 0; n < NR; ++n)
      for (int m = 0; m < MR; ++m) acc[n][m] += static_cast<float>(w[n][k]) * x[m * K + k];
}

using TileFn = void (*)(const int8_t* const*, const float*, int64_t, float[kTileN][kTileM]);

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

}  // namespace int8_rows
