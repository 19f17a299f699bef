// The batched sparse FFN on int8 rows (2+ rows): gate and up in register tiles on x's grid
// (int8_rows.h), the activation 16 rows at a time, and the down products on h's grid in neuron
// pairs. Part of sparse_ffn_cpu.cpp's translation unit, included inside its anonymous namespace
// after the shared pieces it uses: Act codes, activate(), RowScales, I8 and accumulate_down<I8>
// (the down path of builds without AVX-512BW). The weights are int8 rows, or 4-bit rows decoded
// to the same int8 values (int4_rows.h): a tile's rows into a scratch, a down slice in registers.
#pragma once

#if defined(__AVX512F__)
// e^x in 16 lanes: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact n ln2),
// e^r by Cephes' degree-6 polynomial, times 2^n (vscalefps): within 1 ulp of glibc's expf on
// [-100, 88] (checked every 7e-4), and 0 / inf past the float range as expf.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(89.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// v[0:n] = activate(act, v[k], threshold), in place; 16 lanes at a time where AVX-512 is built
// (the batched int8 path runs it on every gate value: one scalar expf per value measured ~10 ns).
inline void activate_n(int act, float* v, int64_t n, float threshold) {
#if defined(__AVX512F__)
  const __m512 thr = _mm512_set1_ps(threshold), zero = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = int8_rows::lanes16(n - k);
    const __m512 g = _mm512_maskz_loadu_ps(m, v + k);
    __m512 r;
    if (act == ACT_SILU) {
      const __m512 sg = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(zero, g))));
      r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_abs_ps(sg), thr, _CMP_GT_OQ), sg);
    } else {
      r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(g, act == ACT_FATRELU ? thr : zero, _CMP_GT_OQ), g);
    }
    _mm512_mask_storeu_ps(v + k, m, r);
  }
#else
  for (int64_t k = 0; k < n; ++k) v[k] = activate(act, v[k], threshold);
#endif
}

// Whether v[0:n] holds a value other than 0 (a NaN counts, as v[t] != 0.f says), 16 lanes at a
// time where AVX-512 is built (the gate pass asks it of every candidate neuron, n = the rows).
inline bool any_nonzero(const float* v, int64_t n) {
#if defined(__AVX512F__)
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = int8_rows::lanes16(n - k);
    if (_mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, v + k), _mm512_setzero_ps(), _CMP_NEQ_UQ) != 0)
      return true;
  }
  return false;
#else
  for (int64_t k = 0; k < n; ++k)
    if (v[k] != 0.f) return true;
  return false;
#endif
}

// Phase 2 for int8 weights at 2+ rows: the down products on h's grid. Each row of h [T, I] is put on its
// own 16-bit grid (int8_rows.h x_max(I): h ~= hq * step[t]; kernels/sparse_ffn_ref.py does the
// same), and the neurons active in some row are taken in pairs, hq of a pair packed as two int16
// in one int32 per row (hp [pairs, T]) so that one vpdpwssd adds both neurons' products to 16
// hidden channels. NOTE: about half the instructions of the fp32 outer products it replaced
// (weights widened to fp32, one FMA per neuron), which took half of a 16-row w8a8 FFN call; the
// FFN call went 0.445 -> 0.368 ms.
struct DownPairs {
  std::vector<int> ids;        // [2 * pairs]: the two neurons of each pair (an odd one out pairs with itself, hq 0)
  std::vector<int32_t> hp;     // [pairs, T]: (hq[a, t] & 0xffff) | (hq[b, t] << 16)
  std::vector<float> step;     // [T]
  int num_pairs = 0;
};

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define SPARSE_FFN_PAIR_TILES 1
inline __m512i dot_pairs(__m512i acc, __m512i w, __m512i x) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, w, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}

// Pairs summed in int32 before a flush to fp32: a lane then holds at most 2048 products of |w| <=
// 127 and |hq| <= 8191, under 2^31 for any I.
constexpr int kPairsPerFlush = 1024;

// The 32 int8 values of W_down_t[i, k0 : k0 + 32] (k0 a multiple of 32, so one 4-bit group).
template <bool kInt4>
inline __m256i load_down32(const int8_rows::WeightRows& w, int64_t i, int64_t k0) {
  const uint8_t* row = w.raw(i);
  if constexpr (kInt4)
    return int4_rows::decode_group(row + k0 / 2, row[int4_rows::num_groups(w.K) * 16 + k0 / int4_rows::kGroup]);
  else
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k0));
}

