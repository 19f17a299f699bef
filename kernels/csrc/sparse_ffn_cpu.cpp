// Copy-free sparse gated FFN for the CPU (decode, batch 1..64).
//
// A neuron i is row i of W_gate, row i of W_up and row i of W_down_t (down stored transposed at
// load time, so every read below is one contiguous row). Only the rows a neuron needs are read,
// straight from the weight tensors: no gather copy (a torch `W[idx]` gather writes the active rows
// before reading them, which costs more than it saves below ~90% sparsity).
//
// Batch 1 (sparse_ffn_row): one pass, threads take chunks of neurons and for each neuron read the
//   gate row, the up row if the gate survived, and the down row if h != 0, into the chunk's
//   partial out; the partials are summed in chunk order at the end (deterministic).
// Batch > 1:
// Phase 1 (threads split the neurons): for each candidate neuron (all neurons, or the union of the
//   predicted ones) read its gate row and compute g for every batch row; apply the activation;
//   read the up row only if some batch row survived the gate; write h [T, I] and active [T, I].
// Phase 2 (threads split the hidden dimension, so no reduction is needed): for each neuron active
//   in any batch row, out[t, slice] += h[t, i] * W_down_t[i, slice].
//
// Weights: float32, bfloat16, float16, or int8 with fp32 scales (RowScales: per neuron for gate
// and up, per hidden channel for down). int8 at batch > 1 runs the same two phases in register
// tiles on the activations' integer grids (sparse_ffn_i8_batch.h, int8_rows.h); int8 at batch 1
// takes the row path on x's grid. 4-bit rows (int4_rows.h: the same int8 values) take the same
// paths, each row decoded as it is read (per tile, or per row on the row path).
//
// Rows read: both paths count the gate, up and down rows they read or software-prefetch (a
// prefetch moves the row from memory as a load does, costing the same bytes, so it counts; a row
// prefetched and then read counts once) into READ [3], with a few adds per neuron in registers
// (no per-neuron flags in memory).
//
// Built by kernels/cpu_native.py with `g++ -O3 -march=native -fopenmp`; AVX2/FMA/F16C are used
// when the compiler targets them, with a scalar path otherwise. Accumulation is fp32 throughout.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>
#include <omp.h>

#include "int8_rows.h"
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPARSE_FFN_AVX2 1
#endif

