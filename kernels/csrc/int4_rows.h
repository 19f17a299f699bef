// 4-bit weight rows (`--quantization int4` / `w4a8`) and the int8 rows the tiles read from them.
//
// Format (kernels/int4_rows.py is the torch twin): a row of K weights is split into G = ceil(K /
// 32) groups of 32 along K and stored in G * 17 bytes: first the G groups' codes, 16 bytes each
// (byte j holds weight j of the group in its low nibble and weight j + 16 in its high one), then
// one multiplier byte m per group. A code c stands for the int8 value m * (c - 8); the quantizer
// writes |c - 8| <= 7 and 1 <= m <= 16, so every value lies in [-112, 112], and pads a row's last
// group with c = 8 (value 0). The row's fp32 scale (per output row, or per channel for the FFN's
// down rows) multiplies these int8 values exactly as it multiplies int8 weights.
// NOTE: an integer multiplier per group instead of an fp32 scale per group (as llama.cpp's Q4_0)
// keeps every product inside the int8 kernels' exact integer sums: a group's int8 values are
// one 16-byte table lookup away (vpshufb), and everything after that lookup is the int8 path,
// unchanged (int8_rows.h tiles, sparse_ffn_i8_batch.h). 4.25 bits per weight.
#pragma once
#include <cstdint>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace int4_rows {

constexpr int kGroup = 32;          // weights per group
constexpr int kGroupBytes = 17;     // 16 bytes of codes + 1 multiplier

inline int64_t num_groups(int64_t K) { return (K + kGroup - 1) / kGroup; }
inline int64_t row_bytes(int64_t K) { return num_groups(K) * kGroupBytes; }
// int8 values a decoded row holds: K rounded up to whole groups (the pad decodes to 0)
inline int64_t padded(int64_t K) { return num_groups(K) * kGroup; }

// kTable[m][c] = m * (c - 8): each multiplier's 16 values, one vpshufb table each (m <= 16; a
// corrupt multiplier byte is clamped to 16 by the lookups below).
struct Table {
  alignas(16) int8_t v[17][16];
  constexpr Table() : v() {
    for (int m = 0; m <= 16; ++m)
      for (int c = 0; c < 16; ++c) v[m][c] = static_cast<int8_t>(m * (c - 8));
  }
};
inline constexpr Table kTable{};

inline int clamp_m(uint8_t m) { return m > 16 ? 16 : m; }

// The int8 value of weight k of a row (scalar: tails and builds without AVX2).
inline int8_t value_at(const uint8_t* row, int64_t K, int64_t k) {
  const int64_t g = k / kGroup, j = k % kGroup;
  const uint8_t byte = row[g * 16 + (j & 15)];
  const int c = j < 16 ? (byte & 15) : (byte >> 4);
  return kTable.v[clamp_m(row[num_groups(K) * 16 + g])][c];
}

#if defined(__AVX2__)
// The 32 int8 values of one group: codes (16 bytes) and multiplier m.
inline __m256i decode_group(const uint8_t* codes, uint8_t m) {
  const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i nib = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(p, nib), hi = _mm_and_si128(_mm_srli_epi16(p, 4), nib);
  const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kTable.v[clamp_m(m)])));
  return _mm256_shuffle_epi8(table, _mm256_set_m128i(hi, lo));
}
#endif

// out[0 : padded(K)] = the int8 values of a row.
inline void decode_row(const uint8_t* row, int64_t K, int8_t* out) {
  const int64_t G = num_groups(K);
  const uint8_t* mult = row + G * 16;
  for (int64_t g = 0; g < G; ++g) {
#if defined(__AVX2__)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * kGroup), decode_group(row + g * 16, mult[g]));
#else
    const int8_t* t = kTable.v[clamp_m(mult[g])];
    for (int j = 0; j < 16; ++j) {
      const uint8_t byte = row[g * 16 + j];
      out[g * kGroup + j] = t[byte & 15];
      out[g * kGroup + 16 + j] = t[byte >> 4];
    }
#endif
  }
}

}  // namespace int4_rows

namespace int8_rows {

// Weight rows as the int8 tiles read them: int8 rows of K in place, or 4-bit rows (int4_rows
// above) decoded into a caller's scratch of int4_rows::padded(K) bytes per row.
struct WeightRows {
  const void* base = nullptr;
  int64_t K = 0;
  int bits = 8;   // 8 or 4

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
// dot(row i, xq) exactly, xq being one row of x on its 16-bit grid (int8_rows.h XRows; K values,
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
    const __m512i wv = _mm512_cvtepi8_epi16(v), xv = _mm512_loadu_si512(xq + g * 32);
#if defined(__AVX512VNNI__)
    if (g & 1) a1 = _mm512_dpwssd_epi32(a1, wv, xv); else a0 = _mm512_dpwssd_epi32(a0, wv, xv);
#else
    (g & 1 ? a1 : a0) = _mm512_add_epi32(g & 1 ? a1 : a0, _mm512_madd_epi16(wv, xv));
#endif
  }
  for (; next != nullptr && fetched < next_bytes; fetched += 64) __builtin_prefetch(next + fetched, 0, 3);
  return _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
}
#endif

}  // namespace int8_rows