// out[t0 + r, k0 : k0 + 32] = (sum over pairs p of W_down_t[a_p, k] hq[a_p, t] + W_down_t[b_p, k]
// hq[b_p, t]) * step[t] * scale[k] for r < MR. A pair's two 32-byte weight slices are widened to
// int16 and interleaved (unpacklo/hi: lanes of channels 8L..8L+3 and 8L+4..8L+7 of each 128-bit
// lane L), so the accumulators hold the channels permuted; the permutation is undone once, at
// the store.
template <int MR, bool kInt4>
void down_tile_pairs(const int8_rows::WeightRows& w_down_t, const DownPairs& dp, int64_t T, int64_t t0, int64_t H,
                     int64_t k0, const float* scale, float* out) {
  __m512 f_lo[MR], f_hi[MR];
  for (int r = 0; r < MR; ++r) f_lo[r] = f_hi[r] = _mm512_setzero_ps();
  for (int p0 = 0; p0 < dp.num_pairs; p0 += kPairsPerFlush) {
    const int p1 = dp.num_pairs - p0 < kPairsPerFlush ? dp.num_pairs : p0 + kPairsPerFlush;
    __m512i lo[MR], hi[MR];
    for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm512_setzero_si512();
    for (int p = p0; p < p1; ++p) {
      const __m512i wa = _mm512_cvtepi8_epi16(load_down32<kInt4>(w_down_t, dp.ids[2 * p], k0));
      const __m512i wb = _mm512_cvtepi8_epi16(load_down32<kInt4>(w_down_t, dp.ids[2 * p + 1], k0));
      const __m512i wl = _mm512_unpacklo_epi16(wa, wb), wh = _mm512_unpackhi_epi16(wa, wb);
      const int32_t* h = dp.hp.data() + (int64_t)p * T + t0;
      for (int r = 0; r < MR; ++r) {
        const __m512i hb = _mm512_set1_epi32(h[r]);
        lo[r] = dot_pairs(lo[r], wl, hb);
        hi[r] = dot_pairs(hi[r], wh, hb);
      }
    }
    for (int r = 0; r < MR; ++r) {
      f_lo[r] = _mm512_add_ps(f_lo[r], _mm512_cvtepi32_ps(lo[r]));
      f_hi[r] = _mm512_add_ps(f_hi[r], _mm512_cvtepi32_ps(hi[r]));
    }
  }
  const __m512 s0 = scale != nullptr ? _mm512_loadu_ps(scale + k0) : _mm512_set1_ps(1.f);
  const __m512 s1 = scale != nullptr ? _mm512_loadu_ps(scale + k0 + 16) : _mm512_set1_ps(1.f);
  for (int r = 0; r < MR; ++r) {
    // [lo L0, hi L0, lo L1, hi L1] = channels 0..15, [lo L2, hi L2, lo L3, hi L3] = 16..31
    const __m512 a = _mm512_shuffle_f32x4(f_lo[r], f_hi[r], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 b = _mm512_shuffle_f32x4(f_lo[r], f_hi[r], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512 st = _mm512_set1_ps(dp.step[t0 + r]);
    float* o = out + (t0 + r) * H + k0;
    _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_mul_ps(_mm512_shuffle_f32x4(a, a, _MM_SHUFFLE(3, 1, 2, 0)), st), s0));
    _mm512_storeu_ps(o + 16, _mm512_mul_ps(_mm512_mul_ps(_mm512_shuffle_f32x4(b, b, _MM_SHUFFLE(3, 1, 2, 0)), st), s1));
  }
}

using DownTileFn = void (*)(const int8_rows::WeightRows&, const DownPairs&, int64_t, int64_t, int64_t, int64_t,
                            const float*, float*);

template <bool kInt4>
constexpr DownTileFn down_tile_for(int mr) {
  return mr == 1 ? down_tile_pairs<1, kInt4> : mr == 2 ? down_tile_pairs<2, kInt4> : mr == 3 ? down_tile_pairs<3, kInt4>
         : mr == 4 ? down_tile_pairs<4, kInt4> : mr == 5 ? down_tile_pairs<5, kInt4> : down_tile_pairs<6, kInt4>;
}

constexpr int kDownRows = 6;   // out rows per tile: 6 x 2 int32 + 6 x 2 fp32 accumulators + 5 vectors
#endif

