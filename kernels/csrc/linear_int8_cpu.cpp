// int8 linear for the CPU: out[m, n] = scale[n] * sum_k x[m, k] * w[n, k].
//
// w is int8 [N, K] row-major with one fp32 scale per output row (symmetric, per channel; see
// kernels/linear_int8_cpu.py quantize_int8); x is fp32 or bf16 [M, K], out [M, N] in x's dtype.
// Each row of x is first put on its own 14-bit grid (int8_rows.h quantize_row), and the dot
// products are exact int32 sums of int8 x int16 products (AVX-512 VNNI where built), scaled once
// at the end: a decode step reads 1 byte per weight instead of 4 (fp32) or 2 (bf16), and a
// batched step does twice the products per instruction of fp32 FMAs.
//
// Work split: rows of x in blocks of kRowBlock (one block for any decode batch); within a block
// the threads split the output rows into tiles of up to 4, and each tile is computed against the
// block's rows kTileM at a time (6 with AVX-512, 2 with AVX2: what fits the vector registers).
// A tile's weight rows (4 * K bytes) stay in L1 while every group of x rows
// passes over them, so the weight is read from memory once per row block; the x rows
// (kRowBlock * K int16 at most) stay in L2.
// NOTE: with fp32 activations 6 x rows per step measured on par with 4, and widening each
// tile's weight rows to an fp32 L1 buffer once per row block measured slower than widening in
// registers (docs/benchmarks/quantization.md).
//
// Built with the other native kernels by kernels/cpu_native.py (g++ -O3 -march=native -fopenmp):
// AVX-512 where the compiler targets it, else AVX2, else scalar code.
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

#include "int8_rows.h"

namespace {

using int8_rows::kTileM;
using int8_rows::kTileN;

constexpr int64_t kRowBlock = 64;   // rows of x per pass over the weight

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

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }

template <typename T>
void linear_int8(const T* x, const int8_rows::WeightRows& w, const float* scale, T* out, int64_t M, int64_t K,
                 int64_t N, int x_bits, int num_threads) {
  const int64_t num_tiles = (N + kTileN - 1) / kTileN;
  int8_rows::XRows xr;   // one row block of x on its grid
  xr.reset(M < kRowBlock ? M : kRowBlock, K, x_bits);
#pragma omp parallel num_threads(num_threads)
  {
    // 4-bit rows: decoded in the tile's registers where one group of x rows passes over them,
    // else into a scratch once for all the groups (int8_rows.h I4Load)
    const bool in_registers = w.bits == 4 && int8_rows::XRows::decodes_int4() && M <= kTileM;
    std::vector<int8_t> scratch(w.bits == 4 && !in_registers ? kTileN * int4_rows::padded(K) : 0);
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t rows = M - m0 < kRowBlock ? M - m0 : kRowBlock;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) xr.quantize(r, x + (m0 + r) * K, [](T v) { return to_f32(v); });
      // the implicit barrier above: every row is on its grid
#pragma omp for schedule(static)
      for (int64_t t = 0; t < num_tiles; ++t) {
        const int64_t n0 = t * kTileN;
        const int nr = static_cast<int>(N - n0 < kTileN ? N - n0 : kTileN);
        int64_t acc[kTileN][kTileM];
        const int8_t* rows_of_tile[kTileN];
        // the next tile's rows (this thread's next under the static split)
        int8_rows::prefetch_tile([&](int64_t i) { return w.raw(i); }, n0 + kTileN, N, w.stride());
        for (int i = 0; i < nr; ++i)
          rows_of_tile[i] = in_registers ? reinterpret_cast<const int8_t*>(w.raw(n0 + i))
                                         : w.row(n0 + i, scratch.data() + i * int4_rows::padded(K));
        int64_t wsum[kTileN] = {int8_rows::kNoSum};
        for (int64_t m = 0; m < rows; m += kTileM) {
          const int mr = static_cast<int>(rows - m < kTileM ? rows - m : kTileM);
          xr.dot(rows_of_tile, nr, m, mr, acc, wsum, in_registers);
          for (int j = 0; j < mr; ++j)
            for (int i = 0; i < nr; ++i)
              store(out + (m0 + m + j) * N + n0 + i, static_cast<float>(acc[i][j]) * xr.step(m + j) * scale[n0 + i]);
        }
      }
      // the implicit barrier of the loop above: the next block may overwrite the rows
    }
  }
}

}  // namespace

extern "C" {

// out [M, N] = (x [M, K] @ w [N, K].T) * scale [N] with x on its x_bits grid (16 or 8); x and
// out share the dtype: 0 = float32, 1 = bfloat16. w_bits 8: w is int8 [N, K]; 4: w holds N
// 4-bit rows (int4_rows.h), decoded to the same int8 values. Returns 0, 1 for an unsupported
// dtype, 2 for unsupported x_bits, 3 for unsupported w_bits.
int linear_int8_cpu(const void* x, const void* w_data, const float* scale, void* out, int64_t M, int64_t K,
                    int64_t N, int dtype, int x_bits, int w_bits, int num_threads) {
  if (x_bits != 16 && x_bits != 8) return 2;
  if (w_bits != 8 && w_bits != 4) return 3;
  const int8_rows::WeightRows w(w_data, K, w_bits);
  switch (dtype) {
    case 0:
      linear_int8<float>(static_cast<const float*>(x), w, scale, static_cast<float*>(out), M, K, N, x_bits,
                         num_threads);
      return 0;
    case 1:
      linear_int8<uint16_t>(static_cast<const uint16_t*>(x), w, scale, static_cast<uint16_t*>(out), M, K, N,
                            x_bits, num_threads);
      return 0;
    default:
      return 1;
  }
}

// The largest |xq| of the activation grid for rows of length K (int8_rows.h x_max), for the
// torch twin of the grid (kernels/activation_grid.py).
int int8_rows_x_max(int64_t K, int bits) { return int8_rows::x_max(K, bits); }

}  // extern "C"