namespace {

// Codes as kernels/sparse_ffn_ref.py ACT_CODES assigns them.
enum Act { ACT_SILU = 0, ACT_RELU = 1, ACT_DRELU = 2, ACT_FATRELU = 3 };

struct F32 { using T = float; };
struct BF16 { using T = uint16_t; };
struct F16 { using T = uint16_t; };
// int8 weights: gate, up (and predictor) rows have one fp32 scale per row, applied to the
// row's dot product; W_down_t has one per hidden channel (column), applied to out (RowScales).
struct I8 { using T = int8_t; };

inline float scalar_load(const float* p) { return *p; }

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float f16_to_f32(uint16_t h) {
  // NOTE: a scalar IEEE half decode for the tails and for builds without F16C.
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      int e = -1;
      do { ++e; mant <<= 1; } while ((mant & 0x400) == 0);
      bits = sign | ((127 - 15 - e) << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename D> inline float load1(const typename D::T* p);
template <> inline float load1<F32>(const float* p) { return *p; }
template <> inline float load1<BF16>(const uint16_t* p) { return bf16_to_f32(*p); }
template <> inline float load1<F16>(const uint16_t* p) { return f16_to_f32(*p); }
template <> inline float load1<I8>(const int8_t* p) { return static_cast<float>(*p); }

#ifdef SPARSE_FFN_AVX2
template <typename D> inline __m256 load8(const typename D::T* p);
template <> inline __m256 load8<F32>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<BF16>(const uint16_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
template <> inline __m256 load8<F16>(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <> inline __m256 load8<I8>(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// dot(w[0:n], x[0:n]) with w in the weight dtype and x in fp32.
template <typename D> inline float dot(const typename D::T* w, const float* x, int64_t n) {
  int64_t k = 0;
  float acc = 0.f;
#ifdef SPARSE_FFN_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (; k + 32 <= n; k += 32) {
    a0 = _mm256_fmadd_ps(load8<D>(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(load8<D>(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(load8<D>(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(load8<D>(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  for (; k + 8 <= n; k += 8) a0 = _mm256_fmadd_ps(load8<D>(w + k), _mm256_loadu_ps(x + k), a0);
  acc = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
  for (; k < n; ++k) acc += load1<D>(w + k) * x[k];
  return acc;
}

// y[0:n] += a * w[0:n]
template <typename D> inline void axpy(float a, const typename D::T* w, float* y, int64_t n) {
  int64_t k = 0;
#ifdef SPARSE_FFN_AVX2
  const __m256 va = _mm256_set1_ps(a);
  for (; k + 16 <= n; k += 16) {
    _mm256_storeu_ps(y + k, _mm256_fmadd_ps(va, load8<D>(w + k), _mm256_loadu_ps(y + k)));
    _mm256_storeu_ps(y + k + 8,
                     _mm256_fmadd_ps(va, load8<D>(w + k + 8), _mm256_loadu_ps(y + k + 8)));
  }
  for (; k + 8 <= n; k += 8)
    _mm256_storeu_ps(y + k, _mm256_fmadd_ps(va, load8<D>(w + k), _mm256_loadu_ps(y + k)));
#endif
  for (; k < n; ++k) y[k] += a * load1<D>(w + k);
}

// out[r] = dot(w, x + rows[r] * H) for R <= 4 batch rows sharing one weight row: each weight
// vector is loaded (and converted) once for all R rows.
template <typename D, int R>
inline void dot_rows(const typename D::T* w, const float* x, const int* rows, int64_t H,
                     float* out, const typename D::T* next) {
  int64_t k = 0;
  float acc[R];
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
#ifdef SPARSE_FFN_AVX2
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  for (; k + 16 <= H; k += 16) {
    // NOTE: rows are scattered, so the hardware prefetcher restarts at every row; streaming
    // the next row the thread will read alongside this one keeps two rows in flight.
    if (next != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next + k), _MM_HINT_T0);
    const __m256 w0 = load8<D>(w + k), w1 = load8<D>(w + k + 8);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + rows[r] * H + k;
      a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), a0[r]);
      a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) acc[r] = hsum8(_mm256_add_ps(a0[r], a1[r]));
#endif
  for (; k < H; ++k) {
    const float wk = load1<D>(w + k);
    for (int r = 0; r < R; ++r) acc[r] += wk * x[rows[r] * H + k];
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

// out[rows[r]] (row stride H) += a[r] * w[0:n] for R <= 4 rows sharing one weight row slice.
template <typename D, int R>
inline void axpy_rows(const typename D::T* w, const float* a, float* y, const int* rows,
                      int64_t H, int64_t n, const typename D::T* next) {
  int64_t k = 0;
#ifdef SPARSE_FFN_AVX2
  __m256 va[R];
  for (int r = 0; r < R; ++r) va[r] = _mm256_set1_ps(a[r]);
  for (; k + 8 <= n; k += 8) {
    if (next != nullptr && (k & 15) == 0)
      _mm_prefetch(reinterpret_cast<const char*>(next + k), _MM_HINT_T0);
    const __m256 wk = load8<D>(w + k);
    for (int r = 0; r < R; ++r) {
      float* yr = y + rows[r] * H + k;
      _mm256_storeu_ps(yr, _mm256_fmadd_ps(va[r], wk, _mm256_loadu_ps(yr)));
    }
  }
#endif
  for (; k < n; ++k) {
    const float wk = load1<D>(w + k);
    for (int r = 0; r < R; ++r) y[rows[r] * H + k] += a[r] * wk;
  }
}

// Whether dot_rows / axpy_rows prefetch their `next` row for rows of n elements: only their AVX2
// loops do, from the first full step. The rows-read counts include such rows where this holds.
#ifdef SPARSE_FFN_AVX2
constexpr bool kPrefetches = true;
#else
constexpr bool kPrefetches = false;
#endif
inline bool dot_prefetches(int64_t n) { return kPrefetches && n >= 16; }
inline bool axpy_prefetches(int64_t n) { return kPrefetches && n >= 8; }

// Dispatches a list of rows to dot_rows in groups of 4.
template <typename D>
inline void dot_many(const typename D::T* w, const float* x, const int* rows, int n, int64_t H,
                     float* out, const typename D::T* next) {
  int j = 0;
  for (; j + 4 <= n; j += 4, next = nullptr) dot_rows<D, 4>(w, x, rows + j, H, out + j, next);
  switch (n - j) {
    case 3: dot_rows<D, 3>(w, x, rows + j, H, out + j, next); break;
    case 2: dot_rows<D, 2>(w, x, rows + j, H, out + j, next); break;
    case 1: dot_rows<D, 1>(w, x, rows + j, H, out + j, next); break;
    default: break;
  }
}

template <typename D>
inline void axpy_many(const typename D::T* w, const float* a, float* y, const int* rows, int n,
                      int64_t H, int64_t len, const typename D::T* next) {
  int j = 0;
  for (; j + 4 <= n; j += 4, next = nullptr) axpy_rows<D, 4>(w, a + j, y, rows + j, H, len, next);
  switch (n - j) {
    case 3: axpy_rows<D, 3>(w, a + j, y, rows + j, H, len, next); break;
    case 2: axpy_rows<D, 2>(w, a + j, y, rows + j, H, len, next); break;
    case 1: axpy_rows<D, 1>(w, a + j, y, rows + j, H, len, next); break;
    default: break;
  }
}

// Software prefetch of a whole row (one hint per 64-byte line).
template <typename D> inline void prefetch_row(const typename D::T* w, int64_t n) {
  const char* p = reinterpret_cast<const char*>(w);
  for (int64_t b = 0; b < n * (int64_t)sizeof(typename D::T); b += 64)
    __builtin_prefetch(p + b, 0, 3);
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// The gate activation before the product with up: 0 where the neuron is off.
inline float activate(int act, float g, float threshold) {
  switch (act) {
    case ACT_SILU: {
      const float s = silu(g);
      return std::fabs(s) > threshold ? s : 0.f;
    }
    case ACT_FATRELU: return g > threshold ? g : 0.f;
    default: return g > 0.f ? g : 0.f;  // relu, drelu
  }
}

// fp32 scales of int8 weights (null for float weights: scale 1, and x * 1.f == x, so the float
// paths compute exactly what they did before). gate/up: one per neuron, multiplying its dot
// products. down: one per hidden channel k (a column of W_down_t, i.e. per output channel of
// down_proj), multiplying out[:, k] once all neurons are summed.
// NOTE: per neuron row, W_down_t's rows span the hidden channels, and the few outlier channels
// of the residual stream set each row's scale: measured +2.8% perplexity on SmolLM2 against
// +0.0% per channel (docs/benchmarks/quantization.md).
// 4-bit rows (int4_rows.h) take down's scale per neuron instead (down_neuron, `down` null),
// folded into h[i] before the down products: each group's multiplier already follows the
// outlier channels within a row, and on SmolLM2 a per-neuron scale cost +10.4% perplexity
// against +16.5% per channel (4-bit down rows alone; docs/benchmarks/quantization.md).
struct RowScales {
  const float* gate = nullptr;
  const float* up = nullptr;
  const float* down = nullptr;
  const float* down_neuron = nullptr;
  static float at(const float* s, int64_t i) { return s != nullptr ? s[i] : 1.f; }
};

constexpr int kMaxBatch = 64;
// Bytes of out one thread accumulates at a time in phase 2 (half of a 32 KiB L1d).
constexpr int64_t kOutBlockBytes = 16 << 10;
// Neurons per dynamically scheduled chunk of the batch-1 path.
constexpr int64_t kRowChunk = 256;

// The next neuron after i that some batch row needs a gate row for (I if none).
inline int64_t next_candidate(const uint8_t* predicted, int64_t i, int64_t T, int64_t I) {
  if (predicted == nullptr) return i + 1;
  for (int64_t j = i + 1; j < I; ++j)
    for (int64_t t = 0; t < T; ++t)
      if (predicted[t * I + j]) return j;
  return I;
}

// Batch 1: one pass per neuron, gate -> up -> down, each chunk of neurons accumulating its own
// partial out (H floats, in L1/L2); the partials are summed in chunk order at the end, so the
// result does not depend on which thread ran which chunk. Versus the two-phase path below it
// reads each down row whole (not one half-row slice per thread), has no barrier between the
// gate/up and down phases, and balances the down rows dynamically too, so a thread preempted
// by another process holds back only its current chunk. NOTE: per-chunk (not per-thread)
// partials keep repeated calls bitwise equal; the timings behind these choices are in
// docs/benchmarks/kernels.md#native-cpu-kernel-designs.
// Where the row path finds neuron i's row of a weight [I, H]: in place, or for 4-bit rows
// (int4_rows.h; D = I8) decoded into the caller's scratch of int4_rows::padded(H) values. The
// row is used before the next one is decoded, so one scratch per thread serves all three weights.
template <typename D>
struct RowSource {
  const void* base;
  int64_t H;
  bool int4 = false;

  const typename D::T* at(int64_t i, typename D::T* scratch) const {
    if (!int4) return static_cast<const typename D::T*>(base) + i * H;
    int4_rows::decode_row(ahead_bytes(i), H, reinterpret_cast<int8_t*>(scratch));
    return scratch;
  }
  // Where row i is stored, for the prefetch hints (a 4-bit row is 17/32 of an int8 one: the hints,
  // which cover H elements of D::T, reach into the next row there).
  const typename D::T* ahead(int64_t i) const { return reinterpret_cast<const typename D::T*>(ahead_bytes(i)); }
  int64_t stride() const { return int4 ? int4_rows::row_bytes(H) : H * static_cast<int64_t>(sizeof(typename D::T)); }
  // The int8 or 4-bit rows as the integer kernels take them (D = I8).
  int8_rows::WeightRows rows() const { return int8_rows::WeightRows(base, H, int4 ? 4 : 8); }

 private:
  const uint8_t* ahead_bytes(int64_t i) const { return static_cast<const uint8_t*>(base) + i * stride(); }
};

// xq (int8 / 4-bit rows, may be null): x on its 16-bit grid (H values, zeros up to a multiple of
// 32) with grid step xstep, x holding the same values in fp32: where given (and built), the gate
// and up dots are exact integer sums (int8_rows.h row_dot16) instead of fp32 FMAs.
template <typename D>
void sparse_ffn_row(const float* x, const RowSource<D>& w_gate, const RowSource<D>& w_up,
                    const RowSource<D>& w_down_t, const RowScales& scales, const uint8_t* predicted,
                    float* h, uint8_t* active, float* out, int64_t* read, int64_t H, int64_t I,
                    int act, float threshold, int num_threads, const int16_t* xq = nullptr,
                    float xstep = 0.f) {
  // One partial out per chunk of neurons, summed in chunk order: the result does not depend on
  // which thread ran which chunk (dynamic scheduling), so repeated calls are bitwise equal.
  const int64_t num_chunks = (I + kRowChunk - 1) / kRowChunk;
  // NOTE: left uninitialised (a std::vector<float> would zero all of it, ~1 MB per Mistral call):
  // a chunk zeroes its partial when its first neuron fires, and only such chunks are summed.
  std::unique_ptr<float[]> partial(new float[num_chunks * H]);
  std::vector<uint8_t> used(num_chunks, 0);
  std::vector<int64_t> chunk_read(3 * num_chunks, 0);   // gate, up, down rows per chunk
  // The prefetch hints the loop below issues (dot_rows' and axpy_rows' AVX2 loops only): with a
  // predictor every visited neuron's down row and, after an active neuron, the next one's up row;
  // in exact mode (not drelu) the down row of a neuron whose gate survived.
  const bool down_ahead = predicted != nullptr && dot_prefetches(H);
  const bool up_ahead = predicted != nullptr && axpy_prefetches(H);
  const bool alive_down_ahead = predicted == nullptr && act != ACT_DRELU && dot_prefetches(H);
#pragma omp parallel num_threads(num_threads)
  {
    const int row0 = 0;
    float g, u;
    std::vector<typename D::T> scratch(w_gate.int4 ? int4_rows::padded(H) : 0);
    // *result = dot(row i of w, x), prefetching `next` (a row of the same stride) as dot_rows does
    auto dot = [&](const RowSource<D>& w, int64_t i, const typename D::T* next, float* result) {
#if defined(INT8_ROWS_ROW_DOT)
      if constexpr (std::is_same_v<D, I8>) {
        if (xq != nullptr) {
          const uint8_t* ahead = dot_prefetches(H) ? reinterpret_cast<const uint8_t*>(next) : nullptr;
          *result = static_cast<float>(int8_rows::row_dot16(w.rows(), i, xq, ahead, w.stride())) * xstep;
          return;
        }
      }
#endif
      dot_rows<D, 1>(w.at(i, scratch.data()), x, &row0, H, result, next);
    };
#pragma omp for schedule(dynamic, 1)
    for (int64_t ci = 0; ci < num_chunks; ++ci) {
      const int64_t c = ci * kRowChunk, end = c + kRowChunk < I ? c + kRowChunk : I;
      float* acc = partial.get() + ci * H;
      std::memset(h + c, 0, sizeof(float) * (end - c));
      std::memset(active + c, 0, end - c);
      int64_t i = c;
      // The chunk's rows read are counted from these after the loop.
      int64_t num_visited = 0, num_alive = 0, num_fired = 0;
      int64_t num_up_unread = 0;   // up rows prefetched for a neuron whose gate then failed
      bool up_fetched = false;     // the current neuron's up row was prefetched
      if (predicted != nullptr)
        while (i < end && !predicted[i]) ++i;
      if (predicted != nullptr && i < end) {
        prefetch_row<D>(w_up.ahead(i), H);
        up_fetched = true;
      }
      while (i < end) {
        int64_t next = i + 1;
        if (predicted != nullptr)
          while (next < end && !predicted[next]) ++next;
        const typename D::T* next_gate = next < end ? w_gate.ahead(next) : nullptr;
        // A predicted neuron usually fires, so its rows are fetched two rows ahead of use in
        // the order gate, up, down, next gate, next up (the up row was fetched during the
        // previous down). In exact mode most gates fail: only the next gate row is fetched
        // ahead, and for drelu the down row is needed only if u > 0 too.
        const typename D::T* next_up = next < end ? w_up.ahead(next) : nullptr;
        ++num_visited;
        dot(w_gate, i, predicted != nullptr ? w_down_t.ahead(i) : next_gate, &g);
        g *= RowScales::at(scales.gate, i);
        bool next_up_fetched = false;
        const float a = activate(act, g, threshold);
        if (a != 0.f) {
          ++num_alive;
          dot(w_up, i, predicted != nullptr || act == ACT_DRELU ? next_gate : w_down_t.ahead(i), &u);
          u *= RowScales::at(scales.up, i);
          const float v = a * ((act == ACT_DRELU && u < 0.f) ? 0.f : u);
          h[i] = v;
          active[i] = v != 0.f;
          if (v != 0.f) {
            if (!used[ci]) {
              std::memset(acc, 0, sizeof(float) * H);
              used[ci] = 1;
            }
            ++num_fired;
            const float vd = v * RowScales::at(scales.down_neuron, i);
            axpy_rows<D, 1>(w_down_t.at(i, scratch.data()), &vd, acc, &row0, H, H,
                            predicted != nullptr ? next_up : next_gate);
            next_up_fetched = up_ahead && next_up != nullptr;
          }
        } else {
          num_up_unread += up_fetched;
        }
        up_fetched = next_up_fetched;
        i = next;
      }
      chunk_read[3 * ci] = num_visited;
      chunk_read[3 * ci + 1] = num_alive + num_up_unread;
      chunk_read[3 * ci + 2] = down_ahead ? num_visited : alive_down_ahead ? num_alive : num_fired;
    }  // implicit barrier: the reduction reads every chunk's partial
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t slice = ((H + nt - 1) / nt + 15) / 16 * 16;
    const int64_t lo = tid * slice, hi = lo + slice < H ? lo + slice : H;
    for (int64_t k = lo; k < hi; ++k) out[k] = 0.f;
    for (int64_t ci = 0; ci < num_chunks; ++ci)
      if (used[ci])
        for (int64_t k = lo; k < hi; ++k) out[k] += partial[ci * H + k];
    if (scales.down != nullptr)
      for (int64_t k = lo; k < hi; ++k) out[k] *= scales.down[k];
  }
  for (int kind = 0; kind < 3; ++kind) {
    read[kind] = 0;
    for (int64_t ci = 0; ci < num_chunks; ++ci) read[kind] += chunk_read[3 * ci + kind];
  }
}

// Phase 2 of the batched paths, run by every thread of their parallel region after the barrier
// that ends phase 1: out[t] += h[t, i] * W_down_t[i] for every neuron with any_active[i].
// Each thread owns a contiguous, 16-aligned slice of the hidden dimension, walked
// in blocks of kOutBlockBytes of out (all T rows) so that the block being accumulated stays
// in L1 across every active neuron. NOTE: without the blocking, T rows of a half-H slice
// spill out of L1 from T = 4 (Mistral) / T = 32 (SmolLM2) and every FMA pays an L2 load
// and store of out (docs/benchmarks/kernels.md#native-cpu-kernel-designs).
template <typename D>
void accumulate_down(const float* h, const uint8_t* any_active, const typename D::T* w_down_t,
                     const RowScales& scales, float* out, int64_t T, int64_t H, int64_t I) {
  const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
  const int64_t chunk = ((H + nt - 1) / nt + 15) / 16 * 16;
  const int64_t lo = tid * chunk, hi = lo + chunk < H ? lo + chunk : H;
  if (lo < hi) {
    // The (neuron, row, h) triples with h != 0, compacted once since every block revisits them.
    std::vector<int> ids, offsets{0}, pair_rows;
    std::vector<float> pair_h;
    for (int64_t i = 0; i < I; ++i) {
      if (!any_active[i]) continue;
      ids.push_back((int)i);
      for (int64_t t = 0; t < T; ++t) {
        const float v = h[t * I + i];
        if (v != 0.f) {
          pair_h.push_back(v);
          pair_rows.push_back((int)t);
        }
      }
      offsets.push_back((int)pair_h.size());
    }
    const int64_t per_block = kOutBlockBytes / (int64_t)sizeof(float) / T / 16 * 16;
    const int64_t block = per_block > 64 ? per_block : 64;
    const int num_ids = (int)ids.size();
    for (int64_t b = lo; b < hi; b += block) {
      const int64_t len = b + block < hi ? block : hi - b;
      for (int j = 0; j < num_ids; ++j) {
        const int64_t i = ids[j];
        axpy_many<D>(w_down_t + i * H + b, pair_h.data() + offsets[j], out + b,
                     pair_rows.data() + offsets[j], offsets[j + 1] - offsets[j], H, len,
                     j + 1 < num_ids ? w_down_t + (int64_t)ids[j + 1] * H + b : nullptr);
      }
      if (scales.down != nullptr)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t k = b; k < b + len; ++k) out[t * H + k] *= scales.down[k];
    }
  }
}

#include "sparse_ffn_i8_batch.h"

template <typename D>
void sparse_ffn(const float* x, const typename D::T* w_gate, const typename D::T* w_up,
                const typename D::T* w_down_t, const RowScales& scales, const uint8_t* predicted,
                float* h, uint8_t* active, uint8_t* any_active, float* out, int64_t* read,
                int64_t T, int64_t H, int64_t I, int act, float threshold, int num_threads) {
  if (T == 1) {
    sparse_ffn_row<D>(x, RowSource<D>{w_gate, H}, RowSource<D>{w_up, H}, RowSource<D>{w_down_t, H}, scales,
                      predicted, h, active, out, read, H, I,
                      act, threshold, num_threads);
    return;
  }
  std::memset(out, 0, sizeof(float) * T * H);
  // With a predictor the gate pass prefetches each candidate's up row (dot_rows' AVX2 loop).
  const bool up_ahead = predicted != nullptr && dot_prefetches(H);
  int64_t gate_read = 0, up_read = 0, down_read = 0;
#pragma omp parallel num_threads(num_threads)
  {
    float g[kMaxBatch], a[kMaxBatch], u[kMaxBatch];
    int rows[kMaxBatch], up_rows[kMaxBatch];
    // NOTE: dynamic chunks balance threads when the active neurons cluster in one range.
#pragma omp for schedule(dynamic, 256) reduction(+ : gate_read, up_read, down_read)
    for (int64_t i = 0; i < I; ++i) {
      int num_rows = 0, num_up = 0;
      for (int64_t t = 0; t < T; ++t) {
        h[t * I + i] = 0.f;
        active[t * I + i] = 0;
        if (predicted == nullptr || predicted[t * I + i] != 0) rows[num_rows++] = (int)t;
      }
      // With a predictor, a predicted neuron usually fires: fetch its up row during the gate.
      gate_read += num_rows > 0;
      up_read += num_rows > 0 && up_ahead;
      if (num_rows > 0)
        dot_many<D>(w_gate + i * H, x, rows, num_rows, H, g,
                    predicted != nullptr ? w_up + i * H : nullptr);
      const float gate_scale = RowScales::at(scales.gate, i);
      for (int j = 0; j < num_rows; ++j) {
        const float v = activate(act, g[j] * gate_scale, threshold);
        if (v != 0.f) {
          a[num_up] = v;
          up_rows[num_up++] = rows[j];
        }
      }
      bool any = false;
      if (num_up > 0) {
        // Only rows whose gate survived read the up row (and only if at least one did).
        up_read += !up_ahead;
        dot_many<D>(w_up + i * H, x, up_rows, num_up, H, u,
                    next_candidate(predicted, i, T, I) < I
                        ? w_gate + next_candidate(predicted, i, T, I) * H : nullptr);
        const float up_scale = RowScales::at(scales.up, i);
        for (int j = 0; j < num_up; ++j) {
          const float uu = u[j] * up_scale;
          const float uj = (act == ACT_DRELU && uu < 0.f) ? 0.f : uu;
          const float v = a[j] * uj;
          h[up_rows[j] * I + i] = v;
          active[up_rows[j] * I + i] = v != 0.f;
          any |= v != 0.f;
        }
      }
      any_active[i] = any;
      down_read += any;   // phase 2 reads exactly these rows (each thread a slice of each)
    }  // implicit barrier: phase 2 reads every neuron's h

    accumulate_down<D>(h, any_active, w_down_t, scales, out, T, H, I);
  }
  read[0] = gate_read;
  read[1] = up_read;
  read[2] = down_read;
}

// out[t, n] = dot(w[n], x[t]) for a dense [N, K] weight: the predictor's two small GEMVs, which
// torch runs slowly for 16-bit weights on CPUs without bf16 units.
template <typename D>
void linear_rows(const float* x, const typename D::T* w, const float* scale, float* out, int64_t T,
                 int64_t K, int64_t N, int num_threads) {
  int rows[kMaxBatch];
  for (int t = 0; t < T; ++t) rows[t] = t;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t n = 0; n < N; ++n) {
    float acc[kMaxBatch];
    dot_many<D>(w + n * K, x, rows, (int)T, K, acc, n + 1 < N ? w + (n + 1) * K : nullptr);
    const float s = RowScales::at(scale, n);
    for (int64_t t = 0; t < T; ++t) out[t * N + n] = acc[t] * s;
  }
}

}  // namespace

extern "C" {

// out [T, N] float32 = (x [T, K] float32 @ w [N, K].T) * scale [N]; same dtype codes and return
// codes as below; scale is read for int8 weights only (may be null otherwise).
int linear_cpu(const float* x, const void* w, const float* scale, float* out, int64_t T, int64_t K,
               int64_t N, int dtype, int num_threads) {
  if (T > kMaxBatch) return 2;
  switch (dtype) {
    case 0: linear_rows<F32>(x, static_cast<const float*>(w), nullptr, out, T, K, N, num_threads); return 0;
    case 1: linear_rows<BF16>(x, static_cast<const uint16_t*>(w), nullptr, out, T, K, N, num_threads); return 0;
    case 2: linear_rows<F16>(x, static_cast<const uint16_t*>(w), nullptr, out, T, K, N, num_threads); return 0;
    case 3:
      if (scale == nullptr) return 3;
      linear_rows<I8>(x, static_cast<const int8_t*>(w), scale, out, T, K, N, num_threads);
      return 0;
    default: return 1;
  }
}

// dtype: 0 = float32, 1 = bfloat16, 2 = float16, 3 = int8 with fp32 scales, 4 = 4-bit rows
// (int4_rows.h: I rows of H each, for all three weights) with fp32 scales; x, h and out are
// always float32. scale_gate/up [I] (per neuron) and scale_down [H] (per hidden channel): read for
// int8 / 4-bit only (may be null otherwise); for 4-bit rows scale_down is per neuron [I]
// (RowScales::down_neuron). x_bits (int8 / 4-bit only): the grid of x for the
// gate and up dot products, 16 or 8 (int8_rows.h). read [3] (written): the gate, up and down rows
// the kernel read or prefetched.
// Returns 0 on success, 1 for an unsupported dtype, 2 for T > kMaxBatch, 3 for int8 without
// scales, 4 for unsupported x_bits.
int sparse_ffn_cpu(const float* x, const void* w_gate, const void* w_up, const void* w_down_t,
                   const float* scale_gate, const float* scale_up, const float* scale_down,
                   const uint8_t* predicted, float* h, uint8_t* active, uint8_t* any_active,
                   float* out, int64_t* read, int64_t T, int64_t H, int64_t I, int act,
                   float threshold, int dtype, int x_bits, int num_threads) {
  if (T > kMaxBatch) return 2;
  if ((dtype == 3 || dtype == 4) && x_bits != 16 && x_bits != 8) return 4;
  const RowScales none;
  switch (dtype) {
    case 0:
      sparse_ffn<F32>(x, static_cast<const float*>(w_gate), static_cast<const float*>(w_up),
                      static_cast<const float*>(w_down_t), none, predicted, h, active, any_active,
                      out, read, T, H, I, act, threshold, num_threads);
      return 0;
    case 1:
      sparse_ffn<BF16>(x, static_cast<const uint16_t*>(w_gate),
                       static_cast<const uint16_t*>(w_up), static_cast<const uint16_t*>(w_down_t),
                       none, predicted, h, active, any_active, out, read, T, H, I, act, threshold,
                       num_threads);
      return 0;
    case 2:
      sparse_ffn<F16>(x, static_cast<const uint16_t*>(w_gate), static_cast<const uint16_t*>(w_up),
                      static_cast<const uint16_t*>(w_down_t), none, predicted, h, active,
                      any_active, out, read, T, H, I, act, threshold, num_threads);
      return 0;
    case 3:
    case 4: {
      if (scale_gate == nullptr || scale_up == nullptr || scale_down == nullptr) return 3;
      RowScales scales;
      scales.gate = scale_gate;
      scales.up = scale_up;
      (dtype == 4 ? scales.down_neuron : scales.down) = scale_down;
      auto rows = [&](const void* w) { return int8_rows::WeightRows(w, H, dtype == 4 ? 4 : 8); };
      if (T == 1) {
        // NOTE: one row takes the row path, on x's grid (the values the tiles' integer dots see)
        // and with h exact: the batched path measured slower there in a served step (11.2-11.8
        // vs 8.9-10.1 ms per SmolLM2 decode step: its barriers and its down pass by channel
        // slices, where the row path streams each active down row once; 4-bit rows: 7.9 ms of
        // the layers' share of a step through the tiles, 6.8 on the row path, 5.7 once its gate
        // and up dots became integer sums).
        const int64_t ld = (H + 31) / 32 * 32;   // row_dot16's steps
        std::vector<int16_t> xq(ld);
        std::vector<float> xg(H);
        const float step = int8_rows::quantize_row(x, H, ld, int8_rows::x_max(H, x_bits), 0, xq.data(),
                                                   [](float v) { return v; });
        for (int64_t k = 0; k < H; ++k) xg[k] = static_cast<float>(xq[k]) * step;
        auto source = [&](const void* w) { return RowSource<I8>{w, H, dtype == 4}; };
        sparse_ffn_row<I8>(xg.data(), source(w_gate), source(w_up), source(w_down_t), scales, predicted, h,
                           active, out, read, H, I, act, threshold, num_threads, xq.data(), step);
      } else {
        sparse_ffn_i8_batch(x, rows(w_gate), rows(w_up), rows(w_down_t), scales, predicted, h, active,
                            any_active, out, read, T, H, I, act, threshold, x_bits, num_threads);
      }
      return 0;
    }
    default:
      return 1;
  }
}

int sparse_ffn_cpu_max_batch() { return kMaxBatch; }

// What the rows-read counts depend on besides the inputs (for tests that recount them from the
// inputs): whether this build prefetches (its AVX2 loops), and the batch-1 path's chunk size.
int sparse_ffn_cpu_prefetches() { return kPrefetches ? 1 : 0; }
int sparse_ffn_cpu_row_chunk() { return static_cast<int>(kRowChunk); }

}  // extern "C"