// hq of pair p's first (half 0) or second (half 1) neuron in row t.
inline int32_t hq_of(const DownPairs& dp, int64_t p, int64_t T, int64_t t, int half) {
  const int32_t v = dp.hp[p * T + t];
  return half == 0 ? static_cast<int16_t>(v & 0xffff) : static_cast<int16_t>(static_cast<uint32_t>(v) >> 16);
}

// out[t, k] for k in [lo, hi), every row t, one integer sum per element (the pair tiles' tails,
// and the 4-bit down path of builds without AVX-512BW).
void down_scalar(const DownPairs& dp, const int8_rows::WeightRows& w_down_t, const RowScales& scales, float* out,
                 int64_t T, int64_t H, int64_t lo, int64_t hi) {
  for (int64_t k = lo; k < hi; ++k)
    for (int64_t t = 0; t < T; ++t) {
      int64_t acc = 0;
      for (int p = 0; p < dp.num_pairs; ++p)
        acc += (int64_t)hq_of(dp, p, T, t, 0) * w_down_t.value(dp.ids[2 * p], k) +
               (int64_t)hq_of(dp, p, T, t, 1) * w_down_t.value(dp.ids[2 * p + 1], k);
      out[t * H + k] = static_cast<float>(acc) * dp.step[t] * RowScales::at(scales.down, k);
    }
}

// Phase 2 for int8 weights (every thread of the parallel region, after dp is built): threads own
// 32-aligned slices of the hidden dimension; AVX-512 builds run the pair tiles above, others
// accumulate_down's axpy path on h [T, I] (which holds the grid's values, hq * step) for int8
// rows and down_scalar for 4-bit ones.
void accumulate_down_i8(const DownPairs& dp, const float* h, const uint8_t* any_active,
                        const int8_rows::WeightRows& w_down_t, const RowScales& scales, float* out, int64_t T,
                        int64_t H, int64_t I) {
  const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
  const int64_t slice = ((H + nt - 1) / nt + 31) / 32 * 32;
  const int64_t lo = tid * slice, hi = lo + slice < H ? lo + slice : H;
#if defined(SPARSE_FFN_PAIR_TILES)
  (void)h;
  (void)any_active;
  (void)I;
  if (lo >= hi) return;
  const int64_t vec_end = lo + (hi - lo) / 32 * 32;
  for (int64_t k0 = lo; k0 < vec_end; k0 += 32)
    for (int64_t t0 = 0; t0 < T; t0 += kDownRows) {
      const int mr = (int)(T - t0 < kDownRows ? T - t0 : kDownRows);
      (w_down_t.bits == 4 ? down_tile_for<true>(mr) : down_tile_for<false>(mr))(w_down_t, dp, T, t0, H, k0,
                                                                                scales.down, out);
    }
  down_scalar(dp, w_down_t, scales, out, T, H, vec_end, hi);   // H not a multiple of 32: the tail
#else
  if (w_down_t.bits == 4) {
    down_scalar(dp, w_down_t, scales, out, T, H, lo, hi);
    return;
  }
  accumulate_down<I8>(h, any_active, static_cast<const int8_t*>(w_down_t.base), scales, out, T, H, I);
#endif
}

// Batch > 1 with int8 weights: phase 1 in register tiles (int8_rows.h) of 4 neurons x up to 6
// batch rows, instead of one neuron's dot products at a time. Threads take chunks of kI8Chunk
// neurons; in a chunk, the gate rows of the candidates (all neurons, or those some row predicts)
// are read once for every batch row, then the up rows of the neurons whose gate survived for
// some (predicted) row, again for every row. The chunk's activated gates wait in a [neuron][row]
// buffer between the two passes, activated 16 rows per instruction (activate_n), and h is kept
// neuron-major (hn) for phase 2's broadcasts.
// NOTE: a tile computes all T rows of its neurons, also rows that were not predicted or whose
// gate failed (their products are discarded): compute, not bytes, and at 2+ rows the per-neuron
// dots were compute-bound (measured 2.8x slower than these tiles at 16 rows on SmolLM2's FFN:
// docs/benchmarks/quantization.md). A tile prefetches the next tile's rows, which its pass reads
// anyway: each count is the rows read.
// NOTE: per (neuron, row) work outside the tiles (a scalar expf per gate, h written [T, I] and
// repacked [I, T] by every thread for phase 2) took half of a 16-row w8a8 FFN call before it
// moved to the buffers above.
constexpr int64_t kI8Chunk = 64;

