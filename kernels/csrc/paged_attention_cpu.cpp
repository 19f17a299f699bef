// Paged-attention decode for the CPU, reading K/V in place through the block table.
//
// One query token per sequence. Task (s, kv_head): the G = Hq / Hkv query heads that share the KV
// head score every K row of the sequence's context (each read once, straight from the cache block
// that holds it: no gathered copy of the context, which the torch path writes every step before
// reading it), take the softmax per head in fp32, then weight every V row (read once) into the
// G outputs.
// Positions p with ctx - window <= p < ctx are attended (window <= 0: no window).
//
// Built with the other native kernels by kernels/cpu_native.py (g++ -O3 -march=native -fopenmp);
// the inner loops over the head dimension are left to the compiler's auto-vectorisation.
// NOTE: fast-math for this file only: it lets the compiler vectorise the softmax exp and the
// reductions (5x here); every position it sums is finite (no masked -inf scores are formed).
#pragma GCC optimize("fast-math")
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline void bf16_store(uint16_t* dst, float f) {
  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x7fffffu)) {
    *dst = static_cast<uint16_t>((bits >> 16) | 0x40);   // NaN stays NaN
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  *dst = static_cast<uint16_t>(bits >> 16);
}

template <typename T> inline void to_f32(const T* src, float* dst, int64_t n);
template <> inline void to_f32<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}
template <> inline void to_f32<uint16_t>(const uint16_t* src, float* dst, int64_t n) {
  // bf16 is the top half of an fp32: widen and shift (a loop the compiler vectorises)
  uint32_t* bits = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) bits[i] = static_cast<uint32_t>(src[i]) << 16;
}

template <typename T> inline void from_f32(const float* src, T* dst, int64_t n);
template <> inline void from_f32<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}
template <> inline void from_f32<uint16_t>(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) bf16_store(dst + i, src[i]);
}

// 8 independent partial sums: the compiler turns the inner loop into one vector FMA (a single
// running sum is a dependency chain it may not reorder without -ffast-math).
inline float dot(const float* a, const float* b, int64_t n) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int j = 0; j < 8; ++j) lanes[j] += a[d + j] * b[d + j];
  float sum = 0.0f;
  for (int j = 0; j < 8; ++j) sum += lanes[j];
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// Asks for the D elements of a K or V row ahead of their use. NOTE: the rows of one (sequence, KV
// head) sit Hkv * D elements apart and a step's whole cache (SmolLM2 at 16 sequences: ~44 MB of
// fp32 K and V) does not fit the L3, so every row comes from memory; without these the score and
// weighting loops waited on each row's load (a 16-row SmolLM2 decode step spent ~13% here).
template <typename T>
inline void prefetch_row(const T* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b, 0, 3);
}

// How many positions ahead the loops below ask for K and V rows.
constexpr int64_t kPrefetchAhead = 8;

#if defined(__AVX512F__)
// 16 contiguous elements of a K row as fp32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {   // bf16: the top half of an fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// out[0:16] = the lane sums of v[0:16]: a transpose-and-add network (15 adds, 30 shuffles) where 16
// separate reductions take ~130 instructions.
inline void sum_lanes16(const __m512* v, float* out) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  auto fold = [](__m512 x, __m512 y) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  _mm512_storeu_ps(out, fold(fold(c[0], c[1]), fold(c[2], c[3])));
}

// scores[g * n + p] = scale * q_g . K[p] for the G query heads, 16 positions at a time: each K row
// read once (straight from the cache, no fp32 copy) into 16-lane partial dots, whose sums for 16
// positions come out of one transpose network. D % 16 == 0.
// NOTE: the per-position dot with its own reduction (and a copy of each K row) made a 16-sequence
// SmolLM2 attention call ~0.19 ms.
template <typename T, typename RowAt>
void score16(const float* qf, int64_t G, int64_t D, int64_t n, float scale, RowAt row_at, float* scores,
             __m512* part) {
  for (int64_t p = 0; p < kPrefetchAhead && p < n; ++p) prefetch_row(row_at(p), D);
  for (int64_t p0 = 0; p0 < n; p0 += 16) {
    const int64_t np = n - p0 < 16 ? n - p0 : 16;
    for (int64_t j = 0; j < 16; ++j) {
      if (j >= np) {
        for (int64_t g = 0; g < G; ++g) part[g * 16 + j] = _mm512_setzero_ps();
        continue;
      }
      const T* k = row_at(p0 + j);
      if (p0 + j + kPrefetchAhead < n) prefetch_row(row_at(p0 + j + kPrefetchAhead), D);
      for (int64_t g = 0; g < G; ++g) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + d), load16(k + d), acc);
        part[g * 16 + j] = acc;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      alignas(64) float sums[16];
      sum_lanes16(part + g * 16, sums);
      for (int64_t j = 0; j < np; ++j) scores[g * n + p0 + j] = sums[j] * scale;
    }
  }
}
#endif

