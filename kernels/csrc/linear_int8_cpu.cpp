// Weight-only int8 linear for the CPU: out[m, n] = scale[n] * sum_k x[m, k] * w[n, k].
//
// w is int8 [N, K] row-major with one fp32 scale per output row (symmetric, per channel; see
// kernels/linear_int8_cpu.py quantize_int8); x is fp32 or bf16 [M, K], out [M, N] in x's dtype.
// Accumulation is fp32: each int8 weight is widened to fp32 in registers (never written back),
// so a decode step reads 1 byte per weight instead of 4 (fp32) or 2 (bf16).
//
// Work split: rows of x in blocks of kRowBlock (one block for any decode batch); within a block
// the threads split the output rows into tiles of up to 4, and each tile is computed against the
// block's rows kTileM at a time (6 with AVX-512, 2 with AVX2: what fits the vector registers).
// A tile's weight rows (4 * K bytes) stay in L1 while every group of x rows
// passes over them, so the weight is read from memory once per row block; the x rows
// (kRowBlock * K floats at most) stay in L2.
// NOTE: 6 x rows per step measured on par with 4 here; widening each tile's weight rows to an
// fp32 L1 buffer once per row block (instead of in registers per group of rows) measured slower
// (0.7x vs 0.8x of MKL's fp32 rate at M = 64 on cache-resident weights). The kernel wins wherever
// the weight comes from memory (docs/benchmarks/quantization.md).
// NOTE: int8 activations (VNNI) would read no fewer weight bytes and change the numerics; the
// decode step is bound by the weight bytes, not by the FMAs.
//
// Built with the other native kernels by kernels/cpu_native.py (g++ -O3 -march=native -fopenmp):
// AVX-512 where the compiler targets it, else AVX2 + FMA, else scalar code.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#include <omp.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRowBlock = 64;   // rows of x per pass over the weight
constexpr int kTileN = 4;           // output rows (weight rows) per tile

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

// x rows per inner step: 4 x 6 accumulators + 4 weight vectors + 1 x vector fill AVX-512's 32
// registers; AVX2 has 16, so 4 x 2 there (a wider tile would spill accumulators to the stack).
constexpr int kTileM = Vec::W == 16 ? 6 : 2;

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  // round to nearest even, as torch does; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x7fffffu)) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline void store(float* out, float v) { *out = v; }
inline void store(uint16_t* out, float v) { *out = f32_to_bf16(v); }

// acc[n][m] = dot(w row n, x row m) for NR weight rows (stride K) and MR x rows (stride K): each
// widened weight vector feeds MR FMAs, each x vector NR.
template <int NR, int MR>
void tile(const int8_t* w, const float* x, int64_t K, float acc[kTileN][kTileM]) {
  typename Vec::R a[NR][MR];
  for (int n = 0; n < NR; ++n)
    for (int m = 0; m < MR; ++m) a[n][m] = Vec::zero();
  int64_t k = 0;
  for (; k + Vec::W <= K; k += Vec::W) {
    typename Vec::R wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = Vec::load_w(w + n * K + k);
    for (int m = 0; m < MR; ++m) {
      const typename Vec::R xv = Vec::load_x(x + m * K + k);
      for (int n = 0; n < NR; ++n) a[n][m] = Vec::fma(wv[n], xv, a[n][m]);
    }
  }
  for (int n = 0; n < NR; ++n)
    for (int m = 0; m < MR; ++m) acc[n][m] = Vec::sum(a[n][m]);
  for (; k < K; ++k)   // K not a multiple of the vector width
    for (int n = 0; n < NR; ++n)
      for (int m = 0; m < MR; ++m) acc[n][m] += static_cast<float>(w[n * K + k]) * x[m * K + k];
}

using TileFn = void (*)(const int8_t*, const float*, int64_t, float[kTileN][kTileM]);

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

template <typename T>
void linear_int8(const T* x, const int8_t* w, const float* scale, T* out, int64_t M, int64_t K, int64_t N,
                 int num_threads) {
  const int64_t num_tiles = (N + kTileN - 1) / kTileN;
  // fp32 copy of one row block of x (bf16 input only; fp32 input is read in place)
  std::vector<float> xf(std::is_same<T, float>::value ? 0 : (M < kRowBlock ? M : kRowBlock) * K);
#pragma omp parallel num_threads(num_threads)
  {
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t rows = M - m0 < kRowBlock ? M - m0 : kRowBlock;
      const float* xb;
      if constexpr (std::is_same<T, float>::value) {
        xb = x + m0 * K;
      } else {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = 0; k < K; ++k) xf[r * K + k] = bf16_to_f32(x[(m0 + r) * K + k]);
        xb = xf.data();   // the implicit barrier above: every row is converted
      }
#pragma omp for schedule(static)
      for (int64_t t = 0; t < num_tiles; ++t) {
        const int64_t n0 = t * kTileN;
        const int nr = static_cast<int>(N - n0 < kTileN ? N - n0 : kTileN);
        float acc[kTileN][kTileM];
        for (int64_t m = 0; m < rows; m += kTileM) {
          const int mr = static_cast<int>(rows - m < kTileM ? rows - m : kTileM);
          pick_tile(nr, mr)(w + n0 * K, xb + m * K, K, acc);
          for (int j = 0; j < mr; ++j)
            for (int i = 0; i < nr; ++i) store(out + (m0 + m + j) * N + n0 + i, acc[i][j] * scale[n0 + i]);
        }
      }
      // the implicit barrier of the loop above: the next block may overwrite xf
    }
  }
}

}  // namespace

extern "C" {

// out [M, N] = (x [M, K] @ w [N, K].T) * scale [N]; x and out share the dtype:
// 0 = float32, 1 = bfloat16. Returns 0, or 1 for an unsupported dtype.
int linear_int8_cpu(const void* x, const int8_t* w, const float* scale, void* out, int64_t M, int64_t K,
                    int64_t N, int dtype, int num_threads) {
  switch (dtype) {
    case 0:
      linear_int8<float>(static_cast<const float*>(x), w, scale, static_cast<float*>(out), M, K, N, num_threads);
      return 0;
    case 1:
      linear_int8<uint16_t>(static_cast<const uint16_t*>(x), w, scale, static_cast<uint16_t*>(out), M, K, N,
                            num_threads);
      return 0;
    default:
      return 1;
  }
}

}  // extern "C"