// use(j, t, dot) for every listed neuron ids[j], j < n, and batch row t < T: dot = W[ids[j]] . x[t]
// with x[t] on its grid (xr; int8_rows.h), unscaled by W's row scales; the neurons kTileN and
// the rows kTileM at a time in register tiles.
// scratch: int8_rows::kTileN * int4_rows::padded(H) bytes (4-bit rows decoded there, where the
// tiles do not decode them in registers: more than one group of x rows).
template <typename Use>
inline void for_each_tile_dot(const int8_rows::WeightRows& w, const int* ids, int n, const int8_rows::XRows& xr,
                              int64_t T, int64_t H, int8_t* scratch, Use&& use) {
  using int8_rows::kTileM;
  using int8_rows::kTileN;
  int64_t acc[kTileN][kTileM];
  const bool in_registers = w.bits == 4 && int8_rows::XRows::decodes_int4() && T <= kTileM;
  for (int j = 0; j < n; j += kTileN) {
    const int nr = n - j < kTileN ? n - j : kTileN;
    const int8_t* rows[kTileN];
    int8_rows::prefetch_tile([&](int64_t i) { return w.raw(ids[i]); }, j + kTileN, n, w.stride());
    for (int k = 0; k < nr; ++k)
      rows[k] = in_registers ? reinterpret_cast<const int8_t*>(w.raw(ids[j + k]))
                             : w.row(ids[j + k], scratch + k * int4_rows::padded(H));
    int64_t wsum[kTileN] = {int8_rows::kNoSum};
    for (int64_t m = 0; m < T; m += kTileM) {
      const int mr = (int)(T - m < kTileM ? T - m : kTileM);
      xr.dot(rows, nr, m, mr, acc, wsum, in_registers);
      for (int k = 0; k < nr; ++k)
        for (int r = 0; r < mr; ++r) use(j + k, m + r, static_cast<float>(acc[k][r]) * xr.step(m + r));
    }
  }
}