template <typename T>
void decode(const T* q, const T* k_cache, const T* v_cache, const int32_t* tables, const int32_t* lens,
            T* out, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int64_t block_size, int64_t max_blocks,
            float scale, int64_t window) {
  const int64_t G = Hq / Hkv;
#pragma omp parallel
  {
    std::vector<float> qf(G * D), acc(G * D), row(D), scores;
#if defined(__AVX512F__)
    std::vector<__m512> part;   // score16's partial dots, [G][16]
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < S * Hkv; ++task) {
      const int64_t s = task / Hkv, h = task % Hkv;
      const int64_t ctx = lens[s];
      const int64_t start = window > 0 && ctx > window ? ctx - window : 0;
      const int64_t n = ctx - start;
      const int32_t* table = tables + s * max_blocks;
      auto offset = [&](int64_t p) {   // element offset of position p's row for KV head h
        return ((static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size) * Hkv + h) * D;
      };
      to_f32<T>(q + (s * Hq + h * G) * D, qf.data(), G * D);
      // pass 1: every K row once, scored against the G query heads
      scores.resize(G * n);
#if defined(__AVX512F__)
      if (D % 16 == 0) {
        part.resize(G * 16);
        score16<T>(qf.data(), G, D, n, scale, [&](int64_t p) { return k_cache + offset(start + p); },
                   scores.data(), part.data());
      } else
#endif
      for (int64_t p = 0; p < n; ++p) {
        to_f32<T>(k_cache + offset(start + p), row.data(), D);
        for (int64_t g = 0; g < G; ++g) scores[g * n + p] = dot(qf.data() + g * D, row.data(), D) * scale;
      }
      // pass 2: softmax per query head (fp32)
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * n;
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t p = 0; p < n; ++p) mx = sg[p] > mx ? sg[p] : mx;
        for (int64_t p = 0; p < n; ++p) { sg[p] = std::exp(sg[p] - mx); sum += sg[p]; }
        const float inv = 1.0f / sum;
        for (int64_t p = 0; p < n; ++p) sg[p] *= inv;
      }
      // pass 3: every V row once, weighted into the G outputs
      std::fill(acc.begin(), acc.end(), 0.0f);
#if defined(__AVX512F__)
      if (D % 16 == 0 && G <= 16) {   // each V row read in place, 16 lanes at a time
        const int64_t dv = D / 16;
        part.assign(G * dv, _mm512_setzero_ps());
        __m512 w[16];
        for (int64_t p = 0; p < kPrefetchAhead && p < n; ++p) prefetch_row(v_cache + offset(start + p), D);
        for (int64_t p = 0; p < n; ++p) {
          const T* v = v_cache + offset(start + p);
          if (p + kPrefetchAhead < n) prefetch_row(v_cache + offset(start + p + kPrefetchAhead), D);
          for (int64_t g = 0; g < G; ++g) w[g] = _mm512_set1_ps(scores[g * n + p]);
          for (int64_t d = 0; d < dv; ++d) {
            const __m512 vv = load16(v + 16 * d);
            for (int64_t g = 0; g < G; ++g) part[g * dv + d] = _mm512_fmadd_ps(w[g], vv, part[g * dv + d]);
          }
        }
        for (int64_t g = 0; g < G; ++g)
          for (int64_t d = 0; d < dv; ++d) _mm512_storeu_ps(acc.data() + g * D + 16 * d, part[g * dv + d]);
        from_f32<T>(acc.data(), out + (s * Hq + h * G) * D, G * D);
        continue;
      }
#endif
      for (int64_t p = 0; p < n; ++p) {
        to_f32<T>(v_cache + offset(start + p), row.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float w = scores[g * n + p];
          float* ag = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) ag[d] += w * row[d];
        }
      }
      from_f32<T>(acc.data(), out + (s * Hq + h * G) * D, G * D);
    }
  }
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 bfloat16. Returns 0, or -1 for an unsupported dtype.
int paged_attention_decode_cpu(const void* q, const void* k_cache, const void* v_cache, const int32_t* tables,
                               const int32_t* lens, void* out, int64_t S, int64_t Hq, int64_t Hkv, int64_t D,
                               int64_t block_size, int64_t max_blocks, float scale, int64_t window, int dtype) {
  if (dtype == 0) {
    decode<float>(static_cast<const float*>(q), static_cast<const float*>(k_cache),
                  static_cast<const float*>(v_cache), tables, lens, static_cast<float*>(out), S, Hq, Hkv, D,
                  block_size, max_blocks, scale, window);
    return 0;
  }
  if (dtype == 1) {
    decode<uint16_t>(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k_cache),
                     static_cast<const uint16_t*>(v_cache), tables, lens, static_cast<uint16_t*>(out), S, Hq,
                     Hkv, D, block_size, max_blocks, scale, window);
    return 0;
  }
  return -1;
}

}  // extern "C"
