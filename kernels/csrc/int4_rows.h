// 4-bit weight rows (`--quantization int4` / `w4a8`): the format and its decode to int8 values
// (int8_rows.h reads them through these).
//
// Format (kernels/int4_rows.py is the torch twin): a row of K weights is split into G = ceil(K /
// 32) groups of 32 along K and stored in G * 17 bytes: first the G groups' codes, 16 bytes each
// (byte j holds weight j of the group in its low nibble and weight j + 16 in its high one), then
// one multiplier byte m per group. A code c stands for the int8 value m * (c - 8); the quantizer
// writes |c - 8| <= 7 and 1 <= m <= 16, so every value lies in [-112, 112], and pads a row's last
// group with c = 8 (value 0). The row's fp32 scale (one per row: a linear's output row, an FFN
// neuron's gate, up or down row) multiplies these int8 values as it multiplies int8 weights.
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