void sparse_ffn_i8_batch(const float* x, const int8_rows::WeightRows& w_gate, const int8_rows::WeightRows& w_up,
                         const int8_rows::WeightRows& w_down_t, const RowScales& scales, const uint8_t* predicted,
                         float* h, uint8_t* active, uint8_t* any_active, float* out, int64_t* read,
                         int64_t T, int64_t H, int64_t I, int act, float threshold, int x_bits,
                         int num_threads) {
  // NOTE: AVX-512 builds write every element of out in phase 2; AVX2 ones add to it
  std::memset(out, 0, sizeof(float) * T * H);
  const int64_t num_chunks = (I + kI8Chunk - 1) / kI8Chunk;
  int64_t gate_read = 0, up_read = 0, down_read = 0;
  int8_rows::XRows xr;   // x on its grid (int8_rows.h), for the gate and up tiles
  xr.reset(T, H, x_bits);
  // h neuron-major, hn[i * T + t]: written for the neurons whose up row was read
  std::unique_ptr<float[]> hn(new float[I * T]);
  std::vector<float> chunk_amax(num_chunks * T, 0.f);   // max |h| per chunk and row (NaN sticks)
  DownPairs dp;
  std::vector<float> inv(T);   // 1 / h's grid step per row (0 for a zero row)
  const int qmax = int8_rows::x_max(I, 16);
#pragma omp parallel num_threads(num_threads)
  {
    int ids[kI8Chunk], alive[kI8Chunk];
    std::vector<float> gate(kI8Chunk * T);   // the chunk's activated gates, [position in ids][t]
    // the chunk's alive neurons' nonzero rows, 16 rows a mask: [position in alive][t / 16]
    const int64_t groups16 = (T + 15) / 16;
    std::vector<uint16_t> nz_masks;
#if defined(SPARSE_FFN_PAIR_TILES)
    nz_masks.resize(kI8Chunk * groups16);
#endif
    std::vector<int8_t> scratch(w_gate.bits == 4 ? int8_rows::kTileN * int4_rows::padded(H) : 0);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) xr.quantize(t, x + t * H, [](float v) { return v; });
#pragma omp for schedule(dynamic, 1) reduction(+ : gate_read, up_read, down_read)
    for (int64_t ci = 0; ci < num_chunks; ++ci) {
      const int64_t c = ci * kI8Chunk, end = c + kI8Chunk < I ? c + kI8Chunk : I, len = end - c;
      uint8_t candidate[kI8Chunk];
      std::memset(candidate, predicted == nullptr ? 1 : 0, len);
      std::memset(any_active + c, 0, len);
      for (int64_t t = 0; t < T; ++t) {
        std::memset(active + t * I + c, 0, len);
        if (predicted != nullptr)
          for (int64_t i = c; i < end; ++i) candidate[i - c] |= predicted[t * I + i];
      }
      int num_ids = 0;
      for (int64_t i = c; i < end; ++i)
        if (candidate[i - c]) ids[num_ids++] = (int)i;
      gate_read += num_ids;
      // Gate pass: the activated gate of every row, 0 in the rows not predicted.
      for_each_tile_dot(w_gate, ids, num_ids, xr, T, H, scratch.data(), [&](int j, int64_t t, float g) {
        gate[j * T + t] = g * RowScales::at(scales.gate, ids[j]);
      });
      int num_alive = 0;
      for (int j = 0; j < num_ids; ++j) {    // keep the neurons some row's gate let through
        float* g = gate.data() + j * T;
        activate_n(act, g, T, threshold);
        if (predicted != nullptr)
          for (int64_t t = 0; t < T; ++t) g[t] = predicted[t * I + ids[j]] ? g[t] : 0.f;
        if (any_nonzero(g, T)) alive[num_alive++] = j;
      }
      up_read += num_alive;
      int alive_ids[kI8Chunk];
      for (int k = 0; k < num_alive; ++k) alive_ids[k] = ids[alive[k]];
      // Up pass: h = activated gate * up (dReLU: * relu(up)), where the gate let it through.
      for_each_tile_dot(w_up, alive_ids, num_alive, xr, T, H, scratch.data(), [&](int k, int64_t t, float dot) {
        const float a = gate[alive[k] * T + t];
        const float u = dot * RowScales::at(scales.up, alive_ids[k]);
        // h times its down row's scale where that is per neuron (4-bit rows; RowScales), which
        // then goes onto h's grid with it; never 0, so h's zeros stay put
        hn[(int64_t)alive_ids[k] * T + t] =
            a * ((act == ACT_DRELU && u < 0.f) ? 0.f : u) * RowScales::at(scales.down_neuron, alive_ids[k]);
      });
      float* amax = chunk_amax.data() + ci * T;
      for (int k = 0; k < num_alive; ++k) {
        const int64_t i = alive_ids[k];
        const float* v = hn.get() + i * T;
        bool any = false;
#if defined(SPARSE_FFN_PAIR_TILES)
        for (int64_t t0 = 0; t0 < T; t0 += 16) {   // 16 rows per instruction; NaN kept as max_abs does
          const __mmask16 m = int8_rows::lanes16(T - t0);
          const __m512 x = _mm512_maskz_loadu_ps(m, v + t0);
          const __mmask16 nz = _mm512_mask_cmp_ps_mask(m, x, _mm512_setzero_ps(), _CMP_NEQ_UQ);
          const __mmask16 nan = _mm512_mask_cmp_ps_mask(m, x, x, _CMP_UNORD_Q);
          const __m512 a = _mm512_maskz_loadu_ps(m, amax + t0);
          __m512 r = _mm512_max_ps(_mm512_abs_ps(x), a);   // a wherever x is NaN
          r = _mm512_mask_mov_ps(r, nan | _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), _mm512_set1_ps(NAN));
          _mm512_mask_storeu_ps(amax + t0, m, r);
          any |= nz != 0;
          nz_masks[k * groups16 + t0 / 16] = nz;
        }
#else
        for (int64_t t = 0; t < T; ++t) {
          active[t * I + i] = v[t] != 0.f;
          any |= v[t] != 0.f;
          amax[t] = int8_rows::max_abs(amax[t], v[t]);
        }
#endif
        any_active[i] = any;
        down_read += any;
      }
#if defined(SPARSE_FFN_PAIR_TILES)
      // NOTE: row by row, each row's flags within one chunk's bytes: written neuron by neuron,
      // every flag was a store to another row's cache line (T * I scattered stores per call,
      // ~8% of a 16-prompt prefill)
      for (int64_t t = 0; t < T; ++t) {
        uint8_t* row = active + t * I;
        const int64_t g = t / 16, bit = t % 16;
        for (int k = 0; k < num_alive; ++k) row[alive_ids[k]] = (nz_masks[k * groups16 + g] >> bit) & 1;
      }
#endif
    }  // implicit barrier: every neuron's h is known
#pragma omp single
    {   // h's grid per row (int8_rows.h Grid, as x's) and the active neurons in pairs
      dp.step.assign(T, 0.f);
      std::vector<float> row_amax(T, 0.f);
#if defined(SPARSE_FFN_PAIR_TILES)
      // 16 rows per instruction (serial code: the other threads wait); NaN sticks as in max_abs
      for (int64_t t0 = 0; t0 < T; t0 += 16) {
        const __mmask16 m = int8_rows::lanes16(T - t0);
        __m512 r = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int64_t ci = 0; ci < num_chunks; ++ci) {
          const __m512 a = _mm512_maskz_loadu_ps(m, chunk_amax.data() + ci * T + t0);
          nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
          r = _mm512_max_ps(r, a);
        }
        _mm512_mask_storeu_ps(row_amax.data() + t0, m, _mm512_mask_mov_ps(r, nan, _mm512_set1_ps(NAN)));
      }
#else
      for (int64_t ci = 0; ci < num_chunks; ++ci)
        for (int64_t t = 0; t < T; ++t) row_amax[t] = int8_rows::max_abs(row_amax[t], chunk_amax[ci * T + t]);
#endif
      for (int64_t t = 0; t < T; ++t) {
        const int8_rows::Grid g(row_amax[t], qmax);
        dp.step[t] = g.step;
        inv[t] = g.inv;
      }
      dp.ids.clear();
      for (int64_t i = 0; i < I; ++i)
        if (any_active[i]) dp.ids.push_back((int)i);
      if (dp.ids.size() % 2 == 1) dp.ids.push_back(dp.ids.back());   // the odd one pairs with itself, hq 0
      dp.num_pairs = (int)dp.ids.size() / 2;
      dp.hp.resize((size_t)dp.num_pairs * T);
    }  // implicit barrier
#pragma omp for schedule(static)
    for (int p = 0; p < dp.num_pairs; ++p) {
      const int64_t a = dp.ids[2 * p], b = dp.ids[2 * p + 1];
#if defined(SPARSE_FFN_PAIR_TILES)
      // 16 rows per instruction: vcvtps2dq rounds to nearest even as nearbyint does, and turns a
      // NaN (a row with step NaN) into 0x80000000, whose low 16 bits, and that shifted left by
      // 16, are 0: the row's hq stay 0 as below
      for (int64_t t0 = 0; t0 < T; t0 += 16) {
        const __mmask16 m = int8_rows::lanes16(T - t0);
        const __m512 iv = _mm512_maskz_loadu_ps(m, inv.data() + t0);
        const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, hn.get() + a * T + t0), iv));
        const __m512i qb = b == a ? _mm512_setzero_si512()
                                  : _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, hn.get() + b * T + t0), iv));
        const __m512i packed = _mm512_or_si512(_mm512_and_si512(qa, _mm512_set1_epi32(0xffff)), _mm512_slli_epi32(qb, 16));
        _mm512_mask_storeu_epi32(dp.hp.data() + (int64_t)p * T + t0, m, packed);
      }
#else
      for (int64_t t = 0; t < T; ++t) {
        // inv 0: a zero row, or one with a NaN / inf (step NaN), whose hq stay 0
        auto q = [&](int64_t i) { return inv[t] != 0.f ? static_cast<int32_t>(std::nearbyint(hn[i * T + t] * inv[t])) : 0; };
        const int32_t qa = q(a);
        const int32_t qb = b == a ? 0 : q(b);
        dp.hp[(int64_t)p * T + t] = (qa & 0xffff) | static_cast<int32_t>(static_cast<uint32_t>(qb) << 16);
        // the axpy down path (accumulate_down) reads h [T, I]: the grid's values
        h[t * I + a] = static_cast<float>(qa) * dp.step[t];
        if (b != a) h[t * I + b] = static_cast<float>(qb) * dp.step[t];
      }
#endif
    }  // implicit barrier: phase 2 reads every pair
    accumulate_down_i8(dp, h, any_active, w_down_t, scales, out, T, H, I);
  }
  read[0] = gate_read;
  read[1] = up_read;
  read[2] = down_read;
}
